"""Adversarial inputs for the straight-line band selection of sparsejax/kth.py.

Arrays of 2**17 keys (8x `kth._SAMPLE`) take the sampled counting pass, then
one extraction of a band [lo, hi] around the estimated k-th key; a miss
(high or low), a row with more than 3 band keys or ties make the group go
on in the fallback loop. Every mask is checked against a NumPy stable sort
(`_reference` of tests/test_elementwise_scores.py: ties to the lower flat
index, or the lower position in the concatenation; NaN last; non-candidates
below every candidate). `PassLog` counts, at run time, the counting and
extraction passes that run (a debug callback in each), and classifies each
group's band extraction (hit, high miss, low miss, overfull), so that the
tests can say which inputs take the loop and check that `kth._MAX_PASSES`
never ends it.
"""

import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import elementwise_scores
from sparsejax import kth
from sparsejax import selection
from sparsejax import topk_mask
from sparsejax import topk_masks
from sparsejax import topk_masks_by_count
from sparsejax.keys import sortable_keys
from tests import one_device_env
from tests.test_elementwise_scores import _assert_masks_equal
from tests.test_elementwise_scores import _keep
from tests.test_elementwise_scores import _reference

SHAPE = (256, 512)   # 2**17 keys: 8x kth._SAMPLE, so the sampled passes run
SPARSITIES = (0.001, 0.1, 0.5, 0.9, 0.999)
assert np.prod(SHAPE) >= 8 * kth._SAMPLE


class PassLog:
  """Records, at run time, the passes of each `kth.kth_largest` call.

  Entries are dicts: call ('main': the k-th key; 'ties': the search among
  the ties at it), kind ('count' or 'extract'), and for extractions per
  group the band ends, the count above the upper end, the band count and
  whether a row holds more than 3 band keys. The selection's compiled
  program is dropped before and after, so that the patched passes are
  traced in (and only in) the calls made while the log is on.
  """

  def __init__(self, monkeypatch):
    self.entries = []
    self._call = None
    real_kth, real_count, real_extract = kth.kth_largest, kth._count_pass, kth._extract_pass

    def kth_largest(*args, **kwargs):
      before, self._call = self._call, ("main" if kwargs.get("ties") else "ties")
      try:
        return real_kth(*args, **kwargs)
      finally:
        self._call = before

    def count_pass(key_fns, segment_of, segments, thresholds):
      out = real_count(key_fns, segment_of, segments, thresholds)
      call = self._call
      jax.debug.callback(lambda t, c: self.entries.append(
          dict(call=call, kind="count", thresholds=np.asarray(t), counts=np.asarray(c))),
          thresholds, out)
      return out

    def extract_pass(key_fns, segment_of, offsets, sizes, lower, upper):
      out = real_extract(key_fns, segment_of, offsets, sizes, lower, upper)
      call, segments = self._call, lower.shape[0]
      groups = [r[0] for r in out]
      zero = jnp.zeros((), jnp.int32)
      seg = lambda per: kth._segment_sum(per, groups, segments, zero)
      above = seg([r[6].sum(dtype=jnp.int32) for r in out])
      band = seg([r[1].astype(jnp.int32).sum(dtype=jnp.int32) for r in out])
      overfull = seg([(r[1] > 3).sum(dtype=jnp.int32) for r in out])
      jax.debug.callback(lambda lo, hi, a, b, o: self.entries.append(
          dict(call=call, kind="extract", lo=np.asarray(lo), hi=np.asarray(hi),
               above=np.asarray(a), band=np.asarray(b), overfull=np.asarray(o))),
          lower, upper, above, band, overfull)
      return out

    monkeypatch.setattr(kth, "kth_largest", kth_largest)
    monkeypatch.setattr(kth, "_count_pass", count_pass)
    monkeypatch.setattr(kth, "_extract_pass", extract_pass)

  def clear(self):
    self.entries = []

  def passes(self, call="main"):
    return [e["kind"] for e in self.entries if e["call"] == call]

  def loop_passes(self):
    """Passes of the k-th key search past the straight-line ones (count + band)."""
    main = self.passes("main")
    straight = 2 if main[:1] == ["count"] else 1
    return max(0, len(main) - straight) if main else 0

  def band_outcomes(self, k):
    """Per group, what the straight-line band extraction found, given the counts k."""
    band = next((e for e in self.entries if e["call"] == "main" and e["kind"] == "extract"), None)
    if band is None:
      return ["no passes"] * len(k)
    out = []
    for g, kg in enumerate(np.asarray(k)):
      if band["lo"][g] == band["hi"][g] and band["band"][g] + band["above"][g] >= kg > band["above"][g]:
        out.append("done before" if band["overfull"][g] == 0 else "overfull")
      elif band["above"][g] >= kg:
        out.append("high miss")
      elif band["above"][g] + band["band"][g] < kg:
        out.append("low miss")
      else:
        out.append("hit" if band["overfull"][g] == 0 else "overfull")
    return out


@contextlib.contextmanager
def pass_log():
  """A `PassLog` while in the block (the compiled selection is dropped before and after)."""
  selection._masks.clear_cache()
  try:
    with pytest.MonkeyPatch.context() as patch:
      yield PassLog(patch)
  finally:
    selection._masks.clear_cache()


def _float_of_key(key):
  """The float32 whose sortable key is `key` (NumPy inverse of `sortable_keys`)."""
  key = np.asarray(key, np.uint32)
  bits = np.where(key >= np.uint32(2**31), key ^ np.uint32(2**31), ~key)
  return bits.astype(np.uint32).view(np.float32)


def _keys(x):
  return np.asarray(sortable_keys(jnp.asarray(x)))


# --- inputs -------------------------------------------------------------------------------------

def _sample_mask(shape, size=None):
  """Where the default strided sample of an array of `shape` reads (alone in its group)."""
  size = int(np.prod(shape)) if size is None else size
  strides = kth._sample_strides(shape, max(1.0, size / kth._SAMPLE))
  mask = np.zeros(shape, bool)
  mask[tuple(slice(None, None, s) for s in strides)] = True
  return mask


def _planted_block(rng, k, offset, count=1000):
  """Distinct scores, then `count` of them (ranks k - offset .. k - offset + count - 1) set equal."""
  n = int(np.prod(SHAPE))
  x = rng.permutation(n).astype(np.float32)
  order = np.argsort(-x, kind="stable")
  first = min(max(k - 1 - offset, 0), n - count)
  x[order[first:first + count]] = x[order[first]]
  return x.reshape(SHAPE)


def _distribution(name, rng):
  """Scores of SHAPE for an input the sample may mislead on (float32 unless said)."""
  n = int(np.prod(SHAPE))
  if name == "normal":
    return rng.normal(size=SHAPE).astype(np.float32)
  if name == "quantized_300":
    return rng.integers(0, 300, size=SHAPE).astype(np.float32)
  if name == "two_values":
    return rng.integers(0, 2, size=SHAPE).astype(np.float32)
  if name == "sorted_ascending":
    return np.arange(n, dtype=np.float32).reshape(SHAPE)
  if name == "sorted_descending":
    return np.arange(n, 0, -1, dtype=np.float32).reshape(SHAPE)
  if name == "sorted_ascending_few_ulps":   # consecutive floats: keys 1 apart
    return _float_of_key(_keys(np.float32(1.0)) + np.arange(n, dtype=np.uint32)).reshape(SHAPE)
  strides = kth._sample_strides(SHAPE, n / kth._SAMPLE)
  if name == "rows_on_sample_stride":   # the sampled rows hold the small values
    x = rng.normal(size=SHAPE).astype(np.float32)
    return np.where((np.arange(SHAPE[0]) % strides[0] == 0)[:, None], x - 100, x + 100)
  if name == "columns_on_sample_stride":   # the sampled columns hold the large values
    x = rng.normal(size=SHAPE).astype(np.float32)
    return np.where((np.arange(SHAPE[1]) % strides[1] == 0)[None, :], x + 100, x)
  if name == "unsampled_are_larger":   # every sampled entry below every unsampled one
    x = rng.random(SHAPE).astype(np.float32)
    return np.where(_sample_mask(SHAPE), x, x + 2)
  if name == "huge_outliers":
    x = rng.normal(size=SHAPE).astype(np.float32)
    x.ravel()[rng.choice(n, 20, replace=False)] = np.float32(3e38)
    x.ravel()[rng.choice(n, 20, replace=False)] = np.float32(-3e38)
    return x
  if name == "zeros_99":
    x = rng.normal(size=SHAPE).astype(np.float32)
    return np.where(rng.random(SHAPE) < 0.99, np.float32(0), x)
  if name == "all_equal":
    return np.full(SHAPE, 0.75, np.float32)
  if name == "two_clusters":   # half near 1e-3, half near 1e3, in random places
    x = rng.random(SHAPE).astype(np.float32)
    return np.where(rng.permutation(n).reshape(SHAPE) < n // 2, 1e-3 * (1 + x), 1e3 * (1 + x)
                    ).astype(np.float32)
  if name == "subnormals":   # 1e-40 scale (below float32's smallest normal), signs, zeros
    x = (rng.normal(size=SHAPE) * 1e-40).astype(np.float32)
    x.ravel()[rng.choice(n, 1000, replace=False)] = 0.0
    return x
  if name == "negative":
    return -np.abs(rng.normal(size=SHAPE)).astype(np.float32) - 5
  if name == "signed_zeros_and_infs":
    return rng.choice(np.array([-0.0, 0.0, np.inf, -np.inf, 1.0, -1.0], np.float32), size=SHAPE)
  raise ValueError(name)


DISTRIBUTIONS = ("normal", "quantized_300", "two_values", "sorted_ascending", "sorted_descending",
                 "sorted_ascending_few_ulps", "rows_on_sample_stride", "columns_on_sample_stride",
                 "unsampled_are_larger", "huge_outliers", "zeros_99", "all_equal", "two_clusters",
                 "subnormals", "negative", "signed_zeros_and_infs")


def _check_single(x, sparsities=SPARSITIES, what=""):
  for sparsity in sparsities:
    want = _reference([x], [_keep(x.size, sparsity)])[0]
    got = np.asarray(topk_mask(x, sparsity))
    np.testing.assert_array_equal(got, want, err_msg=f"{what} sparsity {sparsity}")


# --- 1. ties at the band's ends --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["quantized_300", "two_values"])
def test_quantized_scores_tie_at_every_threshold(name):
  _check_single(_distribution(name, np.random.default_rng(1)), what=name)


@pytest.mark.parametrize("offset", [0, 1, 3, 4, 500, 999])
def test_a_block_of_1000_equal_scores_around_the_kth_rank(offset):
  # offset: how many of the ties rank above k (0: the block starts at k, one kept).
  rng = np.random.default_rng(offset)
  for sparsity in SPARSITIES:
    k = _keep(int(np.prod(SHAPE)), sparsity)
    x = _planted_block(rng, k, offset)
    _check_single(x, [sparsity], what=f"offset {offset}")


# --- 2. inputs the sample misleads on --------------------------------------------------------------

@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_inputs_that_mislead_the_sample_select_like_numpy(name):
  _check_single(_distribution(name, np.random.default_rng(2)), what=name)


def test_infinities_and_nan_under_jit_rank_like_numpy():
  # NaN (either sign) ranks below -inf; +-inf at the k-th rank, tied.
  rng = np.random.default_rng(3)
  n = int(np.prod(SHAPE))
  x = rng.normal(size=SHAPE).astype(np.float32)
  flat = x.ravel()
  places = rng.permutation(n)
  flat[places[:3000]] = np.inf
  flat[places[3000:6000]] = -np.inf
  flat[places[6000:9000]] = np.nan
  flat[places[9000:10000]] = -np.nan
  select = jax.jit(topk_mask)
  for sparsity in SPARSITIES + (1 - 3000 / n, 1 - 3001 / n, 6000 / n, 8000 / n, 0.0):
    s = float(np.float32(sparsity))
    want = _reference([x], [_keep(n, s)])[0]
    np.testing.assert_array_equal(np.asarray(select(x, s)), want, err_msg=f"sparsity {sparsity}")


def _interval(count_entry, k):
  """[L, U] after the first counting pass (one group), from its thresholds and counts."""
  t, c = count_entry["thresholds"][0].astype(np.int64), count_entry["counts"][0]
  lower = max([0] + [int(a) for a, n in zip(t, c) if n >= k])
  upper = min([2**32 - 1] + [int(a) - 1 for a, n in zip(t, c) if n < k])
  return lower, upper


def _plant(x, k, lower, upper, target, ties, need, clustered, rng):
  """x with keys of unsampled entries in [L, U] moved (in [L, U]) so that the k-th key is
  `target`, held by `ties` entries of which `need` are kept (`clustered`: the first ones in
  flat order, so that rows hold many); None where impossible.

  The sample and every first-pass count stay as they were, so the band is the same."""
  keys = _keys(x).ravel().astype(np.int64)
  movable = ~_sample_mask(x.shape).ravel() & (keys >= lower) & (keys <= upper)
  fixed = ~movable
  n_top = k - need - int(np.sum(fixed & (keys > target)))
  n_at = ties - int(np.sum(fixed & (keys == target)))
  places = np.flatnonzero(movable)
  if (n_top < 0 or n_at < 0 or n_top + n_at > places.size or (n_top and target >= upper)
      or not lower <= target <= upper):
    return None
  places = rng.permutation(places)
  keys[places[:n_top]] = upper
  keys[places[n_top + n_at:]] = lower if target > lower else target
  keys[places[n_top:n_top + n_at]] = target
  if clustered:   # the ties swapped into consecutive unsampled entries (same sample and counts)
    unsampled = np.flatnonzero(~_sample_mask(x.shape).ravel())
    block = unsampled[unsampled.size // 3:unsampled.size // 3 + n_at]
    ties_out = np.setdiff1d(places[n_top:n_top + n_at], block)
    others_in = block[keys[block] != target][:ties_out.size]
    keys[ties_out], keys[others_in] = keys[others_in], target
  return _float_of_key(keys.astype(np.uint32)).reshape(x.shape)


# (ties, need, clustered): one key, 2-4 ties (repeated maxima), more (bisection), spread
# over many rows, or in consecutive entries (rows with more than 3 band keys).
TIE_PATTERNS = ((1, 1, False), (2, 1, False), (2, 2, False), (4, 3, False), (4, 4, False),
                (5, 5, False), (6, 2, False), (40, 20, False), (300, 1, False), (300, 150, False),
                (4, 2, True), (40, 39, True), (300, 1, True))


def test_ties_planted_at_the_band_ends_select_like_numpy():
  # The band [lo, hi] of the straight-line extraction is read from a first
  # run; entries the sample does not read are moved, within the first
  # pass's [L, U], to lo - 1, lo, hi or hi + 1, so that the k-th key sits
  # there with the given ties while the sample and the band stay the same.
  rng = np.random.default_rng(4)
  n = int(np.prod(SHAPE))
  base = rng.normal(size=SHAPE).astype(np.float32)
  cases, outcomes = [], {}
  with pass_log() as log:
    for sparsity in (0.1, 0.5, 0.9):
      k = _keep(n, sparsity)
      log.clear()
      topk_mask(base, sparsity).block_until_ready()
      count = next(e for e in log.entries if e["kind"] == "count")
      band = next(e for e in log.entries if e["kind"] == "extract")
      lower, upper = _interval(count, k)
      lo, hi = int(band["lo"][0]), int(band["hi"][0])
      assert lower < lo <= hi < upper, (sparsity, lower, lo, hi, upper)
      for end, target in (("lo-1", lo - 1), ("lo", lo), ("hi", hi), ("hi+1", hi + 1)):
        for ties, need, clustered in TIE_PATTERNS:
          x = _plant(base, k, lower, upper, target, ties, need, clustered, rng)
          if x is None:
            continue
          log.clear()
          topk_mask(x, sparsity).block_until_ready()
          planted = next(e for e in log.entries if e["kind"] == "extract")
          assert (int(planted["lo"][0]), int(planted["hi"][0])) == (lo, hi), "the band moved"
          outcome = log.band_outcomes([k])[0]
          outcomes.setdefault(outcome, []).append((sparsity, end, ties, need, clustered))
          assert log.loop_passes() < kth._MAX_PASSES
          cases.append((sparsity, end, ties, need, x))
  assert len(cases) >= 90, len(cases)

  assert {"hit", "high miss", "low miss", "overfull"} <= set(outcomes), outcomes.keys()
  for sparsity, end, ties, need, x in cases:   # the program as it runs without the log
    want = _reference([x], [_keep(n, sparsity)])[0]
    np.testing.assert_array_equal(np.asarray(topk_mask(x, sparsity)), want,
                                  err_msg=f"sparsity {sparsity}, T at {end}, {ties} ties, {need} kept")


# --- 3. several groups at once, and one global selection over odd shapes -------------------------

def _groups(rng):
  """Per-array scores whose groups end differently after the straight-line band."""
  half = (256, 256)   # 2**16 keys each
  return [rng.normal(size=half).astype(np.float32),                              # hit
          np.arange(half[0] * half[1], dtype=np.float32).reshape(half),          # sorted
          rng.integers(0, 300, size=half).astype(np.float32),                    # ties: overfull
          np.where(rng.random(half) < 0.99, 0, rng.normal(size=half)).astype(np.float32),
          rng.normal(size=(10, 10)).astype(np.float32),                          # its own sample
          np.zeros((0, 4), np.float32),                                          # empty
          rng.normal(size=half).astype(np.float32),                              # k = 0
          rng.normal(size=half).astype(np.float32),                              # k = n
          _distribution("unsampled_are_larger", rng)]                            # 2**17


def _group_counts(scores, fractions):
  return [int(round(f * s.size)) for s, f in zip(scores, fractions)]


GROUP_FRACTIONS = ([0.3, 0.001, 0.5, 0.1, 0.5, 0.5, 0.0, 1.0, 0.7],
                   [0.999, 0.9, 0.1, 0.005, 0.01, 1.0, 0.0, 1.0, 0.3],
                   [0.5, 0.5, 0.999, 0.995, 1.0, 0.0, 0.0, 1.0, 0.99])


def test_groups_that_hit_miss_and_overflow_the_band_together_select_like_numpy():
  scores = _groups(np.random.default_rng(5))
  select = jax.jit(lambda counts, *s: topk_masks_by_count(list(s), list(counts)))
  outcomes = set()
  with pass_log() as log:
    for fractions in GROUP_FRACTIONS:
      counts = _group_counts(scores, fractions)
      log.clear()
      jax.block_until_ready(topk_masks_by_count(scores, counts))
      outcomes |= set(log.band_outcomes(np.maximum(counts, 1)))
      assert log.loop_passes() < kth._MAX_PASSES
  assert {"hit", "overfull"} <= outcomes and outcomes & {"high miss", "low miss"}, outcomes
  for fractions in GROUP_FRACTIONS:
    counts = _group_counts(scores, fractions)
    want = _reference(scores, counts)
    _assert_masks_equal(topk_masks_by_count(scores, counts), want, f"eager, {fractions}")
    _assert_masks_equal(select(jnp.asarray(counts, jnp.int32), *scores), want, f"jit, {fractions}")


def _odd_leaves(rng):
  return [rng.normal(size=(65537,)).astype(np.float32),      # prime: rows of 256 and one of 1
          rng.normal(size=(3, 65521)).astype(np.float32),    # prime < 2**16: whole rows
          rng.normal(size=(3000, 1)).astype(np.float32),     # last axis 1
          rng.integers(-50, 50, size=(128, 96)).astype(np.float32),   # ties
          rng.normal(size=(7, 13, 5)).astype(np.float32),
          np.zeros((0, 4), np.float32),
          np.full((2, 2), np.float32(7.0))]


def test_a_global_selection_over_leaves_of_odd_shapes_selects_like_numpy():
  leaves = _odd_leaves(np.random.default_rng(6))
  total = sum(x.size for x in leaves)
  select = jax.jit(topk_masks)
  for sparsity in SPARSITIES + (0.0, 1.0):
    want = _reference(leaves, _keep(total, sparsity))
    _assert_masks_equal(topk_masks(leaves, sparsity), want, f"eager, {sparsity}")
    s = float(np.float32(sparsity))
    _assert_masks_equal(select(leaves, s), _reference(leaves, _keep(total, s)), f"jit, {sparsity}")


def test_per_array_sparsities_over_leaves_of_odd_shapes_select_like_numpy():
  leaves = _odd_leaves(np.random.default_rng(7))
  sparsities = [0.5, 0.999, 0.9, 0.3, 0.1, 0.5, 0.25]
  want = _reference(leaves, [_keep(x.size, s) for x, s in zip(leaves, sparsities)])
  _assert_masks_equal(topk_masks(leaves, sparsities), want, "per-array")


# --- 4. other dtypes ---------------------------------------------------------------------------

def _int_scores(dtype, rng):
  info = np.iinfo(dtype)
  x = rng.integers(info.min, info.max, size=SHAPE, dtype=dtype, endpoint=True)
  flat = x.ravel()
  places = rng.permutation(flat.size)
  flat[places[:2000]] = info.max   # ties at both ends of the key range
  flat[places[2000:4000]] = info.min
  flat[places[4000:5000]] = 0
  return x


@pytest.mark.parametrize("dtype", ["int32", "uint32", "int32_narrow", "bfloat16", "float16"])
def test_other_dtypes_select_like_numpy(dtype):
  rng = np.random.default_rng(8)
  n = int(np.prod(SHAPE))
  if dtype in ("int32", "uint32"):
    x = _int_scores(np.dtype(dtype), rng)
    extra = (2000 / n, 1 - 2000 / n, 1 - 2001 / n, 1 - 1999 / n)   # the ties at max and min
  elif dtype == "int32_narrow":   # close keys: ranks 1 apart in key space
    x = rng.integers(-3000, 3000, size=SHAPE).astype(np.int32)
    extra = ()
  else:
    x = jnp.asarray(rng.normal(size=SHAPE), dtype)
    extra = ()
  for sparsity in SPARSITIES + extra + (0.0, 1.0):
    want = _reference([np.asarray(x)], [_keep(n, sparsity)])[0]
    np.testing.assert_array_equal(np.asarray(topk_mask(x, sparsity)), want,
                                  err_msg=f"{dtype}, sparsity {sparsity}")


@pytest.mark.slow   # a fresh interpreter and its compiles
def test_float64_and_int64_scores_with_x64_select_like_numpy():
  script = """
import jax, jax.numpy as jnp, numpy as np
from sparsejax import topk_mask, topk_masks
from tests.test_elementwise_scores import _keep, _reference, _assert_masks_equal
assert jax.config.read("jax_enable_x64")
rng = np.random.default_rng(9)
shape = (256, 512)
close = 1.0 + np.arange(2**17) * 2.0**-52           # 1 ulp apart: float32 cannot tell them
cases = {"float64": rng.normal(size=shape),
         "float64_close": rng.permutation(close).reshape(shape),
         "float64_ties": rng.integers(0, 300, size=shape).astype(np.float64) * (1 + 2.0**-40),
         "int64": rng.integers(-2**62, 2**62, size=shape, dtype=np.int64),
         "int64_close": rng.permutation(2**40 + np.arange(2**17, dtype=np.int64)).reshape(shape)}
cases["int64"].ravel()[:500] = 2**63 - 1
cases["int64"].ravel()[500:900] = -2**63                     # the minimum: key 0
cases["uint64"] = rng.integers(0, 2**64 - 1, size=shape, dtype=np.uint64, endpoint=True)
cases["uint64"].ravel()[:300] = 2**64 - 1                  # above int64's range, and 0
cases["uint64"].ravel()[300:600] = 0
for name, x in cases.items():
  for sparsity in (0.001, 0.1, 0.5, 0.9, 0.999):
    want = _reference([x], [_keep(x.size, sparsity)])[0]
    got = np.asarray(topk_mask(jnp.asarray(x), sparsity))
    np.testing.assert_array_equal(got, want, err_msg=f"{name} {sparsity}")
mixed = [cases["float64"], rng.normal(size=(3000, 1)), rng.normal(size=(65537,))]
for sparsity in (0.1, 0.9):
  want = _reference(mixed, _keep(sum(m.size for m in mixed), sparsity))
  _assert_masks_equal(topk_masks([jnp.asarray(m) for m in mixed], sparsity), want, "global")
print("ok")
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", script], cwd=root,
                          env=one_device_env(JAX_ENABLE_X64="1"), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# --- 5. counts under jit and candidates ----------------------------------------------------------

def test_traced_counts_and_candidates_select_like_numpy():
  rng = np.random.default_rng(10)
  a = rng.normal(size=SHAPE).astype(np.float32)
  b = rng.integers(0, 300, size=(256, 256)).astype(np.float32)
  c = rng.normal(size=(3000, 1)).astype(np.float32)
  scores = [a, b, c]
  candidates = [rng.random(SHAPE) < 0.3,                   # 30% candidates
                np.zeros(b.shape, bool),                   # none: all tied at the bottom
                None]
  total = sum(s.size for s in scores)
  n_live = int(candidates[0].sum()) + c.size

  @jax.jit
  def select(counts):
    return (topk_masks_by_count(scores, [counts[0], counts[1], counts[2]], candidates=candidates),
            topk_masks_by_count(scores, counts[3], candidates=candidates))

  for counts in ([0, 0, 0, 0], [1, 1, 1, 1], [n_live - c.size, 100, 2999, n_live],
                 [n_live - c.size + 1, 40000, 3000, n_live + 1],       # T among non-candidates
                 [70000, b.size, 1500, 100000], [a.size, 7, 0, total], [10**7, -3, 5, 123457]):
    clipped = [min(max(k, 0), s.size) for k, s in zip(counts, scores)]
    each, whole = select(jnp.asarray(counts, jnp.int32))
    _assert_masks_equal(each, _reference(scores, clipped, candidates), f"per-array, {counts}")
    _assert_masks_equal(whole, _reference(scores, min(max(counts[3], 0), total), candidates),
                        f"global, {counts}")


# --- 6. jit and eager, elementwise and stored -------------------------------------------------------

@pytest.mark.parametrize("name", ["quantized_300", "sorted_descending", "subnormals", "zeros_99",
                                  "rows_on_sample_stride"])
def test_jit_eager_elementwise_and_stored_masks_are_the_same(name):
  w = _distribution(name, np.random.default_rng(11))
  w = np.where(np.arange(w.size).reshape(w.shape) % 2 == 0, w, -w)   # |w| ties +-v
  stored = np.abs(w)
  lazy = jax.jit(lambda w, s: topk_mask(elementwise_scores(jnp.abs, w), s))
  given = jax.jit(lambda w, s: topk_mask(jnp.abs(w), s))
  for sparsity in (0.001, 0.5, 0.999):
    want = _reference([stored], [_keep(w.size, sparsity)])[0]
    s32 = float(np.float32(sparsity))
    assert _keep(w.size, s32) == want.sum()
    for what, got in (("eager lazy", topk_mask(elementwise_scores(jnp.abs, w), sparsity)),
                      ("eager stored", topk_mask(stored, sparsity)),
                      ("jit lazy", lazy(w, s32)), ("jit stored", given(w, s32))):
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{what}, {sparsity}")


# --- half-precision scores computed in the program -------------------------------------------------

def _product(a, b):
  return a * b


# bfloat16: XLA:CPU computes a bf16 product in float32 and, with its default
# --xla_allow_excess_precision, skipped the rounding to bf16 where the product
# was fused into a pass (an `astype(float32)` cancelled the convert). Keys now
# widen bf16 from its bits, so every pass ranks the rounded products.


def _half_pair(dtype):
  rng = np.random.default_rng(12)
  return tuple(jnp.asarray(rng.normal(size=SHAPE), dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_products_computed_in_the_jitted_step_keep_the_exact_count(dtype):
  # Scores computed inside the caller's jitted program (the stored path):
  # the count of kept entries must be exact and the masks those of the
  # rounded products.
  a, b = _half_pair(dtype)
  stored = np.asarray(jax.jit(_product)(a, b)).astype(np.float32)
  select = jax.jit(lambda a, b, s: topk_mask(a * b, s))
  for sparsity in (0.001, 0.5, 0.9):
    s32 = float(np.float32(sparsity))
    want = _reference([stored], [_keep(stored.size, s32)])[0]
    got = np.asarray(select(a, b, s32))
    assert got.sum() == want.sum(), (sparsity, int(got.sum()), int(want.sum()))
    np.testing.assert_array_equal(got, want, err_msg=f"{dtype}, sparsity {sparsity}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_elementwise_products_equal_the_stored_products(dtype):
  # elementwise_scores(fn, ...) promises the masks of fn(...) given as an array.
  a, b = _half_pair(dtype)
  stored = np.asarray(_product(a, b)).astype(np.float32)
  for sparsity in (0.5, 0.9):
    want = _reference([stored], [_keep(stored.size, sparsity)])[0]
    got = np.asarray(topk_mask(elementwise_scores(_product, a, b), sparsity))
    np.testing.assert_array_equal(got, want, err_msg=f"{dtype}, sparsity {sparsity}")


# --- extremes of k, vmap, many groups, sample-sized groups -----------------------------------------

def test_k_of_1_2_and_n_minus_1_n_under_jit_select_like_numpy():
  select = jax.jit(lambda x, k: topk_masks_by_count([x], k)[0])
  n = int(np.prod(SHAPE))
  for name in ("normal", "sorted_ascending", "sorted_descending", "quantized_300", "all_equal",
               "huge_outliers", "signed_zeros_and_infs"):
    x = _distribution(name, np.random.default_rng(13))
    for k in (1, 2, 3, 5, n - 5, n - 1, n):
      want = _reference([x], k)[0]
      np.testing.assert_array_equal(np.asarray(select(x, jnp.int32(k))), want,
                                    err_msg=f"{name}, k {k}")


def test_vmap_over_rows_that_need_different_passes_selects_like_numpy_per_row():
  rng = np.random.default_rng(14)
  rows = np.stack([_distribution(name, rng) for name in
                   ("normal", "quantized_300", "sorted_descending", "zeros_99")])
  for sparsity in (0.001, 0.5, 0.9):
    got = jax.vmap(lambda x: topk_mask(x, sparsity))(rows)
    for i, x in enumerate(rows):
      want = _reference([x], [_keep(x.size, sparsity)])[0]
      np.testing.assert_array_equal(np.asarray(got[i]), want, err_msg=f"row {i}, {sparsity}")


def test_groups_around_the_sample_size_and_a_0d_leaf_select_like_numpy():
  # At most 1.5x kth._SAMPLE keys a group is its own sample (strides round
  # to 1); just above, the sampled passes run.
  rng = np.random.default_rng(15)
  sizes = (kth._SAMPLE - 1, kth._SAMPLE, kth._SAMPLE + 1, 3 * kth._SAMPLE // 2 - 1,
           3 * kth._SAMPLE // 2 + 1, 2 * kth._SAMPLE + 3)
  leaves = [rng.integers(0, 1000, size=(n,)).astype(np.float32) for n in sizes]
  leaves.append(np.array(500.0, np.float32))   # 0-d
  leaves.append(np.array([999.0], np.float32))
  per_array = [0.5, 0.9, 0.001, 0.999, 0.3, 0.7, 0.0, 1.0]
  want = _reference(leaves, [_keep(x.size, s) for x, s in zip(leaves, per_array)])
  _assert_masks_equal(topk_masks(leaves, per_array), want, "per-array")
  total = sum(x.size for x in leaves)
  for sparsity in (0.001, 0.5, 0.999):
    _assert_masks_equal(topk_masks(leaves, sparsity), _reference(leaves, _keep(total, sparsity)),
                        f"global {sparsity}")


def test_all_false_candidates_and_nan_among_candidates_select_like_numpy():
  rng = np.random.default_rng(16)
  a = rng.normal(size=SHAPE).astype(np.float32)
  b = rng.normal(size=(256, 256)).astype(np.float32)
  a.ravel()[rng.choice(a.size, 5000, replace=False)] = np.nan   # NaN: key 1, above non-candidates
  scores = [a, b]
  none = [np.zeros(a.shape, bool), np.zeros(b.shape, bool)]
  some = [rng.random(a.shape) < 0.5, np.zeros(b.shape, bool)]
  select = jax.jit(lambda k, c0, c1: topk_masks_by_count(scores, k, candidates=[c0, c1]))
  total = a.size + b.size
  for candidates in (none, some):
    live = int(sum(c.sum() for c in candidates))
    for k in (0, 1, 1000, live - 1, live, live + 1, total - 1, total):
      k = min(max(k, 0), total)
      _assert_masks_equal(select(jnp.int32(k), *candidates), _reference(scores, k, candidates),
                          f"{live} candidates, k {k}")


@pytest.mark.slow   # 12 leaves: a long compile
def test_twelve_per_array_groups_of_mixed_kinds_select_like_numpy():
  rng = np.random.default_rng(17)
  names = ("normal", "quantized_300", "sorted_ascending", "zeros_99", "two_clusters", "negative")
  leaves = [_distribution(name, rng)[:64 * (i + 1)] for i, name in enumerate(names * 2)]
  for sparsities in ([0.5] * 12, [0.001, 0.1, 0.5, 0.9, 0.999, 0.3] * 2,
                     [0.999, 0.9, 0.5, 0.1, 0.001, 0.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.75]):
    want = _reference(leaves, [_keep(x.size, s) for x, s in zip(leaves, sparsities)])
    _assert_masks_equal(topk_masks(leaves, sparsities), want, f"{sparsities}")


# --- the pass guard -------------------------------------------------------------------------------

def test_no_input_here_is_ended_by_the_pass_guard():
  # kth._MAX_PASSES bounds the loop; every input here ends well before it.
  # A count that does not shrink the interval 4x is followed by one probe
  # extraction and a count splitting the key range in 3 (at U, L + 1 and two
  # even splits): at most 2 passes per 3x of the key range, ~40 for 32-bit
  # keys, plus the 2 straight-line ones and the interpolated counts. These
  # inputs take at most 30 (log-uniform uint32 scores whose sampled entries
  # are all 0 take 29, int64 ones 47: not checked here).
  worst = {}
  with pass_log() as log:
    for name in DISTRIBUTIONS:
      x = _distribution(name, np.random.default_rng(2))
      for sparsity in SPARSITIES:
        log.clear()
        topk_mask(x, sparsity).block_until_ready()
        worst[(name, sparsity)] = (len(log.passes("main")), len(log.passes("ties")))
  main, ties = max(m for m, _ in worst.values()), max(t for _, t in worst.values())
  assert main < kth._MAX_PASSES and ties < kth._MAX_PASSES, worst
  assert main <= 30 and ties <= 30, worst


# With candidates, non-candidates take key 0, which an integer score at its
# dtype's minimum also has: the two used to be merged with the next value.
@pytest.mark.parametrize("dtype", ["uint32", "int32"])
def test_integer_minimum_among_candidates_ranks_below_the_next_value(dtype):
  low = np.iinfo(dtype).min
  rng = np.random.default_rng(18)
  x = rng.integers(low, low + 3, size=SHAPE, dtype=dtype)   # the minimum and the next two values
  candidates = rng.random(SHAPE) < 0.9
  for keep in (1000, int(candidates.sum()) - 1000):
    want = _reference([x], [keep], [candidates])[0]
    got = np.asarray(topk_masks_by_count([x], [keep], candidates=[candidates])[0])
    np.testing.assert_array_equal(got, want, err_msg=f"{dtype}, keep {keep}")


# In a global selection where only some leaves have a candidates array, a
# leaf given None is all candidates: its entries at the dtype's minimum (key
# 0, like the other leaves' non-candidates) must rank above the
# non-candidates. `_select` lifts the tie positions of candidates at T = 0
# only in leaves with a candidates array (`live_fns[i] is None` returns the
# unlifted position), so the None leaf's minima lose to earlier non-candidates.
@pytest.mark.parametrize("dtype", ["uint32", "int32"])
def test_integer_minimum_in_a_leaf_without_candidates_ranks_above_other_non_candidates(dtype):
  low = np.iinfo(dtype).min
  rng = np.random.default_rng(19)
  small = [np.full(8, low, dtype), np.full(4, low, dtype)]
  live = np.arange(8) >= 4                                     # 4 non-candidates, first
  large = [rng.integers(low, low + 3, size=SHAPE, dtype=dtype),
           np.full((64, 512), low, dtype)]
  live_large = rng.random(SHAPE) < 0.9
  cases = [(small, [live, None], 6), (small[::-1], [None, live], 6),
           (large, [live_large, None], int(live_large.sum()) + 1000)]
  for scores, candidates, keep in cases:
    want = _reference(scores, keep, candidates)
    _assert_masks_equal(topk_masks_by_count(scores, keep, candidates=candidates), want,
                        f"{dtype}, keep {keep}, candidates {[c is None for c in candidates]}")
