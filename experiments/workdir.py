"""A workdir holds one run: its config, metrics and results.

`check` decides what may happen to an existing workdir: a fresh or empty
one is used; an unfinished run of the same config is resumed from its
checkpoints; a finished one is reported, not retrained; anything else is
refused unless the caller asks to overwrite, so nothing saved is lost
silently.
"""

from __future__ import annotations

import enum
import fcntl
import functools
import hashlib
import json
import os
import pwd
import shutil
import socket
import tempfile
from typing import Callable

import ml_collections

from sparsejax.checkpoint import CheckpointError
from sparsejax.checkpoint import SparseCheckpointManager

CONFIG_FILE = "config.json"
FINAL_FILE = "final.json"
LOCK_FILE = ".lock"  # the OS lock of the process using the workdir, and who that is
# Every name each binary writes at the top of its workdir, declared here once:
# --overwrite removes these and nothing else, and a workdir holding names of
# another binary is refused. The binaries' own constants (train.NM_EXPORT,
# lottery_report.CSV_FILE, ...) must be listed here (tests/test_workdir.py
# checks them, and what each binary's run leaves in its workdir).
BINARY_RUN_FILES = {
    "experiments.train": (CONFIG_FILE, FINAL_FILE, "metrics.jsonl", "metrics.garbled.txt",
                          "tensorboard", "curves.png", "checkpoints", "dense_baseline",
                          "nm_export.npz"),
    "experiments.lottery": (CONFIG_FILE, FINAL_FILE, "summary.csv", "lottery.png", "replicates"),
    "experiments.nm_study": (CONFIG_FILE, FINAL_FILE, "summary.csv", "nm_study.png", "runs"),
    "experiments.oneshot": (CONFIG_FILE, FINAL_FILE, "summary.csv", "oneshot.png", "rows",
                            "pruned"),
    "experiments.sensitivity": (CONFIG_FILE, FINAL_FILE, "sensitivity.csv", "sensitivity.png",
                                "rates.json"),
    "experiments.structured": (CONFIG_FILE, FINAL_FILE, "summary.csv", "rows"),
}
RUN_FILES = BINARY_RUN_FILES["experiments.train"]  # the default: experiments.train's


class Status(enum.Enum):
  NEW = "new"            # nothing of a run here: train
  RESUME = "resume"      # an unfinished run of the same config: continue it
  FINISHED = "finished"  # same config, final results present: nothing to do


class WorkdirError(RuntimeError):
  """The workdir holds a run that this invocation must not touch."""


def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON types (tuples become lists)."""
  return json.loads(config.to_json())


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_diff(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every key whose value differs."""
  old, new = _flat(old), _flat(new)
  return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
          for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]


def save_json(workdir: str, name: str, value) -> None:
  """Writes `value` as JSON atomically: readers see the old file or the whole new one."""
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f".{name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(value, f, indent=2, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(workdir, name))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_json(workdir: str, name: str):
  """The JSON value in `workdir/name`.

  Raises:
    WorkdirError: the file is not JSON (truncated or damaged), naming it.
  """
  path = os.path.join(workdir, name)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    where = (f"{e.msg} at line {e.lineno} column {e.colno}"
             if isinstance(e, json.JSONDecodeError) else f"{e.reason} at byte {e.start}")
    todo = (f"`rm {path}` and rerun: it is redone (a run's results from its checkpoints)."
            if os.path.basename(path) != CONFIG_FILE else
            "Restore it, or replace the whole run with --overwrite.")
    raise WorkdirError(f"{path} is not valid JSON (truncated or damaged: {where}). {todo}") from e


def check_usable(workdir: str) -> None:
  """Raises WorkdirError, in one line, if `workdir` cannot hold a run.

  That is: it (or a directory above it) is a file, or the nearest existing
  directory on its path is not writable by this user.
  """
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise WorkdirError(f"Workdir {workdir}: {path} is a file, not a directory; choose another "
                       "--workdir.")
  effective = os.access in os.supports_effective_ids
  if not os.access(path, os.W_OK | os.X_OK, effective_ids=effective):
    user = pwd.getpwuid(os.geteuid()).pw_name
    raise WorkdirError(f"Workdir {workdir}: {path} is not writable by user {user}; choose a "
                       "--workdir you can write to.")


_held: dict[str, int] = {}  # realpath -> open fd of each workdir lock this process holds
_lock_on_start = [False]


def lock(workdir: str) -> None:
  """Locks an existing `workdir` for the rest of this process.

  The lock is the OS's (`flock` on `<workdir>/.lock`), so it is released on
  any exit, SIGKILL included; the file names the holder. Taking it again in
  the same process does nothing.

  Raises:
    WorkdirError: another process holds it (names its pid and host).
  """
  key = os.path.realpath(workdir)
  if key in _held:
    return
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = os.read(fd, 256).decode(errors="replace").strip() or "an unknown process"
    os.close(fd)
    raise WorkdirError(f"Workdir {workdir} is in use by another run ({holder}); wait for it "
                       "to end or use another --workdir.") from e
  os.ftruncate(fd, 0)
  os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
  _held[key] = fd
  if _call_locks and not _lock_on_start[0]:
    _call_locks[-1].append(key)  # released when that library call returns


def _release(key: str) -> None:
  fd = _held.pop(key)
  fcntl.flock(fd, fcntl.LOCK_UN)
  os.close(fd)


def _locking() -> bool:
  """Whether `check` and `start` lock the workdirs they claim or find a run in."""
  return _lock_on_start[0] or bool(_call_locks)


_call_locks: list[list[str]] = []  # per library call in progress: the locks it took


def holds_workdirs(run: Callable) -> Callable:
  """Decorates a library `run(config, workdir, ...)`: during the call, `check`
  and `start` lock each workdir they claim or find a run in, as a binary's do
  (a second caller, in any process, is refused in one line), and the locks it
  took are released when it returns or raises.

  In a binary (`hold_workdirs`) the locks last for the process instead. In a
  multi-process run the primary process, which writes the files, holds them.
  """

  @functools.wraps(run)
  def wrapper(*args, **kwargs):
    from experiments import distributed  # pylint: disable=g-import-not-at-top
    if _lock_on_start[0] or not distributed.is_primary():
      return run(*args, **kwargs)
    _call_locks.append([])
    try:
      return run(*args, **kwargs)
    finally:
      for key in _call_locks.pop():
        _release(key)

  return wrapper


def hold_workdirs() -> None:
  """From now on `start` and `check` lock each workdir they claim or find a run in.

  The locks last for the life of the process.

  For command-line binaries, whose process is the run; library callers (a
  notebook running several studies) keep no lock past their call.
  """
  _lock_on_start[0] = True


def check(workdir: str, config: ml_collections.ConfigDict, overwrite: bool = False,
          run_files: tuple[str, ...] = RUN_FILES) -> Status:
  """What a run of `config` may do with `workdir`; reads only.

  Returns:
    Status.NEW when no run is here (or `overwrite`), Status.RESUME for an
    unfinished run of this config, Status.FINISHED when this config's final
    results are here.

  Raises:
    WorkdirError: the workdir holds a run of a different config, or run
      files without a config, and `overwrite` is False; or, with
      `overwrite`, files that another binary's run writes (a lottery
      workdir given to experiments.train): never a mix of two runs.

  `run_files` are the names a run of this binary writes (default: those of
  experiments.train).
  """
  present = _present(workdir, run_files)
  if overwrite and present:
    foreign = sorted(set(_present(workdir, tuple(_all_run_files()))) - set(run_files))
    if foreign:
      raise WorkdirError(
          f"Workdir {workdir} holds {foreign}, written by another experiment binary; "
          "--overwrite replaces only a run of this binary, whole, and never leaves a mix. "
          "Remove that run yourself or use another --workdir.")
  if not present or overwrite:
    return Status.NEW
  if CONFIG_FILE not in present:
    raise WorkdirError(
        f"Workdir {workdir} holds run files {present} but no {CONFIG_FILE}; refusing to "
        "write over them. Pass --overwrite to replace them, or use another --workdir.")
  if _locking():  # claim the run here before resuming or reporting it
    lock(workdir)
  diff = config_diff(load_json(workdir, CONFIG_FILE), config_dict(config))
  if diff:
    raise WorkdirError(
        f"Workdir {workdir} holds a run with a different config:\n  " + "\n  ".join(diff) +
        "\nPass --overwrite to replace that run, or use another --workdir.")
  return Status.FINISHED if FINAL_FILE in present else Status.RESUME


def start(workdir: str, config: ml_collections.ConfigDict, overwrite: bool = False,
          run_files: tuple[str, ...] = RUN_FILES) -> None:
  """Claims `workdir` for a new run of `config`: writes config.json.

  With `overwrite`, first removes the files an earlier run wrote
  (`run_files`) and nothing else.

  Raises:
    WorkdirError: as `check`, or when the workdir holds this finished run.
  """
  if check(workdir, config, overwrite, run_files) is not Status.NEW:
    raise WorkdirError(f"Workdir {workdir} already holds a run of this config.")
  os.makedirs(workdir, exist_ok=True)
  if _locking():
    lock(workdir)  # before anything in it is removed
  for name in _present(workdir, run_files):
    path = os.path.join(workdir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  try:  # exclusive create: of two runs started on one workdir, one fails here
    with open(os.path.join(workdir, CONFIG_FILE), "x", encoding="utf-8") as f:
      json.dump(config_dict(config), f, indent=2, sort_keys=True)
  except FileExistsError as e:
    raise WorkdirError(f"Another run claimed {workdir} at the same time.") from e


def _all_run_files() -> set[str]:
  """The names a run of any experiment binary writes."""
  return set().union(*BINARY_RUN_FILES.values())


def undeclared(workdir: str, run_files: tuple[str, ...] = RUN_FILES) -> list[str]:
  """Names at the top of `workdir` that are not in `run_files` (its lock and
  half-written temporaries aside): files --overwrite would leave behind."""
  return sorted(name for name in os.listdir(workdir)
                if name not in run_files and name != LOCK_FILE and not name.endswith(".tmp"))


def _present(workdir: str, run_files: tuple[str, ...] = RUN_FILES) -> list[str]:
  return [name for name in run_files if os.path.exists(os.path.join(workdir, name))]


def config_digest(config: dict) -> str:
  """A short SHA-256 of a config (plain JSON types), keys sorted."""
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def identity(config: dict, checkpoints: str) -> dict:
  """What a run's results come from: its config's digest, and the step and
  checksum (of the checksummed meta, which holds every leaf's checksum) of the
  latest checkpoint in `checkpoints`; step and checksum None if there is none
  (or it cannot be read)."""
  step = checksum = None
  if os.path.isdir(checkpoints):
    with SparseCheckpointManager(checkpoints, read_only=True) as manager:  # changes nothing there
      step = manager.latest_step()
      if step is not None:
        try:
          checksum = (manager.restore(step).meta or {}).get("meta_checksum")
        except CheckpointError:
          checksum = None
  return {"config_digest": config_digest(config), "step": step, "checkpoint_checksum": checksum}


IDENTITY_KEY = "identity"  # in a finished run's final.json (or a row): identity() of its source


def identity_mismatch(recorded: dict | None, current: dict) -> str | None:
  """Why results recorded from `recorded` do not come from `current`, in a
  few words, or None when they do (or when nothing was recorded: results
  written before identities were kept are trusted)."""
  if recorded is None:
    return None
  differ = [f"{key} {recorded.get(key)!r} != {value!r}" for key, value in current.items()
            if recorded.get(key) != value]
  return "; ".join(differ) or None
