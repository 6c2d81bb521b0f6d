"""The running interpreter's standard library source as a byte-level TFDS text dataset.

Real text that ships with every Python: the `.py` files under
`sysconfig.get_paths()['stdlib']`, without `site-packages` and the test
suites (directories named test, tests or idle_test), about 12 MB on Python
3.11. Each file goes to one split by a hash of its path relative to the
stdlib root (SHA-256, mod 100: < 90 train, < 95 validation, else test), so
the split does not depend on the machine or the order files are listed.
The files of a split, in path order, each followed by a NUL byte, are cut
into examples of `SEQUENCE_LENGTH` + 1 bytes (input and shifted target);
the remainder is dropped. Tokens are bytes: a vocabulary of 256.

The builder config is named after the interpreter version ('python3.11'):
another Python has other files, so another dataset.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

NAME = "stdlib_text"
SEQUENCE_LENGTH = 256
VOCAB_SIZE = 256
SPLITS = (("train", 90), ("validation", 95), ("test", 100))
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
  """The split of a file, from the SHA-256 of its path relative to the stdlib root.

  >>> split_of('json/decoder.py') in ('train', 'validation', 'test')
  True
  """
  bucket = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100
  return next(name for name, upper in SPLITS if bucket < upper)


def source_files(root: pathlib.Path | None = None) -> dict[str, list[pathlib.Path]]:
  """The `.py` files of each split, sorted by relative path."""
  root = root or stdlib_root()
  out: dict[str, list[pathlib.Path]] = {name: [] for name, _ in SPLITS}
  for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
    relative = path.relative_to(root)
    if EXCLUDED_DIRS & set(relative.parts[:-1]):
      continue
    out[split_of(relative.as_posix())].append(path)
  return out


def split_bytes(files: list[pathlib.Path]) -> np.ndarray:
  """The files' bytes, each followed by a NUL, as one uint8 array."""
  return np.frombuffer(b"".join(p.read_bytes() + b"\0" for p in files), np.uint8)


def chunks(data: np.ndarray, length: int = SEQUENCE_LENGTH + 1) -> np.ndarray:
  """`data` cut into rows of `length` bytes, the remainder dropped."""
  rows = len(data) // length
  return data[:rows * length].reshape(rows, length)


class StdlibText(tfds.core.GeneratorBasedBuilder):
  """Byte sequences of the Python standard library's source."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Hash split 90/5/5 by file path; 257-byte examples."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=f"python{sys.version_info.major}.{sys.version_info.minor}",
      description="the stdlib of the interpreter that prepares the dataset")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(SEQUENCE_LENGTH + 1,), dtype=np.uint8),
        }),
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(files) for split, files in source_files().items()}

  def _generate_examples(self, files):
    for i, row in enumerate(chunks(split_bytes(files))):
      yield i, {"tokens": row}
