"""Config values that cannot train are one-line errors; a diverging run stops."""

import math
import os
import subprocess
import sys

import pytest

from experiments import config_checks
from experiments import train
from experiments import trainer
from sparsejax.checkpoint import SparseCheckpointManager


@pytest.mark.parametrize("key,value,message", [
    ("learning_rate", math.nan, r"^config.learning_rate=nan must be a finite number in \(0, inf\]"),
    ("learning_rate", math.inf, r"^config.learning_rate=inf must be a finite number"),
    ("learning_rate", -0.1, r"^config.learning_rate=-0.1 must be a finite number in \(0, inf\]"),
    ("momentum", 1.0, r"^config.momentum=1.0 must be a finite number in \[0, 1\)"),
    ("momentum", -0.5, r"^config.momentum=-0.5 must be a finite number in \[0, 1\)"),
    ("weight_decay", -1e-4, r"^config.weight_decay=-0.0001 must be a finite number in \[0, inf\]"),
    ("input.std", (1e-46,), r"^config.input.std\[0\]=1e-46 underflows in float32"),
    ("input.std", (1e-40,), r"^config.input.std\[0\]=1e-40 underflows in float32"),
    ("input.std", (math.nan,), r"^config.input.std\[0\]=nan must be a finite number"),
    ("input.std", (0.0,), r"^config.input.std\[0\]=0.0 must be a finite number in \(0, inf\]"),
    ("input.mean", (math.inf,), r"^config.input.mean\[0\]=inf must be a finite number\.$"),
])
def test_a_value_that_cannot_train_names_its_key_and_writes_nothing(tiny_config, tmp_path, key,
                                                                    value, message):
  if key.startswith("input."):
    other = "std" if key == "input.mean" else "mean"
    tiny_config.input[key.split(".")[1]], tiny_config.input[other] = value, (0.5,)
  else:
    tiny_config.update({"optimizer": "sgd", key: value})
  workdir = tmp_path / "run"
  with pytest.raises(config_checks.ConfigError, match=message) as raised:
    train.run(tiny_config, str(workdir))
  assert "\n" not in str(raised.value)
  assert not workdir.exists()


def test_a_loss_that_becomes_nan_stops_the_run_naming_the_step(tiny_config, tmp_path):
  # Plain SGD at 1e4 on the digits: losses 2.4, 2e10, 2e29 at steps 1-3, NaN at step 4.
  tiny_config.update(optimizer="sgd", learning_rate=1e4, dense_baseline=False, log_every=1,
                     checkpoint_every=2)
  tiny_config.pruning.method = "dense"
  workdir = str(tmp_path / "run")
  with pytest.raises(trainer.TrainingDiverged) as raised:
    train.run(tiny_config, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert str(raised.value) == (
      f"training diverged: the loss is nan at step 4 (config.learning_rate=10000.0); the last "
      f"checkpoint, step 2, is kept in {checkpoints}. Rerun with a lower --config.learning_rate "
      "(or warmup) and --overwrite.")
  with SparseCheckpointManager(checkpoints) as manager:
    assert manager.all_steps() == [2]
  assert not os.path.exists(os.path.join(workdir, "final.json"))


def test_cli_a_diverging_run_ends_in_one_line_with_a_nonzero_status(digits_dir, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/default.py",
       f"--workdir={workdir}", f"--config.data_dir={digits_dir}", "--config.model.features=(32,16)",
       "--config.optimizer=sgd", "--config.learning_rate=1e4", "--config.pruning.method=dense",
       "--config.dense_baseline=False", "--config.num_train_steps=8", "--config.log_every=1",
       "--config.checkpoint_every=2"],
      cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root), capture_output=True,
      text=True, timeout=600)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith(
      "error: training diverged: the loss is nan at step 4 (config.learning_rate=10000.0); the "
      f"last checkpoint, step 2, is kept in {workdir}/checkpoints.")
  assert not (workdir / "final.json").exists()
