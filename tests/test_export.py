"""Compressed sparse export: bitwise round trips, on-disk content, size, errors."""

from __future__ import annotations

import functools
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


# N:M layout: `export_sparse(..., nm=(n, m[, axis]))`.

NM_CASES = {  # name: (shape, n, m, axis, mask from sparsejax.nm_mask rather than NumPy)
    "dense_2_4": ((64, 32), 2, 4, -2, True),
    "conv_1_8": ((3, 3, 16, 8), 1, 8, -2, True),
    "dense_2_4_last_axis": ((16, 8), 2, 4, -1, False),
}


def _kernel(shape):
  return np.random.default_rng(0).normal(size=shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _nm_mask(shape, n, m, axis, library):
  """An N:M mask of |_kernel(shape)|, read-only.

  Cached, and made with NumPy unless `library`, because `sparsejax.nm_mask`
  spends about a second compiling its ops for every new shape.
  """
  scores = np.abs(_kernel(shape))
  if library:
    mask = np.asarray(sparsejax.nm_mask(jnp.asarray(scores), n, m, axis=axis))
  else:
    axis %= len(shape)
    groups = np.moveaxis(scores.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:]),
                         axis + 1, -1)
    grouped_mask = np.zeros(groups.shape, bool)
    top = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    np.put_along_axis(grouped_mask, top, True, axis=-1)
    mask = np.moveaxis(grouped_mask, -1, axis + 1).reshape(shape)
  mask.flags.writeable = False
  return mask


def _nm_leaf(shape, n, m, axis=-2, dtype=np.float32, library=False):
  """A kernel and a writable N:M mask of it, with -0.0 and NaN at kept entries."""
  w = _kernel(shape).astype(dtype)
  mask = _nm_mask(shape, n, m, axis, library).copy()
  kept = np.flatnonzero(mask)
  w.flat[kept[0]], w.flat[kept[1]] = -0.0, np.nan  # only a bitwise round trip keeps these
  return w, mask


def _nm_expected(w, mask, n, m, axis):
  """Kept values and in-group positions, grouped along `axis`: a plain NumPy spelling."""
  axis %= w.ndim
  groups = w.shape[:axis] + (w.shape[axis] // m, m) + w.shape[axis + 1:]
  w_g, mask_g = (np.moveaxis(a.reshape(groups), axis + 1, -1) for a in (w, mask))
  values = w_g[mask_g].reshape(w_g.shape[:-1] + (n,))  # row-major: position order
  positions = np.broadcast_to(np.arange(m), mask_g.shape)[mask_g].reshape(values.shape)
  out = w.shape[:axis] + (w.shape[axis] // m * n,) + w.shape[axis + 1:]
  return tuple(np.moveaxis(a, -1, axis + 1).reshape(out) for a in (values, positions))


def _bit_planes(positions, m):
  """In-group positions packed as bit planes, least significant plane first."""
  bits = int(np.ceil(np.log2(m)))
  flat = np.asarray(positions).reshape(-1)
  return np.packbits([(flat >> k) & 1 for k in range(bits)])


def _rewrite(file, change_arrays=lambda a: None, change_header=lambda h: None):
  """Rewrites an export with edited members, as a corrupted or hand-made file."""
  with np.load(file) as npz:
    arrays = {name: npz[name] for name in npz.files}
  header = json.loads(arrays["header"].tobytes().decode())
  change_arrays(arrays)
  change_header(header)
  arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  with open(file, "wb") as f:
    np.savez(f, **arrays)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", NM_CASES.values(), ids=NM_CASES.keys())
def test_nm_export_round_trips_values_and_masks_bitwise(tmp_path, case, dtype):
  shape, n, m, axis, library = case
  w, mask = _nm_leaf(shape, n, m, axis, dtype, library)
  bias = np.arange(shape[-1], dtype=dtype)
  params, masks = {"layer": {"bias": bias, "kernel": w}}, {"layer": {"bias": None, "kernel": mask}}
  file = tmp_path / "model.npz"
  stats = export.export_sparse(params, masks, file, nm=(n, m, axis))
  assert stats.kept == mask.sum() == mask.size // m * n
  like = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  for restored, restored_masks in (export.load_sparse(file), export.load_sparse(file, like=like)):
    got = restored["layer"]["kernel"]
    assert got.dtype == w.dtype and got.shape == w.shape
    np.testing.assert_array_equal(_bits(got), _bits(np.where(mask, w, np.zeros((), w.dtype))))
    np.testing.assert_array_equal(_bits(restored["layer"]["bias"]), _bits(bias))
    assert restored_masks["layer"]["bias"] is None
    assert restored_masks["layer"]["kernel"].dtype == bool
    np.testing.assert_array_equal(restored_masks["layer"]["kernel"], mask)


@pytest.mark.parametrize("case", NM_CASES.values(), ids=NM_CASES.keys())
def test_nm_export_file_holds_grouped_kept_values_and_bit_plane_indices(tmp_path, case):
  shape, n, m, axis, library = case
  w, mask = _nm_leaf(shape, n, m, axis, library=library)
  file = tmp_path / "model.npz"
  nm = (n, m) if (axis, len(shape)) == (-2, 2) else (n, m, axis)  # the default rule, or explicit
  export.export_sparse({"kernel": w}, {"kernel": mask}, file, nm=nm)
  values, positions = _nm_expected(w, mask, n, m, axis)
  with np.load(file, allow_pickle=False) as npz:
    header = json.loads(npz["header"].tobytes().decode())
    assert header["version"] == 2
    nm_entry = {"n": n, "m": m, "axis": axis % w.ndim}
    assert header["leaves"] == [{"path": "kernel", "shape": list(shape), "dtype": "float32",
                                 "kept": values.size, "nm": nm_entry}]
    assert sorted(npz.files) == ["0.nm_index", "0.nm_values", "header"]  # no bit mask
    assert npz["0.nm_values"].shape == values.shape
    np.testing.assert_array_equal(_bits(npz["0.nm_values"]), _bits(values))
    np.testing.assert_array_equal(npz["0.nm_index"], _bit_planes(positions, m))


NM_SIZES = {"dense_2_4": ((512, 512), 2, 4), "conv_1_8": ((3, 3, 256, 64), 1, 8)}


@pytest.mark.parametrize("case", NM_SIZES.values(), ids=NM_SIZES.keys())
def test_nm_export_is_within_kept_values_plus_index_bits(tmp_path, case):
  shape, n, m = case
  w, mask = _nm_leaf(shape, n, m)
  stats = export.export_sparse({"w": w}, {"w": mask}, tmp_path / "nm.npz", nm=(n, m, -2))
  bitmask = export.export_sparse({"w": w}, {"w": mask}, tmp_path / "bitmask.npz")
  bytes_per_weight = n / m * (4 + np.ceil(np.log2(m)) / 8)
  assert stats.file_bytes == os.path.getsize(tmp_path / "nm.npz")
  assert stats.dense_bytes == bitmask.dense_bytes == w.nbytes
  assert stats.ratio <= bytes_per_weight / 4 + 0.01
  if n * np.ceil(np.log2(m)) < m:  # 1:8: 3 index bits per 8 weights beat 8 mask bits
    assert stats.file_bytes < bitmask.file_bytes


def test_nm_export_rejects_a_mask_that_is_not_nm_naming_leaf_and_group(tmp_path):
  w, mask = _nm_leaf((8, 6), 2, 4)
  mask[4:8, 3] = [True, True, True, False]  # group 1 of column 3 keeps 3 of 4
  with pytest.raises(ValueError, match=re.escape(
      "mask 'dense/kernel' is not 2:4 along axis 0: group (1, 3) (entries 4..7 of axis 0) "
      "keeps 3, not 2.")):
    export.export_sparse({"dense": {"kernel": w}}, {"dense": {"kernel": mask}},
                         tmp_path / "model.npz", nm=(2, 4))
  assert not os.listdir(tmp_path)


def test_nm_export_rejects_an_axis_length_not_divisible_by_m_naming_the_leaf(tmp_path):
  w = np.ones((6, 8), np.float32)
  mask = np.zeros((6, 8), bool)
  with pytest.raises(ValueError, match=re.escape(
      "mask 'dense/kernel' of shape (6, 8): axis 0 has length 6, not divisible by m=4.")):
    export.export_sparse({"dense": {"kernel": w}}, {"dense": {"kernel": mask}},
                         tmp_path / "model.npz", nm=(2, 4))
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("nm, message", [
    ((2,), "nm must be (n, m) or (n, m, axes) with int n and m, got (2,)"),
    ((2.0, 4), "nm must be (n, m) or (n, m, axes) with int n and m"),
    ((5, 4), "nm needs 0 <= n <= m and 1 <= m <= 256, got n=5, m=4"),
    ((1, 512), "nm needs 0 <= n <= m and 1 <= m <= 256, got n=1, m=512"),
    ((1, 2, 3), "axes (3,) are out of range for 'kernel' of shape (4, 4)"),
], ids=["too_short", "float", "n_above_m", "m_above_256", "axis_out_of_range"])
def test_nm_export_rejects_malformed_nm(tmp_path, nm, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    export.export_sparse({"kernel": np.ones((4, 4))}, {"kernel": np.ones((4, 4), bool)},
                         tmp_path / "model.npz", nm=nm)


def test_nm_export_of_an_attention_output_kernel_groups_over_heads_and_head_dim(tmp_path):
  # (heads, head_dim, out): each output unit's input vector is the row-major
  # flattening of (heads, head_dim), so groups of 4 run over (h, d) pairs.
  rng = np.random.default_rng(3)
  w = rng.normal(size=(2, 6, 5)).astype(np.float32)
  flat = w.reshape(12, 5)                                     # rows: h * 6 + d
  groups = np.abs(flat).reshape(3, 4, 5)
  top = np.argsort(-groups, axis=1, kind="stable")[:, :2]
  flat_mask = np.zeros_like(groups, bool)
  np.put_along_axis(flat_mask, top, True, axis=1)
  mask = flat_mask.reshape(2, 6, 5)
  params = {"attention": {"out": {"kernel": w}}}
  file = tmp_path / "model.npz"
  export.export_sparse(params, {"attention": {"out": {"kernel": mask}}}, file, nm=(2, 4))
  with np.load(file, allow_pickle=False) as npz:
    header = json.loads(npz["header"].tobytes().decode())
    assert header["version"] == 3
    assert header["leaves"][0]["nm"] == {"n": 2, "m": 4, "axes": [0, 1]}
    values, positions = _nm_expected(flat, flat_mask.reshape(12, 5), 2, 4, 0)
    np.testing.assert_array_equal(npz["0.nm_values"], values)
    np.testing.assert_array_equal(npz["0.nm_index"], _bit_planes(positions, 4))
  restored, restored_masks = export.load_sparse(file)
  np.testing.assert_array_equal(restored_masks["attention"]["out"]["kernel"], mask)
  np.testing.assert_array_equal(restored["attention"]["out"]["kernel"], np.where(mask, w, 0))


def _descending(arrays):
  """Reverses the in-group order of every group: unique, but not ascending."""
  bits = np.unpackbits(arrays["0.nm_index"], count=2 * 16).reshape(2, 16)
  positions = (bits[0] + 2 * bits[1]).reshape(2, 2, 4)[:, ::-1]
  arrays["0.nm_index"] = _bit_planes(positions, 3)


@pytest.mark.parametrize("change_arrays, change_header, message", [
    (lambda a: a.update({"0.nm_index": np.full(4, 0xFF, np.uint8)}), None,
     "in-group index 3 of group (0, 0) is >= m=3"),
    (lambda a: a.update({"0.nm_index": np.zeros(4, np.uint8)}), None,
     "the in-group indices [0, 0] of group (0, 0) repeat a position"),
    (_descending, None, "of group (0, 0) are not ascending"),
    (lambda a: a.update({"0.nm_values": a["0.nm_values"][:-1]}), None,
     "array '0.nm_values' is float32[3, 4], expected float32[4, 4]"),
    (lambda a: a.update({"0.nm_index": a["0.nm_index"][:-1]}), None,
     "array '0.nm_index' is uint8[3], expected uint8[4]"),
    (lambda a: a.pop("0.nm_index"), None, "array '0.nm_index' is missing"),
    (None, lambda h: h["leaves"][0].update(kept=15),
     "header says 15 kept but 2:3 of shape [6, 4] keeps 16"),
    (None, lambda h: h["leaves"][0]["nm"].update(m=4),
     "N:M entry {'n': 2, 'm': 4, 'axis': 0} does not fit shape [6, 4]"),
], ids=["index_above_m", "duplicate_index", "descending_index", "values_shape",
        "index_size", "index_missing", "kept_count", "axis_not_divisible"])
def test_load_sparse_rejects_corrupt_nm_data_naming_file_and_leaf(
    tmp_path, change_arrays, change_header, message):
  w, mask = _nm_leaf((6, 4), 2, 3)  # 2 groups of 3 per column: 16 kept, 2 index bits each
  file = tmp_path / "model.npz"
  export.export_sparse({"dense": {"kernel": w}}, {"dense": {"kernel": mask}}, file, nm=(2, 3))
  _rewrite(file, change_arrays or (lambda a: None), change_header or (lambda h: None))
  with pytest.raises(ValueError, match=re.escape(f"{file}: leaf 'dense/kernel': ") + ".*"
                     + re.escape(message)):
    export.load_sparse(file)


def test_load_sparse_reads_a_hand_made_version_1_file(tmp_path):
  w = np.array([[1.5, -2.0, 0.0], [3.0, 4.0, -0.0]], np.float32)
  mask = np.array([[True, False, False], [False, True, True]])
  bias = np.array([7.0, 8.0], np.float32)
  header = {"format": "sparsejax.sparse_export", "version": 1, "leaves": [
      {"path": "dense/bias", "shape": [2], "dtype": "float32"},
      {"path": "dense/kernel", "shape": [2, 3], "dtype": "float32", "kept": 3}]}
  file = tmp_path / "v1.npz"
  with open(file, "wb") as f:
    np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
             **{"0.dense": bias, "1.values": w[mask], "1.mask": np.packbits(mask.reshape(-1))})
  restored, restored_masks = export.load_sparse(file)
  np.testing.assert_array_equal(_bits(restored["dense"]["kernel"]), _bits(np.where(mask, w, 0)))
  np.testing.assert_array_equal(restored["dense"]["bias"], bias)
  np.testing.assert_array_equal(restored_masks["dense"]["kernel"], mask)
  assert restored_masks["dense"]["bias"] is None


def test_export_writes_version_1_without_nm_leaves_so_older_readers_load_it(tmp_path):
  params, masks = _params()
  export.export_sparse(params, masks, tmp_path / "bitmask.npz")
  export.export_sparse({"w": np.ones((4, 2))}, {"w": None}, tmp_path / "dense.npz", nm=(2, 4))
  for name in ("bitmask.npz", "dense.npz"):  # nm with no masked leaf: nothing N:M written
    with np.load(tmp_path / name) as npz:
      assert json.loads(npz["header"].tobytes().decode())["version"] == 1, name
