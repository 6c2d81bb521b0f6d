"""The streaming Grain pipeline: batches against NumPy references, resume, shards, eval coverage."""

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from experiments import config_checks
from experiments import input_pipeline
from experiments import trainer as trainer_lib

NUM_TRAIN, NUM_TEST = 40, 13


class TinyCifar(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """32x32x3 images whose first pixel is the example's index (to see who is where)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(1, NUM_TEST)}

  def _generate_examples(self, seed, n):
    images = tiny_images(seed, n)
    for i in range(n):
      yield i, {"image": images[i], "label": i % 10}


def tiny_images(seed, n):
  images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(n)
  return images


@pytest.fixture
def tiny(tmp_path, monkeypatch):
  """TinyCifar prepared in a temporary data_dir, loadable by name in this process."""
  monkeypatch.setitem(input_pipeline.BUNDLED, "tiny_cifar", TinyCifar)
  return str(tmp_path)


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _reference_cifar_example(image, seed, epoch, index):
  """Pad 4 with zeros, crop 32x32 at a random offset, flip with probability 1/2: loops."""
  rng = np.random.default_rng([seed, 1, epoch, index])
  top, left = rng.integers(0, 9, size=2)
  flip = rng.random() < 0.5
  out = np.zeros_like(image)
  for y in range(32):
    for x in range(32):
      sy, sx = y + top - 4, (31 - x if flip else x) + left - 4
      if 0 <= sy < 32 and 0 <= sx < 32:
        out[y, x] = image[sy, sx]
  return out


def test_cifar_batches_equal_a_numpy_reference_of_the_permutation_and_augmentation(tiny):
  data = input_pipeline.load("tiny_cifar", tiny, augment="cifar", mean=MEAN, std=STD)
  source = input_pipeline.data_source("tiny_cifar", "train", tiny)  # in TFDS's file order
  raw = np.stack([source[i]["image"] for i in range(NUM_TRAIN)])
  raw_labels = np.array([source[i]["label"] for i in range(NUM_TRAIN)])
  batch, seed = 8, 3
  for step in (0, 4, 5, 9):  # two epochs of 5 steps
    epoch, k = divmod(step, NUM_TRAIN // batch)
    order = np.random.default_rng([seed, epoch]).permutation(NUM_TRAIN)
    indices = order[k * batch:(k + 1) * batch]
    expected = np.stack([_reference_cifar_example(raw[i], seed, epoch, i) for i in indices])
    expected = (expected / 255.0 - np.array(MEAN)) / np.array(STD)
    images, labels = input_pipeline.TrainBatch(data, batch, seed)(step)
    np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels, raw_labels[indices])


def _indices(images):
  """The example index written into the first pixel (mean 0, std 1: x * 255)."""
  return np.rint(images[:, 0, 0, 0] * 255).astype(int)


def test_two_processes_read_disjoint_shards_that_together_are_the_global_batch(tiny):
  data = input_pipeline.load("tiny_cifar", tiny, mean=(0.0,) * 3, std=(1.0,) * 3)
  batch, per_epoch = 8, NUM_TRAIN // 8
  seen = {0: [], 1: []}
  for step in range(per_epoch):
    whole = _indices(input_pipeline.TrainBatch(data, batch, seed=1)(step)[0])
    parts = [_indices(input_pipeline.TrainBatch(data, batch, 1, p, 2)(step)[0]) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    for p in (0, 1):
      seen[p] += parts[p].tolist()
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(NUM_TRAIN))  # the epoch, each example once


@pytest.mark.parametrize("processes", [1, 2])
def test_the_eval_pass_covers_every_example_exactly_once(tiny, processes):
  data = input_pipeline.load("tiny_cifar", tiny, mean=(0.0,) * 3, std=(1.0,) * 3)
  seen = []
  for p in range(processes):
    for images, labels, weights in input_pipeline.eval_batches(data, 6, process_index=p,
                                                               process_count=processes):
      assert len(images) == len(labels) == len(weights) == 6 // processes
      seen += _indices(images[weights > 0]).tolist()
      assert (labels[weights > 0] == _indices(images[weights > 0]) % 10).all()
  assert sorted(seen) == list(range(NUM_TEST))


def test_a_pipeline_started_mid_epoch_gives_the_same_batches_bitwise(tiny):
  data = input_pipeline.load("tiny_cifar", tiny, augment="cifar")
  whole = list(input_pipeline.train_batches(data, 8, seed=0, start_step=0, num_steps=12))
  resumed = list(input_pipeline.train_batches(data, 8, seed=0, start_step=7, num_steps=12))
  assert len(resumed) == 5
  for (a, la), (b, lb) in zip(whole[7:], resumed):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def test_worker_processes_give_the_batches_of_the_threaded_pipeline(digits_dir):
  data = input_pipeline.load("sklearn_digits", digits_dir, augment="cifar", cache_mb=0)
  threads = list(input_pipeline.train_batches(data, 32, seed=0, start_step=3, num_steps=9))
  workers = list(input_pipeline.train_batches(data, 32, seed=0, start_step=3, num_steps=9,
                                              worker_count=2))
  assert len(workers) == 6
  for (a, la), (b, lb) in zip(threads, workers):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def test_imagenet_evaluation_resizes_the_shorter_side_and_crops_the_centre():
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  out = input_pipeline.center_crop(image, 16)
  # 16 / 0.875 = 18.3 -> shorter side 18, so 40x60 becomes 18x27; centre 16x16.
  resized = np.asarray(PIL.Image.fromarray(image).resize((27, 18), PIL.Image.BILINEAR))
  np.testing.assert_array_equal(out, resized[1:17, 5:21])


def test_imagenet_training_crops_are_seeded_and_vary():
  image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
  crops = [input_pipeline.imagenet_augment(image, input_pipeline.example_rng(0, 0, i), 24)
           for i in range(6)]
  assert all(c.shape == (24, 24, 3) and c.dtype == np.uint8 for c in crops)
  again = input_pipeline.imagenet_augment(image, input_pipeline.example_rng(0, 0, 0), 24)
  np.testing.assert_array_equal(crops[0], again)
  assert len({c.tobytes() for c in crops}) == 6


def test_random_resized_crop_with_the_full_scale_is_a_resize_of_the_whole_image():
  image = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
  out = input_pipeline.random_resized_crop(image, np.random.default_rng(0), 12,
                                           scale=(1.0, 1.0), ratio=(1.0, 1.0))
  expected = np.asarray(PIL.Image.fromarray(image).resize((12, 12), PIL.Image.BILINEAR))
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.input.update(augment="mixup"), r"config.input.augment='mixup' is not one of"),
    (lambda c: c.input.update(mean=(0.5, 0.5)), r"config.input.mean=\(0.5, 0.5\) and "
                                                r"config.input.std=\(\)"),
    (lambda c: c.input.update(worker_count=-1), r"config.input.worker_count=-1 must be"),
    (lambda c: c.input.update(augment="imagenet"), r"augment='imagenet' crops to image_size"),
])
def test_bad_input_config_is_an_error_naming_the_key(tiny_config, edit, message):
  edit(tiny_config)
  with pytest.raises(config_checks.ConfigError, match=message):
    trainer_lib.Trainer(tiny_config)


class _Stop(Exception):
  pass


def _stop(state):
  raise _Stop()


def test_an_augmented_run_stopped_and_resumed_ends_bitwise_equal(tiny_config, tmp_path):
  import chex
  tiny_config.input.augment = "cifar"
  tiny_config.checkpoint_every = 10
  trainer = trainer_lib.Trainer(tiny_config)
  whole = trainer.fit(str(tmp_path / "whole"), log=lambda line: None)
  with pytest.raises(_Stop):
    trainer.fit(str(tmp_path / "cut"), log=lambda line: None, callbacks={25: _stop})
  resumed = trainer.fit(str(tmp_path / "cut"), log=lambda line: None, resume=True)
  chex.assert_trees_all_equal(resumed.state, whole.state)
