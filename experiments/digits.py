"""scikit-learn's bundled handwritten digits as a TFDS dataset.

The 1,797 8x8 digits (UCI optical recognition of handwritten digits) ship
inside the scikit-learn wheel, so this builder prepares them with no network
access. It makes the default experiment run offline through exactly the same
`tfds.data_source` path as mnist or cifar10.

The split is fixed: images are shuffled once with seed 0 and the first 80%
(1,437) form `train`, the remaining 360 form `test`. Pixel values 0..16 are
stored as uint8 0..255 (v * 255 / 16, rounded), so every dataset reaches the
input pipeline in the same range.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NAME = "sklearn_digits"
TRAIN_FRACTION = 0.8
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
  """Indices into `sklearn.datasets.load_digits()` of each split."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  n = len(datasets.load_digits().target)
  order = np.random.default_rng(SPLIT_SEED).permutation(n)
  cut = int(TRAIN_FRACTION * n)
  return {"train": order[:cut], "test": order[cut:]}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """The 8x8 handwritten digits bundled with scikit-learn."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fixed 1437/360 train/test split (seed 0)."}

  def _info(self) -> tfds.core.DatasetInfo:
    # Tensor rather than Image: Image features need TensorFlow to encode PNGs.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(idx) for split, idx in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    for i in indices:
      yield int(i), {"image": images[i], "label": int(digits.target[i])}
