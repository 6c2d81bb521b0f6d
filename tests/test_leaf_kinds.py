"""None, MaskedNode, integer and non-bool leaves through every public function."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import checkpoint
from sparsejax import lottery
from tests import reference


def _params(empty):
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                    "bias": jnp.zeros(4)},
          "extra": empty,
          "head": {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}}


def _expected_masks(params, sparsity):
  return {name: reference.topk_mask(np.abs(np.asarray(params[name]["kernel"])), sparsity)
          for name in ("dense", "head")}


EMPTIES = {"none": None, "masked_node": optax.MaskedNode()}


@pytest.mark.parametrize("empty", EMPTIES.values(), ids=EMPTIES.keys())
def test_empty_leaves_pass_through_the_mask_functions_untouched(empty, tmp_path):
  params = _params(empty)
  masks = sparsejax.magnitude_masks(params, 0.5)
  expected = _expected_masks(params, 0.5)
  for name in ("dense", "head"):
    np.testing.assert_array_equal(masks[name]["kernel"], expected[name])
  assert masks["extra"] is empty or masks["extra"] == empty
  assert masks["dense"]["bias"] is None

  pruned = sparsejax.apply_masks(params, masks)
  assert pruned["extra"] == empty
  np.testing.assert_array_equal(pruned["head"]["kernel"],
                                np.where(expected["head"], params["head"]["kernel"], 0))
  unpacked = sparsejax.unpack_masks(sparsejax.pack_masks(masks), params)
  np.testing.assert_array_equal(unpacked["dense"]["kernel"], expected["dense"])
  assert unpacked["extra"] == empty

  again = sparsejax.compute_masks(params, 0.75, previous_masks=masks)
  for name in ("dense", "head"):
    assert not np.any(np.asarray(again[name]["kernel"]) & ~expected[name])  # never revived
  nm = sparsejax.nm_masks(params, 2, 4)
  assert np.asarray(nm["dense"]["kernel"]).sum() == 16

  level = lottery.prune_level(params, masks, 0.5)
  assert int(np.asarray(level["dense"]["kernel"]).sum()) == 8  # round(0.5 * 16)

  report = sparsejax.sparsity_report(params, masks)
  assert list(report.leaves) == ["dense/bias", "dense/kernel", "head/kernel"]
  walked = [(leaf.path, leaf.mask is None) for leaf in sparsejax.leaves_with_masks(params, masks)]
  assert walked == [("dense/bias", True), ("dense/kernel", False), ("head/kernel", False)]

  file = tmp_path / "model.npz"
  checkpoint.export_sparse(pruned, masks, file)
  restored, restored_masks = checkpoint.load_sparse(file)  # no `like`: nested dicts
  assert sorted(restored) == ["dense", "head"]  # the empty entry holds nothing to write
  for name in ("dense", "head"):
    np.testing.assert_array_equal(restored[name]["kernel"], pruned[name]["kernel"])
    np.testing.assert_array_equal(restored_masks[name]["kernel"], expected[name])
  assert restored_masks["dense"]["bias"] is None


@pytest.mark.parametrize("empty", EMPTIES.values(), ids=EMPTIES.keys())
@pytest.mark.parametrize("wrapper", ["gradual", "nm"])
def test_empty_leaves_pass_through_the_optax_wrappers(empty, wrapper):
  params = _params(empty)
  if wrapper == "gradual":
    tx = sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5)).wrap(optax.sgd(0.1))
  else:
    tx = sparsejax.NMSparsity.from_method(
        "step", sparsejax.NMSchedule(2, 4, num_steps=1)).wrap(optax.sgd(0.1))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert new["extra"] == empty
  kernel = np.asarray(new["dense"]["kernel"])
  assert np.count_nonzero(kernel) == 16  # half of 32, by either method
  np.testing.assert_array_equal(np.asarray(new["dense"]["bias"]), np.full(4, -0.1, np.float32))
  masked = sparsejax.masked_params(new, state)
  assert masked["extra"] == empty


def test_default_filter_skips_integer_and_bool_arrays():
  params = {"w": jnp.ones((4, 4)), "table": jnp.ones((4, 4), jnp.int32),
            "flags": jnp.ones((4, 4), bool), "bf16": jnp.ones((4, 4), jnp.bfloat16)}
  masks = sparsejax.magnitude_masks(params, 0.5)
  assert masks["table"] is None and masks["flags"] is None
  assert masks["w"] is not None and masks["bf16"] is not None


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16, jnp.int32])
def test_integer_scores_rank_by_true_magnitude_at_int_min(dtype):
  info = jnp.iinfo(dtype)
  values = np.array([[info.min, 3], [info.max, -5]], dtype)
  everything = lambda path, leaf: True
  masks = sparsejax.magnitude_masks({"q": jnp.asarray(values)}, 0.5, leaf_filter=everything)
  expected = reference.topk_mask(np.abs(values.astype(np.int64)), 0.5)  # exact, in int64
  np.testing.assert_array_equal(masks["q"], expected)
  assert bool(masks["q"][0, 0])  # |INT_MIN| is the largest magnitude
  nm = sparsejax.nm_masks({"q": jnp.asarray(values)}, 1, 2, leaf_filter=everything)
  np.testing.assert_array_equal(nm["q"], [[True, False], [False, True]])


@pytest.mark.parametrize("fn", [
    lambda p, m: sparsejax.apply_masks(p, m),
    lambda p, m: sparsejax.pack_masks(m),
    lambda p, m: sparsejax.sparsity_report(p, m),
    lambda p, m: sparsejax.with_masks(
        sparsejax.GradualMagnitudePruning(sparsejax.FixedMaskSchedule()).wrap(optax.sgd(1.0)).init(p),
        m),
], ids=["apply_masks", "pack_masks", "sparsity_report", "with_masks"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32])
def test_non_bool_masks_are_rejected_naming_the_leaf(fn, dtype):
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
  masks = {"a": {"kernel": jnp.ones((2, 2), bool)}, "b": {"kernel": jnp.ones((2, 2), dtype)}}
  with pytest.raises(ValueError, match=re.escape(
      f"mask 'b/kernel' has dtype {jnp.dtype(dtype)}; masks must be bool")):
    fn(params, masks)


def test_apply_masks_rejects_non_bool_masks_inside_jit():
  with pytest.raises(ValueError, match="mask 'w' has dtype float32"):
    jax.jit(sparsejax.apply_masks)({"w": jnp.ones(2)}, {"w": jnp.ones(2)})


@pytest.mark.parametrize("sparsity", ["0.5", None, True, 0.5 + 0j], ids=["str", "none", "bool", "complex"])
def test_topk_mask_rejects_a_sparsity_that_is_not_a_real_number(sparsity):
  with pytest.raises(ValueError, match="sparsity must be a real number in"):
    sparsejax.topk_mask(jnp.ones(4), sparsity)


def test_complex_scores_are_rejected_naming_the_leaf():
  with pytest.raises(ValueError, match="complex numbers have no order"):
    sparsejax.topk_mask(jnp.ones(4, jnp.complex64), 0.5)
  with pytest.raises(ValueError, match=r"the scores of 'w' are complex64"):
    sparsejax.compute_masks({"w": jnp.ones((2, 2), jnp.complex64)}, 0.5,
                            score=lambda w, key: w, leaf_filter=lambda path, leaf: True)
  with pytest.raises(ValueError, match="complex numbers have no order"):
    sparsejax.nm_mask(jnp.ones((4, 1), jnp.complex64), 2, 4)


def test_load_sparse_of_a_npy_file_is_a_one_line_error(tmp_path):
  file = tmp_path / "weights.npy"
  np.save(file, np.ones(3))
  with pytest.raises(ValueError, match=re.escape(f"{file}: a single NumPy array (.npy), not a "
                                                 "sparsejax export")):
    checkpoint.load_sparse(file)


def test_checkpoint_manager_on_a_file_is_a_one_line_error(tmp_path):
  file = tmp_path / "ckpt"
  file.write_text("not a directory")
  with pytest.raises(checkpoint.CheckpointError, match="is a file, not a checkpoint directory"):
    checkpoint.SparseCheckpointManager(str(file))
  assert file.read_text() == "not a directory"  # nothing lost
