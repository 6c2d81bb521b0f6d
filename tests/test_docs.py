"""The documentation site: every public name documented, built offline with warnings as errors."""

import glob
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys

import sparsejax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _public_modules():
  names = ["sparsejax"] + [m.name for m in pkgutil.walk_packages(sparsejax.__path__, "sparsejax.")
                           if not any(p.startswith("_") for p in m.name.split("."))]
  return [importlib.import_module(name) for name in names]


def _public_objects(module):
  """(qualified name, object) of each public function and class a module defines or exports."""
  names = getattr(module, "__all__", None) or [
      n for n, v in vars(module).items() if not n.startswith("_")
      and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module.__name__]
  for name in names:
    value = getattr(module, name)
    if not (inspect.isfunction(value) or inspect.isclass(value)):
      continue
    yield f"{module.__name__}.{name}", value
    if inspect.isclass(value) and value.__module__.startswith("sparsejax"):
      for attribute, member in vars(value).items():
        function = member.fget if isinstance(member, property) else getattr(
            member, "__func__", member)
        if not attribute.startswith("_") and inspect.isfunction(function):
          yield f"{module.__name__}.{name}.{attribute}", getattr(value, attribute)


def test_every_public_function_class_and_method_has_a_docstring():
  undocumented = sorted({name for module in _public_modules()
                         for name, value in _public_objects(module) if not inspect.getdoc(value)})
  assert not undocumented, f"public names without a docstring: {undocumented}"


def test_docs_build_offline_with_warnings_as_errors(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "docs",
       str(tmp_path / "html")], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  api = (tmp_path / "html" / "api.html").read_text()
  modules = [f"sparsejax.{name}" for name in sparsejax.__all__
             if inspect.ismodule(getattr(sparsejax, name))]
  for module in modules + ["sparsejax", "sparsejax.checkpoint"]:
    assert f'id="module-{module}"' in api, module
  for name in ("sparsejax.GradualMagnitudePruning", "sparsejax.oneshot.prune_sequentially",
               "sparsejax.checkpoint.SparseCheckpointManager.latest_step"):
    assert f'id="{name}"' in api, name
  configs = (tmp_path / "html" / "configs.html").read_text()
  config_files = sorted(p for p in os.listdir(os.path.join(ROOT, "experiments", "configs"))
                        if p.endswith(".py") and p != "__init__.py")
  for name in config_files:
    assert f'id="{name.replace(".", "")}"' in configs, name
  for key in ("swap_end_fraction", "fsdp_min_size", "regrow_scope"):   # keys deep in default.py
    assert key in configs, key


def test_readme_is_a_front_page_whose_links_and_the_guides_links_resolve():
  readme = os.path.join(ROOT, "README.md")
  assert sum(1 for _ in open(readme, encoding="utf-8")) < 200
  pages = [readme] + sorted(glob.glob(os.path.join(ROOT, "docs", "guides", "*.md")))
  assert len(pages) > 10
  for page in pages:
    text = open(page, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)#]+?\.(?:md|py|ipynb))(?:#[^)]*)?\)", text):
      if not target.startswith("http"):
        path = os.path.normpath(os.path.join(os.path.dirname(page), target))
        assert os.path.exists(path), f"{os.path.relpath(page, ROOT)} links to missing {target}"
