"""The stdlib text dataset, the byte-level transformer LM and one-shot pruning on it."""

import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import stdlib_text
from experiments.models import lm
from sparsejax import oneshot


def _fake_stdlib(root: pathlib.Path) -> dict[str, bytes]:
  files = {"a.py": b"import os\n", "json/decoder.py": b"x = 1\n" * 50, "zz.py": b"pass\n",
           "test/test_a.py": b"skipped\n", "site-packages/pkg.py": b"skipped\n",
           "email/mime/text.py": b"def f():\n    return 2\n" * 20, "notes.txt": b"not python\n"}
  for name, data in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  return files


def test_split_is_the_path_hash_and_excludes_tests(tmp_path):
  files = _fake_stdlib(tmp_path)
  splits = stdlib_text.source_files(tmp_path)
  seen = {p.relative_to(tmp_path).as_posix(): split for split, ps in splits.items() for p in ps}
  assert set(seen) == {"a.py", "json/decoder.py", "zz.py", "email/mime/text.py"}
  for path, split in seen.items():
    bucket = int.from_bytes(hashlib.sha256(path.encode()).digest(), "big") % 100
    assert split == ("train" if bucket < 90 else "validation" if bucket < 95 else "test")
  train = splits["train"]
  assert [p.relative_to(tmp_path).as_posix() for p in train] == sorted(
      p for p, s in seen.items() if s == "train")
  data = stdlib_text.split_bytes(train)
  assert data.tobytes() == b"".join(files[p.relative_to(tmp_path).as_posix()] + b"\0" for p in train)
  rows = stdlib_text.chunks(data, 7)
  assert rows.shape == (len(data) // 7, 7) and rows.tobytes() == data.tobytes()[:rows.size]


def test_real_stdlib_splits_are_disjoint_and_sized():
  splits = stdlib_text.source_files()
  names = [set(p.as_posix() for p in ps) for ps in splits.values()]
  assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
  sizes = {k: len(v) for k, v in splits.items()}
  total = sum(sizes.values())
  assert total > 300 and 0.8 < sizes["train"] / total < 0.97 and sizes["test"] > 5, sizes


def _model_and_params(**kw):
  model = lm.TransformerLM(num_layers=2, width=16, num_heads=2, mlp_dim=32, max_length=12, **kw)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
  return model, params


def test_lm_is_causal():
  model, params = _model_and_params()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
  a, b = (model.apply({"params": params}, t) for t in (tokens, changed))
  np.testing.assert_array_equal(a[:, :7], b[:, :7])          # earlier positions do not see token 7
  assert not np.allclose(a[:, 7:], b[:, 7:])
  with pytest.raises(ValueError, match="longer than max_length=12"):
    model.apply({"params": params}, jnp.zeros((1, 13), jnp.int32))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_oneshot_prunes_the_lm_block_by_block(method):
  model, params = _model_and_params()
  calibration = [np.asarray(jax.random.randint(jax.random.key(2), (4, 12), 0, 256))]
  lines = []
  kernels = lambda path, leaf: path.endswith("kernel") and not path.startswith("head")
  pruned, masks = oneshot.prune_sequentially(
      params, oneshot.linen_hessians(model, calibration), method, nm=(2, 4), leaf_filter=kernels,
      log=lines.append)
  assert [line.split(":")[0] for line in lines] == [f"[{method}] group {i + 1}/2 block_{i}"
                                                    for i in range(2)]
  for name in ("query", "key", "value", "out"):
    keep = np.asarray(masks["block_1"]["attention"][name]["kernel"])
    grouped = keep.reshape(-1, keep.shape[-1]) if name == "out" else keep.reshape(16, -1)
    assert (grouped.reshape(-1, 4, grouped.shape[-1]).sum(axis=1) == 2).all()
  assert masks["head"]["kernel"] is None and masks["embed"]["embedding"] is None
  np.testing.assert_array_equal(pruned["head"]["kernel"], params["head"]["kernel"])
  logits = model.apply({"params": pruned}, calibration[0])
  assert np.isfinite(np.asarray(logits)).all()


def test_synflow_on_a_token_model_is_a_config_error(tmp_path):
  from experiments import config_checks  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  from experiments.configs import lm_stdlib  # pylint: disable=g-import-not-at-top
  config = lm_stdlib.get_config()
  config.data_dir = str(tmp_path)
  config.model.update(num_layers=1, width=16, num_heads=2, mlp_dim=32)
  config.pruning.method = "synflow"
  with pytest.raises(config_checks.ConfigError, match="'synflow' feeds the network all-ones"):
    trainer.Trainer(config)
