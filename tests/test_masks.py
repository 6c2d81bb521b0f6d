"""Masks trees: applying them, packing them to bits, reporting their sparsity."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax

PACK_SHAPES = {"a": (3, 5), "b": (7,), "c": (2, 3, 4)}  # 15, 7, 24 entries


def _params():
  rng = np.random.default_rng(0)
  return {
      "dense": {"bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
                "kernel": jnp.asarray(rng.normal(size=(4, 3)) + 5.0, jnp.float32)},
      "embed": jnp.asarray(rng.normal(size=(5, 2)) - 5.0, jnp.bfloat16),
  }


def _masks():
  rng = np.random.default_rng(1)
  return {"dense": {"bias": None, "kernel": jnp.asarray(rng.random((4, 3)) < 0.5)},
          "embed": jnp.asarray(rng.random((5, 2)) < 0.5)}


def _check_applied(out, params, masks):
  # Every masked weight is far from 0, so a zero means pruned and only pruned.
  for name, got, w, m in [("kernel", out["dense"]["kernel"], params["dense"]["kernel"],
                           masks["dense"]["kernel"]),
                          ("embed", out["embed"], params["embed"], masks["embed"])]:
    assert got.dtype == w.dtype, name
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.where(np.asarray(m), np.asarray(w, np.float32), 0.0), name)
  np.testing.assert_array_equal(out["dense"]["bias"], params["dense"]["bias"])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_apply_masks_zeroes_exactly_the_false_entries_and_passes_none_leaves_through(jit):
  params, masks = _params(), _masks()
  fn = jax.jit(sparsejax.apply_masks) if jit else sparsejax.apply_masks
  _check_applied(fn(params, masks), params, masks)


def test_apply_masks_rejects_masks_missing_a_layer_naming_first_differing_path():
  params, masks = _params(), _masks()
  del masks["dense"]
  with pytest.raises(ValueError, match=re.escape(
      "first difference at leaf 0: params has 'dense/bias', masks has 'embed'")):
    sparsejax.apply_masks(params, masks)


def test_apply_masks_rejects_masks_tree_that_ends_early():
  params, masks = _params(), _masks()
  del masks["embed"]
  with pytest.raises(ValueError, match=re.escape(
      "params has 'embed', masks has '<none: masks end here>'")):
    sparsejax.apply_masks(params, masks)


def test_apply_masks_rejects_mask_of_wrong_shape_naming_the_leaf():
  params, masks = _params(), _masks()
  masks["dense"]["kernel"] = jnp.ones((3, 4), bool)
  with pytest.raises(ValueError, match=re.escape(
      "masks leaf 'dense/kernel' is array of shape (3, 4) but the parameter is array of shape (4, 3)")):
    sparsejax.apply_masks(params, masks)


def _pack_case():
  rng = np.random.default_rng(2)
  params = {k: jnp.ones(s) for k, s in PACK_SHAPES.items()}
  params["d"] = jnp.ones((2, 2))
  masks = {k: jnp.asarray(rng.random(s) < 0.5) for k, s in PACK_SHAPES.items()}
  masks["d"] = None
  return params, masks


def test_pack_masks_stores_ceil_size_over_8_uint8_bytes_in_numpy_bit_order():
  _, masks = _pack_case()
  packed = sparsejax.pack_masks(masks)
  assert packed["d"] is None
  for name, shape in PACK_SHAPES.items():
    got = packed[name]
    assert got.dtype == jnp.uint8, name
    assert got.shape == (math.ceil(math.prod(shape) / 8),), name
    np.testing.assert_array_equal(got, np.packbits(np.asarray(masks[name]).ravel()), name)


def test_unpack_masks_inverts_pack_masks_exactly():
  params, masks = _pack_case()
  unpacked = sparsejax.unpack_masks(sparsejax.pack_masks(masks), params)
  assert unpacked["d"] is None
  for name, shape in PACK_SHAPES.items():
    assert unpacked[name].dtype == jnp.bool_, name
    assert unpacked[name].shape == shape, name
    np.testing.assert_array_equal(unpacked[name], masks[name], name)


@pytest.mark.parametrize("extra_bytes", [-1, 1])
def test_unpack_masks_rejects_wrong_packed_length_naming_the_leaf(extra_bytes):
  params, masks = _pack_case()
  packed = sparsejax.pack_masks(masks)
  packed["c"] = jnp.zeros((3 + extra_bytes,), jnp.uint8)
  with pytest.raises(ValueError, match=re.escape(
      f"packed mask 'c' is uint8[{3 + extra_bytes}], but the parameter of shape (2, 3, 4) "
      "needs uint8[3]")):
    sparsejax.unpack_masks(packed, params)


def test_unpack_masks_rejects_packed_leaf_that_is_not_bytes():
  params, masks = _pack_case()
  packed = sparsejax.pack_masks(masks)
  packed["c"] = jnp.zeros((3,), jnp.int32)
  with pytest.raises(ValueError, match=re.escape("packed mask 'c' is int32[3]")):
    sparsejax.unpack_masks(packed, params)


def test_unpack_masks_rejects_tree_with_different_paths():
  params, masks = _pack_case()
  packed = sparsejax.pack_masks(masks)
  packed["bb"] = packed.pop("b")
  with pytest.raises(ValueError, match=re.escape(
      "packed masks tree does not match params: first difference at leaf 1: "
      "params has 'b', packed masks has 'bb'")):
    sparsejax.unpack_masks(packed, params)


def test_sparsity_report_of_masks_tree_hand_worked():
  masks = {"conv": jnp.array([[True, False], [False, False]]),   # 1 of 4 kept
           "dense": {"bias": None,                                # not pruned: skipped
                     "kernel": jnp.array([True, True, False, True, False, False])}}  # 3 of 6
  report = sparsejax.sparsity_report(masks)
  assert list(report.leaves) == ["conv", "dense/kernel"]
  assert tuple(report.leaves["conv"]) == (4, 1, 0.75, None)
  assert tuple(report.leaves["dense/kernel"]) == (6, 3, 0.5, None)
  assert (report.size, report.kept) == (10, 4)
  assert report.sparsity == pytest.approx(0.6, abs=1e-12)
  assert report.zero_fraction is None


def test_sparsity_report_of_params_alone_reports_zeros_not_pruning():
  params = {"b": jnp.array([0.0, -0.0, 3.0]),              # 2 of 3 zero (-0.0 is zero)
            "w": jnp.array([[0.0, 1.5], [-2.0, 0.0]])}     # 2 of 4 zero
  report = sparsejax.sparsity_report(params)
  assert report.leaves["b"] == (3, None, None, pytest.approx(2 / 3, abs=1e-12))
  assert tuple(report.leaves["w"]) == (4, None, None, 0.5)
  assert (report.size, report.kept, report.sparsity) == (7, None, None)
  assert report.zero_fraction == pytest.approx(4 / 7, abs=1e-12)


def test_sparsity_report_of_params_and_masks_keeps_zero_biases_apart_from_pruning():
  # A zero-initialised bias is 100% zeros but 0% pruned; the kernel's mask
  # prunes 3 of 4 while only 2 of its weights are zero (one kept weight is 0).
  params = {"bias": jnp.zeros(4), "kernel": jnp.array([[0.0, 0.0], [0.0, 2.0]]), "none": None}
  masks = {"bias": None, "kernel": jnp.array([[True, False], [False, True]]), "none": None}
  report = sparsejax.sparsity_report(params, masks)
  assert list(report.leaves) == ["bias", "kernel"]
  assert tuple(report.leaves["bias"]) == (4, 4, 0.0, 1.0)
  assert tuple(report.leaves["kernel"]) == (4, 2, 0.5, 0.75)
  assert (report.size, report.kept, report.sparsity) == (8, 6, 0.25)
  assert report.zero_fraction == pytest.approx(7 / 8, abs=1e-12)


def test_sparsity_report_str_lists_every_leaf_and_the_overall_line():
  report = sparsejax.sparsity_report(
      {"encoder": {"layer_0": {"kernel": jnp.array([1.0, 0.0, 0.0, 0.0])}},
       "head": jnp.array([[2.0, 0.0]])})
  lines = str(report).splitlines()
  assert len(lines) == 4  # header, two leaves, overall
  assert lines[0].split() == ["leaf", "size", "kept", "sparsity", "zeros"]
  assert lines[1].split() == ["encoder/layer_0/kernel", "4", "-", "-", "0.7500"]
  assert lines[2].split() == ["head", "2", "-", "-", "0.5000"]
  assert lines[3].split() == ["overall", "6", "-", "-", f"{4 / 6:.4f}"]


def test_unpack_masks_runs_under_jit():
  params, masks = _pack_case()
  packed = sparsejax.pack_masks(masks)
  unpacked = jax.jit(sparsejax.unpack_masks)(packed, params)
  for name in masks:
    if masks[name] is not None:
      np.testing.assert_array_equal(np.asarray(unpacked[name]), np.asarray(masks[name]))


def test_leaves_with_masks_without_masks_lists_every_array_by_path_with_mask_none():
  params = {"dense": {"bias": jnp.zeros(3), "kernel": jnp.ones((2, 3))}, "skip": None,
            "head": {"kernel": jnp.full((3, 1), 2.0)}}
  walked = sparsejax.leaves_with_masks(params, None)
  assert [(leaf.path, leaf.mask) for leaf in walked] == [
      ("dense/bias", None), ("dense/kernel", None), ("head/kernel", None)]
  np.testing.assert_array_equal(walked[2].param, np.full((3, 1), 2.0))
