"""The k-th largest key of several arrays in a few passes, exactly.

`kth_largest` finds, for each group of key arrays (one leaf, or all the
leaves of a global selection), the k-th largest key T and how many keys are
>= T and > T. It keeps an interval [L, U] that holds T, with exact counts
count(key >= L) >= k > count(key > U), and narrows it pass by pass:

1. A strided sample of each array (~16K keys per group, a few cache lines
   per row) is ranked by bisection; its quantiles around rank k * S / n give
   the first thresholds, which bracket T with high probability.
2. A counting pass counts the keys >= each of 4 thresholds in one read of
   the keys (two counts per uint32, summed along rows in one variadic
   reduce, which XLA:CPU fuses with the key computation). Later thresholds
   are interpolated in the interval (its keys taken as evenly spread),
   around the estimated position of T with a margin; a pass that does not
   shrink the interval 4x makes the next one split the interval's key range
   evenly (5 parts), so any input finishes in a bounded number of passes.
3. Once the interval holds few keys, one extraction pass reduces each row
   to the count, max, min and (wrapping) sum of its keys in the interval:
   a row with at most 3 of them gives all of them exactly, and T is found
   among those values alone. A row with more makes the group count on.

Every count is exact, so the result does not depend on the sample: a bad
sample only costs passes. Each pass reads the keys once and writes a few
numbers per row; keys are computed inside each pass from the caller's
arrays (`key_fns`), never stored.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_THRESHOLDS = 4          # counted per pass: two uint32 words of two 16-bit counts per row
_ROW_LIMIT = 2**16 - 1   # longest row a 16-bit count can sum
_FLAT_ROW = 32           # row length of 1-D arrays (and rows too long for 16-bit counts)
_SAMPLE = 2**14          # sampled keys per group
_SAMPLE_Z = (-3.5, -1.2, 1.2, 3.5)  # first thresholds: sample ranks around k, in binomial sds
_MARGIN_SDS = 3.0        # interpolated thresholds span the estimate +- this many sds ...
_MARGIN_FRACTION = 0.02  # ... plus this fraction of the interval (uneven spread of keys)
_MAX_PASSES = 96         # a guard: the worst case takes fewer passes than this


def _rows(x: jax.Array) -> list[jax.Array]:
  """Views of `x` whose last axis is reduced in a pass (rows of <= 65535 keys).

  Arrays of two or more axes are not reshaped, so a sharded array (FSDP) is
  reduced on its shards and only per-row results cross devices.
  """
  if x.ndim >= 2 and x.shape[-1] <= _ROW_LIMIT:
    return [x]
  flat = x.reshape(-1)
  size = flat.shape[0]
  main = size - size % _FLAT_ROW
  out = []
  if main:
    out.append(flat[:main].reshape(-1, _FLAT_ROW))
  if size - main:
    out.append(flat[main:].reshape(1, -1))
  return out


def _row_count(shape: tuple[int, ...]) -> int:
  """Rows of an array of this shape in `_rows` (extraction bins)."""
  size = int(np.prod(shape))
  if len(shape) >= 2 and shape[-1] <= _ROW_LIMIT:
    return size // max(shape[-1], 1)
  return size // _FLAT_ROW + (size % _FLAT_ROW > 0)


def _sample_strides(shape: tuple[int, ...], ratio: float) -> tuple[int, ...]:
  """Per-axis strides that keep about 1/ratio of the entries.

  The last axis is strided first (at most by about sqrt(ratio), so rows are
  not skipped wholesale), then the leading axes in order. Odd strides avoid
  aliasing with power-of-two structure.
  """
  strides = [1] * len(shape)
  left = max(ratio, 1.0)
  order = ([len(shape) - 1] + list(range(len(shape) - 1))) if shape else []
  for n, axis in enumerate(order):
    remaining_axes = len(order) - n
    want = left ** (1.0 / remaining_axes) if remaining_axes > 1 else left
    stride = int(min(shape[axis], max(1, round(want))))
    if stride > 1 and stride % 2 == 0 and stride < shape[axis]:
      stride += 1
    strides[axis] = stride
    left /= stride
  return tuple(strides)


def _segment_sum(per_leaf: Sequence[jax.Array], segment_of: Sequence[int], segments: int,
                 like: jax.Array) -> jax.Array:
  """Stacks per-group sums of per-leaf values (all shaped like `like`)."""
  zero = jnp.zeros_like(like)
  return jnp.stack([sum((v for v, s in zip(per_leaf, segment_of) if s == g), zero)
                    for g in range(segments)])


def _count_pass(key_fns, segment_of, segments, thresholds: jax.Array) -> jax.Array:
  """count(key >= t) for the `_THRESHOLDS` thresholds of each group, in one read."""
  per_leaf = []
  for key_fn, s in zip(key_fns, segment_of):
    t = thresholds[s]
    leaf = jnp.zeros(_THRESHOLDS, jnp.int32)
    for view in _rows(key_fn()):
      words = tuple((view >= t[2 * a]).astype(jnp.uint32)
                    | ((view >= t[2 * a + 1]).astype(jnp.uint32) << 16)
                    for a in range(_THRESHOLDS // 2))
      sums = jax.lax.reduce(words, (np.uint32(0),) * len(words),
                            lambda x, y: tuple(a + b for a, b in zip(x, y)), (view.ndim - 1,))
      leaf = leaf + jnp.stack([half.astype(jnp.int32).sum(dtype=jnp.int32)
                               for w in sums for half in (w & 0xFFFF, w >> 16)])
    per_leaf.append(leaf)
  return _segment_sum(per_leaf, segment_of, segments, jnp.zeros(_THRESHOLDS, jnp.int32))


def _extract_pass(key_fns, segment_of, lower, upper):
  """Per row: count, max, ~min and wrapping sum of the keys in [lower, upper] of its group."""
  out = []
  for key_fn, s in zip(key_fns, segment_of):
    for view in _rows(key_fn()):
      zero = np.array(0, view.dtype)
      band = (view >= lower[s]) & (view <= upper[s])
      ops = (band.astype(jnp.uint32), jnp.where(band, view, zero), jnp.where(band, ~view, zero),
             jnp.where(band, view, zero))
      out.append((s, jax.lax.reduce(
          ops, (np.uint32(0), zero, zero, zero),
          lambda x, y: (x[0] + y[0], jnp.maximum(x[1], y[1]), jnp.maximum(x[2], y[2]), x[3] + y[3]),
          (view.ndim - 1,))))
  return out


def _bisect(values, segments, ranks, key_type, bits):
  """Per group and column of `ranks`: the ranks[g, j]-th largest of the group's values.

  `values` holds (group, keys, valid) triples; invalid entries do not count.
  One bisection step per key bit; meant for small arrays (samples, rows).
  """
  columns = ranks.shape[1]

  def step(i, prefix):
    candidate = prefix | (np.array(1, key_type) << (bits - 1 - i).astype(key_type))
    per = [((v[..., None] >= candidate[s]) & ok[..., None]).reshape(-1, columns)
           .sum(axis=0, dtype=jnp.int32) for s, v, ok in values]
    counts = _segment_sum(per, [s for s, _, _ in values], segments, jnp.zeros(columns, jnp.int32))
    return jnp.where(counts >= ranks, candidate, prefix)

  return jax.lax.fori_loop(0, bits, step, jnp.zeros(ranks.shape, key_type))


def kth_largest(key_fns: Sequence[Callable[[], jax.Array]], shapes: Sequence[tuple[int, ...]],
                segment_of: Sequence[int], k: jax.Array, key_type, sample: int = _SAMPLE
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k[g]-th largest key T of each group g, and count(key >= T), count(key > T).

  Args:
    key_fns: one function per array returning its keys (unsigned ints of
      `key_type`); called inside every pass, so keys are never stored.
    shapes: the arrays' shapes.
    segment_of: the group of each array.
    k: int32 (groups,), each in [1, group size] (groups of size 0 may hold
      anything: their results are meaningless).
    key_type: jnp.uint32 or jnp.uint64.
    sample: keys sampled per group; a group of at most this many keys is
      ranked by bisection over all of them (no counting passes).

  Returns:
    (T, at_or_above, above), each of shape (groups,).
  """
  segments = k.shape[0]
  bits = 8 * jnp.dtype(key_type).itemsize
  key_max = np.array(np.iinfo(key_type).max, key_type)
  sizes = [sum(int(np.prod(sh)) for sh, s in zip(shapes, segment_of) if s == g)
           for g in range(segments)]
  live = [i for i, sh in enumerate(shapes) if int(np.prod(sh)) > 0]
  key_fns = [key_fns[i] for i in live]
  shapes = [shapes[i] for i in live]
  segment_of = [segment_of[i] for i in live]
  size = jnp.asarray(sizes, jnp.int32)
  k = jnp.clip(k, 1, jnp.maximum(size, 1))

  # 1. The sample: one stride ratio per group, so each leaf is sampled in proportion.
  ratios = [max(1.0, n / sample) for n in sizes]
  strides = [_sample_strides(sh, ratios[s]) for sh, s in zip(shapes, segment_of)]
  complete = np.array([all(all(st == 1 for st in strides[i])
                           for i in range(len(shapes)) if segment_of[i] == g)
                       for g in range(segments)])
  sample_size = np.array([sum(int(np.prod([-(-d // st) for d, st in zip(sh, strides[i])]))
                              for i, sh in enumerate(shapes) if segment_of[i] == g)
                          for g in range(segments)], np.float32)
  p = k.astype(jnp.float32) / jnp.maximum(size, 1).astype(jnp.float32)
  centre = p * sample_size
  sd = jnp.sqrt(sample_size * p * (1 - p)) + 1.0
  ranks = jnp.stack([centre + z * sd for z in _SAMPLE_Z], axis=1)
  ranks = jnp.clip(jnp.round(ranks), 1, np.maximum(sample_size, 1)[:, None]).astype(jnp.int32)
  # A group whose sample is all of it: the k-th largest sample key is T.
  ranks = jnp.where(complete[:, None], k[:, None], ranks)
  values = [(s, key_fns[i]()[tuple(slice(None, None, st) for st in strides[i])],
             jnp.ones((), bool)) for i, s in enumerate(segment_of)]
  quantiles = _bisect(values, segments, ranks, key_type, bits)
  exact = quantiles[:, 0]
  at_exact = _segment_sum([((v >= exact[s]) & ok).sum(dtype=jnp.int32) for s, v, ok in values],
                          segment_of, segments, jnp.zeros((), jnp.int32))
  above_exact = _segment_sum([((v > exact[s]) & ok).sum(dtype=jnp.int32) for s, v, ok in values],
                             segment_of, segments, jnp.zeros((), jnp.int32))
  if complete.all():
    return exact, at_exact, above_exact

  # Extraction capacity: keys in the interval that rows of <= 3 of them hold
  # (expected rows holding 4 or more, for keys spread at random: ~1%).
  row_counts = np.array([sum(_row_count(sh) for sh, s in zip(shapes, segment_of) if s == g)
                         for g in range(segments)], np.float64)
  capacity = jnp.asarray(0.7 * row_counts ** 0.75, jnp.float32)

  def narrow(state, thresholds, counts):
    lower, upper, at_lower, above_upper = state[:4]
    enough = counts >= k[:, None]
    new_lower = jnp.maximum(jnp.max(jnp.where(enough, thresholds, lower[:, None]), axis=1), lower)
    at_new_lower = jnp.min(jnp.where(enough & (thresholds >= new_lower[:, None]), counts,
                                     at_lower[:, None]), axis=1)
    # A threshold with fewer than k keys at or above it: T is below it.
    below = jnp.where(~enough, thresholds - np.array(1, key_type), upper[:, None])
    new_upper = jnp.minimum(jnp.min(below, axis=1), upper)
    above_new_upper = jnp.max(jnp.where(~enough & (below <= new_upper[:, None]), counts,
                                        above_upper[:, None]), axis=1)
    return new_lower, new_upper, at_new_lower, above_new_upper

  def count_thresholds(state):
    lower, upper, at_lower, above_upper, _, stalled, _ = state
    inside = (at_lower - above_upper).astype(jnp.float32)
    j = (k - above_upper).astype(jnp.float32)        # T is the j-th largest in [L, U]
    width = (upper - lower).astype(jnp.float32) + 1.0
    margin = (_MARGIN_SDS * jnp.sqrt(j * (inside - j) / jnp.maximum(inside, 1)) + 2.0
              + _MARGIN_FRACTION * inside)
    spread = jnp.asarray([-1.0, -1 / 3, 1 / 3, 1.0], jnp.float32)
    interp = j[:, None] + margin[:, None] * spread
    even = inside[:, None] * jnp.arange(1, _THRESHOLDS + 1, dtype=jnp.float32) / (_THRESHOLDS + 1)
    elements = jnp.where(stalled[:, None], even, interp)
    offset = elements / jnp.maximum(inside, 1)[:, None] * width[:, None]
    top = np.nextafter(np.float32(2.0 ** bits), np.float32(0))
    offset = jnp.clip(jnp.floor(offset), 1.0, top).astype(key_type)
    offset = jnp.maximum(jnp.minimum(offset, (upper - lower)[:, None]), np.array(1, key_type))
    # Offsets count down from U: U - (o - 1) has about o keys of the interval at or above it.
    return upper[:, None] - (offset - np.array(1, key_type))

  def after_count(state, first):
    thresholds = jnp.where(first, quantiles, count_thresholds(state))
    counts = _count_pass(key_fns, segment_of, segments, thresholds)
    lower, upper, at_lower, above_upper = narrow(state, thresholds, counts)
    before = state[2] - state[3]
    stalled = (at_lower - above_upper) * 4 > before
    return (lower, upper, at_lower, above_upper, before, stalled, state[6])

  def after_extract(state):
    lower, upper, at_lower, above_upper, _, stalled, cap_scale = state
    rows = _extract_pass(key_fns, segment_of, lower, upper)
    overfull = _segment_sum([(r[0] > 3).sum(dtype=jnp.int32) for _, r in rows],
                            [s for s, _ in rows], segments, jnp.zeros((), jnp.int32))
    ok = overfull == 0
    found_values = []
    for s, (count, high, low_inverted, total) in rows:
      low = ~low_inverted
      found_values += [(s, high, count >= 1), (s, low, count >= 2),
                       (s, total - high - low, count >= 3)]
    found = _bisect(found_values, segments, (k - above_upper)[:, None], key_type, bits)[:, 0]
    groups = [s for s, _, _ in found_values]
    ge = _segment_sum([((v >= found[s]) & valid).sum(dtype=jnp.int32)
                       for s, v, valid in found_values], groups, segments, jnp.zeros((), jnp.int32))
    gt = _segment_sum([((v > found[s]) & valid).sum(dtype=jnp.int32)
                       for s, v, valid in found_values], groups, segments, jnp.zeros((), jnp.int32))
    take = ok & (lower != upper)
    return (jnp.where(take, found, lower), jnp.where(take, found, upper),
            jnp.where(take, above_upper + ge, at_lower),
            jnp.where(take, above_upper + gt, above_upper),
            state[4], stalled, jnp.where(ok, cap_scale, cap_scale * 0.25))

  def pending(state):
    return (state[0] != state[1]) & (size > 0)

  def more(carry):
    passes, state = carry
    return (passes < _MAX_PASSES) & jnp.any(pending(state))

  def step(carry):
    passes, state = carry
    inside = (state[2] - state[3]).astype(jnp.float32)
    small = jnp.all(~pending(state) | (inside <= capacity * state[6])) & (passes > 0)
    state = jax.lax.cond(small, after_extract, lambda st: after_count(st, passes == 0), state)
    return passes + 1, state

  # Groups ranked on their whole sample start done: L = U = T.
  start = (jnp.where(complete, exact, np.array(0, key_type)), jnp.where(complete, exact, key_max),
           jnp.where(complete, at_exact, size), jnp.where(complete, above_exact, 0), size,
           jnp.zeros(segments, bool), jnp.ones(segments, jnp.float32))
  _, state = jax.lax.while_loop(more, step, (jnp.int32(0), start))
  lower, _, at_lower, above_upper = state[:4]
  return lower, at_lower, above_upper
