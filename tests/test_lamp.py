"""LAMP (Lee et al. 2021) against a NumPy port of the authors' code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import lamp
from tests import reference

SHAPES = {"conv": (3, 3, 4, 16), "dense_0": (144, 64), "dense_1": (64, 32), "head": (32, 10)}


def _params(seed=0, scales=None):
  rng = np.random.default_rng(seed)
  scales = scales or {}
  return {name: {"kernel": (scales.get(name, 1.0) * (1 + name.count("_")) *
                            rng.normal(size=shape)).astype(np.float32),
                 "bias": np.zeros(shape[-1], np.float32)}
          for name, shape in SHAPES.items()}


def _kernels(tree):
  return [np.asarray(tree[name]["kernel"]) for name in sorted(SHAPES)]


def test_lamp_normalize_hand_worked_example():
  # squares 1, 4, 9 (and a zero): 1/14, 4/13, 9/9; the zero scores 0.
  got = lamp.lamp_normalize(jnp.array([[2., 0.], [-1., 3.]]))
  np.testing.assert_allclose(np.asarray(got), [[4 / 13, 0.], [1 / 14, 1.]], rtol=1e-6)
  assert np.asarray(lamp.lamp_normalize(jnp.zeros(3))).tolist() == [0., 0., 0.]


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95, 0.99])
def test_lamp_masks_equal_the_authors_rule(sparsity):
  params = _params()
  masks = sparsejax.compute_masks(params, sparsity, allocation="lamp")
  want = reference.lamp_masks(_kernels(params), sparsity)
  for got, expected, name in zip(_kernels(masks), want, sorted(SHAPES)):
    np.testing.assert_array_equal(got, expected, err_msg=name)
  assert masks["head"]["bias"] is None


def test_lamp_never_empties_a_layer_where_global_magnitude_does():
  params = _params(scales={"head": 1e-3})
  lamp_masks = sparsejax.compute_masks(params, 0.99, allocation="lamp")
  global_masks = sparsejax.compute_masks(params, 0.99, allocation="global")
  assert int(np.asarray(global_masks["head"]["kernel"]).sum()) == 0
  assert all(int(m.sum()) >= 1 for m in _kernels(lamp_masks))


@pytest.mark.parametrize("layer", sorted(SHAPES))
def test_lamp_masks_do_not_change_when_one_layer_is_scaled(layer):
  base = sparsejax.compute_masks(_params(), 0.9, allocation="lamp")
  # A power of two scales every square exactly, so every LAMP score is unchanged to the bit.
  scaled = sparsejax.compute_masks(_params(scales={layer: 64.0}), 0.9, allocation="lamp")
  for a, b in zip(_kernels(base), _kernels(scaled)):
    np.testing.assert_array_equal(a, b)


def test_lamp_keeps_the_exact_total_and_runs_the_same_under_jit():
  params = _params(1)
  eager = sparsejax.compute_masks(params, 0.9, allocation="lamp")
  jitted = jax.jit(lambda p, s: sparsejax.compute_masks(p, s, allocation="lamp"))(params, 0.9)
  total = sum(np.prod(s) for s in SHAPES.values())
  assert sum(int(m.sum()) for m in _kernels(eager)) == round(0.1 * total)
  for a, b in zip(_kernels(eager), _kernels(jitted)):
    np.testing.assert_array_equal(a, b)


def test_lamp_inside_imp_ranks_the_survivors_like_the_authors():
  # Three levels of 20% (the paper's IMP); each level is LAMP over the surviving weights.
  params = _params(2)
  masks, kernels = None, _kernels(params)
  want = [np.ones(k.shape, bool) for k in kernels]
  for _ in range(3):
    masks = sparsejax.lottery.prune_level(params, masks, 0.2, allocation="lamp")
    kept = sum(int(m.sum()) for m in want)
    level = reference.lamp_masks([k * m for k, m in zip(kernels, want)],
                                 1.0 - round(0.8 * kept) / sum(k.size for k in kernels))
    want = [m & l for m, l in zip(want, level)]
    for got, expected in zip(_kernels(masks), want):
      np.testing.assert_array_equal(got, expected)


def test_gradual_pruning_takes_the_lamp_allocation():
  import optax
  params = _params(3)
  schedule = sparsejax.PolynomialSchedule(0.0, 0.8, begin_step=0, end_step=1)
  pruner = sparsejax.GradualMagnitudePruning(schedule, allocation="lamp")
  opt = pruner.wrap(optax.sgd(0.0))
  state = opt.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, state = opt.update(zeros, state, params)
  _, state = opt.update(zeros, state, params)
  got = _kernels(sparsejax.state_masks(state))
  for g, w in zip(got, reference.lamp_masks(_kernels(params), 0.8)):
    np.testing.assert_array_equal(g, w)


def test_an_unknown_allocation_lists_lamp():
  with pytest.raises(ValueError, match="lamp"):
    sparsejax.compute_masks(_params(), 0.5, allocation="lamb")


# --- Keep counts by bisection (no sort, no kernel gathered) against the sort and the authors. ---

def _count_kernels(seed=0):
  return [k for k in _kernels(_params(seed))]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.999])
def test_lamp_keep_counts_by_bisection_equal_the_sort_path_and_the_authors_rule(sparsity):
  kernels = _count_kernels()
  total = sum(k.size for k in kernels)
  keep = round((1 - sparsity) * total)
  by_sort = [int(c) for c in lamp.lamp_keep_counts(kernels, keep, method="sort")]
  by_bisection = [int(c) for c in lamp.lamp_keep_counts(kernels, keep, method="bisection")]
  authors = [int(m.sum()) for m in reference.lamp_masks(kernels, sparsity)]
  assert by_bisection == by_sort == authors
  assert sum(by_bisection) == keep


def test_lamp_keep_counts_by_bisection_split_ties_like_one_top_k_over_the_sorted_scores():
  # Hand-worked: leaf a = squares 4, 4, 4, 1, 0, 0 scores 4/4, 4/8, 4/12, 1/13, 0, 0 (equal
  # values scored in sorted order, as the authors' cumsum does); leaf b = 9, 9, 0 scores 1, 1/2,
  # 0; leaf c is all zeros (scores 0). Ties (the two 1s, the 1/2s, the zeros) go to the earlier
  # leaf.
  leaves = [jnp.array([2., 2., 2., 1., 0., 0.]), jnp.array([3., -3., 0.]), jnp.zeros(4)]
  want = {0: [0, 0, 0], 1: [1, 0, 0], 2: [1, 1, 0], 3: [2, 1, 0], 4: [2, 2, 0], 5: [3, 2, 0],
          8: [6, 2, 0], 9: [6, 3, 0], 10: [6, 3, 1], 13: [6, 3, 4]}
  for keep, counts in want.items():
    for method in ("sort", "bisection"):
      got = [int(c) for c in lamp.lamp_keep_counts(leaves, keep, method=method)]
      assert got == counts, (method, keep)


def test_lamp_keep_counts_by_bisection_skip_pruned_entries_and_ignore_a_layers_scale():
  kernels = _count_kernels(4)
  rng = np.random.default_rng(5)
  alive = [rng.random(k.shape) < 0.6 for k in kernels]
  keep = sum(int(a.sum()) for a in alive) // 5
  got = [int(c) for c in lamp.lamp_keep_counts(kernels, keep, alive, method="bisection")]
  want = [int(m.sum()) for m in reference.lamp_masks(
      [k * a for k, a in zip(kernels, alive)], 1 - keep / sum(k.size for k in kernels))]
  assert got == want
  for layer in range(len(kernels)):
    scaled = [k * (64.0 if i == layer else 1.0) for i, k in enumerate(kernels)]
    assert [int(c) for c in lamp.lamp_keep_counts(scaled, keep, alive, method="bisection")] == got


def test_lamp_keep_counts_method_is_checked_and_auto_bisects_on_several_devices():
  with pytest.raises(ValueError, match=r"method='radix': LAMP keep counts are computed by one of"):
    lamp.lamp_keep_counts([jnp.ones(3)], 1, method="radix")
  assert jax.device_count() > 1   # the test run's 4 CPU devices: 'auto' is the bisection
  kernels = _count_kernels()
  auto = jax.make_jaxpr(lambda k: lamp.lamp_keep_counts(k, 100))(kernels)
  assert "sort" not in str(auto) and "sort" in str(
      jax.make_jaxpr(lambda k: lamp.lamp_keep_counts(k, 100, method="sort"))(kernels))
