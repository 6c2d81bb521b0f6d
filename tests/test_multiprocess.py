"""Two JAX processes of two CPU devices each train as one process of four.

The processes run the real binary through `experiments.launch` (gloo
collectives between them). The masks must be equal; weights, optimizer
state and metrics equal up to float rounding: gloo sums the gradient's
per-device parts in another order than one process does, which moves the
last bit of some values (not yet bitwise: see the README).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsejax.checkpoint import SparseCheckpointManager
from experiments import launch
from experiments import metrics as metrics_lib
from tests import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


def _train_args(workdir, data_dir, *extra, steps=STEPS):
  return ["-m", "experiments.train", "--config=experiments/configs/default.py",
          f"--workdir={workdir}", f"--config.data_dir={data_dir}",
          "--config.model.features=(32,16)", f"--config.num_train_steps={steps}",
          "--config.log_every=10", "--config.checkpoint_every=20",
          "--config.dense_baseline=False", "--config.pruning.update_every=5",
          "--config.keep_checkpoints=0", *extra]


def _launch(workdir, data_dir, *extra, steps=STEPS, wait=True):
  """The train binary as 2 processes of 2 CPU devices each."""
  command = [sys.executable, "-m", "experiments.launch", "--processes", "2",
             "--devices_per_process", "2", "--", sys.executable,
             *_train_args(workdir, data_dir, *extra, steps=steps)]
  if not wait:
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=600)


def _env():
  return one_device_env()


def _final(workdir, steps=STEPS):
  """The final checkpoint's items as host arrays (whatever devices wrote them)."""
  step = os.path.join(workdir, "checkpoints", str(steps))
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
@pytest.mark.parametrize("method", ["gradual", "nm"])
def test_two_processes_of_two_devices_train_like_one_process_of_four(digits_dir, tmp_path,
                                                                     method):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  extra = [f"--config.pruning.method={method}"]
  single = subprocess.run(
      [sys.executable, *_train_args(one, digits_dir, *extra), "--cpu_devices=4"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  assert "on 4 cpu device(s); workdir" in single.stdout
  multi = _launch(two, digits_dir, *extra)
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
  _assert_checksums_verify_here(two, "mix32:")  # written by 2 processes, read by 1
  _assert_checksums_verify_here(one, "")


def _assert_checksums_verify_here(workdir, kind):
  """Every leaf of every step has a checksum of `kind`, and this process (one
  CPU device) reads every step back intact."""
  with SparseCheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    steps = manager.all_steps()
    assert steps
    for step in steps:
      sums = manager.restore(step).meta["checksums"]
      assert sums["params"] and sums["opt_state"] and sums["masks"]
      for item in sums.values():
        assert all(value.startswith(kind) and (kind or ":" not in value)
                   for value in item.values()), item
      manager.verify(step)


def _child_with_rank(parent_pid, rank):
  """The pid of the launcher's child process of rank `rank` (None if gone)."""
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{name}/cmdline") as f:
        argv = f.read().split("\0")
    except OSError:
      continue
    if ppid == parent_pid and f"--process_id={rank}" in argv:
      return int(name)
  return None


@pytest.mark.slow
def test_fsdp_in_two_processes_killed_in_one_resumes_bitwise(digits_dir, tmp_path):
  steps = 200
  fsdp = ("--config.mesh.fsdp=2", "--config.mesh.fsdp_min_size=0")
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  uninterrupted = _launch(whole, digits_dir, *fsdp, steps=steps)
  assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]
  assert "4 device(s) (fsdp 2)" in uninterrupted.stdout
  launcher = _launch(killed, digits_dir, *fsdp, steps=steps, wait=False)
  deadline = time.time() + 300
  checkpoints = os.path.join(killed, "checkpoints")
  while not (os.path.isdir(checkpoints) and "40" in os.listdir(checkpoints)):
    assert launcher.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.02)
  victim = _child_with_rank(launcher.pid, 1)
  assert victim is not None
  os.kill(victim, signal.SIGKILL)
  assert launcher.wait(timeout=120) == 137  # the launcher reports it and stops process 0
  assert not os.path.exists(os.path.join(killed, "final.json"))
  resumed = _launch(killed, digits_dir, *fsdp, steps=steps)
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert "[process 0] [gradual] resuming from the checkpoint at step" in resumed.stdout
  assert "[process 1] [gradual] resuming from the checkpoint at step" in resumed.stdout
  chex.assert_trees_all_equal(_final(killed, steps), _final(whole, steps))
  assert _metrics(killed) == _metrics(whole)
  _assert_checksums_verify_here(whole, "mix32:")


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_in_two_processes(digits_dir, tmp_path):
  one, moved = str(tmp_path / "one"), str(tmp_path / "moved")
  single = subprocess.run([sys.executable, *_train_args(one, digits_dir), "--cpu_devices=4"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  # The run as it was at step 20: later checkpoints and the final summary gone.
  shutil.copytree(one, moved)
  shutil.rmtree(os.path.join(moved, "checkpoints", str(STEPS)))
  os.remove(os.path.join(moved, "final.json"))
  multi = _launch(moved, digits_dir)
  assert multi.returncode == 0, multi.stdout[-3000:]
  assert "[process 1] [gradual] resuming from the checkpoint at step 20" in multi.stdout
  final_moved, final_one = _final(moved), _final(one)
  chex.assert_trees_all_equal(final_moved["masks"], final_one["masks"])
  chex.assert_trees_all_close(final_moved["params"], final_one["params"], rtol=1e-5, atol=1e-6)


def test_the_launcher_reports_the_worst_exit_code_and_stops_the_others(tmp_path):
  code = ("import glob, os, sys, time\n"
          "rank = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])\n"
          "print('up', rank, flush=True)\n"
          "open(os.path.join(sys.argv[1], f'{rank}.up'), 'w').close()\n"
          "if rank == 1:\n"  # fail once every process is up (a loaded machine starts them slowly)
          "  while len(glob.glob(os.path.join(sys.argv[1], '*.up'))) < 3:\n    time.sleep(0.05)\n"
          "  sys.exit(3)\n"
          "time.sleep(120)\n")
  script = tmp_path / "worker.py"
  script.write_text(code)
  out = subprocess.run([sys.executable, "-m", "experiments.launch", "--processes", "3", "--",
                        sys.executable, str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 128 + 15  # the stopped sleepers' SIGTERM is worse than 3
  for rank in range(3):
    assert f"[process {rank}] up {rank}" in out.stdout


def test_exit_codes_count_signals_as_the_shell_does():
  assert launch.exit_code(0) == 0 and launch.exit_code(2) == 2 and launch.exit_code(-9) == 137


@pytest.mark.slow
def test_the_lottery_in_two_processes_prunes_like_one_process(digits_dir, tmp_path):
  args = ["-m", "experiments.lottery", "--config=experiments/configs/lottery.py",
          f"--config.data_dir={digits_dir}", "--config.model.features=(32,16)",
          "--config.num_epochs=2", "--config.log_every=11", "--config.checkpoint_every=0",
          "--config.lottery.levels=2", "--config.lottery.replicates=1",
          "--config.lottery.rewind_step=5", "--config.lottery.branches=('random_prune',)"]
  one, two = tmp_path / "one", tmp_path / "two"
  single = subprocess.run([sys.executable, *args, f"--workdir={one}", "--cpu_devices=4"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  multi = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--processes", "2", "--devices_per_process",
       "2", "--", sys.executable, *args, f"--workdir={two}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert multi.returncode == 0, multi.stdout[-3000:]
  assert multi.stdout.count("test accuracy at the end of training") == 1  # process 0 reports
  rows_one = json.loads((one / "final.json").read_text())["rows"]
  rows_two = json.loads((two / "final.json").read_text())["rows"]
  assert [(r["level"], r["branch"], r["density"]) for r in rows_two] == \
      [(r["level"], r["branch"], r["density"]) for r in rows_one]
  for a, b in zip(rows_two, rows_one):
    assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1 / 360 + 1e-9)
  for level in (1, 2):
    for branch in ("ticket", "random_prune"):
      path = os.path.join("replicates", "seed_0", f"level_{level:02d}", branch)
      masks = [_final(str(root / path), steps=22)["masks"] for root in (one, two)]
      chex.assert_trees_all_equal(*masks)
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))
  _assert_checksums_verify_here(str(two / "replicates" / "seed_0" / "level_02" / "ticket"),
                                "mix32:")


def test_gloo_collectives_across_two_processes_agree_with_numpy_for_large_chunks():
  # jax issue 40830 (wrong psum_scatter chunks above ~256 KiB) and 40831 (its
  # timeout ignored): a hang fails through the timeout, wrong values by the exit code.
  out = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--processes", "2", "--devices_per_process",
       "2", "--", sys.executable, os.path.join(ROOT, "tests", "collectives_worker.py")],
      cwd=ROOT, env=dict(_env(), PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:]
  for rank in (0, 1):
    assert f"[process {rank}] collectives with 2048 KiB chunks agree with numpy" in out.stdout


_IGNORES_THE_SIGNAL = """\
import os, signal, sys, time
rank = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])
signum = int(sys.argv[1])
signal.signal(signum, lambda s, f: print('caught', s, flush=True))  # as JAX's SIGTERM notifier
with open(f'{sys.argv[2]}/{rank}.pid', 'w') as f:
  f.write(str(os.getpid()))
for _ in range(600):
  time.sleep(0.1)
"""


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_stops_every_process_after_the_grace_period(tmp_path, signum):
  script = tmp_path / "worker.py"
  script.write_text(_IGNORES_THE_SIGNAL)
  launcher = subprocess.Popen(
      [sys.executable, "-m", "experiments.launch", "--processes", "3", "--grace_s", "1", "--",
       sys.executable, str(script), str(int(signum)), str(tmp_path)],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 60
  while len(list(tmp_path.glob("*.pid"))) < 3:
    assert launcher.poll() is None and time.time() < deadline
    time.sleep(0.05)
  time.sleep(0.2)  # the pid file is written after the handler is installed
  pids = [int((tmp_path / f"{rank}.pid").read_text()) for rank in range(3)]
  start = time.time()
  launcher.send_signal(signum)
  out, _ = launcher.communicate(timeout=30)  # the workers alone would sleep for 60 s
  assert launcher.returncode == 128 + signum, out
  assert time.time() - start < 10
  for rank in range(3):
    assert f"[process {rank}] caught {int(signum)}" in out  # forwarded to each
  assert not any(_alive(pid) for pid in pids)


def test_launcher_help_prints_the_options_and_the_signal_behaviour():
  out = subprocess.run([sys.executable, "-m", "experiments.launch", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  for text in ("--processes", "--devices_per_process", "--grace_s", "SIGTERM", "143",
               "-- COMMAND", "experiments/own_loop.py", "block_until_ready"):
    assert text in out.stdout, text
  missing = subprocess.run([sys.executable, "-m", "experiments.launch", "--processes", "2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert missing.returncode == 2 and "no command" in missing.stderr


@pytest.mark.slow
def test_sigterm_to_the_launcher_of_a_training_run_ends_it_and_the_same_command_resumes(
    digits_dir, tmp_path):
  steps = 400
  workdir = str(tmp_path / "run")
  command = [sys.executable, "-m", "experiments.launch", "--processes", "2",
             "--devices_per_process", "2", "--grace_s", "2", "--", sys.executable,
             *_train_args(workdir, digits_dir, steps=steps)]
  launcher = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while not (os.path.isdir(checkpoints) and "40" in os.listdir(checkpoints)):
    assert launcher.poll() is None, "the run ended before it could be stopped"
    assert time.time() < deadline
    time.sleep(0.02)
  children = [_child_with_rank(launcher.pid, rank) for rank in (0, 1)]
  assert None not in children
  start = time.time()
  launcher.send_signal(signal.SIGTERM)
  assert launcher.wait(timeout=60) == 143
  assert time.time() - start < 2 + 5  # the grace period, then SIGKILL
  assert not any(_alive(pid) for pid in children)
  assert not os.path.exists(os.path.join(workdir, "final.json"))  # it did not train on
  resumed = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  for rank in (0, 1):
    assert f"[process {rank}] [gradual] resuming from the checkpoint at step" in resumed.stdout
  assert os.path.exists(os.path.join(workdir, "final.json"))
  assert str(steps) in os.listdir(checkpoints)


def _own_loop_result(stdout, process=0):
  """(final loss, {path: kept weights}) from experiments.own_loop's last line of `process`."""
  line = [l for l in stdout.splitlines() if f"process {process} of" in l][-1]
  loss = float(line.split("final loss ")[1].split(",")[0])
  kept = json.loads(line.split("kept weights ")[1].replace("'", '"'))
  return loss, kept


@pytest.mark.slow
def test_the_own_loop_example_runs_in_two_processes_as_in_one():
  steps = ["--steps=30"]
  launched = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--processes", "2", "--devices_per_process",
       "2", "--", sys.executable, "-m", "experiments.own_loop", *steps],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert launched.returncode == 0, launched.stdout[-3000:]
  single = subprocess.run([sys.executable, "-m", "experiments.own_loop", *steps,
                           "--cpu_devices=4"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  loss, kept = _own_loop_result(single.stdout)
  assert kept == {"hidden/kernel": 32 * 64 // 4, "out/kernel": 64 * 10 // 4}  # 75% pruned
  for process in (0, 1):
    loss_p, kept_p = _own_loop_result(launched.stdout, process)
    assert f"[process {process}] process {process} of 2, 4 devices" in launched.stdout
    assert kept_p == kept
    assert loss_p == pytest.approx(loss, rel=1e-5)  # gloo adds the gradient in another order
  assert loss < 2.0  # it learned: log(10) = 2.30 at the start
