"""Compressed sparse export: bitwise round trips, on-disk content, size, errors."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsejax
from sparsejax.checkpoint import export
from tests import models

DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float64": np.float64}


def _bits(a) -> np.ndarray:
  """The raw bits of an array, to compare values exactly (-0.0, NaN payloads)."""
  a = np.asarray(a)
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _params(dtype=np.float32, seed=0):
  """A masked conv kernel, a masked dense kernel and an unmasked bias."""
  rng = np.random.default_rng(seed)
  params = {
      "conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(dtype)},
      "dense": {"bias": rng.normal(size=(10,)).astype(dtype),
                "kernel": rng.normal(size=(16, 10)).astype(dtype)},
  }
  masks = {
      "conv": {"kernel": rng.random((3, 3, 4, 8)) < 0.3},
      "dense": {"bias": None, "kernel": rng.random((16, 10)) < 0.3},
  }
  # Values that only a bitwise round trip keeps: -0.0 and a NaN, both kept.
  masks["conv"]["kernel"].flat[:2] = True
  params["conv"]["kernel"].flat[0] = -0.0
  params["conv"]["kernel"].flat[1] = np.nan
  return params, masks


def _export_and_load(tmp_path, params, masks, like=None, name="model.npz"):
  file = tmp_path / name
  stats = export.export_sparse(params, masks, file)
  return stats, file, export.load_sparse(file, like=like)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_load_sparse_restores_dense_arrays_bitwise(tmp_path, dtype):
  params, masks = _params(dtype)
  _, _, (restored, _) = _export_and_load(tmp_path, params, masks)
  for path in ("conv/kernel", "dense/kernel", "dense/bias"):
    layer, leaf = path.split("/")
    w, m, got = params[layer][leaf], masks[layer][leaf], restored[layer][leaf]
    expected = w if m is None else np.where(m, w, np.zeros((), w.dtype))
    assert got.dtype == w.dtype and got.shape == w.shape, path
    np.testing.assert_array_equal(_bits(got), _bits(expected), path)


def test_load_sparse_returns_exact_zeros_at_pruned_entries_of_unmasked_params(tmp_path):
  params, masks = _params()
  assert np.all(params["dense"]["kernel"] != 0)  # pruned entries are dropped, not checked
  _, _, (restored, _) = _export_and_load(tmp_path, params, masks)
  for layer in ("conv", "dense"):
    pruned = restored[layer]["kernel"][~masks[layer]["kernel"]]
    assert pruned.size and np.all(_bits(pruned) == 0), layer  # +0.0, not -0.0


def test_load_sparse_restores_masks_and_none_for_unmasked_leaves(tmp_path):
  params, masks = _params()
  _, _, (_, restored) = _export_and_load(tmp_path, params, masks)
  assert restored["dense"]["bias"] is None
  for layer in ("conv", "dense"):
    assert restored[layer]["kernel"].dtype == bool
    np.testing.assert_array_equal(restored[layer]["kernel"], masks[layer]["kernel"])


def test_export_file_holds_kept_values_in_row_major_order_and_packed_masks(tmp_path):
  params, masks = _params()
  stats, file, _ = _export_and_load(tmp_path, params, masks)
  with np.load(file, allow_pickle=False) as npz:
    header = json.loads(npz["header"].tobytes().decode())
    assert (header["format"], header["version"]) == ("sparsejax.sparse_export", 1)
    index = {e["path"]: i for i, e in enumerate(header["leaves"])}
    assert list(index) == ["conv/kernel", "dense/bias", "dense/kernel"]
    for layer in ("conv", "dense"):
      i, w, m = index[f"{layer}/kernel"], params[layer]["kernel"], masks[layer]["kernel"]
      entry = header["leaves"][i]
      assert (entry["shape"], entry["dtype"], entry["kept"]) == (list(w.shape), "float32", m.sum())
      np.testing.assert_array_equal(_bits(npz[f"{i}.values"]), _bits(w[m]))
      assert npz[f"{i}.mask"].dtype == np.uint8
      np.testing.assert_array_equal(
          np.unpackbits(npz[f"{i}.mask"], count=m.size).reshape(m.shape).astype(bool), m)
    i = index["dense/bias"]
    assert "kept" not in header["leaves"][i] and f"{i}.values" not in npz.files
    np.testing.assert_array_equal(npz[f"{i}.dense"], params["dense"]["bias"])
  assert stats.kept == sum(int(masks[l]["kernel"].sum()) for l in ("conv", "dense"))
  assert stats.dense_bytes == sum(a.nbytes for a in jax.tree.leaves(params))


def test_export_of_90_percent_sparse_float32_leaf_is_within_kept_values_plus_bits(tmp_path):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(100, 1000)).astype(np.float32)
  mask = np.zeros(w.size, bool)
  mask[rng.choice(w.size, 10_000, replace=False)] = True
  stats = export.export_sparse({"w": w}, {"w": mask.reshape(w.shape)}, tmp_path / "w.npz")
  bound = (0.1 * 4 + 1 / 8) / 4 + 0.01
  assert stats.file_bytes == os.path.getsize(tmp_path / "w.npz")
  assert (stats.dense_bytes, stats.kept) == (400_000, 10_000)
  assert stats.ratio == stats.file_bytes / stats.dense_bytes <= bound


def test_export_sparse_writes_exactly_at_path_without_adding_a_suffix(tmp_path):
  params, masks = _params()
  _, file, (restored, _) = _export_and_load(tmp_path, params, masks, name="model.sparse")
  assert sorted(os.listdir(tmp_path)) == ["model.sparse"]  # no '.npz' added, no temp left
  np.testing.assert_array_equal(restored["dense"]["bias"], params["dense"]["bias"])


def test_load_sparse_with_like_returns_the_structure_of_linen_params(tmp_path):
  params = models.linen_params()
  masks = sparsejax.magnitude_masks(params, 0.8)
  like = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  _, _, (restored, restored_masks) = _export_and_load(tmp_path, params, masks, like=like)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  assert restored_masks["Dense_0"]["bias"] is None
  jax.tree.map(np.testing.assert_array_equal, restored, sparsejax.apply_masks(params, masks))


@pytest.mark.parametrize("change, message", [
    (lambda p: p["dense"].update(kernel=np.zeros((16, 11), np.float32)),
     "leaf 2 does not match `like`: the file has 'dense/kernel' float32[16, 10], "
     "like has 'dense/kernel' float32[16, 11]"),
    (lambda p: p["dense"].update(kernel=np.zeros((16, 10), jnp.bfloat16)),
     "leaf 2 does not match `like`: the file has 'dense/kernel' float32[16, 10], "
     "like has 'dense/kernel' bfloat16[16, 10]"),
    (lambda p: p.update(conv={"weight": p["conv"]["kernel"]}),
     "leaf 0 does not match `like`: the file has 'conv/kernel' float32[3, 3, 4, 8], "
     "like has 'conv/weight' float32[3, 3, 4, 8]"),
    (lambda p: p.pop("conv"),
     "leaf 0 does not match `like`: the file has 'conv/kernel' float32[3, 3, 4, 8], "
     "like has 'dense/bias' float32[10]"),
], ids=["shape", "dtype", "path", "missing_leaf"])
def test_load_sparse_with_mismatched_like_names_first_leaf_and_both_shapes(tmp_path, change, message):
  params, masks = _params()
  file = tmp_path / "model.npz"
  export.export_sparse(params, masks, file)
  like, _ = _params()
  change(like)
  with pytest.raises(ValueError, match=re.escape(f"{file}: {message}")):
    export.load_sparse(file, like=like)


def test_nnx_state_paths_are_preserved_with_and_without_like(tmp_path):
  state = nnx.state(models.NnxMLP(nnx.Rngs(0)), nnx.Param)
  masks = sparsejax.magnitude_masks(state, 0.75)
  _, _, (nested, nested_masks) = _export_and_load(tmp_path, state, masks)
  assert {k: sorted(v) for k, v in nested.items()} == {
      layer: ["bias", "kernel"] for layer in ("hidden0", "hidden1", "out")}
  assert nested_masks["out"]["bias"] is None and nested_masks["out"]["kernel"].shape == (16, 4)

  restored, restored_masks = export.load_sparse(tmp_path / "model.npz", like=state)
  assert isinstance(restored, nnx.State)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  expected = sparsejax.apply_masks(state, masks)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(restored_masks), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(got, want)


def test_load_sparse_rejects_a_file_cut_in_half_naming_it(tmp_path):
  params, masks = _params()
  file = tmp_path / "model.npz"
  export.export_sparse(params, masks, file)
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=re.escape(f"{file}: not a readable sparsejax export")):
    export.load_sparse(file)


def test_load_sparse_rejects_a_corrupted_value_byte_naming_the_leaf(tmp_path):
  params, masks = _params()
  file = tmp_path / "model.npz"
  export.export_sparse(params, masks, file)
  data = bytearray(file.read_bytes())
  at = data.find(params["dense"]["kernel"][masks["dense"]["kernel"]].tobytes())
  data[at + 5] ^= 0xFF  # the zip CRC no longer matches
  file.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=re.escape(f"{file}: leaf 'dense/kernel': cannot read")):
    export.load_sparse(file)


def test_load_sparse_rejects_kept_values_that_do_not_match_mask_popcount(tmp_path):
  params, masks = _params()
  file = tmp_path / "model.npz"
  export.export_sparse(params, masks, file)
  with np.load(file) as npz:
    arrays = {name: npz[name] for name in npz.files}
  arrays["2.values"] = arrays["2.values"][:-1]  # leaf 2 is dense/kernel
  with open(file, "wb") as f:
    np.savez(f, **arrays)
  kept = int(masks["dense"]["kernel"].sum())
  with pytest.raises(ValueError, match=re.escape(
      f"{file}: leaf 'dense/kernel': {kept - 1} kept values stored (header says {kept}) "
      f"but the mask keeps {kept}")):
    export.load_sparse(file)


def test_load_sparse_rejects_files_from_a_newer_format_version(tmp_path):
  file = tmp_path / "model.npz"
  header = {"format": "sparsejax.sparse_export", "version": 99, "leaves": []}
  with open(file, "wb") as f:
    np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8))
  with pytest.raises(ValueError, match="format version 99 is newer"):
    export.load_sparse(file)


def test_export_sparse_rejects_masks_that_do_not_match_params_naming_the_leaf(tmp_path):
  params, masks = _params()
  masks["dense"]["kernel"] = masks["dense"]["kernel"][:, :5]
  with pytest.raises(ValueError, match="masks leaf 'dense/kernel' is array of shape"):
    export.export_sparse(params, masks, tmp_path / "model.npz")
  assert not os.listdir(tmp_path)


def test_export_sparse_rejects_non_bool_masks(tmp_path):
  params, masks = _params()
  masks["dense"]["kernel"] = masks["dense"]["kernel"].astype(np.float32)
  with pytest.raises(ValueError, match="mask 'dense/kernel' has dtype float32; masks must be bool"):
    export.export_sparse(params, masks, tmp_path / "model.npz")
