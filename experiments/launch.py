"""Runs one command as several JAX processes on this machine: tests, and a single host.

Every process runs the command with --coordinator_address (a free local
port), --num_processes, --process_id and --cpu_devices appended, on CPU
devices that talk through gloo. Each output line is prefixed with
"[process i]". The exit code is the worst of the processes' (a signal N
counts as 128 + N); when one process fails, the others are stopped, so a
crashed run never hangs waiting in a collective. SIGTERM and SIGINT to the
launcher stop every process (see `launch`).
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
  """Runs `command` as `processes` JAX processes; returns the exit code.

  The exit code is the worst of the processes' (a signal N counts as
  128 + N), or 128 + N when the launcher itself got SIGTERM or SIGINT (N):
  it then forwards that signal to every process, gives them `grace_s`
  seconds to end, SIGKILLs those left and returns once none is running.
  A second signal SIGKILLs them at once. When one process fails, the others
  get SIGTERM, then SIGKILL after `grace_s`.
  """
  if processes < 1 or devices_per_process < 1:
    raise ValueError("--processes and --devices_per_process must be at least 1.")
  if grace_s < 0:
    raise ValueError(f"--grace_s must be at least 0, not {grace_s}.")
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  children = []
  received = []  # the signals the launcher got, in order

  def send_all(signum):
    for child in children:
      if child.poll() is None:
        try:
          os.killpg(child.pid, signum)
        except ProcessLookupError:  # ended since poll()
          pass

  def on_signal(signum, frame):
    del frame
    received.append(signum)
    send_all(signum if len(received) == 1 else signal.SIGKILL)

  relays = []
  previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i in range(processes):
      if received:
        break
      argv = command + [f"--coordinator_address={address}", f"--num_processes={processes}",
                        f"--process_id={i}", f"--cpu_devices={devices_per_process}"]
      # A session of its own: a Ctrl-C on the terminal reaches the launcher
      # only, which forwards it; killpg also reaches what the process started.
      children.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True))
    relays += [threading.Thread(target=_relay, args=(i, c.stdout, out), daemon=True)
               for i, c in enumerate(children)]
    for relay in relays:
      relay.start()
    if received:
      send_all(received[0])
    while any(c.poll() is None for c in children):
      failed = any(c.poll() not in (None, 0) for c in children)
      if received or failed:  # stop the others: ask, then after grace_s, kill
        if not received:
          send_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(c.poll() is None for c in children):
          time.sleep(0.05)
        send_all(signal.SIGKILL)
        break
      time.sleep(0.1)
    for child in children:
      child.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for relay in relays:
    relay.join(timeout=5)
  if received:
    return 128 + received[0]
  return max(exit_code(c.returncode) for c in children)


_EPILOG = """\
signals:
  SIGTERM or SIGINT (Ctrl-C) to the launcher goes to every process; those
  still running --grace_s seconds later are SIGKILLed, and the launcher
  exits with 128 + the signal (143 for SIGTERM, 130 for SIGINT). A second
  signal kills at once. JAX's distributed runtime catches SIGTERM in each
  process ("SIGTERM caught") and lets it run on, so a training run ends at
  the SIGKILL: run the same command again to resume from its newest intact
  checkpoint.

your own loop (see experiments/own_loop.py):
  Run the same jitted steps in the same order in every process, feed each its
  slice of the batch (jax.make_array_from_process_local_data), and bound the
  steps in flight: JAX dispatches asynchronously, and on CPU with gloo a loop
  that enqueues more than about 30 steps without waiting hangs silently (the
  processes wait in a collective until gloo's 30-minute timeout). Wait on an
  output of an earlier step in the loop, e.g. keep the last losses in a
  deque and call .block_until_ready() on the one from 1 step back (or on
  every step's loss).

example:
  python -m experiments.launch --processes 2 --devices_per_process 2 -- \\
      python -m experiments.train --config=experiments/configs/default.py \\
      --workdir=runs/mp
"""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.launch",
      usage="%(prog)s [--processes N] [--devices_per_process D] [--grace_s S] -- COMMAND ...",
      description=__doc__, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2, help="JAX processes to start (2).")
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="CPU devices of each process (1).")
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="seconds the processes get to end after SIGTERM or SIGINT, or after "
                           "another process failed, before SIGKILL (10).")
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = _parser()
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])  # --help prints the full help and exits
  command = argv[split + 1:]
  if not command:
    parser.error("no command: put the command to run after --")
  try:
    return launch(command, args.processes, args.devices_per_process, grace_s=args.grace_s)
  except ValueError as e:
    parser.error(str(e))


if __name__ == "__main__":
  sys.exit(main())
