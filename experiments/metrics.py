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

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import event_file_writer

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes scalar metrics to `workdir/metrics.jsonl` and to TensorBoard."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    """Opens the metrics of `workdir`.

    Args:
      workdir: the run's directory.
      resume_step: None for a new run (metrics.jsonl must not exist yet: two
        runs are never mixed); for a resumed run, the step it resumes from:
        records after it (written before the run was killed) are dropped and
        new ones appended.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if resume_step is None:
      try:
        self._jsonl = open(path, "x", encoding="utf-8")
      except FileExistsError as e:
        raise FileExistsError(f"{path} exists: {workdir} already holds a run's metrics. Use a "
                              "fresh workdir (or experiments.train's --overwrite).") from e
    else:
      kept = [r for r in _read_records(path, tolerate_torn_end=True)
              if r["step"] <= resume_step] if os.path.exists(path) else []
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(path + ".tmp", path)
      self._jsonl = open(path, "a", encoding="utf-8")
    # TensorBoard shows the newest value when a resumed run writes a step again.
    self._events = event_file_writer.EventFileWriter(os.path.join(workdir, TENSORBOARD_DIR))

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


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, optionally of one split."""
  records = _read_records(os.path.join(workdir, METRICS_FILE))
  return [r for r in records if split is None or r["split"] == split]


def _read_records(path: str, tolerate_torn_end: bool = False) -> list[dict]:
  """Parses JSON lines; a killed writer may leave a torn last line, dropped if tolerated."""
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if tolerate_torn_end and i == len(lines) - 1:
        break
      raise
  return records
