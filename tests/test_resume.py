"""A training run killed mid-way (SIGKILL) and restarted ends bitwise where an uninterrupted one does."""

import os
import signal
import subprocess
import sys
import time

import chex
import orbax.checkpoint as ocp
import pytest

from experiments import metrics as metrics_lib
from experiments import workdir as workdir_lib
from tests import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, data_dir):
  return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/default.py",
          f"--workdir={workdir}", f"--config.data_dir={data_dir}",
          "--config.model.features=(512,512)", "--config.num_train_steps=1200",
          "--config.checkpoint_every=150", "--config.log_every=50",
          "--config.pruning.update_every=25", "--config.dense_baseline=False"]


def _env():
  return one_device_env()


def _finished_steps(directory):
  if not os.path.isdir(directory):
    return []
  return [int(name) for name in os.listdir(directory) if name.isdigit()]


def _metrics_past_checkpoint(workdir, at_least):
  latest = max(_finished_steps(os.path.join(workdir, "checkpoints")), default=0)
  if latest < at_least:
    return False
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in f if '"step": ' in line]
  return max(steps) > latest


def _final_items(workdir):
  step_dir = os.path.join(workdir, "checkpoints", "1200")
  checkpointer = ocp.StandardCheckpointer()
  return {name: checkpointer.restore(os.path.join(step_dir, name))
          for name in ("params", "masks", "opt_state", "train_state")}


def _metrics(workdir):
  return [{k: v for k, v in r.items() if k != "steps_per_second"}
          for r in metrics_lib.read_metrics(workdir)]


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one_bitwise(digits_dir, tmp_path):
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  subprocess.run(_command(whole, digits_dir), cwd=ROOT, env=_env(), check=True,
                 capture_output=True, timeout=600)

  process = subprocess.Popen(_command(killed, digits_dir), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  # Kill once metrics past the latest checkpoint are on disk: the resumed run
  # must drop and replay them.
  while not _metrics_past_checkpoint(killed, at_least=450):
    assert process.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.exists(os.path.join(killed, "final.json"))  # killed mid-way
  assert max(_finished_steps(os.path.join(killed, "checkpoints"))) < 1200

  resumed = subprocess.run(_command(killed, digits_dir), cwd=ROOT, env=_env(), check=True,
                           capture_output=True, text=True, timeout=600)
  assert "resuming from the checkpoint at step" in resumed.stdout

  chex.assert_trees_all_equal(_final_items(killed), _final_items(whole))
  assert _metrics(killed) == _metrics(whole)  # records after the checkpoint were replayed once
  final_whole = workdir_lib.load_json(whole, "final.json")
  final_killed = workdir_lib.load_json(killed, "final.json")
  for key in ("test", "train", "sparsity", "layers", "best_test_accuracy"):
    assert final_killed[key] == final_whole[key], key
