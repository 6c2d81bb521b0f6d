"""The lottery binary: levels, rewinding, controls, summary, errors, resume."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import sparsejax

from experiments import config_checks
from experiments import lottery as lottery_run
from experiments import metrics as metrics_lib
from experiments import trainer as trainer_lib
from experiments import workdir as workdir_lib
from experiments.configs import lottery as lottery_config
from tests import reference
from sparsejax.checkpoint import SparseCheckpointManager
from tests import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny MLP's kernels: 64x32, 32x16, 16x10.
SIZES = {"hidden_0/kernel": 64 * 32, "hidden_1/kernel": 32 * 16, "head/kernel": 16 * 10}
HIDDEN = ("hidden_0/kernel", "hidden_1/kernel")  # pruned with one threshold; the head is kept


def _tiny(digits_dir):
  """2 replicates of 3 levels of 50%, 33 steps each (3 epochs), rewind to step 11."""
  config = lottery_config.get_config()
  config.data_dir = digits_dir
  config.model.features = (32, 16)
  config.num_epochs = 3
  config.log_every = 11
  config.checkpoint_every = 0
  config.lottery.levels = 3
  config.lottery.prune_fraction = 0.5
  config.lottery.rewind_step = 1
  config.lottery.rewind_unit = "epochs"
  config.lottery.rewind_optimizer = True
  return config


@pytest.fixture
def tiny_lottery(digits_dir):
  return _tiny(digits_dir)


def _quiet(_):
  pass


def _level_dir(workdir, seed, level, branch="ticket"):
  return os.path.join(workdir, "replicates", f"seed_{seed}", f"level_{level:02d}", branch)


@pytest.fixture(scope="module")
def finished(digits_dir, tmp_path_factory):
  """One finished tiny run shared by the tests that only read it."""
  config = _tiny(digits_dir)
  workdir = str(tmp_path_factory.mktemp("lottery") / "run")
  result = lottery_run.run(config, workdir, log=_quiet)
  return config, workdir, result


# The default config (global, head at fraction 0) at p = 0.5, by hand: the hidden
# kernels together keep 2560 -> 1280 -> 640 -> 320, the head all its 160 weights.
HIDDEN_KEPT = (2560, 1280, 640, 320)


def _kept(summary):
  return {path: layer["kept"] for path, layer in summary["layers"].items()}


def test_every_level_keeps_half_the_hidden_weights_and_the_whole_head(finished):
  config, workdir, result = finished
  for seed in (0, 1):
    for level in range(4):
      ticket = None
      for branch in ["ticket"] + (list(config.lottery.branches) if level else []):
        summary = json.load(open(os.path.join(_level_dir(workdir, seed, level, branch),
                                              "final.json")))
        kept = _kept(summary)
        assert kept["head/kernel"] == 160, (seed, level, branch)
        assert sum(kept[path] for path in HIDDEN) == HIDDEN_KEPT[level], (seed, level, branch)
        ticket = ticket or kept
        assert kept == ticket, (seed, level, branch)  # the controls: the ticket's per-layer counts
        # Pruned weights are exactly zero in the trained params.
        for path, layer in summary["layers"].items():
          assert layer["zero_fraction"] >= 1 - kept[path] / SIZES[path] - 1e-12
  rows = result["rows"]
  assert len(rows) == 2 * (1 + 3 * 3)
  for row in rows:
    assert row["density"] == pytest.approx((HIDDEN_KEPT[row["level"]] + 160) / sum(SIZES.values()))


def test_masks_only_shrink_and_controls_differ_from_the_ticket(finished):
  config, workdir, _ = finished
  trainer = trainer_lib.Trainer(config)

  def restore(level, branch="ticket"):
    with SparseCheckpointManager(os.path.join(_level_dir(workdir, 0, level, branch),
                                              "checkpoints")) as manager:
      state = trainer.restore(manager)
    return ({leaf.path: np.asarray(leaf.value)
             for leaf in sparsejax.trees.named_leaves(trainer_lib.masks_of(state))},
            {leaf.path: np.asarray(leaf.value) for leaf in sparsejax.trees.named_leaves(state.params)})

  masks = lambda level, branch="ticket": restore(level, branch)[0]
  previous, trained = restore(0)
  for level in (1, 2, 3):
    current = masks(level)
    for path in SIZES:
      assert not np.any(current[path] & ~previous[path]), (level, path)  # never revived
    # numpy reference: one threshold over both hidden kernels' surviving |w| after the
    # previous level's training; the head keeps its mask.
    scores = [np.where(previous[path], np.abs(trained[path]), -1.0) for path in HIDDEN]
    want = reference.global_topk_masks(scores, 1 - HIDDEN_KEPT[level] / HIDDEN_KEPT[0])
    for path, mask in zip(HIDDEN, want):
      np.testing.assert_array_equal(current[path], mask, err_msg=f"level {level} {path}")
    np.testing.assert_array_equal(current["head/kernel"], previous["head/kernel"])
    random = masks(level, "random_prune")
    reinit = masks(level, "random_reinit")
    for path in SIZES:
      assert random[path].sum() == current[path].sum()
      np.testing.assert_array_equal(reinit[path], current[path])  # same mask, fresh weights
    assert not np.array_equal(random["hidden_0/kernel"], current["hidden_0/kernel"])
    previous, trained = restore(level)


def test_rewind_point_is_the_dense_state_after_k_steps(finished, digits_dir):
  config, workdir, _ = finished
  # Independent: a plain dense run of the same seed stopped after k = 11 steps.
  short = lottery_config.get_config()
  short.update_from_flattened_dict({"data_dir": digits_dir, "model.features": (32, 16),
                                    "num_train_steps": 11, "log_every": 11,
                                    "checkpoint_every": 0})
  trainer = trainer_lib.Trainer(config)
  dense = trainer_lib.Trainer(short, data=trainer.data).fit(
      os.path.join(workdir, "..", "dense_11"), log=_quiet).state
  with SparseCheckpointManager(os.path.join(workdir, "replicates", "seed_0", "rewind")) as manager:
    assert manager.latest_step() == 11
    stored = manager.restore(rewind_like=lottery_run._rewind_tree(trainer.initial_state())).rewind
  chex.assert_trees_all_equal(stored["params"], dense.params)
  chex.assert_trees_all_equal(stored["opt_state"], dense.opt_state)  # adam moments and counts
  assert int(stored["step"]) == 11
  assert int(sparsejax.find_pruning_state(stored["opt_state"]).count) == 11
  # Each pruned level trains from step k: its first metrics are after step 11.
  for level in (1, 2, 3):
    steps = [r["step"] for r in metrics_lib.read_metrics(_level_dir(workdir, 0, level), "train")]
    assert steps == [22, 33]


def test_each_level_and_control_starts_from_the_state_it_should(digits_dir, tmp_path, monkeypatch):
  config = _tiny(digits_dir)
  config.lottery.replicates = 1
  config.lottery.levels = 2
  starts = {}
  original_fit = trainer_lib.Trainer.fit

  def recording_fit(self, workdir, *args, start=None, **kwargs):
    level, branch = workdir.split(os.sep)[-2:]
    if start is not None:  # copied: the first step donates the state's buffers
      starts[(int(level[len("level_"):]), branch)] = jax.tree.map(np.array, start)
    return original_fit(self, workdir, *args, start=start, **kwargs)

  monkeypatch.setattr(trainer_lib.Trainer, "fit", recording_fit)
  workdir = str(tmp_path / "run")
  lottery_run.run(config, workdir, log=_quiet)
  trainer = trainer_lib.Trainer(config)
  with SparseCheckpointManager(os.path.join(workdir, "replicates", "seed_0", "rewind")) as manager:
    point = manager.restore(rewind_like=lottery_run._rewind_tree(trainer.initial_state())).rewind
  point_kernels = {leaf.path: np.asarray(leaf.value)
                   for leaf in sparsejax.trees.named_leaves(point["params"])}
  assert sorted(starts) == [(1, "random_prune"), (1, "random_reinit"), (1, "ticket"),
                            (2, "random_prune"), (2, "random_reinit"), (2, "ticket")]
  fresh = {}
  for (level, branch), start in starts.items():
    assert int(start.step) == 11  # every level retrains from step k
    masks = {leaf.path: leaf.value for leaf in
             sparsejax.trees.named_leaves(sparsejax.find_pruning_state(start.opt_state).masks)}
    kernels = {leaf.path: leaf.value for leaf in sparsejax.trees.named_leaves(start.params)}
    assert int(masks["head/kernel"].sum()) == 160
    assert sum(int(masks[path].sum()) for path in HIDDEN) == HIDDEN_KEPT[level]
    for path, kernel in kernels.items():
      if path not in SIZES:
        continue
      if branch == "random_reinit":  # fresh weights under the ticket's mask
        assert np.all(kernel[~masks[path]] == 0)
        assert not np.any(kernel[masks[path]] == point_kernels[path][masks[path]])
        fresh[(level, path)] = kernel
      else:  # the ticket and random_prune start from the rewound step-k weights
        np.testing.assert_array_equal(kernel, np.where(masks[path], point_kernels[path], 0))
    # The ticket's optimizer state is the one of step k (rewind_optimizer=True).
    count = int(sparsejax.find_pruning_state(start.opt_state).count)
    assert count == (0 if branch == "random_reinit" else 11)
  assert not np.array_equal(fresh[(1, "hidden_0/kernel")] != 0, fresh[(2, "hidden_0/kernel")] != 0)
  ticket = lambda level: {leaf.path: leaf.value for leaf in sparsejax.trees.named_leaves(
      sparsejax.find_pruning_state(starts[(level, "ticket")].opt_state).masks)}
  for path in SIZES:  # level 2 prunes half of what level 1 kept, by the trained magnitudes
    assert not np.any(ticket(2)[path] & ~ticket(1)[path])


def test_summary_table_csv_and_plot(finished):
  _, workdir, result = finished
  with open(os.path.join(workdir, "summary.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 20
  assert {r["branch"] for r in rows} == {"ticket", "random_reinit", "random_prune"}
  assert os.path.getsize(os.path.join(workdir, "lottery.png")) > 10_000
  assert workdir_lib.undeclared(workdir, lottery_run.RUN_FILES) == []
  table = {(e["branch"], e["level"]): e for e in result["table"]}
  for (branch, level), entry in table.items():
    accs = [r["test_accuracy"] for r in result["rows"]
            if r["branch"] == branch and r["level"] == level]
    assert entry["replicates"] == 2
    assert entry["test_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert entry["test_accuracy"]["min"] == min(accs)


def test_finished_run_is_read_back_not_retrained(finished):
  config, workdir, result = finished
  lines = []
  again = lottery_run.run(config, workdir, log=lines.append)
  assert again["rows"] == result["rows"]
  assert lines == [f"{workdir} already holds this finished lottery run; reporting its saved results."]


@pytest.mark.parametrize("key, value, message", [
    ("lottery.prune_fraction", 1.0, "lottery.prune_fraction=1.0 must be in"),
    ("lottery.levels", 0, "lottery.levels=0 must be an integer >= 1"),
    ("lottery.allocation", "snip", "lottery.allocation='snip' is not one of"),
    ("lottery.allocation", "layerwise",
     "lottery.allocation='layerwise' is called 'uniform' in sparsejax"),
    ("lottery.layer_fractions", {"^head/": 1.0},
     "config.lottery.layer_fractions={'^head/': 1.0}: layer_fractions['^head/'] must be in [0, 1)"),
    ("lottery.layer_fractions", {"^output/": 0.1},
     "config.lottery.layer_fractions={'^output/': 0.1}: layer_fractions regex(es) ['^output/'] "
     "match no pruned leaf"),
    ("lottery.layer_fractions", {"hidden_(": 0.1}, "layer_fractions regex 'hidden_(' does not compile"),
    ("lottery.rewind_step", 3, "lottery.rewind_step=3 epochs is step 33"),
    ("lottery.rewind_unit", "iterations", "lottery.rewind_unit='iterations'"),
    ("lottery.branches", ("random_prune", "random_prune"), "repeats a branch"),
    ("lottery.branches", ("shuffle",), "lottery.branches='shuffle' is not one of"),
    ("lottery.replicates", 0, "lottery.replicates=0"),
    ("lottery.include", "(", "lottery.include='(' is not a valid regex"),
])
def test_bad_lottery_config_names_the_key_and_writes_nothing(tiny_lottery, tmp_path, key, value,
                                                             message):
  tiny_lottery.update_from_flattened_dict({key: value})
  workdir = str(tmp_path / "never")
  with pytest.raises(config_checks.ConfigError, match=re.escape(message)):
    lottery_run.run(tiny_lottery, workdir, log=_quiet)
  assert not os.path.exists(workdir)


def test_each_binary_refuses_the_others_config(tiny_lottery, tiny_config, tmp_path):
  from experiments import train
  with pytest.raises(config_checks.ConfigError, match="python -m experiments.lottery"):
    train.run(tiny_lottery, str(tmp_path / "a"))
  with pytest.raises(config_checks.ConfigError, match="configs/lottery.py"):
    lottery_run.run(tiny_config, str(tmp_path / "b"), log=_quiet)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("rewind_optimizer, branches, message", [
    (False, (), "rewind_optimizer=False train from a fresh optimizer state"),
    (True, ("random_reinit",), "the random_reinit branch train from a fresh optimizer state"),
])
def test_fresh_optimizer_with_a_schedule_after_step_zero_is_an_error(
    tiny_lottery, tmp_path, rewind_optimizer, branches, message):
  tiny_lottery.lottery.rewind_optimizer = rewind_optimizer
  tiny_lottery.lottery.branches = branches
  tiny_lottery.lr_schedule = "cosine"
  with pytest.raises(config_checks.ConfigError, match=message):
    lottery_run.run(tiny_lottery, str(tmp_path / "never"), log=_quiet)
  tiny_lottery.lottery.rewind_step = 0  # k = 0: the schedule starts at 0 anyway
  tiny_lottery.lottery.levels = 1
  tiny_lottery.num_epochs = 1
  tiny_lottery.log_every = 1
  lottery_run.run(tiny_lottery, str(tmp_path / "fine"), log=_quiet)


def test_filters_that_leave_no_kernel_are_an_error(tiny_lottery, tmp_path):
  tiny_lottery.lottery.include = "no_such_layer"
  with pytest.raises(config_checks.ConfigError, match=r"^config.lottery.include='no_such_layer' "
                                                     r"matches none of the prunable leaves \['"):
    lottery_run.run(tiny_lottery, str(tmp_path / "never"), log=_quiet)
  tiny_lottery.lottery.include, tiny_lottery.lottery.exclude = "hidden_0", "hidden"
  with pytest.raises(config_checks.ConfigError, match="leave no kernel to prune"):
    lottery_run.run(tiny_lottery, str(tmp_path / "never"), log=_quiet)
  assert not os.path.exists(tmp_path / "never")


def _command(workdir, data_dir, *extra):
  return [sys.executable, "-m", "experiments.lottery",
          f"--config={ROOT}/experiments/configs/lottery.py", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", *extra]


def _env():
  return one_device_env()


def test_cli_prints_the_table_and_rejects_unknown_keys(digits_dir, tmp_path):
  done = subprocess.run(
      _command("runs/cli", digits_dir, "--config.model.features=(16,)",
               "--config.num_epochs=2", "--config.log_every=22", "--config.checkpoint_every=0",
               "--config.lottery.levels=1", "--config.lottery.replicates=1",
               "--config.lottery.branches=('random_prune',)",
               "--config.lottery.allocation=uniform",  # Frankle & Carbin's rates:
               "--config.lottery.layer_fractions={'^head/': 0.1}"),
      cwd=tmp_path, env=dict(_env(), PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "level  weights" in done.stdout and "random_prune" in done.stdout
  assert os.path.exists(tmp_path / "runs" / "cli" / "lottery.png")
  # By hand: hidden_0 (64x16) keeps round(0.8 * 1024) = 819, the head (16x10) round(0.9 * 160).
  level_1 = json.load(open(_level_dir(tmp_path / "runs" / "cli", 0, 1) + "/final.json"))
  assert _kept(level_1) == {"hidden_0/kernel": 819, "head/kernel": 144}
  bad = subprocess.run(_command(str(tmp_path / "x"), digits_dir, "--config.lottery.level=3"),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0
  assert "unknown config key --config.lottery.level" in bad.stderr
  assert not os.path.exists(tmp_path / "x")


# A run big enough to be killed mid-level: (256, 256) MLP, 300 steps per level.
RESUME_FLAGS = ("--config.model.features=(256,256)", "--config.num_train_steps=300",
                "--config.log_every=50", "--config.checkpoint_every=100",
                "--config.lottery.levels=2", "--config.lottery.replicates=1",
                "--config.lottery.branches=('random_prune',)",
                "--config.lottery.rewind_step=30", "--config.lottery.rewind_optimizer=True")


def _checkpoints(directory):
  path = os.path.join(directory, "checkpoints")
  return [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []


def _metrics_past_checkpoint(directory):
  steps = _checkpoints(directory)
  if not steps:
    return False
  records = metrics_lib.read_metrics(directory) if os.path.exists(
      os.path.join(directory, "metrics.jsonl")) else []
  return max((r["step"] for r in records), default=0) > max(steps)


def _final_params(workdir, level, branch):
  directory = os.path.join(_level_dir(workdir, 0, level, branch), "checkpoints", "300")
  return {name: ocp.StandardCheckpointer().restore(os.path.join(directory, name))
          for name in ("params", "masks", "opt_state")}


@pytest.mark.slow
def test_killed_lottery_resumes_at_its_level_and_matches_an_uninterrupted_run(digits_dir,
                                                                             tmp_path):
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  subprocess.run(_command(whole, digits_dir, *RESUME_FLAGS), cwd=ROOT, env=_env(), check=True,
                 capture_output=True, timeout=600)
  process = subprocess.Popen(_command(killed, digits_dir, *RESUME_FLAGS), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  target = _level_dir(killed, 0, 2)  # kill inside level 2's ticket, after a checkpoint
  deadline = time.time() + 300
  while not _metrics_past_checkpoint(target):
    assert process.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.exists(os.path.join(target, "final.json"))
  finished_levels = {(level, branch): os.path.getmtime(
      os.path.join(_level_dir(killed, 0, level, branch), "final.json"))
      for level, branch in ((0, "ticket"), (1, "ticket"), (1, "random_prune"))}

  resumed = subprocess.run(_command(killed, digits_dir, *RESUME_FLAGS), cwd=ROOT, env=_env(),
                           check=True, capture_output=True, text=True, timeout=600)
  assert "[seed 0 level 2 ticket] resuming from the checkpoint at step" in resumed.stdout
  for level, branch in finished_levels:  # read back, not retrained
    assert f"[seed 0 level {level} {branch}] mlp on" not in resumed.stdout
    assert os.path.getmtime(os.path.join(_level_dir(killed, 0, level, branch), "final.json")) \
        == finished_levels[(level, branch)]
  for level, branch in ((1, "ticket"), (2, "ticket"), (2, "random_prune")):
    chex.assert_trees_all_equal(_final_params(killed, level, branch),
                                _final_params(whole, level, branch))
  rows = lambda w: json.load(open(os.path.join(w, "final.json")))["rows"]
  assert rows(killed) == rows(whole)


def test_a_level_whose_checkpoints_are_all_damaged_is_retrained_by_a_rerun(tiny_lottery, tmp_path):
  tiny_lottery.num_epochs, tiny_lottery.lottery.levels = 2, 1
  tiny_lottery.lottery.replicates, tiny_lottery.lottery.branches = 1, ()
  workdir = str(tmp_path / "run")
  result = lottery_run.run(tiny_lottery, workdir, log=_quiet)
  level = _level_dir(workdir, 0, 1)
  shutil.rmtree(os.path.join(level, "checkpoints", "22", "params"))  # its only checkpoint
  for directory in (level, workdir):  # as if killed before the level finished
    os.remove(os.path.join(directory, "final.json"))
  lines = []
  again = lottery_run.run(tiny_lottery, workdir, log=lines.append)
  retrained = [l for l in lines if "retraining this level" in l]
  assert len(retrained) == 1 and retrained[0].startswith(
      f"[seed 0 level 1 ticket] Every checkpoint in {level}/checkpoints is damaged")
  timeless = lambda rows: [{k: v for k, v in r.items() if "time" not in k} for r in rows]
  assert timeless(again["rows"]) == timeless(result["rows"])  # the same training again
  # A level's recorded identity no longer matching (trained again since): the table is redone.
  key = os.path.join("replicates", "seed_0", "level_01", "ticket")
  forged = {**again, "identities": {**again["identities"],
                                    key: {**again["identities"][key], "step": 11}}}
  workdir_lib.save_json(workdir, "final.json", forged)
  lines = []
  third = lottery_run.run(tiny_lottery, workdir, log=lines.append)
  assert lines[0] == (f"{workdir}/final.json does not come from the levels now in replicates/ "
                      f"({key}: step 11 != 22); redoing the table from them.")
  assert timeless(third["rows"]) == timeless(result["rows"])
  assert third["identities"] == again["identities"]


@pytest.mark.slow
def test_lamp_levels_prune_the_trained_hidden_kernels_like_the_authors_rule(tiny_lottery, tmp_path,
                                                                           monkeypatch):
  # One level of 50% with allocation='lamp': the binary's masks are LAMP's (Lee et al.) on the
  # trained level-0 kernels (the head is kept by layer_fractions).
  tiny_lottery.lottery.levels = 1
  tiny_lottery.lottery.replicates = 1
  tiny_lottery.lottery.branches = ()
  tiny_lottery.lottery.allocation = "lamp"
  calls = []
  prune_level = sparsejax.lottery.prune_level

  def spy(params, masks, fraction, **kwargs):
    out = prune_level(params, masks, fraction, **kwargs)
    calls.append((jax.tree.map(np.asarray, params), out, kwargs["allocation"]))
    return out

  monkeypatch.setattr(lottery_run.lottery, "prune_level", spy)
  lottery_run.run(tiny_lottery, str(tmp_path / "run"), log=_quiet)
  (params, masks, allocation), = calls
  assert allocation == "lamp"
  want = reference.lamp_masks([params[name]["kernel"] for name in ("hidden_0", "hidden_1")], 0.5)
  for name, expected in zip(("hidden_0", "hidden_1"), want):
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), expected, err_msg=name)
  assert np.asarray(masks["head"]["kernel"]).all()
