"""One-shot magnitude and random pruning of a Flax-Linen-style params tree."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from tests import reference

KERNELS = ["Dense_0", "Dense_1"]


def _params(scale_dense_1=1.0):
  rng = np.random.default_rng(0)
  layer = lambda n_in, n_out, scale: {  # noqa: E731
      "kernel": jnp.asarray(scale * rng.normal(size=(n_in, n_out)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(n_out,)), jnp.float32)}
  return {"params": {"Dense_0": layer(20, 10, 1.0), "Dense_1": layer(10, 5, scale_dense_1)}}


def _kernel(tree, layer):
  return tree["params"][layer]["kernel"]


def _check_biases_not_pruned(masks):
  assert jax.tree.structure(masks, is_leaf=lambda x: x is None) == jax.tree.structure(_params())
  for layer in KERNELS:
    assert masks["params"][layer]["bias"] is None


@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_magnitude_masks_match_reference_topk_per_leaf_and_skip_biases(sparsity):
  params = _params()
  masks = sparsejax.magnitude_masks(params, sparsity)
  _check_biases_not_pruned(masks)
  for layer in KERNELS:
    got = _kernel(masks, layer)
    assert got.dtype == jnp.bool_
    np.testing.assert_array_equal(got, reference.topk_mask(np.abs(_kernel(params, layer)), sparsity))


def test_magnitude_masks_global_match_reference_over_prunable_leaves():
  params = _params(scale_dense_1=3.0)  # larger weights: Dense_1 keeps more than Dense_0
  masks = sparsejax.magnitude_masks(params, 0.7, allocation="global")
  _check_biases_not_pruned(masks)
  want = reference.global_topk_masks([np.abs(_kernel(params, l)) for l in KERNELS], 0.7)
  for layer, expected in zip(KERNELS, want):
    np.testing.assert_array_equal(_kernel(masks, layer), expected)
  assert _kernel(masks, "Dense_1").mean() > 0.3 > _kernel(masks, "Dense_0").mean()


def test_magnitude_masks_global_break_cross_leaf_ties_in_jax_tree_leaf_order():
  # Insertion order puts Dense_1 first, jax.tree order (sorted keys) Dense_0:
  # with every |w| equal, the 125 kept weights are the first 125 of Dense_0.
  params = {"params": {"Dense_1": {"kernel": -jnp.ones((10, 5))},
                       "Dense_0": {"kernel": jnp.ones((20, 10))}}}
  masks = sparsejax.magnitude_masks(params, 0.5, allocation="global")
  want = reference.global_topk_masks([np.abs(x) for x in jax.tree.leaves(params)], 0.5)
  for got, expected in zip(jax.tree.leaves(masks), want):
    np.testing.assert_array_equal(got, expected)
  assert int(_kernel(masks, "Dense_0").sum()) == 125 and int(_kernel(masks, "Dense_1").sum()) == 0


@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_magnitude_masks_erk_keep_rounded_reference_density_per_leaf(sparsity):
  params = _params()
  masks = sparsejax.magnitude_masks(params, sparsity, allocation="erk")
  _check_biases_not_pruned(masks)
  densities = reference.erk_densities(sparsity, [(20, 10), (10, 5)])
  for layer, density in zip(KERNELS, densities):
    w = np.abs(_kernel(params, layer))
    k = round(density * w.size)
    assert abs(density * w.size - k) < 0.4  # not a rounding tie: the count is well defined
    np.testing.assert_array_equal(_kernel(masks, layer), reference.topk_mask(w, 1 - k / w.size))
  if sparsity == 0.3:  # the small layer is made dense
    assert bool(_kernel(masks, "Dense_1").all())


def test_magnitude_masks_custom_map_prunes_matched_leaf_at_its_sparsity():
  params = _params()
  masks = sparsejax.magnitude_masks(params, 0.5, allocation={"Dense_1/": 0.9})
  for layer, sparsity in (("Dense_0", 0.5), ("Dense_1", 0.9)):
    w = np.abs(_kernel(params, layer))
    np.testing.assert_array_equal(_kernel(masks, layer), reference.topk_mask(w, sparsity))


def test_magnitude_masks_custom_leaf_filter_chooses_the_pruned_leaves():
  params = _params()
  masks = sparsejax.magnitude_masks(params, 0.6, leaf_filter=lambda path, leaf: "Dense_1" in path)
  assert masks["params"]["Dense_0"] == {"bias": None, "kernel": None}
  for name in ("bias", "kernel"):
    w = np.abs(params["params"]["Dense_1"][name])
    np.testing.assert_array_equal(masks["params"]["Dense_1"][name], reference.topk_mask(w, 0.6))


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
def test_magnitude_masks_under_jit_with_traced_sparsity_match_reference(allocation):
  params, sparsity = _params(), 0.8
  fn = jax.jit(functools.partial(sparsejax.magnitude_masks, allocation=allocation))
  masks = fn(params, sparsity)
  _check_biases_not_pruned(masks)
  s32 = float(np.float32(sparsity))  # a traced sparsity is float32
  scores = [np.abs(_kernel(params, layer)) for layer in KERNELS]
  if allocation == "uniform":
    want = [reference.topk_mask(w, s32) for w in scores]
  elif allocation == "global":
    want = reference.global_topk_masks(scores, s32)
  else:
    densities = reference.erk_densities(s32, [w.shape for w in scores])
    want = [reference.topk_mask(w, 1 - round(d * w.size) / w.size) for w, d in zip(scores, densities)]
  for layer, expected in zip(KERNELS, want):
    np.testing.assert_array_equal(_kernel(masks, layer), expected)


def test_random_masks_keep_magnitude_counts_and_depend_on_the_key():
  params = _params()
  masks_0 = sparsejax.random_masks(params, 0.6, jax.random.key(0))
  masks_1 = sparsejax.random_masks(params, 0.6, jax.random.key(1))
  _check_biases_not_pruned(masks_0)
  for layer in KERNELS:
    size = _kernel(params, layer).size
    expected = round(0.4 * size)  # what magnitude pruning keeps: 80 and 20
    assert int(_kernel(masks_0, layer).sum()) == expected
    assert int(_kernel(masks_1, layer).sum()) == expected
    assert not np.array_equal(_kernel(masks_0, layer), _kernel(masks_1, layer))
  # Random, not magnitude: the kept set is not the top-|w| set.
  w = np.abs(_kernel(params, "Dense_0"))
  assert not np.array_equal(_kernel(masks_0, "Dense_0"), reference.topk_mask(w, 0.6))


def test_random_masks_require_a_key():
  with pytest.raises(ValueError, match="need a PRNG key"):
    sparsejax.random_masks(_params(), 0.5, None)


def test_magnitude_masks_reject_nan_naming_the_leaf_path():
  params = _params()
  params["params"]["Dense_1"]["kernel"] = params["params"]["Dense_1"]["kernel"].at[2, 3].set(jnp.nan)
  with pytest.raises(ValueError, match=re.escape("NaN in the scores of 'params/Dense_1/kernel'")):
    sparsejax.magnitude_masks(params, 0.5)


@pytest.mark.parametrize("sparsity", [1.5, -0.2])
def test_magnitude_masks_reject_sparsity_outside_unit_interval(sparsity):
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
    sparsejax.magnitude_masks(_params(), sparsity)
