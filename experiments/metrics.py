"""Metrics to the workdir: JSON lines and TensorBoard scalars.

`metrics.jsonl` holds one JSON object per line, {"step": t, "split": ...,
name: value, ...}, readable with pandas.read_json(lines=True). TensorBoard
event files (tags "<split>/<name>") are written with TensorBoard's own
writer, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import event_file_writer

METRICS_FILE = "metrics.jsonl"
GARBLED_FILE = "metrics.garbled.txt"  # lines of metrics.jsonl that were not JSON, kept on resume
TENSORBOARD_DIR = "tensorboard"


class MetricsError(ValueError):
  """A line of metrics.jsonl is not a JSON record (names the file and line)."""


class MetricWriter:
  """Writes scalar metrics to `workdir/metrics.jsonl` and to TensorBoard."""

  def __init__(self, workdir: str, resume_step: int | None = None,
               log: Callable[[str], None] = print):
    """Opens the metrics of `workdir`.

    Args:
      workdir: the run's directory.
      resume_step: None for a new run (metrics.jsonl must not exist yet: two
        runs are never mixed); for a resumed run, the step it resumes from:
        records after it (written before the run was killed) are dropped and
        new ones appended. Lines that are not JSON (a record torn by the
        kill, a damaged disk) cannot be placed by step: they are moved to
        metrics.garbled.txt, with their line numbers, and reported via `log`.
    """
    os.makedirs(workdir, exist_ok=True)
    self._workdir = workdir
    path = os.path.join(workdir, METRICS_FILE)
    if resume_step is None:
      try:
        self._jsonl = open(path, "x", encoding="utf-8")
      except FileExistsError as e:
        raise FileExistsError(f"{path} exists: {workdir} already holds a run's metrics. Use a "
                              "fresh workdir (or experiments.train's --overwrite).") from e
    else:
      records, garbled = _parse(path) if os.path.exists(path) else ([], [])
      kept = [r for r in records if r["step"] <= resume_step]
      if garbled:
        with open(os.path.join(workdir, GARBLED_FILE), "a", encoding="utf-8") as f:
          f.writelines(f"{path}:{number}: {line.rstrip()}\n" for number, line in garbled)
        log(f"{path}: line(s) {[number for number, _ in garbled]} are not JSON records; moved "
            f"to {GARBLED_FILE} (kept, not read back).")
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(path + ".tmp", path)
      self._jsonl = open(path, "a", encoding="utf-8")
    # TensorBoard shows the newest value when a resumed run writes a step again.
    self._events = event_file_writer.EventFileWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def history(self) -> list[dict]:
    """The records written so far (a resumed run's, up to its step)."""
    return read_metrics(self._workdir)

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    """Records `scalars` of `split` ('train', 'test', ...) at `step`."""
    scalars = {name: float(value) for name, value in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    values = [summary_pb2.Summary.Value(tag=f"{split}/{name}", simple_value=value)
              for name, value in scalars.items()]
    self._events.add_event(event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    self._jsonl.flush()
    self._events.flush()

  def close(self) -> None:
    self._jsonl.close()
    self._events.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class NullWriter:
  """A MetricWriter that writes nothing: for the processes of a multi-process
  run other than the primary one."""

  def history(self) -> list[dict]:
    return []

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    del step, split, scalars

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass

  def __enter__(self) -> "NullWriter":
    return self

  def __exit__(self, *exc) -> None:
    pass


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, optionally of one split."""
  records = _read_records(os.path.join(workdir, METRICS_FILE))
  return [r for r in records if split is None or r["split"] == split]


def _parse(path: str) -> tuple[list[dict], list[tuple[int, str]]]:
  """The records of a JSON-lines file, and the (line number, line) of those that are not."""
  records, garbled = [], []
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        records.append(record)
      else:
        garbled.append((number, line))
  return records, garbled


def _read_records(path: str) -> list[dict]:
  """The records of a JSON-lines file.

  Raises:
    MetricsError: naming the file and the first line that is not a record.
  """
  records, garbled = _parse(path)
  if garbled:
    number, line = garbled[0]
    raise MetricsError(f"{path}, line {number}, is not a JSON metrics record: "
                       f"{line.strip()[:80]!r}")
  return records
