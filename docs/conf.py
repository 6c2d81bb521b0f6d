"""Sphinx configuration of sparsejax's documentation (built offline, warnings as errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "sparsejax"
author = "the sparsejax authors"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # Attributes: as fields, so NamedTuple fields are not described twice
myst_heading_anchors = 3
html_theme = "alabaster"
html_title = "sparsejax"
suppress_warnings = ["myst.header"]


def _escape_plain_text(app, what, name, obj, options, lines):
  """Docstrings are plain text with |w| and a * b: keep RST from reading them as markup.

  `|` starts a substitution and `*` emphasis in reStructuredText; both are
  escaped outside doctest lines and literal blocks.
  """
  del app, what, name, obj, options
  literal = False
  for i, line in enumerate(lines):
    stripped = line.strip()
    if stripped.startswith((">>>", "...")):
      continue
    if literal and line and not line[0].isspace():
      literal = False
    if not literal:
      lines[i] = line.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
    if stripped.endswith("::"):
      literal = True


def setup(app):
  app.connect("autodoc-process-docstring", _escape_plain_text)
