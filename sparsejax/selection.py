"""Selection: which entries a mask keeps, given scores.

`topk_mask` keeps exactly k = round((1 - sparsity) * size) entries, the
largest scores, ties going to the lower flat index. It never sorts: scores are
mapped to unsigned integer keys whose order is the scores' order, the k-th
largest key is found by bisection over its 32 bits (one counting pass per bit),
and ties at that key are split by a bisection over the flat index, run only
when ties straddle the cut. Each pass is a compare and a count, so the whole
select costs a few dozen cheap reductions instead of an O(n log n) sort.

`nm_mask` keeps the n largest of every m consecutive entries along an axis.

NaN scores raise an error when the scores are concrete; inside `jit` (where
values cannot be checked) a NaN ranks below every number, so it is pruned
first.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_NAN_KEY = 1  # below the key of -inf; only NaNs get it
_COUNT_ROW = 32  # entries summed in uint8 before widening: cheap on every backend
_MAX_ENTRIES = 2**31 - 1  # counts and flat indices are int32


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def sortable_keys(scores: jax.Array) -> jax.Array:
  """Maps scores to unsigned integer keys with the same order as the values.

  Floats of up to 32 bits (and bool, and integers of up to 16 bits) become
  uint32 keys through float32; int32/uint32 keep all their bits; 64-bit
  dtypes (with jax_enable_x64) get uint64 keys. -0.0 and +0.0 share a key;
  NaN gets key 1, below every number.
  """
  x = jnp.asarray(scores)
  dtype = x.dtype
  wide = dtype.itemsize == 8
  key_type = jnp.uint64 if wide else jnp.uint32
  sign = np.array(1 << (8 * jnp.dtype(key_type).itemsize - 1), key_type)
  if jnp.issubdtype(dtype, jnp.signedinteger) and dtype.itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, key_type) ^ sign
  if jnp.issubdtype(dtype, jnp.unsignedinteger) and dtype.itemsize >= 4:
    return x.astype(key_type)
  if not wide and dtype != jnp.float32:
    x = x.astype(jnp.float32)  # exact for bf16, f16, bool and small integers
  bits = jax.lax.bitcast_convert_type(x, key_type)
  # -0.0 -> +0.0, tested on the bits: `x == 0` would also match subnormals,
  # which XLA:CPU flushes to zero in comparisons.
  bits = jnp.where((bits & ~sign) == 0, np.array(0, key_type), bits)
  keys = jnp.where(bits >= sign, ~bits, bits | sign)
  return jnp.where(jnp.isnan(x), np.array(_NAN_KEY, key_type), keys)


def _key_family(dtype) -> str:
  """Scores whose keys can be compared with each other share a family."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer) and dtype.itemsize >= 4:
    return f"{'u' if jnp.issubdtype(dtype, jnp.unsignedinteger) else ''}int{8 * dtype.itemsize}"
  return "float64" if dtype.itemsize == 8 else "float32"


def count_true(pred: jax.Array) -> jax.Array:
  """Counts True entries as int32.

  Rows of 32 are summed in uint8 first: this keeps the count fused with the
  comparison that produces `pred` (XLA:CPU otherwise materialises an int32
  copy of the whole array), which makes a counting pass ~10x cheaper there.
  """
  flat = pred.reshape(-1)
  size = flat.shape[0]
  main = size - size % _COUNT_ROW
  total = jnp.zeros((), jnp.int32)
  if main:
    rows = flat[:main].reshape(-1, _COUNT_ROW).astype(jnp.uint8)
    total += rows.sum(axis=1, dtype=jnp.uint8).astype(jnp.int32).sum(dtype=jnp.int32)
  if size - main:
    total += flat[main:].astype(jnp.int32).sum(dtype=jnp.int32)
  return total


def check_sparsity(sparsity, name: str = "sparsity") -> None:
  """Raises ValueError if a sparsity is not a scalar, or (when concrete) is
  outside [0, 1] or NaN."""
  if np.ndim(sparsity) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(sparsity)}.")
  if isinstance(sparsity, numbers.Real) or (
      _is_concrete(sparsity) and np.ndim(sparsity) == 0
  ):
    value = float(sparsity)
    if not 0.0 <= value <= 1.0:  # also False for NaN
      raise ValueError(f"{name} must be in [0, 1], got {value}.")


def check_no_nan(scores: jax.Array, name: str = "scores") -> None:
  """Raises ValueError naming `name` if concrete `scores` contain NaN.

  Inside a trace (jit, vmap, ...) values are unknown and nothing is checked.
  """
  if not jnp.issubdtype(jnp.result_type(scores), jnp.floating):
    return
  has_nan = jnp.isnan(scores).any()
  if not isinstance(has_nan, jax.core.Tracer) and bool(has_nan):
    raise ValueError(f"NaN in the scores of '{name}': cannot rank them.")


def keep_count(size: int, sparsity) -> jax.Array | int:
  """Returns round((1 - sparsity) * size), rounding half to even.

  A Python float gives a Python int by Python's float arithmetic (so 0.15
  behaves as the decimal 0.15 usually does). A float32 sparsity, numpy or
  jax, concrete or traced, gives the exact value for that float32 number,
  computed with integer arithmetic (float32 itself cannot count past 2**24);
  a traced float64 one (under jax_enable_x64) is computed in float64. A
  traced NaN (it cannot be checked) prunes nothing.

  >>> keep_count(10, 0.85), int(keep_count(10, jnp.float32(0.85)))  # 0.85 vs 0.8500000238
  (2, 1)
  """
  if _is_python_number(sparsity):
    return int(round((1.0 - float(sparsity)) * size))
  s = jnp.asarray(sparsity)
  s = jnp.clip(jnp.where(jnp.isnan(s), 0.0, s), 0.0, 1.0)  # a traced NaN prunes nothing
  if s.dtype == jnp.float64:
    return jnp.round((1.0 - s) * size).astype(jnp.int32)
  return _exact_keep_count(size, s.astype(jnp.float32))


def _is_python_number(x) -> bool:
  """Python and numpy 64-bit numbers take Python's arithmetic; float32 values
  (numpy or jax, concrete or traced) take the exact float32 path."""
  if isinstance(x, np.generic):
    return not (jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize <= 4)
  return isinstance(x, numbers.Real)


def _exact_keep_count(size: int, s: jax.Array) -> jax.Array:
  """round_half_even((1 - s) * size) for a float32 s in [0, 1], exactly.

  s = M * 2**-F with M < 2**24, so (1 - s) * size = size - P / 2**F with
  P = M * size < 2**55, held as two uint32 words (hi, lo). With q = P >> F
  and the remainder r, the result is size - q when r < 2**(F-1), size - q - 1
  when r > 2**(F-1), and the even of the two on a tie.
  """
  u32 = jnp.uint32
  bits = jax.lax.bitcast_convert_type(s, u32)
  exponent = (bits >> 23) & u32(0xFF)
  mantissa = jnp.where(exponent == 0, bits & u32(0x7FFFFF), (bits & u32(0x7FFFFF)) | u32(0x800000))
  shift = jnp.where(exponent == 0, 149, 150 - exponent.astype(jnp.int32))  # F, in [23, 149]
  m1, m0 = mantissa >> 16, mantissa & u32(0xFFFF)
  n1, n0 = u32(size >> 16), u32(size & 0xFFFF)
  low_product = m0 * n0
  middle = m1 * n0 + m0 * n1  # < 2**32
  lo = low_product + (middle << 16)
  hi = m1 * n1 + (middle >> 16) + (lo < low_product).astype(u32)

  def shr(x, n):  # logical shift by a traced amount; 0 when n >= 32
    return jnp.where(n >= 32, u32(0), x >> jnp.clip(n, 0, 31).astype(u32))

  def shl(x, n):
    return jnp.where(n >= 32, u32(0), x << jnp.clip(n, 0, 31).astype(u32))

  def low_bits(x, n):  # x mod 2**n
    return jnp.where(n >= 32, x, x & (shl(u32(1), n) - u32(1)))

  # q = P >> F (q <= size < 2**31, so one word); r = P mod 2**F as (r_hi, r_lo).
  q = jnp.where(shift >= 32, shr(hi, shift - 32), shl(hi, 32 - shift) | shr(lo, shift))
  r_hi = jnp.where(shift >= 32, low_bits(hi, shift - 32), u32(0))
  r_lo = jnp.where(shift >= 32, lo, low_bits(lo, shift))
  # half = 2**(F-1) as (h_hi, h_lo).
  h_hi = jnp.where(shift >= 33, shl(u32(1), shift - 33), u32(0))
  h_lo = jnp.where(shift >= 33, u32(0), shl(u32(1), shift - 1))
  above = (r_hi > h_hi) | ((r_hi == h_hi) & (r_lo > h_lo))
  tie = (r_hi == h_hi) & (r_lo == h_lo)
  big = shift >= 56  # P < 2**55 <= half: r < 1/2 and q = 0
  q = jnp.where(big, u32(0), q).astype(jnp.int32)
  down = jnp.where(big, False, above | (tie & ((size - q) % 2 == 1)))
  return jnp.int32(size) - q - down.astype(jnp.int32)


def _segment_sums(per_leaf: Sequence[jax.Array], segment_of: Sequence[int], segments: int) -> jax.Array:
  return jnp.stack([sum((c for c, s in zip(per_leaf, segment_of) if s == j), jnp.int32(0))
                    for j in range(segments)])


def _select(keys: Sequence[jax.Array], segment_of: Sequence[int], k: jax.Array) -> list[jax.Array]:
  """Top-k masks of several key arrays grouped in segments, in one pass each.

  Each segment (a set of arrays, in order) keeps its k[j] largest keys with
  one threshold, ties going to the lower position in the segment's
  concatenation. Every segment advances together through the same loops,
  so a model with hundreds of leaves costs as many loop steps as one leaf.
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

  # The k-th largest key T of each segment: the largest value with
  # count(keys >= T) >= k, built bit by bit from the most significant one.
  threshold, at_or_above = jax.lax.fori_loop(
      0, bits, threshold_step,
      (jnp.zeros(segments, key_type), jnp.asarray(sizes, jnp.int32)))

  def positions():  # each entry's position in its segment; built where used so it stays fused
    out, offsets = [], [0] * segments
    for key, s in zip(keys, segment_of):
      out.append(offsets[s] + jnp.arange(key.size, dtype=jnp.int32).reshape(key.shape))
      offsets[s] += key.size
    return out

  def tie_cutoffs():
    # Ties at T straddle the cut: keep the first `need` of them by position,
    # finding the cutoff position by bisection.
    above = _segment_sums([count_true(key > threshold[s]) for key, s in zip(keys, segment_of)],
                          segment_of, segments)
    need = k_min1 - above
    indices = positions()

    def cutoff_step(_, bounds):
      lo, hi = bounds
      mid = lo + (hi - lo) // 2
      counts = _segment_sums(
          [count_true((key == threshold[s]) & (index < mid[s]))
           for key, index, s in zip(keys, indices, segment_of)], segment_of, segments)
      enough = counts >= need
      return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    steps = max(1, int(np.ceil(np.log2(max(sizes) + 1))))
    lo, _ = jax.lax.fori_loop(0, steps, cutoff_step,
                              (jnp.zeros(segments, jnp.int32), jnp.asarray(sizes, jnp.int32)))
    return jnp.where(settled, jnp.asarray(sizes, jnp.int32), lo)

  settled = (at_or_above == k_min1) | (k == 0)  # no ties straddle the cut
  cutoff = jax.lax.cond(jnp.all(settled),
                        lambda: jnp.asarray(sizes, jnp.int32), tie_cutoffs)
  return [((key > threshold[s]) | ((key == threshold[s]) & (index < cutoff[s]))) & (k[s] > 0)
          for key, index, s in zip(keys, positions(), segment_of)]


def topk_masks(scores: Sequence[jax.Array], sparsity,
               candidates: Sequence[jax.Array | None] | None = None) -> list[jax.Array]:
  """Top-k masks of several arrays, with one shared or one per-array sparsity.

  - `sparsity` a scalar: one threshold across all arrays, as if they were
    concatenated (global magnitude pruning); exactly
    round((1 - sparsity) * total_size) entries are kept, ties going to the
    lower position in the concatenation.
  - `sparsity` a list or tuple (one per array): each array keeps its own
    round((1 - s_i) * size_i) entries (layerwise pruning), all arrays
    selected together in one loop.

  >>> [m.tolist() for m in topk_masks([jnp.array([1., 5.]), jnp.array([4., 2.])], 0.5)]
  [[False, True], [True, False]]
  >>> [m.tolist() for m in topk_masks([jnp.array([1., 5.]), jnp.array([4., 2.])], [0.5, 0.0])]
  [[False, True], [True, True]]

  Args:
    scores: arrays of scores (any float, integer or bool dtype, any shapes).
      A global selection needs scores that compare: all floats (and bool and
      small integers, ranked as float32), or all of one 32/64-bit integer
      dtype.
    sparsity: fraction pruned in [0, 1], or a sequence of them; traced
      values are allowed.
    candidates: optional bool arrays (or None) like `scores`: entries where
      a candidate array is False rank below every other entry, whatever
      their score (used to never revive weights pruned earlier).

  Returns:
    A list of boolean masks, one per input, same shapes.

  Raises:
    ValueError: for a concrete sparsity outside [0, 1], NaN in concrete
      scores, a sparsity list of the wrong length, scores that do not compare
      in a global selection, or more than 2**31 - 1 entries in one selection.
  """
  scores = [jnp.asarray(s) for s in scores]
  per_array = isinstance(sparsity, (list, tuple))
  sparsities = list(sparsity) if per_array else [sparsity]
  if per_array and len(sparsities) != len(scores):
    raise ValueError(f"{len(sparsities)} sparsities for {len(scores)} score arrays.")
  for i, value in enumerate(sparsities):
    check_sparsity(value, f"sparsity[{i}]" if per_array else "sparsity")
  for i, s in enumerate(scores):
    check_no_nan(s, f"scores[{i}]")
  if per_array:
    segment_of = list(range(len(scores)))
    sizes = [s.size for s in scores]
  else:
    families = sorted({_key_family(s.dtype) for s in scores})
    if len(families) > 1:
      raise ValueError(
          f"a global top-k compares scores across arrays, but {families} scores do not "
          f"compare exactly (dtypes {sorted({str(s.dtype) for s in scores})}): cast them to one.")
    segment_of = [0] * len(scores)
    sizes = [sum(s.size for s in scores)]
  keys = [sortable_keys(s) for s in scores]
  if candidates is not None:
    if len(candidates) != len(scores):
      raise ValueError(f"{len(candidates)} candidate arrays for {len(scores)} score arrays.")
    # Key 0 is below every live key; no float has it and an integer minimum
    # is merged with the value above it.
    keys = [key if c is None else jnp.where(c, jnp.maximum(key, np.array(1, key.dtype)),
                                            np.array(0, key.dtype))
            for key, c in zip(keys, candidates)]
  if max(sizes, default=0) > _MAX_ENTRIES:
    raise ValueError(f"top-k over {max(sizes)} entries: at most {_MAX_ENTRIES} are supported.")
  if sum(sizes) == 0:
    return [jnp.zeros(s.shape, bool) for s in scores]
  k = jnp.stack([jnp.asarray(keep_count(n, value), jnp.int32) for n, value in zip(sizes, sparsities)])
  return _select(keys, segment_of, k)


def topk_mask(scores: jax.Array, sparsity) -> jax.Array:
  """Boolean mask keeping the round((1 - sparsity) * size) largest scores.

  Exactly that many entries are kept; ties go to the lower flat index. Works
  under jit, vmap, pmap and sharding; `sparsity` may be traced.

  >>> topk_mask(jnp.array([3., 1., 2., 2.]), 0.5).tolist()
  [True, False, True, False]

  Args:
    scores: array of scores, any shape.
    sparsity: fraction of entries to drop, in [0, 1].

  Returns:
    A bool array with the shape of `scores`.

  Raises:
    ValueError: if a concrete sparsity is outside [0, 1] or scores hold NaN.
  """
  return topk_masks([scores], sparsity)[0]


def nm_mask(scores: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
  """Boolean N:M mask: in every m consecutive entries along `axis`, keep n.

  The n largest scores of each group are kept, ties going to the lower index.
  For a Flax Dense kernel (in, out) the default axis -2 groups along the
  input (reduction) dimension; for a Conv kernel (H, W, Cin, Cout) along Cin.

  >>> nm_mask(jnp.array([[1.], [4.], [3.], [2.]]), n=2, m=4).ravel().tolist()
  [False, True, True, False]

  Raises:
    ValueError: if not 0 <= n <= m, m < 1, the axis is out of range, its
      length is not divisible by m, or concrete scores hold NaN.
  """
  for name, value in (("n", n), ("m", m)):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
      raise ValueError(f"{name} must be a Python int, got {value!r}.")
  if m < 1 or not 0 <= n <= m:
    raise ValueError(f"N:M needs 0 <= N <= M and M >= 1, got N={n}, M={m}.")
  scores = jnp.asarray(scores)
  if not -scores.ndim <= axis < scores.ndim:
    raise ValueError(f"axis {axis} is out of range for scores of shape {scores.shape}.")
  axis %= scores.ndim
  length = scores.shape[axis]
  if length % m:
    raise ValueError(
        f"axis {axis} of shape {scores.shape} has length {length}, not divisible by M={m}."
    )
  check_no_nan(scores)
  keys = sortable_keys(scores)
  grouped = keys.reshape(scores.shape[:axis] + (length // m, m) + scores.shape[axis + 1:])
  member = axis + 1  # position of the within-group axis
  mine = jnp.expand_dims(grouped, member + 1)   # i along `member`
  other = jnp.expand_dims(grouped, member)      # j along `member + 1`
  i = jax.lax.broadcasted_iota(jnp.int32, (m, m), 0).reshape((m, m) + (1,) * (grouped.ndim - member - 1))
  j = jax.lax.broadcasted_iota(jnp.int32, (m, m), 1).reshape(i.shape)
  beats = (other > mine) | ((other == mine) & (j < i))
  rank_dtype = jnp.uint8 if m <= 255 else jnp.int32
  rank = beats.astype(rank_dtype).sum(axis=member + 1, dtype=rank_dtype)
  return (rank < n).reshape(scores.shape)
