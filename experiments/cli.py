"""Flags and command-line parsing shared by the experiment binaries.

Every binary takes --config (an ml_collections config file, overridable key
by key as --config.<key>=<value>), --workdir and --overwrite. They are
defined once here, so that the binaries can be imported side by side.
"""

from __future__ import annotations

import logging as std_logging
import os
import runpy
import sys
import threading
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow_datasets as tfds

from sparsejax.checkpoint import CheckpointError
from experiments import config_checks
from experiments import distributed
from experiments import input_pipeline
from experiments import metrics as metrics_lib
from experiments import trainer
from experiments import workdir as workdir_lib

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/configs/default.py.", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics, checkpoints "
                              "and results.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: 'host:port' of process 0 (with "
    "--num_processes and --process_id; without them JAX reads SLURM / TPU pod / Open MPI "
    "environments itself).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this one's rank.")
CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "On CPU: devices per process.")
INIT_TIMEOUT = flags.DEFINE_float(
    "initialization_timeout", distributed.INITIALIZATION_TIMEOUT_S, "Multi-process runs: "
    "seconds each process waits for all of them to connect to the coordinator before it "
    "ends with a one-line error.")
OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a run of this binary already in --workdir: every file such a "
    "run writes is removed first (nothing else). A workdir holding another binary's run (a "
    "lottery workdir given to experiments.train) is refused: runs are never mixed.")


def _unknown_overrides(argv: list[str]) -> list[str]:
  """The --config.<key> overrides of `argv` naming a key the config file lacks."""
  config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_file is None:
    return []
  config = runpy.run_path(config_file)["get_config"]()
  unknown = []
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node, path = config, arg[len("--config."):].split("=", 1)[0].split(".")
    for part in path:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        unknown.append("--config." + ".".join(path))
        break
      node = node[part]
  return unknown


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for an unknown --config key."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # how ml_collections reports unknown keys
    unknown = _unknown_overrides(argv)
    if not unknown:
      raise  # not an override: a real error, keep its traceback
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    detail = str(e.args[0] if e.args else e).replace("\n", "; ")
    sys.exit(f"error: unknown config key {unknown[0]} (the config has no such field): {detail}")


class _QuietBackgroundFailures(std_logging.Filter):
  """Drops Orbax's error records: its writer threads log every failure with a
  traceback (dozens for one full disk), and asyncio logs its failed writer
  tasks again; the failure reaches the binary as an exception anyway,
  reported there in one line."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR:
      return True
    orbax = f"{os.sep}orbax{os.sep}"
    message = record.getMessage()
    if record.name == "asyncio" and "exception was never retrieved" in message:
      return False  # a writer task's failure, already raised to the binary
    return orbax not in record.pathname and orbax not in message


def _one_line_thread_failure(args: threading.ExceptHookArgs) -> None:
  """A background thread's exception in one line (its effect is reported by the binary)."""
  first = str(args.exc_value).strip().split("\n", 1)[0]
  name = args.thread.name if args.thread else "a thread"
  print(f"warning: background thread {name} failed: {args.exc_type.__name__}: {first}",
        file=sys.stderr)


def quiet_background_failures() -> None:
  """Background-thread failures (Orbax writers) as one line each, no tracebacks."""
  for name in ("absl", "asyncio"):
    std_logging.getLogger(name).addFilter(_QuietBackgroundFailures())
  threading.excepthook = _one_line_thread_failure
  default_hook = sys.unraisablehook

  def hook(unraisable):
    # TensorStore's completion callbacks, run after a failed Orbax save closed
    # its event loop, raise this; it says nothing the error line does not.
    if not (unraisable.exc_type is RuntimeError and
            str(unraisable.exc_value) == "Event loop is closed"):
      default_hook(unraisable)

  sys.unraisablehook = hook


def main_for(run: Callable[[ml_collections.ConfigDict, str, bool], Any],
             report: Callable[[Any, ml_collections.ConfigDict, str], None]) -> Callable:
  """An absl `main` that runs `run(config, workdir, overwrite)` and `report`s its result.

  Config, dataset (missing or damaged files), workdir, checkpoint and
  metrics-file errors, and OS errors (a full disk, a permission), end the
  program with one line naming the problem, not a traceback.
  """

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if CONFIG.value is None or not WORKDIR.value:
      raise app.UsageError("--config and --workdir are required.")
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the progress
    quiet_background_failures()
    tfds.disable_progress_bar()
    try:  # before any JAX computation
      distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                             CPU_DEVICES.value, INIT_TIMEOUT.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    except distributed.StartupError as e:  # a coordinator port in use
      sys.exit(f"error: {e}")
    processes = (f" in process {jax.process_index()} of {jax.process_count()}"
                 if jax.process_count() > 1 else "")
    print(f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} "
          f"device(s){processes}; workdir {WORKDIR.value}")
    try:
      # One process per workdir: a run already there is locked now (a second
      # copy of the command, started at any time, is refused in one line); a
      # new one when it is claimed. The OS releases the lock on any exit.
      workdir_lib.check_usable(WORKDIR.value)
      if distributed.is_primary():  # the process that writes the run's files holds the lock
        workdir_lib.hold_workdirs()
        if os.path.exists(os.path.join(WORKDIR.value, workdir_lib.CONFIG_FILE)):
          workdir_lib.lock(WORKDIR.value)
      result = run(CONFIG.value, WORKDIR.value, OVERWRITE.value)
    except (config_checks.ConfigError, input_pipeline.DatasetError,
            workdir_lib.WorkdirError, CheckpointError, metrics_lib.MetricsError,
            trainer.TrainingDiverged, OSError) as e:
      sys.exit(f"error: {e}")
    if distributed.is_primary():
      report(result, CONFIG.value, WORKDIR.value)

  return main
