"""Benchmark: the streaming Grain input pipeline vs the in-memory one it replaced.

Three measurements in one run, batch 128:

1. Images/s of `input_pipeline.train_batches` (Grain over ArrayRecord, no
   split in memory) vs the previous pipeline: the whole training split
   decoded once into a standardised float32 array, a batch taken by
   `batch_indices` and fancy indexing. Datasets: the bundled
   `sklearn_digits` (8x8x1, 1,437 train, cached after the first read) and
   `synthetic_cifar`, 50,000 32x32x3 uint8 images of 10 classes written by
   this script as PNG-encoded TFDS ArrayRecord files (smooth colour blocks
   plus noise: ~2.5 KB a PNG, like CIFAR-10's), read with cache_mb=0 so it
   truly streams; worker_count 0 and 2, augment 'none' and 'cifar'.
   Diagnostic row: the same per-batch transforms (`TrainBatch`) on uint8
   images held in memory, i.e. the new pipeline minus file reads and PNG
   decoding. Iterators are created once (their time to the first batch is
   printed), then blocks of batches are timed in interleaved rounds, order
   rotated, after draining each iterator's read-ahead; medians are reported.
2. Input time per step vs a ResNet-20 training step: `experiments.trainer.
   Trainer` with configs/resnet20_cifar10.py on synthetic_cifar (augment
   'cifar', cache_mb 0, worker_count 2). In each of --step-rounds rounds:
   the compiled step alone (fixed batch, the workers idle), the pipeline's
   time per batch (`Trainer.batches`, no training), and a step fed by the
   pipeline: its wait in `next()` and its time while the workers read the
   next batch on the same cores. Medians of per-round ratios to the step
   alone.
3. Peak RSS of a fresh subprocess that only iterates --rss-batches batches
   of synthetic_cifar (augment 'cifar', cache_mb 0), vs the size on disk of
   the train split's ArrayRecord files. With workers, the peak is the
   parent's plus each worker's (VmHWM, sampled from /proc every batch); as
   RSS counts the libraries every process maps once per process, the
   largest sampled sum of PSS is printed too. Also the subprocess's RSS
   before its first batch (imports, opened files): most of the peak on a
   set this small. Baseline: a subprocess holding the split the old way
   (uint8 decoded + standardised float32).

The written dataset (and, for the baseline, the decoded train split as .npz,
and the XLA compilation cache) live in --data_dir: pass one to reuse them
across runs (the first run writes 50,000 PNGs, ~1 min here). Default: a
temporary directory, removed at the end.

  python benchmarks/input.py --data_dir /tmp/sparsejax_input_bench
  python benchmarks/input.py --rounds 5 --block 30 --step-rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

# Run as a script from anywhere: `experiments` lives at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import input_pipeline  # pylint: disable=g-import-not-at-top

SYNTHETIC = "synthetic_cifar"
DIGITS = "sklearn_digits"
CHUNK = 1000  # examples generated / decoded at a time


class SyntheticCifar(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """50,000 train / 1,000 test 32x32x3 uint8 images of 10 classes, PNG-encoded.

  Each image: a random 4x4 colour grid upsampled to 32x32 plus Gaussian noise
  (sigma 12), which PNG-compresses to ~2.5 KB like CIFAR-10's photos.
  """

  VERSION = tfds.core.Version("1.0.0")
  SIZES = {"train": 50_000, "test": 1_000}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)}), supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(seed, n)
            for seed, (split, n) in enumerate(self.SIZES.items())}

  def _generate_examples(self, seed, n):
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
      m = min(CHUNK, n - start)
      grid = rng.integers(0, 256, (m, 4, 4, 3)).astype(np.float32)
      smooth = np.repeat(np.repeat(grid, 8, axis=1), 8, axis=2)
      images = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
      for j in range(m):
        yield start + j, {"image": images[j], "label": (start + j) % 10}
      if (start + m) % 10_000 == 0 or start + m == n:
        print(f"  wrote {start + m:,}/{n:,} examples", flush=True)


# Found by name through `input_pipeline.data_source` in this process and in
# Grain's spawned workers (which import this file as __mp_main__).
input_pipeline.BUNDLED.setdefault(SYNTHETIC, SyntheticCifar)


def _png(image) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
  return buffer.getvalue()


@contextlib.contextmanager
def _pil_png_encoder():
  """TFDS encodes Image features with TensorFlow, absent here; PIL writes the PNGs."""
  original = tfds.features.Image.encode_example
  tfds.features.Image.encode_example = lambda self, x: _png(x)
  try:
    yield
  finally:
    tfds.features.Image.encode_example = original


def prepare(data_dir: str) -> None:
  """Writes synthetic_cifar (unless already there) and sklearn_digits to data_dir."""
  builder = SyntheticCifar(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    print(f"writing {SYNTHETIC} to {data_dir} (once per --data_dir) ...", flush=True)
    start = time.perf_counter()
    with _pil_png_encoder():
      builder.download_and_prepare()
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
  input_pipeline.data_source(DIGITS, "train", data_dir)


def train_files_bytes(data_dir: str) -> int:
  """Size on disk of the ArrayRecord files of synthetic_cifar's train split."""
  path = SyntheticCifar(data_dir=data_dir, file_format="array_record").data_path
  return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*-train.array_record*")))


# --- The previous pipeline: a split decoded into memory, batches by indexing.

def _decoded_cache(name: str, data_dir: str) -> str:
  return os.path.join(data_dir, f"{name}_train_decoded.npz")


def decode_train(name: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole train split as (uint8 NHWC, int32), cached as .npz in data_dir."""
  cache = _decoded_cache(name, data_dir)
  if os.path.exists(cache):
    with np.load(cache) as f:
      return f["images"], f["labels"]
  source = input_pipeline.data_source(name, "train", data_dir)
  images, labels = [], []
  for start in range(0, len(source), CHUNK):  # batched reads: faster than one by one
    for example in source.__getitems__(list(range(start, min(start + CHUNK, len(source))))):
      image = np.asarray(example["image"])
      images.append(image[..., None] if image.ndim == 2 else image)
      labels.append(int(example["label"]))
  images, labels = np.stack(images), np.asarray(labels, np.int32)
  np.savez(cache, images=images, labels=labels)
  return images, labels


def standardise(images: np.ndarray) -> np.ndarray:
  """The old `load`: scale to [0, 1], standardise per channel on the whole split."""
  x = images.astype(np.float32) / 255.0
  mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2)) + 1e-6
  return ((x - mean) / std).astype(np.float32)


class InMemoryBatches:
  """The old training batches: `images[batch_indices(...)]` of a float32 split."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    self.images, self.labels = images, labels
    self.batch_size, self.seed, self.step = batch_size, seed, 0

  def __next__(self):
    idx = input_pipeline.batch_indices(len(self.labels), self.batch_size, self.seed, self.step)
    self.step += 1
    return self.images[idx], self.labels[idx]


class InMemorySplit:
  """uint8 images in memory behind `Split.examples`: the new transforms without file reads."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
    self.images, self.labels, self.num_classes = images, labels, num_classes

  def __len__(self) -> int:
    return len(self.labels)

  def examples(self, indices):
    indices = np.asarray(indices)
    return list(self.images[indices]), self.labels[indices]


class StepBatches:
  """`TrainBatch(step)` called in this thread, step after step."""

  def __init__(self, batch: input_pipeline.TrainBatch):
    self.batch, self.step = batch, 0

  def __next__(self):
    self.step += 1
    return self.batch(self.step - 1)


# --- Timing.

def _status_kib(pid: int | str, field: str) -> int:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _descendants(pid: int) -> list[int]:
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    for task in glob.glob(f"/proc/{p}/task/*/children"):
      try:
        with open(task) as f:
          kids = [int(c) for c in f.read().split()]
      except OSError:
        continue
      out += kids
      todo += kids
  return out


def _cpu_seconds() -> float:
  """CPU time used so far by this process (all threads) and its descendants."""
  total = 0.0
  for pid in [os.getpid()] + _descendants(os.getpid()):
    with contextlib.suppress(OSError, IndexError):  # a process that just ended
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  return total


def wait_idle(timeout_s: float = 20.0, window_s: float = 0.25, busy: float = 0.1) -> None:
  """Waits until our read-ahead threads and workers have filled their buffers (this
  process tree uses < `busy` of a core), so they do not steal the next block's CPU."""
  deadline, before = time.perf_counter() + timeout_s, _cpu_seconds()
  while time.perf_counter() < deadline:
    time.sleep(window_s)
    now = _cpu_seconds()
    if now - before < busy * window_s:
      return
    before = now


def _close(iterator) -> None:
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


def time_per_batch(iterator, drain: int, count: int, min_s: float) -> float:
  """Seconds per batch over >= count batches and >= min_s, after `drain` untimed ones
  (an idle iterator's read-ahead buffer would otherwise come for free)."""
  for _ in range(drain):
    next(iterator)
  n, start = 0, time.perf_counter()
  while n < count or time.perf_counter() - start < min_s:
    next(iterator)
    n += 1
  return (time.perf_counter() - start) / n


def interleaved(runners: dict, rounds: int, count: int, min_s: float) -> dict[str, float]:
  """Median seconds per batch of each runner {name: (iterator, drain)}, over rounds
  in which every runner times one block, the order rotated each round."""
  names = list(runners)
  times = {name: [] for name in names}
  for i in range(rounds):
    k = i % len(names)
    for name in names[k:] + names[:k]:
      iterator, drain = runners[name]
      wait_idle()
      times[name].append(time_per_batch(iterator, drain, count, min_s))
  return {name: statistics.median(ts) for name, ts in times.items()}


def _read_ahead(prefetch: int, workers: int) -> int:
  """More than the batches a full pipeline holds: Grain keeps `prefetch` per worker
  queue, one in each worker's hands and `prefetch` per worker in the interleave
  (threads: `prefetch` buffered plus `prefetch` being read). Draining too many costs
  little: the excess are read at the steady rate, and merely not timed."""
  return (2 * prefetch + 2) * max(1, workers) + 2


def pipeline_runners(data, args, configs) -> tuple[dict, dict]:
  """Started Grain iterators {label: (iterator, drain)} and their time to the first batch."""
  runners, first = {}, {}
  for augment, workers in configs:
    label = f"grain  augment={augment:<5} workers={workers}"
    start = time.perf_counter()
    iterator = input_pipeline.train_batches(
        data._replace(augment=augment), args.batch, seed=0, start_step=0, num_steps=10**7,
        worker_count=workers, prefetch=args.prefetch)
    next(iterator)
    first[label] = time.perf_counter() - start
    runners[label] = (iterator, _read_ahead(args.prefetch, workers))
  return runners, first


def throughput(name: str, data_dir: str, args, configs, cache_mb: float) -> dict[str, float]:
  """Images/s of each pipeline on `name`; prints a table; returns {label: images/s}."""
  print(f"\n== {name}: train split, batch {args.batch}, cache_mb={cache_mb:g}", flush=True)
  start = time.perf_counter()
  data = input_pipeline.load(name, data_dir, cache_mb=cache_mb)
  print(f"new pipeline: opened in {time.perf_counter() - start:.1f} s "
        f"({len(data.train):,} examples of shape {data.image_shape}; mean/std estimated)",
        flush=True)
  start = time.perf_counter()
  source = "its .npz cache" if os.path.exists(_decoded_cache(name, data_dir)) else "the files"
  raw_images, labels = decode_train(name, data_dir)
  images = standardise(raw_images)
  print(f"old pipeline: split in memory in {time.perf_counter() - start:.1f} s "
        f"({images.nbytes / 2**20:.2f} MiB float32; decoded from {source})", flush=True)
  in_memory = data._replace(train=InMemorySplit(raw_images, labels, data.num_classes))
  runners = {"in-memory (old): float32 split, index": (
      InMemoryBatches(images, labels, args.batch, seed=0), 1)}
  for augment in sorted({a for a, _ in configs}):
    runners[f"in-memory uint8 + TrainBatch, {augment}"] = (StepBatches(
        input_pipeline.TrainBatch(in_memory._replace(augment=augment), args.batch, 0)), 1)
  grain_runners, first = pipeline_runners(data, args, configs)
  runners.update(grain_runners)
  try:
    per_batch = interleaved(runners, args.rounds, args.block, args.min_block_s)
  finally:
    for iterator, _ in grain_runners.values():
      _close(iterator)
  rates = {label: args.batch / t for label, t in per_batch.items()}
  base = rates["in-memory (old): float32 split, index"]
  print(f"{'pipeline':<42} {'images/s':>10} {'ms/batch':>9} {'/ old':>8} {'1st batch s':>12}")
  print("-" * 85)
  for label, rate in rates.items():
    first_s = f"{first[label]:12.1f}" if label in first else f"{'':12}"
    print(f"{label:<42} {rate:10.0f} {per_batch[label] * 1e3:9.2f} {rate / base:8.4f} {first_s}")
  del images, raw_images
  gc.collect()
  return {label: rate / base for label, rate in rates.items() if label in first}


# --- ResNet-20 step vs input time.

def step_vs_input(data_dir: str, args) -> dict[str, float]:
  """Times the Trainer's compiled step and its pipeline; returns the ratios."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import resnet20_cifar10  # pylint: disable=g-import-not-at-top

  config = resnet20_cifar10.get_config()
  config.dataset, config.data_dir = SYNTHETIC, data_dir
  config.batch_size = args.batch
  config.input.augment, config.input.cache_mb = "cifar", 0.0
  config.input.worker_count, config.input.prefetch = args.step_workers, args.prefetch
  jax.config.update("jax_compilation_cache_dir", os.path.join(data_dir, "xla_cache"))
  print(f"\n== ResNet-20 step vs input: configs/resnet20_cifar10.py on {SYNTHETIC}, batch "
        f"{args.batch}, augment cifar, cache_mb 0, worker_count {args.step_workers}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
  trainer = trainer_lib.Trainer(config)
  state = trainer.initial_state()
  start = time.perf_counter()
  step = trainer.compiled_step(state)
  print(f"compiled the train step ({trainer.method}) in {time.perf_counter() - start:.0f} s "
        f"(XLA cache in --data_dir)", flush=True)
  images, labels = trainer.batch(0)
  state, _ = step(0, state, images, labels)  # warm-up
  jax.block_until_ready(state)
  batches = trainer.batches(0)  # Grain, then device_put, as in training
  start = time.perf_counter()
  next(batches)
  first_s = time.perf_counter() - start

  def timed_step(batch) -> float:
    nonlocal state
    start = time.perf_counter()
    state, _ = step(0, state, *batch)
    jax.block_until_ready(state)
    return time.perf_counter() - start

  # Rounds of: a step alone (the workers idle, their buffers full); the pipeline
  # alone; a step fed by the pipeline (the workers read the next batch meanwhile,
  # as in steady-state training). Ratios are per round, then the median.
  rows = {"step alone": [], "input/batch": [], "wait": [], "fed step": []}
  for _ in range(args.step_rounds):
    wait_idle()
    rows["step alone"].append(timed_step((images, labels)))
    rows["input/batch"].append(time_per_batch(
        batches, _read_ahead(args.prefetch, args.step_workers), args.step_input_batches,
        args.min_block_s))
    wait_idle()
    start = time.perf_counter()
    batch = next(batches)
    rows["wait"].append(time.perf_counter() - start)
    rows["fed step"].append(timed_step(batch))
  batches.close()
  gc.collect()
  alone = rows["step alone"]
  print(f"{args.step_rounds} rounds ({first_s:.1f} s to the first batch); medians, ms:")
  for name, ts in rows.items():
    print(f"  {name:<12} {statistics.median(ts) * 1e3:9.1f}   (min {min(ts) * 1e3:.1f}, "
          f"max {max(ts) * 1e3:.1f})")
  print("  (input/batch: Trainer.batches alone, >= "
        f"{args.step_input_batches} batches a round; wait: in next() before a fed step)",
        flush=True)
  def ratio(name):
    return statistics.median(t / a for t, a in zip(rows[name], alone))

  return {"input/step": ratio("input/batch"), "wait/step": ratio("wait"),
          "fed step/step alone": ratio("fed step")}


# --- Peak RSS, in fresh subprocesses.

def _pss_kib(pid: int | str) -> int:
  """Proportional set size: shared pages (the libraries every worker maps) split
  between the processes that map them, so a sum over processes counts them once."""
  with open(f"/proc/{pid}/smaps_rollup") as f:
    for line in f:
      if line.startswith("Pss:"):
        return int(line.split()[1])
  return 0


class TreeMemory:
  """Peaks of this process and its descendants, sampled by `sample()`."""

  def __init__(self):
    self.hwm_kib: dict[int, int] = {}  # descendant pid -> its VmHWM
    self.pss_kib = 0  # the largest sampled sum of PSS over the tree

  def sample(self) -> None:
    pss = _pss_kib("self")
    for pid in _descendants(os.getpid()):
      with contextlib.suppress(OSError):  # a process that just ended
        self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), _status_kib(pid, "VmHWM"))
        pss += _pss_kib(pid)
    self.pss_kib = max(self.pss_kib, pss)


def rss_child(args) -> None:
  """Subprocess body: iterate batches (or hold the old split); print its memory as JSON."""
  mode, data_dir = args.rss_child, args.data_dir
  memory = TreeMemory()
  if mode == "in-memory":
    images, labels = decode_train(SYNTHETIC, data_dir)
    base_kib = _status_kib("self", "VmRSS")
    x = standardise(images)
    for step in range(args.rss_batches):
      idx = input_pipeline.batch_indices(len(labels), args.batch, 0, step)
      batch = x[idx], labels[idx]
      del batch
      memory.sample()
  else:
    stats = json.loads(args.rss_stats)
    data = input_pipeline.load(SYNTHETIC, data_dir, augment="cifar", cache_mb=0,
                               mean=stats["mean"], std=stats["std"])
    base_kib = _status_kib("self", "VmRSS")
    iterator = input_pipeline.train_batches(data, args.batch, 0, 0, args.rss_batches,
                                            worker_count=int(mode.split("=")[1]),
                                            prefetch=args.prefetch)
    for _ in iterator:
      memory.sample()
    _close(iterator)
  print(json.dumps({
      "base_kib": base_kib,
      # Not getrusage: Linux carries ru_maxrss across fork + exec, so this process's
      # (and its workers') would include the parent's RSS at the fork. VmHWM is the
      # process image's own.
      "self_kib": _status_kib("self", "VmHWM"),
      "children_kib": sum(memory.hwm_kib.values()),
      "children": len(memory.hwm_kib),
      "pss_kib": memory.pss_kib}))


def peak_rss(data_dir: str, args, stats) -> dict[str, tuple[float, float, float]]:
  """Runs the memory subprocesses and prints a table; returns, per mode, the peak
  RSS, peak PSS and RSS growth from before the first batch, each / size on disk."""
  disk = train_files_bytes(data_dir)
  print(f"\n== Peak memory of a fresh subprocess iterating {args.rss_batches} batches of "
        f"{SYNTHETIC} (augment cifar, cache_mb 0) vs its train split on disk: "
        f"{disk / 2**20:.1f} MiB", flush=True)
  print(f"{'subprocess':<36} {'RSS MiB':>8} {'/ disk':>7} {'PSS MiB':>8} {'/ disk':>7} "
        f"{'RSS before':>11} {'growth':>7} {'/ disk':>7}")
  print("-" * 98)
  ratios = {}
  for mode in [f"workers={w}" for w in args.rss_workers] + ["in-memory"]:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", mode, "--data_dir",
           data_dir, "--batch", str(args.batch), "--rss-batches", str(args.rss_batches),
           "--prefetch", str(args.prefetch), "--rss-stats", json.dumps(stats)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
      raise RuntimeError(f"memory subprocess {mode} failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    rss = (r["self_kib"] + r["children_kib"]) * 1024
    pss, growth = r["pss_kib"] * 1024, rss - r["base_kib"] * 1024
    label = ("in-memory (old): decoded + float32" if mode == "in-memory"
             else f"grain, {mode} (+{r['children']} processes)")
    print(f"{label:<36} {rss / 2**20:8.0f} {rss / disk:7.2f} {pss / 2**20:8.0f} "
          f"{pss / disk:7.2f} {r['base_kib'] / 1024:11.0f} {growth / 2**20:7.0f} "
          f"{growth / disk:7.2f}", flush=True)
    ratios[mode] = (rss / disk, pss / disk, growth / disk)
  print("RSS: the subprocess's VmHWM plus each descendant's (sampled every batch): pages\n"
        "  they share count once per process. PSS: the largest sum over the tree of\n"
        "  proportional set sizes, sampled every batch. RSS before: the subprocess after\n"
        "  imports and opening the data. growth: RSS - RSS before.")
  return ratios


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="",
                      help="where the datasets are written and reused (default: a temporary dir)")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--prefetch", type=int, default=2, help="input_pipeline prefetch")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (default 3)")
  parser.add_argument("--block", type=int, default=12,
                      help="batches per timed block, at least (default 12)")
  parser.add_argument("--min-block-s", type=float, default=0.3,
                      help="seconds per timed block, at least (default 0.3)")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--step-rounds", type=int, default=5,
                      help="rounds of ResNet-20 step alone / pipeline alone / fed step "
                           "(default 5)")
  parser.add_argument("--step-workers", type=int, default=2)
  parser.add_argument("--step-input-batches", type=int, default=20)
  parser.add_argument("--rss-batches", type=int, default=60)
  parser.add_argument("--rss-workers", type=int, nargs="+", default=[2, 0])
  parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "step", "rss"])
  parser.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--rss-stats", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  for flag in ("batch", "prefetch", "rounds", "block", "step_rounds", "step_input_batches",
               "rss_batches"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1")
  if min(args.workers + args.rss_workers + [args.step_workers]) < 0:
    parser.error("worker counts must be >= 0")
  if args.rss_child:
    rss_child(args)
    return

  tfds.disable_progress_bar()
  temporary = not args.data_dir
  data_dir = tempfile.mkdtemp(prefix="sparsejax_input_") if temporary else args.data_dir
  started = time.perf_counter()
  try:
    prepare(data_dir)
    summary = []
    if "throughput" not in args.skip:
      digits = throughput(DIGITS, data_dir, args, [("none", w) for w in args.workers], 64)
      synthetic = throughput(SYNTHETIC, data_dir, args,
                             [(a, w) for a in ("none", "cifar") for w in args.workers], 0)
      summary += [(f"{DIGITS} {label} / in-memory images/s", r, "")
                  for label, r in digits.items()]
      summary += [(f"{SYNTHETIC} {label} / in-memory images/s", r, "")
                  for label, r in synthetic.items()]
    if "step" not in args.skip:
      ratios = step_vs_input(data_dir, args)
      summary += [("ResNet-20: input time per batch / step", ratios["input/step"], "< 0.10"),
                  ("ResNet-20: wait in next() when fed / step", ratios["wait/step"], "< 0.10"),
                  ("ResNet-20: step fed by workers / step alone",
                   ratios["fed step/step alone"], "")]
    if "rss" not in args.skip:
      data = input_pipeline.load(SYNTHETIC, data_dir, cache_mb=0)
      stats = {"mean": data.preprocess.mean, "std": data.preprocess.std}
      for mode, (rss, pss, growth) in peak_rss(data_dir, args, stats).items():
        target = "< 1.0" if mode != "in-memory" else ""
        summary += [(f"peak RSS, {mode} / disk", rss, target),
                    (f"peak PSS, {mode} / disk", pss, ""),
                    (f"RSS growth from before the 1st batch, {mode} / disk", growth, "")]
    print(f"\nSummary (batch {args.batch}; {time.perf_counter() - started:.0f} s)")
    for name, ratio, target in summary:
      print(f"{name:<76} {ratio:8.4f}{f'  (target {target})' if target else ''}")
  finally:
    if temporary:
      shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
