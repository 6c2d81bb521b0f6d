"""Top-k and N:M selection against the numpy references."""

import fractions
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import counts
from tests import reference
from tests import one_device_env


def _scores(kind, shape, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    return rng.normal(size=shape).astype(np.float32)
  if kind == "integer":
    return rng.integers(-3, 4, size=shape).astype(np.float32)
  if kind == "few_values":  # many partial ties
    return rng.integers(0, 3, size=shape).astype(np.float32)
  if kind == "all_equal":
    return np.full(shape, 0.5, np.float32)
  if kind == "signed_zeros":
    return rng.choice(np.array([-0.0, 0.0, 1.0, -1.0], np.float32), size=shape)
  raise ValueError(kind)


KINDS = ["normal", "integer", "all_equal", "signed_zeros"]
SHAPES = [(1,), (7,), (33, 5), (64, 48), (3, 3, 8, 16)]
SPARSITIES = [0.0, 0.1, 0.5, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_topk_mask_matches_numpy_reference(kind, shape, sparsity):
  scores = _scores(kind, shape)
  mask = np.asarray(sparsejax.topk_mask(scores, sparsity))
  np.testing.assert_array_equal(mask, reference.topk_mask(scores, sparsity))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", [0.25, 0.7, 0.95])
def test_topk_mask_under_jit_with_traced_sparsity_matches_reference(kind, sparsity):
  scores = _scores(kind, (40, 25), seed=1)
  mask = np.asarray(jax.jit(sparsejax.topk_mask)(scores, sparsity))
  # A traced sparsity is float32: the reference gets the same float32 value.
  np.testing.assert_array_equal(mask, reference.topk_mask(scores, float(np.float32(sparsity))))


@pytest.mark.parametrize("size", [1, 31, 32, 33, 1000, 4099])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.999, 1.0])
def test_topk_mask_keeps_exact_count_with_ties(size, sparsity):
  scores = np.zeros(size, np.float32)  # every entry ties
  mask = np.asarray(sparsejax.topk_mask(scores, sparsity))
  k = int(round((1 - sparsity) * size))
  assert mask.sum() == k
  np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(k))  # lower index wins


def test_topk_mask_hand_worked_example():
  scores = jnp.array([[0.5, -2.0, 3.0], [3.0, 0.1, 0.5]])
  # keep 3 of 6: both 3.0s, then the first 0.5 (flat index 0 beats 5).
  expected = [[True, False, True], [True, False, False]]
  assert sparsejax.topk_mask(scores, 0.5).tolist() == expected


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32])
def test_topk_mask_accepts_other_dtypes(dtype):
  scores = np.random.default_rng(2).integers(-50, 50, size=(30, 10))
  mask = np.asarray(sparsejax.topk_mask(jnp.asarray(scores, dtype), 0.6))
  np.testing.assert_array_equal(mask, reference.topk_mask(scores, 0.6))


def test_topk_mask_handles_infinities():
  scores = np.array([np.inf, -np.inf, 0.0, 1.0, -np.inf, np.inf], np.float32)
  np.testing.assert_array_equal(np.asarray(sparsejax.topk_mask(scores, 0.5)),
                                reference.topk_mask(scores, 0.5))


@pytest.mark.parametrize("kind", ["normal", "integer", "all_equal"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_global_topk_masks_match_reference_over_concatenation(kind, sparsity):
  scores = [_scores(kind, (20, 10), 3), _scores(kind, (7,), 4), _scores(kind, (5, 3, 2), 5)]
  masks = sparsejax.topk_masks(scores, sparsity)
  for got, want in zip(masks, reference.global_topk_masks(scores, sparsity)):
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, float("nan")])
def test_topk_mask_rejects_sparsity_outside_unit_interval(sparsity):
  with pytest.raises(ValueError, match="sparsity must be in"):
    sparsejax.topk_mask(jnp.ones(4), sparsity)


def test_topk_mask_rejects_nan_scores():
  with pytest.raises(ValueError, match="NaN"):
    sparsejax.topk_mask(jnp.array([1.0, jnp.nan]), 0.5)


def test_topk_mask_under_jit_ranks_nan_lowest():
  mask = jax.jit(sparsejax.topk_mask)(jnp.array([jnp.nan, -jnp.inf, 2.0, jnp.nan]), 0.5)
  assert mask.tolist() == [False, True, True, False]


@pytest.mark.parametrize("kind", ["normal", "integer", "few_values", "all_equal"])
@pytest.mark.parametrize("n,m", [(0, 4), (1, 4), (3, 4), (2, 4), (4, 4), (1, 2), (3, 8), (2, 16),
                                 (1, 8), (7, 8), (2, 8), (6, 8), (1, 16), (15, 16)])
@pytest.mark.parametrize("shape,axis", [((16, 6), -2), ((16, 6), 0), ((5, 32), -1),
                                        ((3, 3, 16, 4), -2), ((2, 16, 3), 1)])
def test_nm_mask_matches_numpy_reference(kind, n, m, shape, axis):
  scores = _scores(kind, shape, seed=n * 10 + m)
  got = np.asarray(sparsejax.nm_mask(scores, n, m, axis=axis))
  np.testing.assert_array_equal(got, reference.nm_mask(scores, n, m, axis))


def test_nm_mask_keeps_n_per_group_under_jit():
  scores = _scores("normal", (64, 8))
  mask = np.asarray(jax.jit(lambda s: sparsejax.nm_mask(s, 2, 4))(scores))
  np.testing.assert_array_equal(mask.reshape(16, 4, 8).sum(axis=1), np.full((16, 8), 2))


@pytest.mark.parametrize("n,m,match", [(5, 4, "N <= M"), (-1, 4, "N <= M"), (1, 0, "M >= 1"),
                                       (1.0, 4, "Python int")])
def test_nm_mask_rejects_bad_n_and_m(n, m, match):
  with pytest.raises(ValueError, match=match):
    sparsejax.nm_mask(jnp.ones((8, 2)), n, m)


def test_nm_mask_rejects_axis_not_divisible_by_m():
  with pytest.raises(ValueError, match="length 6, not divisible by M=4"):
    sparsejax.nm_mask(jnp.ones((6, 3)), 2, 4)


def test_nm_mask_rejects_nan_scores():
  with pytest.raises(ValueError, match="NaN"):
    sparsejax.nm_mask(jnp.array([[1.0], [jnp.nan]]), 1, 2)


@pytest.mark.parametrize("dtype", [np.int32, np.uint32])
def test_topk_mask_ranks_32_bit_integers_beyond_float32_precision(dtype):
  low = 0 if dtype == np.uint32 else -2**31
  scores = np.array([2**24, 2**24 + 1, 2**31 - 2, 2**31 - 1, low, 7], dtype)
  for sparsity in (0.5, 2 / 3, 5 / 6):
    got = np.asarray(sparsejax.topk_mask(scores, sparsity))
    np.testing.assert_array_equal(got, reference.topk_mask(scores, sparsity))
  np.testing.assert_array_equal(
      np.asarray(sparsejax.nm_mask(scores[:4].reshape(4, 1), 1, 2)).ravel(), [False, True, False, True])


def test_topk_mask_with_x64_enabled_ranks_float64_and_int64_exactly():
  # jax_enable_x64 is process-wide: check it in a fresh interpreter.
  script = """
import jax, jax.numpy as jnp, numpy as np, sparsejax
from tests import reference
assert jax.config.read("jax_enable_x64")
cases = [np.random.default_rng(0).normal(size=(40, 30)),
         np.array([1e-50, 0.0, 1 + 1e-12, 1.0, -1e-300, 1e-300]),
         np.array([2**40 + 1, 2**40, -2**62, 3, 2**62], np.int64)]
for scores in cases:
  for sparsity in (0.0, 0.5, 0.9, 1.0):
    want = reference.topk_mask(scores, sparsity)
    for fn in (sparsejax.topk_mask, jax.jit(sparsejax.topk_mask)):
      np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(scores), sparsity)), want)
print("ok")
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = one_device_env(JAX_ENABLE_X64="1")
  result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_topk_mask_rejects_non_scalar_sparsity():
  with pytest.raises(ValueError, match="must be a scalar"):
    sparsejax.topk_mask(jnp.ones(4), jnp.array([0.5]))


SIZES_BEYOND_FLOAT32 = [1, 6, 7, 10, 2**24 - 1, 2**24 + 1, 37_711_283, 205_852_672, 2**31 - 1]
TRACED_SPARSITIES = [0.0, 1.0, 0.5, 0.75, 0.85, 0.9, 0.2, 0.3, 1e-45, 2**-30, 0.999999, 0.123456]


@pytest.mark.parametrize("size", SIZES_BEYOND_FLOAT32)
def test_keep_count_of_traced_float32_sparsity_is_exact(size):
  values = np.array(TRACED_SPARSITIES, np.float32)
  got = np.asarray(jax.jit(jax.vmap(lambda s: counts.keep_count(size, s)))(values))
  # Exact rational arithmetic; Python's round() halves to even like the library.
  want = [round((1 - fractions.Fraction(float(s))) * size) for s in values]
  np.testing.assert_array_equal(got, want)


def test_jitted_topk_mask_on_a_leaf_beyond_2_pow_24_keeps_the_exact_count():
  size = 2**24 + 5
  scores = jax.random.normal(jax.random.key(0), (size,))
  sparsity = np.float32(0.3)
  kept = int(jax.jit(lambda s, p: sparsejax.topk_mask(s, p).sum())(scores, sparsity))
  assert kept == round((1 - fractions.Fraction(float(sparsity))) * size)


@pytest.mark.parametrize("kind", ["normal", "all_equal"])
def test_topk_masks_with_per_array_sparsities_match_per_array_reference(kind):
  scores = [_scores(kind, (20, 10), 3), _scores(kind, (7,), 4), _scores(kind, (0, 3), 5),
            _scores(kind, (5, 3, 2), 6)]
  sparsities = [0.5, 0.0, 0.7, 1.0]
  for fn in (sparsejax.topk_masks, jax.jit(sparsejax.topk_masks)):
    for got, s, sp in zip(fn(scores, sparsities), scores, sparsities):
      np.testing.assert_array_equal(np.asarray(got), reference.topk_mask(s, float(np.float32(sp))))


def test_topk_masks_rejects_sparsity_list_of_wrong_length():
  with pytest.raises(ValueError, match="2 sparsities for 3 score arrays"):
    sparsejax.topk_masks([jnp.ones(2)] * 3, [0.5, 0.5])


def test_topk_mask_ranks_subnormals_by_value_not_as_zero():
  # XLA:CPU flushes subnormals to zero in comparisons; keys must not.
  scores = np.array([-1e-45, 1e-45, 0.0, -1e-40, 1e-40, -0.0], np.float32)
  for sparsity in (0.5, 2 / 3, 5 / 6):
    np.testing.assert_array_equal(np.asarray(sparsejax.topk_mask(scores, sparsity)),
                                  reference.topk_mask(scores, sparsity))


@pytest.mark.parametrize("n,m", [(1, 4), (3, 4), (2, 4), (1, 8), (6, 8)])
def test_nm_mask_under_jit_ranks_nan_below_minus_infinity(n, m):
  column = np.array([np.nan, -np.inf, np.inf, 0.0, -1.0, np.nan, 3.0, -np.inf][:m], np.float32)
  # Hand-ranked: inf, 3, 0, -1, -inf (index 1), -inf (index 7), NaN (index 0), NaN (index 5).
  ranking = [i for i in (2, 6, 3, 4, 1, 7, 0, 5) if i < m]
  expected = np.zeros(m, bool)
  expected[ranking[:n]] = True
  got = np.asarray(jax.jit(lambda s: sparsejax.nm_mask(s, n, m))(column.reshape(m, 1))).ravel()
  np.testing.assert_array_equal(got, expected)


def test_topk_mask_of_a_closed_over_array_works_inside_jit():
  scores = jnp.array([1.0, 3.0, 2.0, 0.0])
  assert jax.jit(lambda: sparsejax.topk_mask(scores, 0.5))().tolist() == [False, True, True, False]
  assert jax.jit(lambda: sparsejax.nm_mask(scores.reshape(4, 1), 2, 4))().ravel().tolist() == [
      False, True, True, False]


def test_traced_nan_sparsity_prunes_nothing():
  assert int(jax.jit(sparsejax.topk_mask)(jnp.arange(1000.0), jnp.nan).sum()) == 1000


def test_numpy_float32_sparsity_counts_like_jax_float32():
  size, sparsity = 2_147_483_643, np.float32(0.3)  # exactly 5033165 / 2**24
  exact = round((1 - fractions.Fraction(float(sparsity))) * size)
  assert int(counts.keep_count(size, sparsity)) == exact
  assert int(jax.jit(lambda s: counts.keep_count(size, s))(sparsity)) == exact


@pytest.mark.parametrize("dtypes", [(np.uint32, np.int32), (np.int32, np.float32),
                                    (np.int32, jnp.bfloat16)])
def test_global_topk_masks_reject_scores_that_do_not_compare(dtypes):
  scores = [jnp.ones(3, dtypes[0]), jnp.ones(2, dtypes[1])]
  with pytest.raises(ValueError, match="do not compare exactly"):
    sparsejax.topk_masks(scores, 0.5)


def test_global_topk_masks_compare_bf16_with_float32():
  scores = [np.array([1.0, 2.5], np.float32), np.array([2.0, 0.5], np.float32)]
  got = sparsejax.topk_masks([jnp.asarray(scores[0], jnp.bfloat16), scores[1]], 0.5)
  for g, want in zip(got, reference.global_topk_masks(scores, 0.5)):
    np.testing.assert_array_equal(np.asarray(g), want)


@pytest.mark.parametrize("values,dtype", [([5.0, -np.inf, -np.inf, 3.0], np.float32),
                                          ([5, -2**31, -2**31, 3], np.int32),
                                          ([True, False, True, True], bool)])
def test_non_candidates_rank_below_every_candidate(values, dtype):
  scores = np.array(values, dtype)
  candidates = np.array([False, True, True, True])
  got = np.asarray(sparsejax.topk_masks([scores], 0.5, candidates=[candidates])[0])
  # Reference: rank candidates first (by score, then index), then the rest.
  order = sorted(range(4), key=lambda i: (not candidates[i], -float(scores[i]), i))
  want = np.zeros(4, bool)
  want[order[:2]] = True
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["normal", "few_values", "all_equal", "signed_zeros"])
@pytest.mark.parametrize("shape, axis, sparsity", [
    ((96, 7), 0, 0.5),        # a (d_in, d_out) matrix, per output unit
    ((50, 9), 0, 0.9),        # a length not a multiple of 32 (padded)
    ((3, 4, 37), -1, 0.3),
    ((5, 33, 2), 1, 0.75),
])
def test_topk_mask_along_equals_numpy_per_slice(kind, shape, axis, sparsity):
  x = _scores(kind, shape, seed=len(shape) + shape[0])
  got = np.asarray(sparsejax.topk_mask_along(jnp.asarray(x), sparsity, axis=axis))
  slices = np.moveaxis(x, axis, -1)
  expected = np.stack([reference.topk_mask(row, sparsity)
                       for row in slices.reshape(-1, slices.shape[-1])]).reshape(slices.shape)
  np.testing.assert_array_equal(got, np.moveaxis(expected, -1, axis))
  assert (got.sum(axis=axis) == round((1 - sparsity) * shape[axis])).all()


def test_topk_mask_along_ties_straddling_the_cut_in_some_slices():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4096, 3)).astype(np.float32)
  x[:3000, 1] = 0.25                     # slice 1: the cut falls inside a run of equal scores
  x[::2, 2] = x[1::2, 2]                 # slice 2: every score twice
  got = np.asarray(sparsejax.topk_mask_along(jnp.asarray(x), 0.5))
  expected = np.stack([reference.topk_mask(x[:, j], 0.5) for j in range(3)], axis=1)
  np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    sparsejax.topk_mask_along(jnp.ones((2, 3)), 0.5, axis=2)
  with pytest.raises(ValueError, match="NaN"):
    sparsejax.topk_mask_along(jnp.array([[1.0], [np.nan]]), 0.5)


@pytest.mark.slow
def test_topk_mask_along_over_more_than_65536_entries_ranks_ties_by_a_32_bit_index():
  long = np.round(np.random.default_rng(4).normal(size=(70_000, 1)), 1).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(sparsejax.topk_mask_along(jnp.asarray(long), 0.4))[:, 0],
                                reference.topk_mask(long[:, 0], 0.4))
