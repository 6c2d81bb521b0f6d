"""Input pipelines: Grain over TFDS ArrayRecord files, batches as a function of step.

Every dataset goes through `tfds.data_source` (random-access ArrayRecord
files, no TensorFlow needed): named TFDS datasets (mnist, cifar10,
imagenet2012, ...) from `data_dir` when they are prepared there, and the
bundled `sklearn_digits` and `stdlib_text` (prepared on first use, offline;
text examples are token sequences whose labels are the next token at every
position). No split is held
in memory: a Grain `MapDataset` over training steps reads each batch's
examples from the files, decodes, augments and standardises them, in
`worker_count` worker processes (0: threads of this process) with
`prefetch` batches read ahead. Only a split whose decoded examples fit in
`cache_mb` keeps them after their first read (the digits: 92 KB).

The batch at training step t is a pure function of (seed, t): a fresh
permutation of the split each epoch, and an augmentation drawn from
(seed, epoch, example index). So a run resumes at any step by starting the
pipeline there, and every JAX process reads only its slice of each global
batch (`process_index` of `process_count`), whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
import time
from typing import NamedTuple

from absl import flags
from etils import epath
from google.protobuf import json_format
import grain
import jax
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from experiments import digits
from experiments import stdlib_text

# Datasets prepared locally from data that ships inside an installed package
# (or, for stdlib_text, with the interpreter).
BUNDLED = {digits.NAME: digits.SklearnDigits, stdlib_text.NAME: stdlib_text.StdlibText}
AUGMENTATIONS = ("none", "cifar", "imagenet")
STATS_EXAMPLES = 2000  # training examples the per-channel mean and std are estimated on
CIFAR_PAD = 4
IMAGENET_CROP_FRACTION = 0.875  # evaluation: resize to size / 0.875, then centre crop


class DatasetError(Exception):
  """A dataset cannot be read: a damaged file (named in the message), or missing."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
  """A dataset is not prepared in data_dir (and cannot be downloaded here)."""


# What a damaged metadata file (dataset_info.json) raises while TFDS reads it.
_METADATA_ERRORS = (json.JSONDecodeError, UnicodeDecodeError, json_format.ParseError)
# What a damaged, truncated or missing ArrayRecord file raises on a read.
_READ_ERRORS = (RuntimeError, OSError, ValueError, IndexError)


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _damaged_metadata(name: str, data_dir: str | None, error: BaseException) -> DatasetError:
  """The error naming the metadata file of `name` that does not parse."""
  root = epath.Path(data_dir) if data_dir else epath.Path(tfds.core.constants.DATA_DIR)
  # data_dir/name/version/ or data_dir/name/config/version/
  paths = [*(root / name).glob("*/dataset_info.json"), *(root / name).glob("*/*/dataset_info.json")]
  for path in sorted(paths):
    try:
      json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
      return DatasetError(
          f"Dataset file {path} is damaged ({_first_line(e)}); prepare the dataset again "
          "or copy the file anew.")
  return DatasetError(f"Dataset {name!r} in {root}: its metadata does not read "
                      f"({_first_line(error)}).")


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
    DatasetError: its dataset_info.json is damaged (the message names it).
  """
  try:
    return _data_source(name, split, data_dir)
  except _METADATA_ERRORS as e:
    raise _damaged_metadata(name, data_dir, e) from e


def _data_source(name: str, split: str, data_dir: str | None):
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
      version_dir = epath.Path(builder.data_path)
      if version_dir.exists() and any(version_dir.iterdir()):  # files there, but no metadata
        raise DatasetError(
            f"Dataset file {version_dir / 'dataset_info.json'} is missing (deleted, or the "
            "copy of the dataset is incomplete); prepare the dataset again or copy the "
            "file anew.") from e
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


def _decode_example(example) -> tuple[np.ndarray, int | np.ndarray]:
  if "tokens" in example:  # a text example: the input and the same tokens shifted by one
    tokens = np.asarray(example["tokens"])
    return tokens[:-1], tokens[1:].astype(np.int32)
  image = np.asarray(example["image"])
  return (image[..., None] if image.ndim == 2 else image), int(example["label"])


class Split:
  """One split of a dataset, read example by example from its ArrayRecord files.

  Picklable (Grain sends it to its worker processes); a worker reopens the
  files and starts with an empty cache.

  Attributes:
    name, split: the TFDS dataset and split.
    num_classes: number of classes of the dataset.
  """

  def __init__(self, name: str, split: str, data_dir: str | None, cache_mb: float = 64):
    self.name, self.split, self.data_dir, self.cache_mb = name, split, data_dir, cache_mb
    self._source = data_source(name, split, data_dir)
    self._length = len(self._source)
    if not self._length:
      raise DatasetNotFoundError(f"Split {split!r} of dataset {name!r} is empty.")
    self._cache: dict[int, tuple[np.ndarray, int]] | None = None
    first, _ = self.example(0)
    self._cache = {} if first.nbytes * self._length <= cache_mb * 2**20 else None
    self.num_classes = _num_classes(self._source)

  def __len__(self) -> int:
    return self._length

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_source"] = None  # reopened where it is used
    state["_cache"] = {} if self._cache is not None else None
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._source = data_source(self.name, self.split, self.data_dir)

  def example(self, index: int) -> tuple[np.ndarray, int]:
    """(uint8 image (H, W, C), label) of one example.

    Raises:
      DatasetError: a file holding it is damaged, truncated or gone (named).
    """
    if self._cache is not None and index in self._cache:
      return self._cache[index]
    out = _decode_example(self._read([int(index)])[0])
    if self._cache is not None:
      self._cache[index] = out
    return out

  def examples(self, indices) -> tuple[list[np.ndarray], np.ndarray]:
    """The uint8 images (a list: sizes may differ) and int32 labels of `indices`."""
    indices = [int(i) for i in indices]
    if self._cache is None:  # one batched read of the files
      pairs = [_decode_example(e) for e in self._read(indices)] if indices else []
    else:
      pairs = [self.example(i) for i in indices]
    return [p[0] for p in pairs], np.asarray([p[1] for p in pairs], np.int32)

  def _read(self, indices: list[int]) -> list:
    """The decoded TFDS examples of `indices`; a failed read names its file."""
    try:
      return self._get(indices)
    except _READ_ERRORS as e:
      raise self._damaged(indices, e) from e

  def _get(self, indices: list[int]) -> list:
    return [self._source[indices[0]]] if len(indices) == 1 else self._source.__getitems__(indices)

  def _files(self, indices: list[int]) -> dict[str, list[int]]:
    """The files holding `indices` (from the split's file instructions), in order."""
    instructions = self._source.dataset_info.splits[self._source.split].file_instructions
    ends = np.cumsum([i.take for i in instructions])  # examples read from each file
    files: dict[str, list[int]] = {}
    for index in indices:
      files.setdefault(os.fspath(instructions[int(np.searchsorted(ends, index, "right"))].filename),
                       []).append(index)
    return files

  def _damaged(self, indices: list[int], error: BaseException) -> DatasetError:
    """The error naming the first file whose examples among `indices` do not read."""
    try:
      files = self._files(indices)
    except Exception:  # pylint: disable=broad-except  # no file list: name the split
      files = {}
    for path, ours in files.items():
      try:
        self._get(ours)
      except _READ_ERRORS as e:
        return DatasetError(
            f"Dataset file {path} is damaged, truncated or missing: reading example {ours[0]} of "
            f"split {self.split!r} of {self.name!r} fails ({_first_line(e)}). Prepare the "
            "dataset again or copy the file anew.")
    return DatasetError(f"Reading examples {indices[:4]}... of split {self.split!r} of "
                        f"{self.name!r} fails ({_first_line(error)}).")


def _num_classes(source) -> int:
  if is_text(source):
    return TOKEN_VALUES
  try:
    return int(source.dataset_info.features["label"].num_classes)
  except (AttributeError, KeyError, TypeError):
    labels = [int(source[i]["label"]) for i in range(len(source))]
    return max(labels) + 1


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


TOKEN_VALUES = stdlib_text.VOCAB_SIZE  # text datasets hold bytes: uint8 tokens


def is_text(source) -> bool:
  """A dataset of token sequences ('tokens' feature) rather than images."""
  try:
    return "tokens" in source.dataset_info.features
  except (AttributeError, TypeError):
    return "tokens" in source[0]


@dataclasses.dataclass(frozen=True)
class TokenPreprocess:
  """uint8 token batch -> int32 model input (text: nothing to scale or augment)."""
  image_size: int = 0
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()

  def __call__(self, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(tokens, np.int32)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """uint8 batch -> float32 model input: scale to [0, 1], resize, channels, standardise.

  `mean` and `std` are per channel, in [0, 1] units, of the training split
  after resizing (estimated on its first examples unless the config gives
  them).
  """
  image_size: int = 0
  channels: int = 0
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()

  def scaled(self, images: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1], resized and channel-repeated, not yet standardised."""
    return _to_channels(_resize(images.astype(np.float32) / 255.0, self.image_size), self.channels)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
    return ((self.scaled(images) - mean) / std).astype(np.float32)


# Augmentations: uint8 (H, W, C) in, uint8 out; `rng` is the example's own.

def cifar_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Zero-pad 4 pixels, take a random crop of the original size, flip half the time
  (the CIFAR recipe of He et al. 2016)."""
  h, w = image.shape[:2]
  top, left = rng.integers(0, 2 * CIFAR_PAD + 1, size=2) - CIFAR_PAD  # offsets in the image
  out = np.zeros_like(image)  # the padding's zeros where the crop leaves the image
  ys, xs = slice(max(top, 0), min(top + h, h)), slice(max(left, 0), min(left + w, w))
  out[ys.start - top:ys.stop - top, xs.start - left:xs.stop - left] = image[ys, xs]
  return out[:, ::-1] if rng.random() < 0.5 else out


def _pil_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
  channels = image.shape[-1]
  pil = PIL.Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), PIL.Image.BILINEAR))
  return out[..., None] if channels == 1 else out


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """A crop of random area (scale) and aspect ratio, resized to size x size
  (Szegedy et al. 2015, as in torchvision's RandomResizedCrop: 10 tries, then
  the centre crop of the clamped ratio)."""
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      return _pil_resize(image[top:top + ch, left:left + cw], size, size)
  aspect = w / h
  cw, ch = (w, int(round(w / ratio[0]))) if aspect < ratio[0] else \
      (int(round(h * ratio[1])), h) if aspect > ratio[1] else (w, h)
  cw, ch = min(cw, w), min(ch, h)
  top, left = (h - ch) // 2, (w - cw) // 2
  return _pil_resize(image[top:top + ch, left:left + cw], size, size)


def imagenet_augment(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """Random resized crop to size x size, then a horizontal flip half the time."""
  out = random_resized_crop(image, rng, size)
  return out[:, ::-1] if rng.random() < 0.5 else out


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Evaluation: resize the shorter side to size / 0.875, take the central size x size."""
  h, w = image.shape[:2]
  short = int(round(size / IMAGENET_CROP_FRACTION))
  nh, nw = (short, max(short, int(round(w * short / h)))) if h <= w else \
      (max(short, int(round(h * short / w))), short)
  resized = _pil_resize(image, nw, nh)
  top, left = (nh - size) // 2, (nw - size) // 2
  return resized[top:top + size, left:left + size]


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The augmentation randomness of one example in one epoch."""
  return np.random.default_rng([seed, 1, epoch, index])


class Data(NamedTuple):
  """A dataset ready for training: both splits and the preprocessing of their batches.

  Attributes:
    train, eval: the splits.
    preprocess: uint8 batch -> standardised float32 model input.
    augment: 'none', 'cifar' or 'imagenet' (training batches only).
    image_shape: shape of one model input: (H, W, C), or (length,) for text.
  """
  train: Split
  eval: Split
  preprocess: Preprocess | TokenPreprocess
  augment: str
  image_shape: tuple[int, ...]

  @property
  def num_classes(self) -> int:
    return self.train.num_classes

  @property
  def text(self) -> bool:
    """Token sequences (labels: the next token at every position), not images."""
    return isinstance(self.preprocess, TokenPreprocess)

  @property
  def input_dtype(self) -> np.dtype:
    return np.dtype(np.int32 if self.text else np.float32)


def load(name: str, data_dir: str | None = None, image_size: int = 0, channels: int = 0,
         train_split: str = "train", eval_split: str = "test", augment: str = "none",
         mean=(), std=(), cache_mb: float = 64) -> Data:
  """Opens a training and an evaluation split of `name`, preprocessed for a model.

  Args:
    name: TFDS name ('mnist', 'cifar10', ...) or 'sklearn_digits'.
    data_dir: where TFDS data lives; None for the TFDS default.
    image_size: resize (bilinear) to image_size x image_size; 0 keeps the
      native size. With augment='imagenet', the crop size (required).
    channels: repeat grayscale to this many channels; 0 keeps them.
    train_split: TFDS split to train on ('train', 'train[:90%]', ...).
    eval_split: TFDS split to evaluate on ('test', 'validation', ...).
    augment: 'none', 'cifar' (pad 4, random crop, flip) or 'imagenet'
      (random resized crop and flip; resize and centre crop for evaluation).
    mean, std: per-channel statistics in [0, 1] units; () estimates them on
      the first STATS_EXAMPLES training examples.
    cache_mb: a split whose decoded examples fit in this many MiB keeps them
      after their first read.

  Raises:
    DatasetNotFoundError: the dataset or a split is not there (saying how to
      prepare it).
    ValueError: an augmentation that does not fit the options.
  """
  if augment not in AUGMENTATIONS:
    raise ValueError(f"augment={augment!r} is not one of {list(AUGMENTATIONS)}.")
  if augment == "imagenet" and image_size <= 0:
    raise ValueError("augment='imagenet' crops to image_size x image_size: set image_size > 0.")
  train = Split(name, train_split, data_dir, cache_mb)
  held_out = Split(name, eval_split, data_dir, cache_mb)
  if is_text(train._source):  # pylint: disable=protected-access
    if augment != "none" or image_size or channels:
      raise ValueError(f"{name!r} is text: augment, image_size and channels do not apply.")
    return Data(train, held_out, TokenPreprocess(), "none", train.example(0)[0].shape)
  if augment != "imagenet":  # the training images are resized, not cropped: sizes must agree
    shape = train.example(0)[0].shape
    other = held_out.example(0)[0].shape
    if shape != other:
      raise ValueError(f"{name!r}: training images are {shape} but evaluation images {other}.")
  preprocess = Preprocess(image_size, channels)
  if not len(mean) or not len(std):
    sample = _uniform_batch(train, range(min(len(train), STATS_EXAMPLES)), augment, image_size)
    scaled = preprocess.scaled(sample)
    mean, std = scaled.mean(axis=(0, 1, 2)), scaled.std(axis=(0, 1, 2)) + 1e-6
  preprocess = Preprocess(image_size, channels, tuple(float(m) for m in np.asarray(mean, np.float32)),
                          tuple(float(s) for s in np.asarray(std, np.float32)))
  probe = preprocess(_uniform_batch(train, [0], augment, image_size))
  if len(preprocess.mean) not in (1, probe.shape[-1]):
    raise ValueError(f"mean has {len(preprocess.mean)} values for {probe.shape[-1]} channels.")
  return Data(train, held_out, preprocess, augment, tuple(probe.shape[1:]))


def _uniform_batch(split: Split, indices, augment: str, image_size: int) -> np.ndarray:
  """The uint8 images of `indices` stacked, centre-cropped to one size if 'imagenet'."""
  images, _ = split.examples(indices)
  if augment == "imagenet":
    images = [center_crop(image, image_size) for image in images]
  return np.stack(images)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples.")
  return num_examples // batch_size


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the global training batch at `step`: a fresh permutation each epoch.

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


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """The positions of a global batch that one JAX process reads."""
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes.")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


@dataclasses.dataclass(frozen=True)
class TrainBatch:
  """step -> this process's (images, labels) of the global training batch at `step`."""
  data: Data
  batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    train = self.data.train
    epoch = int(step) // steps_per_epoch(len(train), self.batch_size)
    indices = batch_indices(len(train), self.batch_size, self.seed, int(step))
    indices = indices[process_slice(self.batch_size, self.process_index, self.process_count)]
    images, labels = train.examples(indices)
    augment, size = self.data.augment, self.data.preprocess.image_size
    if augment == "cifar":
      images = [cifar_augment(im, example_rng(self.seed, epoch, i)) for im, i in zip(images, indices)]
    elif augment == "imagenet":
      images = [imagenet_augment(im, example_rng(self.seed, epoch, i), size)
                for im, i in zip(images, indices)]
    return self.data.preprocess(np.stack(images)), labels


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  """i -> this process's (images, labels, weights) of the i-th evaluation batch;
  the last batch is padded with weight-0 examples."""
  data: Data
  batch_size: int
  process_index: int = 0
  process_count: int = 1

  def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    split = self.data.eval
    ours = process_slice(self.batch_size, self.process_index, self.process_count)
    positions = np.arange(self.batch_size)[ours] + int(i) * self.batch_size
    real = positions[positions < len(split)]
    images, labels = split.examples(real)
    if self.data.augment == "imagenet":
      images = [center_crop(image, self.data.preprocess.image_size) for image in images]
    weights = np.ones(len(real), np.float32)
    pad = len(positions) - len(real)
    shape, dtype = self.data.image_shape, self.data.input_dtype
    x = self.data.preprocess(np.stack(images)) if images else np.zeros((0,) + shape, dtype)
    if pad:
      label_shape = shape if self.data.text else ()
      labels = labels.reshape((len(real),) + label_shape)
      x = np.concatenate([x, np.zeros((pad,) + shape, dtype)])
      labels = np.concatenate([labels, np.zeros((pad,) + label_shape, np.int32)])
      weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    return x, labels, weights


PARENT_POLL_S = 0.5  # how often a worker process checks that its trainer is alive


def _watch_parent(parent_pid: int) -> None:
  while os.getppid() == parent_pid:
    time.sleep(PARENT_POLL_S)
  os._exit(1)  # pylint: disable=protected-access


def exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """Grain worker start-up: the worker ends when the process `parent_pid` dies.

  A killed trainer (SIGKILL, the OOM killer) runs no clean-up, and Grain's
  workers would then wait for it forever, each holding its memory. A thread
  of the worker polls its parent instead: when the parent dies the worker is
  re-parented (getppid changes) and exits. (Linux's PR_SET_PDEATHSIG is not
  used: it fires when the *thread* that started the worker ends, and Grain
  starts workers from short-lived threads.)
  """
  del worker_index, worker_count
  threading.Thread(target=_watch_parent, args=(parent_pid,), name="exit-with-parent",
                   daemon=True).start()


class Batches:
  """Grain's iterator over a dataset of batches, started at construction
  (worker processes included); `close` (or exhausting it) stops the workers,
  and they exit by themselves within PARENT_POLL_S if this process dies."""

  def __init__(self, dataset: grain.MapDataset, worker_count: int, prefetch: int):
    if worker_count > 0:
      if not flags.FLAGS.is_parsed():  # outside an absl binary (a notebook, pytest):
        flags.FLAGS.mark_as_parsed()   # Grain's worker pool reads its flags' defaults
      it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                       per_worker_buffer_size=max(1, prefetch)),
                          worker_init_fn=functools.partial(exit_with_parent, os.getpid()))
    else:
      it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch),
                                                     prefetch_buffer_size=max(1, prefetch)))
    self._it = iter(it)

  def __iter__(self) -> "Batches":
    return self

  def __next__(self):
    try:
      return next(self._it)
    except StopIteration:
      self.close()
      raise

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> "Batches":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train_batches(data: Data, batch_size: int, seed: int, start_step: int, num_steps: int,
                  worker_count: int = 0, prefetch: int = 2, process_index: int = 0,
                  process_count: int = 1) -> Batches:
  """This process's training batches (images, labels) of steps start_step ..
  num_steps - 1, in order."""
  batch = TrainBatch(data, batch_size, seed, process_index, process_count)
  return Batches(grain.MapDataset.range(start_step, num_steps).map(batch), worker_count, prefetch)


def eval_batches(data: Data, batch_size: int, worker_count: int = 0, prefetch: int = 2,
                 process_index: int = 0, process_count: int = 1) -> Batches:
  """This process's (images, labels, weights) batches covering the evaluation split once."""
  batch = EvalBatch(data, batch_size, process_index, process_count)
  count = -(-len(data.eval) // batch_size)
  return Batches(grain.MapDataset.range(count).map(batch), worker_count, prefetch)


def read_split(data: Data, role: str = "eval") -> tuple[np.ndarray, np.ndarray]:
  """A whole split, preprocessed (no augmentation), as arrays: for small splits
  in tests and notebooks, not for training."""
  split = data.train if role == "train" else data.eval
  images, labels = split.examples(range(len(split)))
  if data.augment == "imagenet":
    images = [center_crop(image, data.preprocess.image_size) for image in images]
  return data.preprocess(np.stack(images)), labels
