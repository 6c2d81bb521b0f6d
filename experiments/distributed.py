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

import os

import jax

def _cluster_size_from_environment() -> int:
  """The number of processes a cluster's environment announces (1 outside one)."""
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if os.environ.get(name, "").isdigit():
      return int(os.environ[name])
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len(hosts.split(",")) if hosts else 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None) -> None:
  """Connects this process to the others of a multi-process run, if there are any.

  Args:
    coordinator_address: 'host:port' of process 0; with `num_processes` and
      `process_id`, a run started by hand or by `experiments.launch`. None
      leaves the choice to the environment (a cluster JAX detects).
    num_processes, process_id: this run's size and this process's rank.
    cpu_devices: on CPU, the number of devices of each process.

  Raises:
    ValueError: some but not all of the three connection arguments.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together: "
                     "give all three (or none, to let JAX read the cluster's environment).")
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if all(given):
    if num_processes > 1:
      _use_gloo_on_cpu()
      jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_size_from_environment() > 1:
    _use_gloo_on_cpu()
    jax.distributed.initialize()


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
