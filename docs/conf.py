"""Sphinx configuration of sparsejax's documentation (built offline, warnings as errors)."""

import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))

import sparsejax  # noqa: E402  pylint: disable=g-import-not-at-top


def _write_api_page() -> None:
  """docs/api.md: the package and every public submodule, so none can be left out."""
  modules = ["sparsejax"] + sorted(
      {f"sparsejax.{name}" for name in sparsejax.__all__
       if isinstance(getattr(sparsejax, name), type(sparsejax))} | {"sparsejax.checkpoint"})
  lines = ["# API reference", "", "Every public name of `sparsejax`, from its docstring.", ""]
  for module in modules:
    lines += [f"## `{module}`", "", "```{eval-rst}", f".. automodule:: {module}", "   :members:",
              "```", ""]
  text = "\n".join(lines)
  _write_if_changed(os.path.join(os.path.dirname(os.path.abspath(__file__)), "api.md"), text)


def _write_config_page() -> None:
  """docs/configs.md: every config of experiments/configs, its keys commented in its source."""
  here = os.path.dirname(os.path.abspath(__file__))
  folder = os.path.join(here, "..", "experiments", "configs")
  names = sorted(name for name in os.listdir(folder)
                 if name.endswith(".py") and name != "__init__.py")
  lines = ["# Experiment configs", "",
           "Every key of the binaries' ml_collections configs, as the config files set and "
           "comment them. `default.py` holds every key `experiments.train` reads; the others "
           "override some of them (or, for the other binaries, add their own). Override any "
           "key on the command line: `--config.pruning.sparsity=0.95`; a key that does not "
           "exist is an error naming it.", ""]
  lines += [f"- [`{name}`](#{name.replace('.', '')})" for name in names]
  lines.append("")
  for name in names:
    lines += [f"## {name}", "", "```{literalinclude} ../experiments/configs/" + name,
              ":language: python", "```", ""]
  _write_if_changed(os.path.join(here, "configs.md"), "\n".join(lines))


def _write_if_changed(path: str, text: str) -> None:
  if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)


_write_api_page()
_write_config_page()

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
myst_heading_anchors = 4
html_theme = "alabaster"
html_title = "sparsejax"
suppress_warnings = ["myst.header"]


def _escape_plain_text(app, what, name, obj, options, lines):
  """Docstrings are plain text with |w| and a * b: keep RST from reading them as markup.

  `|` starts a substitution, `*` emphasis and a trailing `_` a link in
  reStructuredText; all are escaped outside doctest lines and literal blocks.
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
      lines[i] = re.sub(r"(\w)_(?=\W|$)", r"\1\\_", lines[i])  # s_ is no link target
    if stripped.endswith("::"):
      literal = True


def setup(app):
  app.connect("autodoc-process-docstring", _escape_plain_text)
