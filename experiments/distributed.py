"""Multi-process start-up: one JAX process per host, every process running the same command.

`initialize` connects the processes (`jax.distributed.initialize`) when the
flags name a coordinator, or when JAX can find one itself (SLURM with more
than one task, a Cloud TPU pod slice, Open MPI); it must run before any JAX
computation. Afterwards `jax.devices()` lists the devices of every process:
the trainer's mesh spans them all, each process reads its slice of every
batch, and only the primary process writes the workdir's files (Orbax
checkpoints are written by all, each its own shards).

On CPU (tests, one machine) `--cpu_devices` gives each process that many
devices, and the processes talk through gloo.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading

import jax

INITIALIZATION_TIMEOUT_S = 120  # default of --initialization_timeout
JAX_TIMEOUT_MARGIN_S = 30  # JAX's own (fatal, misleading) timeout comes this much later


class StartupError(RuntimeError):
  """The processes of a multi-process run cannot connect (the message says why)."""


def _bind_address(coordinator_address: str) -> tuple[str, int]:
  """(host, port) the coordinator binds: JAX's default '[::]:port' or its environment's."""
  port = coordinator_address.rsplit(":", 1)[1]
  bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", "[::]:" + port)
  host, port = bind.rsplit(":", 1)
  return host.strip("[]"), int(port)


def check_port_free(coordinator_address: str) -> None:
  """Raises StartupError if the coordinator's port is taken on this host.

  JAX's coordinator would otherwise fail to bind with a log line and a crash,
  and the other processes wait their whole timeout for it.
  """
  host, port = _bind_address(coordinator_address)
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  try:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
      # As gRPC does: a port in TIME_WAIT from an earlier run is free to bind.
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      probe.bind((host, port))
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      raise StartupError(
          f"The coordinator port {port} (--coordinator_address={coordinator_address}) is "
          "in use on this host, by another program or run: choose a free port for every "
          "process.") from e
    if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):  # no IPv6 here: JAX tells
      raise StartupError(f"The coordinator cannot bind {host}:{port}: {e.strerror}.") from e


def _start_watchdog(message: str, timeout_s: float) -> threading.Timer:
  """Ends this process with `message` if the run is not connected within `timeout_s`.

  JAX's own timeout aborts with a stack trace that blames "another task" that
  died; the message says which address was waited on, and what to check.
  """

  def give_up():
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access  # the main thread is stuck inside JAX

  timer = threading.Timer(timeout_s, give_up)
  timer.daemon = True
  timer.start()
  return timer


def _connect(coordinator_address: str | None, num_processes: int | None,
             process_id: int | None, timeout_s: float) -> None:
  """jax.distributed.initialize, bounded by the watchdog (None: from the environment)."""
  if coordinator_address is None:
    message = (f"this process could not connect to the other processes of the cluster within "
               f"{timeout_s:g} s (--initialization_timeout).")
  else:
    if process_id == 0:
      check_port_free(coordinator_address)
    message = (f"process {process_id} of {num_processes} could not connect to the coordinator "
               f"at {coordinator_address} within {timeout_s:g} s (--initialization_timeout): "
               "process 0 must be running there and every process must have the same "
               "--coordinator_address and --num_processes (process 0 reports a port in use).")
  _use_gloo_on_cpu()
  timer = _start_watchdog(message, timeout_s)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(timeout_s) + JAX_TIMEOUT_MARGIN_S)
  finally:
    timer.cancel()


def _cluster_size_from_environment() -> int:
  """The number of processes a cluster's environment announces (1 outside one)."""
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if os.environ.get(name, "").isdigit():
      return int(os.environ[name])
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len(hosts.split(",")) if hosts else 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None,
               initialization_timeout: float = INITIALIZATION_TIMEOUT_S) -> None:
  """Connects this process to the others of a multi-process run, if there are any.

  Args:
    coordinator_address: 'host:port' of process 0; with `num_processes` and
      `process_id`, a run started by hand or by `experiments.launch`. None
      leaves the choice to the environment (a cluster JAX detects).
    num_processes, process_id: this run's size and this process's rank.
    cpu_devices: on CPU, the number of devices of each process.
    initialization_timeout: seconds every process waits for all of them to
      connect; then it ends with one line on stderr saying what to check
      (exit status 1).

  Raises:
    ValueError: some but not all of the three connection arguments, or a
      timeout that is not positive.
    StartupError: process 0 finds the coordinator's port in use.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together: "
                     "give all three (or none, to let JAX read the cluster's environment).")
  if initialization_timeout <= 0:
    raise ValueError(f"--initialization_timeout must be positive, not {initialization_timeout}.")
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if all(given):
    if num_processes > 1:
      _connect(coordinator_address, num_processes, process_id, initialization_timeout)
  elif _cluster_size_from_environment() > 1:
    _connect(None, None, None, initialization_timeout)


def _use_gloo_on_cpu() -> None:
  """CPU devices of different processes talk through gloo (accelerators have their own)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
