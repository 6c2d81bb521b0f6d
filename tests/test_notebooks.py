"""Every notebook runs top to bottom (small settings, offline) from notebooks/, as Jupyter
opens it, and is stored without outputs."""

import json
import os
import subprocess
import sys

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
# Small settings injected after each notebook's parameters cell.
SMALL = {
    "quickstart.ipynb": {"TRAIN_STEPS": 40},
    "lottery.ipynb": {"TINY_LEVELS": 2, "TINY_EPOCHS": 2},
    "nm_sparsity.ipynb": {"TINY_METHODS": ("srste", "sdgf_geometric"), "TINY_STEPS": 24},
    "sparse_training.ipynb": {"TRAIN_STEPS": 60, "UPDATE_EVERY": 10},
    "oneshot_lm.ipynb": {"TRAIN_STEPS": 40, "CALIBRATION_SEQUENCES": 16, "SPARSITIES": (0.5, 0.7),
                         "PATTERNS": ((2, 4),),
                         "MODEL": {"num_layers": 2, "width": 16, "num_heads": 2, "mlp_dim": 32}},
}


def test_every_notebook_has_small_settings_and_one_parameters_cell():
  assert sorted(SMALL) == sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
  for name in SMALL:
    book = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    tagged = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, name
    for key in SMALL[name]:
      assert f"\n{key} = " in "\n" + tagged[0].source, (name, key)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_is_stored_without_outputs(name):
  with open(os.path.join(NOTEBOOKS, name), encoding="utf-8") as f:
    book = json.load(f)
  for i, cell in enumerate(book["cells"]):
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, (
          f"{name} cell {i} has stored outputs: clear them before committing")


def _user_env():
  """The environment of a user who opens Jupyter: no PYTHONPATH pointing at the repository."""
  return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


_PATH_CELL_END = "  sys.path.insert(0, ROOT)\n"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_imports_experiments_from_the_repository_root_and_from_notebooks(name):
  book = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  index = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
  source = book.cells[index + 1].source  # the first cell after the parameters
  assert _PATH_CELL_END in source, f"{name}: its first code cell must put the root on sys.path"
  prefix = source[:source.index(_PATH_CELL_END) + len(_PATH_CELL_END)]
  check = prefix + ("import importlib.util\n"  # where the imports resolve, without importing jax
                    "print(*(importlib.util.find_spec(m).origin for m in ('experiments', 'sparsejax')))")
  for cwd in (ROOT, NOTEBOOKS):
    out = subprocess.run([sys.executable, "-c", check], cwd=cwd, env=_user_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (name, cwd, out.stderr[-2000:])
    assert out.stdout.split() == [os.path.join(ROOT, "experiments", "__init__.py"),
                                  os.path.join(ROOT, "sparsejax", "__init__.py")], (name, cwd)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.slow  # each notebook runs for 25-60 s
def test_notebook_runs_top_to_bottom(name, tmp_path, digits_dir):
  book = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  index = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
  overrides = dict(SMALL[name])
  source = book.cells[index].source
  if "WORKDIR" in source:
    overrides["WORKDIR"] = str(tmp_path / "workdir")  # absolute: os.path.join keeps it
  if "TRAIN_WORKDIR" in source:
    overrides["TRAIN_WORKDIR"] = str(tmp_path / "train")
  if "DATA_DIR" in source:
    overrides["DATA_DIR"] = digits_dir
  lines = "\n".join(f"{key} = {value!r}" for key, value in overrides.items())
  book.cells.insert(index + 1, nbformat.v4.new_code_cell("# test settings\n" + lines))
  # From notebooks/, without PYTHONPATH: as a user opens it in Jupyter. oneshot_lm's first
  # cell took 550 s on a loaded 2-core machine: hence 1200 s per cell.
  client = nbclient.NotebookClient(book, timeout=1200, kernel_name="python3",  # per cell
                                   resources={"metadata": {"path": NOTEBOOKS}})
  client.execute(env=_user_env())  # raises CellExecutionError, with the failing cell and traceback
  images = sum(1 for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))
  assert images >= 2, f"{name} showed {images} plots"
  if "WORKDIR" in source:
    assert os.path.exists(tmp_path / "workdir" / "final.json")
