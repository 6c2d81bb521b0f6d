"""Runs one command as several JAX processes on this machine: tests, and a single host.

  python -m experiments.launch --processes 2 --devices_per_process 2 -- \
      python -m experiments.train --config=experiments/configs/default.py --workdir=runs/mp

Every process runs the command with --coordinator_address (a free local
port), --num_processes, --process_id and --cpu_devices appended, on CPU
devices that talk through gloo. Each output line is prefixed with
"[process i]". The exit code is the worst of the processes' (a signal N
counts as 128 + N); when one process fails, the others are stopped, so a
crashed run never hangs waiting in a collective.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def exit_code(returncode: int) -> int:
  """A process's exit status as a shell reports it (signal N -> 128 + N)."""
  return 128 - returncode if returncode < 0 else returncode


def _relay(index: int, stream, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"[process {index}] {line}")
    out.flush()


def launch(command: list[str], processes: int, devices_per_process: int,
           out=sys.stdout, grace_s: float = 10.0) -> int:
  """Runs `command` as `processes` JAX processes; returns the worst exit code."""
  if processes < 1 or devices_per_process < 1:
    raise ValueError("--processes and --devices_per_process must be at least 1.")
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  children = []
  for i in range(processes):
    argv = command + [f"--coordinator_address={address}", f"--num_processes={processes}",
                      f"--process_id={i}", f"--cpu_devices={devices_per_process}"]
    children.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True))
  relays = [threading.Thread(target=_relay, args=(i, c.stdout, out), daemon=True)
            for i, c in enumerate(children)]
  for relay in relays:
    relay.start()

  def stop_all(signum=signal.SIGTERM):
    for child in children:
      if child.poll() is None:
        os.killpg(child.pid, signum)

  previous = {sig: signal.signal(sig, lambda s, f: stop_all(s))
              for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    while any(c.poll() is None for c in children):
      if any(c.poll() not in (None, 0) for c in children):  # one failed: end the others
        stop_all()
        deadline = time.time() + grace_s
        while time.time() < deadline and any(c.poll() is None for c in children):
          time.sleep(0.1)
        stop_all(signal.SIGKILL)
        break
      time.sleep(0.1)
    for child in children:
      child.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for relay in relays:
    relay.join(timeout=5)
  return max(exit_code(c.returncode) for c in children)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--" not in argv:
    sys.exit("usage: python -m experiments.launch --processes N --devices_per_process D -- "
             "COMMAND ...")
  split = argv.index("--")
  parser = argparse.ArgumentParser(prog="python -m experiments.launch")
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    sys.exit("error: no command after --")
  return launch(command, args.processes, args.devices_per_process)


if __name__ == "__main__":
  sys.exit(main())
