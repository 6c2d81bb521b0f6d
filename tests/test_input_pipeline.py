"""The TFDS input pipeline: bundled digits, mocked TFDS datasets, batching."""

import io

import numpy as np
import PIL.Image
import pytest
from sklearn import datasets
import tensorflow_datasets as tfds

from experiments import input_pipeline


def _rows(images, labels):
  """Examples as sorted rows (flattened pixels, label): a multiset to compare."""
  rows = np.concatenate([images.reshape(len(labels), -1).astype(np.int64),
                         labels[:, None].astype(np.int64)], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


def _raw_split(data_dir, split):
  source = input_pipeline.data_source("sklearn_digits", split, data_dir)
  images = np.stack([source[i]["image"] for i in range(len(source))])
  labels = np.array([source[i]["label"] for i in range(len(source))])
  return images, labels


def test_digits_builder_serves_all_sklearn_digits_in_a_1437_360_split(digits_dir):
  train, test = _raw_split(digits_dir, "train"), _raw_split(digits_dir, "test")
  assert (len(train[1]), len(test[1])) == (1437, 360)
  assert train[0].shape[1:] == (8, 8, 1) and train[0].dtype == np.uint8
  digits = datasets.load_digits()
  expected = np.round(digits.images * 255 / 16).astype(np.uint8)  # 0..16 -> 0..255
  got = _rows(np.concatenate([train[0], test[0]]), np.concatenate([train[1], test[1]]))
  np.testing.assert_array_equal(got, _rows(expected, digits.target))


def test_digits_split_is_fixed_seed_0_permutation(digits_dir):
  digits = datasets.load_digits()
  order = np.random.default_rng(0).permutation(1797)
  test_idx = order[1437:]
  expected = np.round(digits.images[test_idx] * 255 / 16).astype(np.uint8)
  images, labels = _raw_split(digits_dir, "test")
  np.testing.assert_array_equal(_rows(images, labels), _rows(expected, digits.target[test_idx]))


def test_load_standardises_both_splits_with_train_statistics(digits_dir):
  data = input_pipeline.load("sklearn_digits", digits_dir)
  raw_train = _raw_split(digits_dir, "train")[0].astype(np.float64) / 255
  raw_test, test_labels = _raw_split(digits_dir, "test")
  mean, std = raw_train.mean(), raw_train.std()
  expected = (raw_test.astype(np.float64) / 255 - mean) / (std + 1e-6)
  eval_images, eval_labels = input_pipeline.read_split(data, "eval")
  np.testing.assert_allclose(eval_images, expected, rtol=1e-5, atol=1e-5)  # source order
  np.testing.assert_array_equal(eval_labels, test_labels)
  train_images, train_labels = input_pipeline.read_split(data, "train")
  assert abs(train_images.mean()) < 1e-5 and abs(train_images.std() - 1) < 1e-4
  assert data.num_classes == 10 and train_labels.dtype == np.int32


def test_load_resizes_and_repeats_channels_for_conv_models(digits_dir):
  data = input_pipeline.load("sklearn_digits", digits_dir, image_size=32, channels=3)
  images, _ = input_pipeline.TrainBatch(data, 16, seed=0)(0)
  assert data.image_shape == (32, 32, 3) and images.shape == (16, 32, 32, 3)
  np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_cannot_reduce_colour_channels():
  with pytest.raises(ValueError, match="3-channel images into 2"):
    input_pipeline._to_channels(np.zeros((1, 4, 4, 3)), 2)


def test_named_tfds_dataset_loads_through_mocked_data_source(tmp_path):
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    data = input_pipeline.load("mnist", str(tmp_path))
    images, labels = input_pipeline.read_split(data, "train")
  assert images.shape == (24, 28, 28, 1) and images.dtype == np.float32
  assert data.num_classes == 10 and len(data.eval) == 24
  assert labels.min() >= 0 and labels.max() < 10


def test_absent_dataset_error_says_how_to_provide_it(tmp_path):
  with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
    input_pipeline.load("mnist", str(tmp_path))
  message = str(e.value)
  assert "'mnist' is not prepared in " + str(tmp_path) in message
  assert "tfds build mnist" in message and "--config.data_dir" in message


def test_unknown_dataset_name_is_an_error(tmp_path):
  with pytest.raises(input_pipeline.DatasetNotFoundError, match="Unknown dataset 'no_such_set'"):
    input_pipeline.load("no_such_set", str(tmp_path))


def test_batches_of_an_epoch_are_disjoint_and_epochs_reshuffle():
  n, batch = 103, 10
  epoch0 = [input_pipeline.batch_indices(n, batch, seed=3, step=t) for t in range(10)]
  flat = np.concatenate(epoch0)
  assert len(flat) == 100 and len(set(flat.tolist())) == 100 and flat.max() < n
  epoch1 = input_pipeline.batch_indices(n, batch, seed=3, step=10)
  assert not np.array_equal(epoch1, epoch0[0])
  # A pure function of (seed, step): what a resumed run replays.
  np.testing.assert_array_equal(input_pipeline.batch_indices(n, batch, 3, 7), epoch0[7])
  assert not np.array_equal(input_pipeline.batch_indices(n, batch, 4, 7), epoch0[7])


def test_batch_larger_than_dataset_is_an_error():
  with pytest.raises(ValueError, match="batch_size 64 exceeds the 50 training examples"):
    input_pipeline.steps_per_epoch(50, 64)


def _png(image):
  buffer = io.BytesIO()
  PIL.Image.fromarray(np.asarray(image)[..., 0]).save(buffer, format="PNG")
  return buffer.getvalue()


class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stand-in files for mnist 3.0.1: PNG-encoded Image features, as TFDS writes them."""

  VERSION = tfds.core.Version("3.0.1")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(28, 28, 1)),
        "label": tfds.features.ClassLabel(num_classes=10)}), supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 30), "test": self._generate_examples(1, 12)}

  def _generate_examples(self, seed, n):
    for i, image in enumerate(png_test_images(seed, n)):
      yield i, {"image": image, "label": i % 10}


def png_test_images(seed, n):
  return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def test_png_encoded_tfds_dataset_decodes_without_tensorflow(tmp_path, monkeypatch):
  # Writing PNGs is TensorFlow's job in TFDS; PIL stands in for it to make the
  # files. Reading them back (what the pipeline does) needs no TensorFlow.
  with monkeypatch.context() as patch:
    patch.setattr(tfds.features.Image, "encode_example", lambda self, x: _png(x))
    Mnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = input_pipeline.data_source("mnist", "test", str(tmp_path))
  pairs = [input_pipeline._decode_example(source[i]) for i in range(len(source))]
  images, labels = np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])
  expected = png_test_images(1, 12)
  np.testing.assert_array_equal(_rows(images, labels), _rows(expected, np.arange(12) % 10))
  data = input_pipeline.load("mnist", str(tmp_path))
  assert len(data.train) == 30 and data.image_shape == (28, 28, 1) and data.num_classes == 10


def test_missing_split_is_named_with_the_splits_there_are(tmp_path, monkeypatch):
  with monkeypatch.context() as patch:
    patch.setattr(tfds.features.Image, "encode_example", lambda self, x: _png(x))
    Mnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  with pytest.raises(input_pipeline.DatasetNotFoundError,
                     match=r"'mnist' has no split 'validation'; it has \['test', 'train'\]"):
    input_pipeline.load("mnist", str(tmp_path), eval_split="validation")
