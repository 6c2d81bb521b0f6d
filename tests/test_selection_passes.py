"""Top-k in a few passes (sparsejax/kth.py) against the 32-pass bisection it replaced and NumPy.

Arrays of at most `kth._SAMPLE` keys per group are ranked on their whole
sample (a bisection); the `passes` fixture shrinks the sample to 16 keys so
that these small cases go through the counting and extraction passes too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import sparsejax
from sparsejax import kth
from sparsejax.keys import count_true
from sparsejax.keys import sortable_keys
from tests import reference
from tests.test_fsdp import _collectives
from tests.test_fsdp import _mesh
from tests.test_fsdp import _params


@pytest.fixture
def passes(monkeypatch):
  """Forces the counting passes on small arrays: samples of 16 keys per group."""
  monkeypatch.setattr(kth, "_SAMPLE", 16)


def _segment_sums(per_leaf, segment_of, segments):
  return jnp.stack([sum((c for c, s in zip(per_leaf, segment_of) if s == j), jnp.int32(0))
                    for j in range(segments)])


def _bisection_select(keys, segment_of, k):
  """The selection this replaced, kept as a reference: 32 compare-and-count passes.

  A port of sparsejax 0.x `selection._select`: bisection over the key bits,
  then over the flat index for ties straddling the cut.
  """
  segments = len(k)
  key_type = jnp.uint64 if any(key.dtype == jnp.uint64 for key in keys) else jnp.uint32
  keys = [key.astype(key_type) for key in keys]
  bits = 8 * jnp.dtype(key_type).itemsize
  sizes = [sum(key.size for key, s in zip(keys, segment_of) if s == j) for j in range(segments)]
  k_min1 = jnp.maximum(k, 1)

  def threshold_step(i, carry):
    prefix, at_or_above = carry
    candidate = prefix | (jnp.ones((), key_type) << jnp.asarray(bits - 1 - i, key_type))
    counts = _segment_sums([count_true(key >= candidate[s]) for key, s in zip(keys, segment_of)],
                           segment_of, segments)
    take = counts >= k_min1
    return jnp.where(take, candidate, prefix), jnp.where(take, counts, at_or_above)

  threshold, at_or_above = jax.lax.fori_loop(
      0, bits, threshold_step, (jnp.zeros(segments, key_type), jnp.asarray(sizes, jnp.int32)))
  indices, offsets = [], [0] * segments
  for key, s in zip(keys, segment_of):
    indices.append(offsets[s] + jnp.arange(key.size, dtype=jnp.int32).reshape(key.shape))
    offsets[s] += key.size
  above = _segment_sums([count_true(key > threshold[s]) for key, s in zip(keys, segment_of)],
                        segment_of, segments)
  need = k_min1 - above

  def cutoff_step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    counts = _segment_sums([count_true((key == threshold[s]) & (index < mid[s]))
                            for key, index, s in zip(keys, indices, segment_of)],
                           segment_of, segments)
    enough = counts >= need
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  steps = max(1, int(np.ceil(np.log2(max(sizes) + 1))))
  lo, _ = jax.lax.fori_loop(0, steps, cutoff_step,
                            (jnp.zeros(segments, jnp.int32), jnp.asarray(sizes, jnp.int32)))
  settled = (at_or_above == k_min1) | (k == 0)
  cutoff = jnp.where(settled, jnp.asarray(sizes, jnp.int32), lo)
  return [((key > threshold[s]) | ((key == threshold[s]) & (index < cutoff[s]))) & (k[s] > 0)
          for key, index, s in zip(keys, indices, segment_of)]


@jax.jit
def _bisection_mask(scores, k):
  return _bisection_select([sortable_keys(scores)], [0], k[None])[0]


def _scores(kind, shape, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    return rng.normal(size=shape).astype(np.float32)
  if kind == "few_values":  # many ties, straddling the cut in many rows
    return rng.integers(0, 3, size=shape).astype(np.float32)
  if kind == "all_equal":
    return np.full(shape, 0.5, np.float32)
  if kind == "signed_zeros":
    return rng.choice(np.array([-0.0, 0.0, 1.0, -1.0], np.float32), size=shape)
  if kind == "planted_ties":  # distinct values, but one of them five times, in different rows
    x = rng.permutation(int(np.prod(shape))).astype(np.float32).reshape(shape)
    flat = x.reshape(-1)
    rank = flat.size // 10
    flat[np.argsort(-flat)[rank + 1:rank + 5]] = np.sort(flat)[::-1][rank]
    return x
  raise ValueError(kind)


SPARSITIES = [0.0, 0.1, 0.5, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("kind", ["normal", "few_values", "all_equal", "signed_zeros",
                                  "planted_ties"])
@pytest.mark.parametrize("shape", [(7,), (1000,), (33, 5), (3, 3, 8, 16)])
def test_passes_equal_the_bisection_and_numpy(passes, kind, shape):
  scores = _scores(kind, shape)
  select = jax.jit(sparsejax.topk_mask)
  for sparsity in SPARSITIES:
    want = reference.topk_mask(scores, float(np.float32(sparsity)))
    k = jnp.int32(int(want.sum()))
    np.testing.assert_array_equal(np.asarray(_bisection_mask(scores, k)), want)
    np.testing.assert_array_equal(np.asarray(select(scores, sparsity)), want,
                                  err_msg=f"sparsity {sparsity}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.int32, np.uint32])
def test_passes_rank_other_dtypes_like_numpy(passes, dtype):
  rng = np.random.default_rng(2)
  if dtype == np.int32:
    values = rng.integers(-2**31, 2**31 - 1, size=(40, 30), dtype=np.int64)
    values[0, :4] = [-2**31, 2**31 - 1, 2**24 + 1, 2**24]
  elif dtype == np.uint32:
    values = rng.integers(0, 2**32 - 1, size=(40, 30), dtype=np.int64)
    values[0, :3] = [0, 2**32 - 1, 2**32 - 1]
  else:
    values = rng.integers(-50, 50, size=(40, 30))
  scores = jnp.asarray(values, dtype)
  for sparsity in (0.0, 0.3, 0.6, 0.95, 1.0):
    np.testing.assert_array_equal(np.asarray(sparsejax.topk_mask(scores, sparsity)),
                                  reference.topk_mask(values, sparsity))


def test_passes_rank_infinities_and_nan_under_jit(passes):
  values = np.random.default_rng(3).normal(size=(20, 9)).astype(np.float32)
  values.ravel()[[0, 5, 40, 41]] = [np.inf, -np.inf, np.inf, -np.inf]
  with_nan = values.copy()
  with_nan.ravel()[[7, 70]] = np.nan
  ranked = np.where(np.isnan(with_nan), -np.inf, with_nan)   # NaN below -inf, then by index
  order = np.lexsort((np.arange(ranked.size), -ranked.ravel(),
                      np.isnan(with_nan.ravel())))
  for sparsity in (0.2, 0.5, 0.99):
    np.testing.assert_array_equal(np.asarray(sparsejax.topk_mask(values, sparsity)),
                                  reference.topk_mask(values, sparsity))
    k = int(round((1 - sparsity) * values.size))
    want = np.zeros(values.size, bool)
    want[order[:k]] = True
    got = np.asarray(jax.jit(sparsejax.topk_mask)(with_nan, sparsity)).ravel()
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["normal", "few_values"])
def test_passes_keep_per_array_counts_and_one_global_threshold(passes, kind):
  scores = [_scores(kind, (20, 10), 3), _scores(kind, (7,), 4), _scores(kind, (0, 3), 5),
            _scores(kind, (5, 3, 2), 6), _scores(kind, (300,), 7)]
  sparsities = [0.5, 0.0, 0.7, 1.0, 0.9]
  for fn in (sparsejax.topk_masks, jax.jit(sparsejax.topk_masks)):
    for got, s, sp in zip(fn(scores, sparsities), scores, sparsities):
      np.testing.assert_array_equal(np.asarray(got), reference.topk_mask(s, float(np.float32(sp))))
    for sparsity in (0.0, 0.35, 1.0):
      for got, want in zip(fn(scores, sparsity), reference.global_topk_masks(scores, sparsity)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_passes_rank_non_candidates_last(passes):
  rng = np.random.default_rng(4)
  scores = rng.normal(size=(30, 20)).astype(np.float32)
  candidates = rng.random((30, 20)) < 0.3
  got = np.asarray(sparsejax.topk_masks([scores], 0.5, candidates=[candidates])[0]).ravel()
  live = candidates.ravel()
  # Candidates by score, then the rest all tied (by index), whatever their score.
  order = sorted(range(scores.size),
                 key=lambda i: (not live[i], -float(scores.ravel()[i]) if live[i] else 0.0, i))
  want = np.zeros(scores.size, bool)
  want[order[:scores.size // 2]] = True
  np.testing.assert_array_equal(got, want)


def test_a_leaf_larger_than_the_sample_equals_numpy_with_and_without_jit():
  # 2**17 keys: more than `kth._SAMPLE`, so the default path counts and extracts.
  scores = np.abs(np.random.default_rng(5).normal(size=(128, 1024))).astype(np.float32)
  scores.ravel()[[10, 20, 30]] = scores.ravel()[40]    # ties wherever the cut falls
  for sparsity in (0.5, 0.9, 0.99):
    want = reference.topk_mask(scores, float(np.float32(sparsity)))
    np.testing.assert_array_equal(np.asarray(jax.jit(sparsejax.topk_mask)(scores, sparsity)), want)
  np.testing.assert_array_equal(np.asarray(sparsejax.topk_mask(scores, 0.9)),
                                reference.topk_mask(scores, 0.9))


def test_passes_run_with_jit_disabled_like_numpy(passes):
  # jax.disable_jit() runs the loops in Python, with Python-int loop indices
  # (an eager training step does this).
  scores = np.random.default_rng(6).normal(size=(8, 40)).astype(np.float32)
  with jax.disable_jit():
    got = np.asarray(sparsejax.topk_mask(jnp.asarray(scores), 0.75))
  np.testing.assert_array_equal(got, reference.topk_mask(scores, 0.75))


def test_subnormal_scores_rank_by_value_under_jit():
  # XLA:CPU reads subnormals as zero in float operations: keys must come from the bits only.
  scores = np.array([-1e-45, 1e-45, 0.0, -1e-40, 1e-40, -0.0, 3e-39, -2e-39], np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(sortable_keys)(scores)),
                                np.asarray(sortable_keys(scores)))
  for sparsity in (0.25, 0.5, 0.625, 0.875):
    want = reference.topk_mask(scores, float(np.float32(sparsity)))
    np.testing.assert_array_equal(np.asarray(jax.jit(sparsejax.topk_mask)(scores, sparsity)), want)


@pytest.mark.parametrize("allocation", ["uniform", pytest.param("global", marks=pytest.mark.slow)])
def test_passes_on_fsdp_shards_gather_no_kernel_and_equal_numpy(passes, allocation):
  mesh = _mesh()
  params = _params()
  shardings = sparsejax.fsdp_shardings(params, mesh)
  sharded = jax.device_put(params, shardings)
  update = jax.jit(lambda p: sparsejax.magnitude_masks(p, 0.9, allocation),
                   in_shardings=(shardings,), out_shardings=shardings)
  text = update.lower(sharded).compile().as_text()
  assert "all-gather" not in _collectives(text), _collectives(text)
  masks = update(sharded)
  kernels = ["conv", "dense_0", "dense_1", "head"]
  scores = [np.abs(params[name]["kernel"]) for name in kernels]
  want = (reference.global_topk_masks(scores, 0.9) if allocation == "global"
          else [reference.topk_mask(s, 0.9) for s in scores])
  for name, expected in zip(kernels, want):
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), expected, err_msg=name)
    assert isinstance(masks[name]["kernel"].sharding, NamedSharding)
