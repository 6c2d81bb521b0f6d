"""The N:M study binary: its plan of runs, its table, and a tiny study end to end."""

import csv
import os

import pytest

from experiments import config_checks
from experiments import nm_study
from experiments import train
from experiments import workdir as workdir_lib
from experiments.configs import nm_study as nm_study_config
from experiments.configs import sparse_study_lenet5 as sparse_study_config


def _rows():
  # Hand-made results: (method, pattern, seed, accuracy).
  data = [("dense", "dense", 0, 0.98), ("dense", "dense", 1, 0.96),
          ("step", "2:4", 0, 0.90), ("step", "2:4", 1, 0.94),
          ("srste", "2:4", 0, 0.92), ("srste", "2:4", 1, 0.93),
          ("step", "1:8", 0, 0.70), ("step", "1:8", 1, 0.80)]
  return [{"method": m, "pattern": p, "seed": s, "test_accuracy": a} for m, p, s, a in data]


def test_table_gives_mean_min_max_over_seeds_per_method_and_pattern():
  entries = {(e["method"], e["pattern"]): e for e in nm_study.table(_rows())}
  assert entries[("step", "2:4")]["mean"] == pytest.approx(0.92)
  assert entries[("step", "1:8")]["min"] == 0.70 and entries[("step", "1:8")]["max"] == 0.80
  assert entries[("dense", "dense")]["seeds"] == 2
  markdown = nm_study.format_table(nm_study.table(_rows())).splitlines()
  assert markdown[0] == "| method | 2:4 | 1:8 |"
  assert markdown[2] == "| dense (no pruning) | 0.9700 [0.9600, 0.9800] | 0.9700 [0.9600, 0.9800] |"
  assert markdown[3] == "| step | 0.9200 [0.9000, 0.9400] | 0.7500 [0.7000, 0.8000] |"
  assert markdown[4] == "| srste | 0.9250 [0.9200, 0.9300] | - |"


def test_default_study_plans_every_method_pattern_and_seed_plus_dense():
  names = [name for name, _ in nm_study.runs(nm_study_config.get_config())]
  assert len(names) == 2 * (1 + 6 * 2)
  assert "sdgf_geometric_1of8_seed1" in names and "dense_seed0" in names
  planned = dict(nm_study.runs(nm_study_config.get_config()))
  assert planned["mdgf_exp_1of8_seed1"].pruning.nm.n == 1
  assert planned["mdgf_exp_1of8_seed1"].seed == 1
  assert planned["dense_seed1"].pruning.method == "dense"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.study.update(methods=("step", "nm")), r"config.study.methods='nm' is not one of"),
    (lambda c: c.study.update(seeds=()), r"must be non-empty"),
    (lambda c: c.study.update(seeds=(0, 1, 0)),
     r"config.study.seeds=\(0, 1, 0\) repeats \[0\]: each run would be trained once"),
    (lambda c: c.study.update(patterns=((2, 4), (1, 4), (2, 4))), r"config.study.patterns=.* repeats "
     r"\[\(2, 4\)\]"),
    (lambda c: c.study.update(patterns=((2, 4, 8),)), r"each pattern is an \(n, m\) pair"),
    (lambda c: c.__delattr__("study"), r"has a `study` section"),
    (lambda c: c.study.update(patterns=((2, 4), (5, 4))),
     r"study run step_5of4_seed0: config.pruning.nm.n=5 exceeds config.pruning.nm.m=4"),
    (lambda c: c.study.update(patterns=((1, 16),)),  # geometric 8:128 > the ViT's width 64
     r"study run sdgf_geometric_1of16_seed0: config.pruning.nm: 'block_0/attention/key/kernel' "
     r"of shape \(64, 64\): its contraction axes \(0,\) hold 64 entries, not divisible by M=128"),
])
def test_bad_study_config_is_an_error_naming_the_key(edit, message, tmp_path, digits_dir):
  config = nm_study_config.get_config()
  config.data_dir = digits_dir
  edit(config)
  with pytest.raises(config_checks.ConfigError, match=message):
    nm_study.run(config, str(tmp_path / "study"))
  assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_tiny_study_writes_csv_table_and_plot_and_reads_back_when_rerun(digits_dir, tmp_path):
  config = nm_study_config.get_config()
  config.data_dir = digits_dir
  config.model.update(depth=1, hidden_dim=32, mlp_dim=64, num_heads=2)
  config.num_train_steps = 12
  config.warmup_steps = 2
  config.log_every = 6
  config.checkpoint_every = 12
  config.study.methods = ("srste", "sdgf_stepwise")
  config.study.patterns = ((1, 8),)
  config.study.seeds = (3,)
  workdir = str(tmp_path / "study")
  result = nm_study.run(config, workdir, log=lambda _: None)
  assert sorted(os.listdir(workdir)) == [".lock", "config.json", "final.json", "nm_study.png",
                                         "runs", "summary.csv"]
  assert sorted(os.listdir(os.path.join(workdir, "runs"))) == [
      "dense_seed3", "sdgf_stepwise_1of8_seed3", "srste_1of8_seed3"]
  for name in os.listdir(os.path.join(workdir, "runs")):  # --overwrite removes all they hold
    assert workdir_lib.undeclared(os.path.join(workdir, "runs", name), train.RUN_FILES) == []
  with open(os.path.join(workdir, "summary.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["pattern"], r["seed"]) for r in rows] == [
      ("dense", "dense", "3"), ("srste", "1:8", "3"), ("sdgf_stepwise", "1:8", "3")]
  for r in rows[1:]:
    assert float(r["sparsity"]) == pytest.approx(7 / 8)
    assert int(r["max_nonzeros_per_group"]) <= 1
  assert [e["mean"] for e in result["table"]] == [float(r["test_accuracy"]) for r in rows]
  mtime = os.path.getmtime(os.path.join(workdir, "final.json"))
  assert nm_study.run(config, workdir, log=lambda _: None) == result
  assert os.path.getmtime(os.path.join(workdir, "final.json")) == mtime
  # A run trained again since the table was made: the table is redone from the runs.
  forged = {**result, "identities": {**result["identities"], "srste_1of8_seed3": {
      **result["identities"]["srste_1of8_seed3"], "checkpoint_checksum": "deadbeef"}}}
  workdir_lib.save_json(workdir, "final.json", forged)
  lines = []
  assert nm_study.run(config, workdir, log=lines.append) == result
  assert lines[0].startswith(f"[study] {workdir}/final.json does not come from the runs now in "
                             "runs/ (run srste_1of8_seed3: checkpoint_checksum 'deadbeef' != ")


def test_an_unstructured_study_trains_every_method_at_every_sparsity(digits_dir, tmp_path):
  config = sparse_study_config.get_config()
  config.data_dir = digits_dir
  config.image_size = 0  # 8x8 digits: LeNet-5's convolutions still fit
  config.model = {"name": "mlp", "features": (16,)}
  config.num_train_steps = 6
  config.log_every = 6
  config.checkpoint_every = 6
  config.pruning.dst.update_every = 2
  config.pruning.synflow_iterations = 3
  config.study.methods = ("rigl", "snip")
  config.study.sparsities = (0.5, 0.75)
  config.study.seeds = (1,)
  workdir = str(tmp_path / "study")
  result = nm_study.run(config, workdir, log=lambda _: None)
  assert sorted(os.listdir(os.path.join(workdir, "runs"))) == [
      "dense_seed1", "rigl_50pct_seed1", "rigl_75pct_seed1", "snip_50pct_seed1",
      "snip_75pct_seed1"]
  rows = result["rows"]
  assert [(r["method"], r["pattern"]) for r in rows] == [
      ("dense", "dense"), ("rigl", "50%"), ("snip", "50%"), ("rigl", "75%"), ("snip", "75%")]
  # ERK over the MLP's two kernels (64x16, 16x10) keeps (1 - s) of their 1184 weights.
  for r in rows[1:]:
    assert r["sparsity"] == pytest.approx(1 - round((1 - int(r["pattern"][:-1]) / 100) * 1184)
                                          / 1184, abs=2e-3)
  assert "| rigl |" in result["markdown"] and "| 50% | 75% |" in result["markdown"]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.study.update(methods=("rigl", "srste")), r"config.study.methods='srste'"),
    (lambda c: c.study.update(sparsities=(0.9, 1.0)), r"config.study.sparsities holds 1.0"),
    (lambda c: c.study.update(sparsities=(0.9, 0.9)), r"config.study.sparsities=.* repeats"),
])
def test_bad_unstructured_study_config_is_an_error_naming_the_key(edit, message, tmp_path,
                                                                  digits_dir):
  config = sparse_study_config.get_config()
  config.data_dir = digits_dir
  edit(config)
  with pytest.raises(config_checks.ConfigError, match=message):
    nm_study.run(config, str(tmp_path / "study"))
