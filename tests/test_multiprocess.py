"""Two JAX processes of two CPU devices each train as one process of four.

The processes run the real binary through `experiments.launch` (gloo
collectives between them). The masks must be equal; weights, optimizer
state and metrics equal up to float rounding: gloo sums the gradient's
per-device parts in another order than one process does, which moves the
last bit of some values (not yet bitwise: see the README).
"""

import os
import subprocess
import sys

import chex
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import launch
from experiments import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


def _train_args(workdir, data_dir, *extra):
  return ["-m", "experiments.train", "--config=experiments/configs/default.py",
          f"--workdir={workdir}", f"--config.data_dir={data_dir}",
          "--config.model.features=(32,16)", f"--config.num_train_steps={STEPS}",
          "--config.log_every=10", "--config.checkpoint_every=20",
          "--config.dense_baseline=False", "--config.pruning.update_every=5", *extra]


def _env():
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def _final(workdir):
  """The final checkpoint's items as host arrays (whatever devices wrote them)."""
  step = os.path.join(workdir, "checkpoints", str(STEPS))
  out = {}
  for name in ("params", "masks", "opt_state", "train_state"):
    path = epath.Path(os.path.join(step, name))
    stored = ocp.StandardCheckpointHandler().metadata(path).tree
    host = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), stored)
    out[name] = ocp.StandardCheckpointer().restore(path, host)
  return out


def _metrics(workdir):
  return [{k: v for k, v in r.items() if k != "steps_per_second"}
          for r in metrics_lib.read_metrics(workdir)]


@pytest.mark.slow
def test_two_processes_of_two_devices_train_bitwise_like_one_process_of_four(digits_dir,
                                                                              tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  single = subprocess.run([sys.executable, *_train_args(one, digits_dir), "--cpu_devices=4"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  assert "on 4 cpu device(s); workdir" in single.stdout
  multi = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--processes", "2",
       "--devices_per_process", "2", "--", sys.executable, *_train_args(two, digits_dir)],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert multi.returncode == 0, multi.stdout[-3000:]
  for i in (0, 1):
    assert f"[process {i}] JAX" in multi.stdout and f"in process {i} of 2" in multi.stdout
  # Only process 0 reports and writes the run's files.
  assert multi.stdout.count("pruned test accuracy") == 1
  assert "[process 0] pruned test accuracy" in multi.stdout
  final_two, final_one = _final(two), _final(one)
  chex.assert_trees_all_equal(final_two["masks"], final_one["masks"])
  chex.assert_trees_all_equal(final_two["train_state"], final_one["train_state"])
  chex.assert_trees_all_close(final_two["params"], final_one["params"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(final_two["opt_state"], final_one["opt_state"], rtol=1e-4,
                              atol=1e-6)
  metrics_two, metrics_one = _metrics(two), _metrics(one)
  assert [(r["step"], r["split"]) for r in metrics_two] == \
      [(r["step"], r["split"]) for r in metrics_one]
  for a, b in zip(metrics_two, metrics_one):
    numbers = [k for k in b if k not in ("step", "split")]
    assert [a[k] for k in numbers] == pytest.approx([b[k] for k in numbers], rel=1e-4, abs=1e-6)
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))


def test_the_launcher_reports_the_worst_exit_code_and_stops_the_others(tmp_path):
  code = ("import sys, time\n"
          "rank = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])\n"
          "print('up', rank, flush=True)\n"
          "if rank == 1:\n  sys.exit(3)\n"
          "time.sleep(120)\n")
  script = tmp_path / "worker.py"
  script.write_text(code)
  out = subprocess.run([sys.executable, "-m", "experiments.launch", "--processes", "3", "--",
                        sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 128 + 15  # the stopped sleepers' SIGTERM is worse than 3
  for rank in range(3):
    assert f"[process {rank}] up {rank}" in out.stdout


def test_exit_codes_count_signals_as_the_shell_does():
  assert launch.exit_code(0) == 0 and launch.exit_code(2) == 2 and launch.exit_code(-9) == 137


@pytest.mark.slow
def test_the_lottery_binary_in_two_processes_is_a_one_line_error(digits_dir, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--processes", "2", "--",
       sys.executable, "-m", "experiments.lottery", "--config=experiments/configs/lottery.py",
       f"--workdir={tmp_path / 'lottery'}", f"--config.data_dir={digits_dir}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  for i in (0, 1):
    assert (f"[process {i}] error: experiments.lottery runs in one process only for now"
            in out.stdout), out.stdout[-2000:]
  assert not (tmp_path / "lottery").exists()
