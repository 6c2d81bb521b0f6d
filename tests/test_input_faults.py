"""Faults around the input pipeline and process start-up: each ends in one line
naming the file or port, or, for a killed trainer, in no leftover process."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _children(pid: int) -> list[int]:
  """The processes whose parent is `pid` (from /proc)."""
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          stat = f.read()
      except OSError:
        continue
      if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
        out.append(int(entry))
  return out


def _running(pid: int) -> bool:
  """Alive and not a zombie (a dead child not yet reaped by its new parent)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


TRAINER = textwrap.dedent("""
    import sys, time
    from experiments import input_pipeline
    data = input_pipeline.load("sklearn_digits", sys.argv[1])
    batches = input_pipeline.train_batches(data, 32, 0, 0, 1000, worker_count=2, prefetch=2)
    next(batches)
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grain_workers_exit_when_the_trainer_is_killed(digits_dir):
  trainer = subprocess.Popen([sys.executable, "-c", TRAINER, digits_dir], env=_env(),
                             stdout=subprocess.PIPE, text=True)
  workers = []
  try:
    assert trainer.stdout.readline().strip() == "ready"
    workers = _children(trainer.pid)
    assert len([w for w in workers if _running(w)]) >= 2  # the two workers (and a tracker)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(w) for w in workers):
      time.sleep(0.1)
    survivors = [w for w in workers if _running(w)]
    assert not survivors, f"processes {survivors} outlived the killed trainer"
  finally:
    trainer.kill()
    for w in workers:
      if _running(w):
        os.kill(w, signal.SIGKILL)
