"""Input pipelines: TFDS splits held in memory, batches as a function of step.

Every dataset goes through `tfds.data_source` (random-access ArrayRecord
files, no TensorFlow needed): named TFDS datasets (mnist, fashion_mnist,
cifar10, ...) from `data_dir` when they are prepared there, and the bundled
`sklearn_digits` (prepared on first use, offline). A split is decoded once
into numpy arrays; the batch at training step t is a pure function of
(seed, t), so a run can be resumed at any step and replays the same batches.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np
import tensorflow_datasets as tfds

from experiments import digits

# Datasets prepared locally from data that ships inside an installed package.
BUNDLED = {digits.NAME: digits.SklearnDigits}


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not prepared in data_dir (and cannot be downloaded here)."""


class Split(NamedTuple):
  """One split in memory.

  Attributes:
    images: float32 (n, H, W, C), standardised with the train split's
      per-channel mean and standard deviation.
    labels: int32 (n,).
    num_classes: number of classes of the dataset.
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int


def _not_found_message(name: str, data_dir: str | None) -> str:
  where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
  return (
      f"Dataset {name!r} is not prepared in {where}, and this binary does not "
      "download data. On a machine with internet run\n"
      f"  tfds build {name} --data_dir=DIR --file_format=array_record\n"
      "then copy DIR here and pass --config.data_dir=DIR. The offline dataset "
      f"bundled with this project is {digits.NAME!r}.")


def data_source(name: str, split: str, data_dir: str | None = None):
  """A random-access TFDS data source; prepares bundled datasets on first use.

  Raises:
    DatasetNotFoundError: `name` is unknown or not prepared in `data_dir`, or
      has no split `split` (the message says how to provide it).
  """
  if name in BUNDLED:
    builder = BUNDLED[name](data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DatasetNotFoundError(
          f"Unknown dataset {name!r}: neither a TFDS dataset nor one of the bundled "
          f"datasets {sorted(BUNDLED)}.") from e
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False) \
        if name not in BUNDLED else builder.as_data_source(split=split)
  except Exception as e:  # TFDS raises several types; explain the ones we can
    if not builder.is_prepared():
      raise DatasetNotFoundError(_not_found_message(name, data_dir)) from e
    splits = sorted(builder.info.splits)
    if split not in splits:
      raise DatasetNotFoundError(
          f"Dataset {name!r} has no split {split!r}; it has {splits}. "
          "Set config.train_split / config.eval_split.") from e
    if isinstance(e, NotImplementedError):  # prepared, but not as ArrayRecord
      raise DatasetNotFoundError(
          f"Dataset {name!r} in {builder.data_path} is not in ArrayRecord format, which "
          "random access (and this pipeline) needs. Convert it with `tfds convert_format "
          f"--dataset_dir={builder.data_path} --out_file_format=array_record`.") from e
    raise


def _decode(source) -> tuple[np.ndarray, np.ndarray]:
  """All examples of a data source as (uint8 NHWC images, int labels)."""
  examples = [source[i] for i in range(len(source))]
  if not examples:
    raise ValueError("The split is empty.")
  images = np.stack([np.asarray(e["image"]) for e in examples])
  if images.ndim == 3:  # (n, H, W) grayscale
    images = images[..., None]
  labels = np.asarray([int(e["label"]) for e in examples], np.int32)
  return images, labels


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  if size <= 0 or images.shape[1:3] == (size, size):
    return images
  shape = (images.shape[0], size, size, images.shape[3])
  return np.asarray(jax.image.resize(images.astype(np.float32), shape, "bilinear"))


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
  have = images.shape[-1]
  if channels <= 0 or channels == have:
    return images
  if have == 1:
    return np.repeat(images, channels, axis=-1)
  raise ValueError(f"Cannot turn {have}-channel images into {channels} channels.")


def load(name: str, data_dir: str | None = None, image_size: int = 0, channels: int = 0,
         train_split: str = "train", eval_split: str = "test") -> dict[str, Split]:
  """Loads a training and an evaluation split of `name`, preprocessed for a model.

  Args:
    name: TFDS name ('mnist', 'cifar10', ...) or 'sklearn_digits'.
    data_dir: where TFDS data lives; None for the TFDS default.
    image_size: resize (bilinear) to image_size x image_size; 0 keeps the
      native size.
    channels: repeat grayscale to this many channels; 0 keeps them.
    train_split: TFDS split to train on ('train', 'train[:90%]', ...).
    eval_split: TFDS split to evaluate on ('test', 'validation', ...).

  Returns:
    {'train': Split, 'eval': Split}, images scaled to [0, 1] then
    standardised per channel with statistics of the training split.
  """
  num_classes = None
  raw = {}
  for role, split in (("train", train_split), ("eval", eval_split)):
    source = data_source(name, split, data_dir)
    raw[role] = _decode(source)
    if num_classes is None:
      num_classes = _num_classes(source, raw[role][1])
  out = {}
  for role, (images, labels) in raw.items():
    x = _to_channels(_resize(images.astype(np.float32) / 255.0, image_size), channels)
    out[role] = (x, labels)
  mean = out["train"][0].mean(axis=(0, 1, 2))
  std = out["train"][0].std(axis=(0, 1, 2)) + 1e-6
  return {role: Split(((x - mean) / std).astype(np.float32), y, num_classes)
          for role, (x, y) in out.items()}


def _num_classes(source, labels: np.ndarray) -> int:
  try:
    return int(source.dataset_info.features["label"].num_classes)
  except (AttributeError, KeyError, TypeError):
    return int(labels.max()) + 1


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples.")
  return num_examples // batch_size


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the training batch at `step`: a fresh permutation each epoch.

  A pure function of its arguments, so resuming at `step` replays the batches
  an uninterrupted run would have seen.
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, index = divmod(step, per_epoch)
  order = _epoch_order(num_examples, seed, epoch)
  return order[index * batch_size:(index + 1) * batch_size].copy()


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of one epoch, drawn once per epoch rather than once per step."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def eval_batches(split: Split, batch_size: int):
  """Yields (images, labels, weights) covering `split` once, padded to full batches."""
  n = len(split.labels)
  for start in range(0, n, batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    weights = np.ones(len(labels), np.float32)
    pad = batch_size - len(labels)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    yield images, labels, weights
