"""The k-th largest key of several arrays in a few passes, exactly.

`kth_largest` finds, for each group of key arrays (one leaf, or all the
leaves of a global selection), the k-th largest key T and how many keys are
>= T and > T. It keeps an interval [L, U] that holds T, with exact counts
count(key >= L) >= k > count(key > U), and narrows it pass by pass:

1. A strided sample of each array (~16K keys per group, a few cache lines
   per row) is ranked by bisection; its quantiles around rank k * S / n give
   the first thresholds, which bracket T with high probability. A group of
   at most 16K keys is its own sample: T comes from the bisection, no pass.
2. A counting pass counts the keys >= each of 4 thresholds in one read of
   the keys (a uint8 count per threshold and block of at most 255 keys of
   the last axis, a block of 256 counted as two of 128, in one variadic
   reduce that XLA:CPU fuses with the key computation; a last axis that
   splits into no blocks of 8 or more is counted whole, two 16-bit counts
   per uint32). Later thresholds are interpolated in the interval (in value
   for float keys, in key otherwise), around the estimated place of T with
   a margin. A pass that does not shrink the interval 4x is followed by one
   extraction (the interval shrinks to its extreme keys, step 3) and then a
   count that splits the interval's key range evenly (5 parts), so any
   input ends within a bounded number of passes (about 2 per 5x of key
   range). Tied sample quantiles are also counted one key above.
3. An extraction pass reduces each block to the count, max, min and
   (wrapping) sum of its keys in a band [lo, hi]: a block with at most 3 of
   them gives all of them exactly, and T is found among those values alone;
   a key alone in its block also gives its position (ties at T). The same
   pass counts the keys above hi (in spare bits of the count), so a band
   around the estimated T (the margin above, capped at what one extraction
   holds) both checks that T is in it and finds T. A miss, or a block with
   more than 3 band keys, narrows the interval and the group counts on.

The usual course is straight-line (the sampled counting pass, then one
band extraction, then the caller's mask: 3 reads of the scores); the loop
of counting and extraction passes runs only for groups left pending.
Every count is exact, so the result does not depend on the sample: a bad
sample only costs passes. Each pass reads the keys once and writes a few
numbers per block; keys are computed inside each pass from the caller's
arrays (`key_fns`), never stored. Blocks split the last axis so that an
axis sharded 2, 4 or 8 ways splits on its shards (see `_block`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_THRESHOLDS = 4          # counted per pass (a uint8 count each per block; more is slower on XLA:CPU)
_ROW_LIMIT = 2**16 - 1   # longest row a 16-bit count can sum
_BLOCK = 256             # longest block of an axis reduced to a few numbers per pass
_SAMPLE = 2**14          # sampled keys per group
_SAMPLE_Z = (-3.5, -1.2, 1.2, 3.5)  # first thresholds: sample ranks around k, in binomial sds
_MARGIN_SDS = 3.0        # interpolated thresholds span the estimate +- this many sds ...
_MARGIN_FRACTION = 0.005 # ... plus this fraction of the interval (uneven spread of keys)
_MAX_PASSES = 96         # a guard: the worst case takes fewer passes than this


def _block(length: int) -> int:
  """Block length for reducing an axis of `length` entries: a divisor of it, <= 256.

  The axis is split as (length / block, block) and each block reduced to a
  few numbers. So that an axis sharded in 2, 4 or 8 (FSDP) splits on its
  shards, length / block keeps the factors of two of `length`, up to 8: the
  reduction then never crosses devices (a reduction of several outputs over
  a sharded axis makes XLA gather the partial results).
  """
  twos = 1
  while length % (twos * 2) == 0 and twos < 8:
    twos *= 2
  best = 1
  for block in range(1, min(length, _BLOCK) + 1):
    if length % block == 0 and (length // block) % twos == 0:
      best = block
  return best


def _rows(x: jax.Array) -> list[tuple[int, jax.Array]]:
  """Views of `x` whose last axis (blocks of <= 256 keys) is reduced in a pass.

  Each comes with the flat position of its first entry in `x`. The last
  axis is split into blocks (see `_block`); a block is a row of the view.
  """
  if x.ndim == 0:
    x = x.reshape(1)
  length = x.shape[-1]
  block = _block(length)
  if block < 8 and length > _BLOCK:  # no useful divisor: whole rows (16-bit counts)
    if length <= _ROW_LIMIT:
      return [(0, x)]
    flat = x.reshape(-1)
    size = flat.shape[0]
    main = size - size % _BLOCK
    out = [(0, flat[:main].reshape(-1, _BLOCK))] if main else []
    return out + ([(main, flat[main:].reshape(1, -1))] if size - main else [])
  return [(0, x.reshape(x.shape[:-1] + (length // block, block)))]


def _row_count(shape: tuple[int, ...]) -> int:
  """Rows of an array of this shape in `_rows` (extraction bins)."""
  size = int(np.prod(shape))
  length = shape[-1] if shape else 1
  block = _block(length)
  if block < 8 and length > _BLOCK:
    return size // length if length <= _ROW_LIMIT else size // _BLOCK + (size % _BLOCK > 0)
  return size // block


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


def _segment_reduce(per_leaf, segment_of, segments, fn, init) -> jax.Array:
  """Stacks per-group reductions (`fn`, e.g. jnp.maximum) of per-leaf values (all
  shaped like `init`)."""
  out = []
  for g in range(segments):
    acc = jnp.asarray(init)
    for v, s in zip(per_leaf, segment_of):
      if s == g:
        acc = fn(acc, v)
    out.append(acc)
  return jnp.stack(out)


def _reduce_rest(x: jax.Array, reduce, **kwargs) -> jax.Array:
  """`reduce` (jnp.sum, jnp.max) of `x` over all axes but the first, without a
  reshape (which would gather an array sharded along them)."""
  return reduce(x, axis=tuple(range(1, x.ndim)), **kwargs)


def _count_pass(key_fns, segment_of, segments, thresholds: jax.Array) -> jax.Array:
  """count(key >= t) for the `_THRESHOLDS` thresholds of each group, in one read."""
  per_leaf = []
  for key_fn, s in zip(key_fns, segment_of):
    t = thresholds[s]
    leaf = jnp.zeros(_THRESHOLDS, jnp.int32)
    for _, view in _rows(key_fn()):
      if view.shape[-1] == 256:  # two blocks of 128: a uint8 count holds 128
        view = view.reshape(view.shape[:-1] + (2, 128))
      if view.shape[-1] <= 255:
        # One uint8 count per threshold and block: XLA:CPU vectorizes this
        # variadic reduce well (about 2x a sum pass at 16M keys, against 3.5x
        # for the packed 16-bit words below).
        sums = jax.lax.reduce(tuple((view >= t[a]).astype(jnp.uint8) for a in range(_THRESHOLDS)),
                              (np.uint8(0),) * _THRESHOLDS,
                              lambda x, y: tuple(a + b for a, b in zip(x, y)), (view.ndim - 1,))
        # The thresholds' block counts summed in one reduction (one output,
        # an all-reduce where sharded): fewer reductions in the program, each
        # of which costs XLA:CPU per execution even where it does not run.
        leaf = leaf + _reduce_rest(jnp.stack(sums), jnp.sum, dtype=jnp.int32)
        continue
      words = tuple((view >= t[2 * a]).astype(jnp.uint32)
                    | ((view >= t[2 * a + 1]).astype(jnp.uint32) << 16)
                    for a in range(_THRESHOLDS // 2))
      sums = jax.lax.reduce(words, (np.uint32(0),) * len(words),
                            lambda x, y: tuple(a + b for a, b in zip(x, y)), (view.ndim - 1,))
      # Per-block counts, then one-output sums (an all-reduce where sharded).
      leaf = leaf + jnp.stack([half.astype(jnp.int32).sum(dtype=jnp.int32)
                               for w in sums for half in (w & 0xFFFF, w >> 16)])
    per_leaf.append(leaf)
  return _segment_sum(per_leaf, segment_of, segments, jnp.zeros(_THRESHOLDS, jnp.int32))


def _extract_pass(key_fns, segment_of, offsets, sizes, lower, upper):
  """Per row, of the keys in [lower, upper] of its group: count, max, ~min, wrapping sum.

  Also the reversed position (group size - position in the group) of a
  row's key when it is the only one, and the count of the row's keys above
  `upper`. Both cost no extra accumulator in rows of <= 256 keys: the
  count sits in bits 0-8 of one sum, the count above in bits 9-17 and the
  column in bits 18 and up (longer rows: count in 16 bits, column above
  them, and a fifth accumulator for the count above).
  Returns (group, count, max, ~min, sum, reversed position, count above)
  per view.
  """
  out = []
  for key_fn, s, offset in zip(key_fns, segment_of, offsets):
    for start, view in _rows(key_fn()):
      zero = np.array(0, view.dtype)
      band = (view >= lower[s]) & (view <= upper[s])
      above = (view > upper[s]).astype(jnp.uint32)
      column = jax.lax.broadcasted_iota(jnp.uint32, view.shape, view.ndim - 1)
      short = view.shape[-1] <= 256
      col_shift, count_mask = (18, 0x1FF) if short else (16, 0xFFFF)
      ops = (jnp.where(band, (column << col_shift) | np.uint32(1), np.uint32(0))
             + ((above << 9) if short else np.uint32(0)),
             jnp.where(band, view, zero), jnp.where(band, ~view, zero), jnp.where(band, view, zero))
      add_max = lambda x, y: (x[0] + y[0], jnp.maximum(x[1], y[1]), jnp.maximum(x[2], y[2]),
                              x[3] + y[3]) + tuple(a + b for a, b in zip(x[4:], y[4:]))
      sums = jax.lax.reduce(ops + (() if short else (above,)),
                            (np.uint32(0), zero, zero, zero) + (() if short else (np.uint32(0),)),
                            add_max, (view.ndim - 1,))
      tally, high, low_inverted, total = sums[:4]
      count_above = ((tally >> 9) & 0x1FF) if short else sums[4]
      row = jnp.arange(high.size, dtype=jnp.int32).reshape(high.shape)
      position = offset + start + row * view.shape[-1] + (tally >> col_shift).astype(jnp.int32)
      reversed_position = (sizes[s] - position).astype(jnp.uint32)
      out.append((s, tally & count_mask, high, low_inverted, total, reversed_position,
                  count_above.astype(jnp.int32)))
  return out


def _to_space(keys: jax.Array, key_type, floats: np.ndarray) -> jax.Array:
  """Keys as numbers in which the group's keys are about evenly spread.

  Float keys (groups where `floats` is set) become their float values: key
  order within a binade is linear in the value, but a power of two doubles
  the keys per unit of value, which key-space interpolation would miss.
  Other keys are taken as they are.
  """
  wide = jnp.dtype(key_type).itemsize == 8
  real = jnp.float64 if wide else jnp.float32
  sign = np.array(1 << (63 if wide else 31), key_type)
  bits = jnp.where(keys >= sign, keys ^ sign, ~keys)
  value = jax.lax.bitcast_convert_type(bits, real)
  big = np.array(np.finfo(real).max, real)
  value = jnp.where(jnp.isfinite(value), value, jnp.where(keys >= sign, big, -big))
  floats = jnp.asarray(floats).reshape((-1,) + (1,) * (keys.ndim - 1))
  return jnp.where(floats, value, keys.astype(real))


def _from_space(values: jax.Array, key_type, floats: np.ndarray) -> jax.Array:
  """The inverse of `_to_space` (up to rounding; monotone)."""
  wide = jnp.dtype(key_type).itemsize == 8
  sign = np.array(1 << (63 if wide else 31), key_type)
  bits = jax.lax.bitcast_convert_type(values, key_type)
  from_float = jnp.where(bits >= sign, ~bits, bits | sign)
  top = np.nextafter(np.array(2.0 ** (64 if wide else 32), values.dtype), 0)
  from_key = jnp.clip(values, 0, top).astype(key_type)
  floats = jnp.asarray(floats).reshape((-1,) + (1,) * (values.ndim - 1))
  return jnp.where(floats, from_float, from_key)


def _bisect(values, segments, ranks, key_type, bits):
  """Per group and column of `ranks`: the ranks[g, j]-th largest of the group's values.

  `values` holds (group, keys, valid) triples; invalid entries do not count.
  One bisection step per key bit, meant for small arrays (the sample, the
  ties alone in their blocks).
  """
  columns = ranks.shape[1]
  one = np.array(1, key_type)

  def step(i, prefix):
    candidate = prefix | (one << jnp.asarray(bits - 1 - i).astype(key_type))
    per = [((v[..., None] >= candidate[s]) & ok[..., None])
           .sum(axis=tuple(range(v.ndim)), dtype=jnp.int32) for s, v, ok in values]
    counts = _segment_sum(per, [s for s, _, _ in values], segments, jnp.zeros(columns, jnp.int32))
    return jnp.where(counts >= ranks, candidate, prefix)

  return jax.lax.fori_loop(0, bits, step, jnp.zeros(ranks.shape, key_type))


def _rows_counts(found_rows, segments, thresholds, strict=(False,)) -> jax.Array:
  """Per comparison of `strict` and group: how many of the rows' keys (see
  `finish`) are >= (strict: >) the group's threshold. Shape (len(strict), groups).

  The three keys of a row are counted in one uint8 sum per block of rows, so
  that each count is one fused reduction; the comparisons share it.
  """
  per = []
  for s, count, high, low, middle in found_rows:
    t = thresholds[s]
    hits = []
    for is_strict in strict:
      cmp = (lambda v: v > t) if is_strict else (lambda v: v >= t)
      hit = ((cmp(high) & (count >= 1)).astype(jnp.uint8)
             + (cmp(low) & (count >= 2)).astype(jnp.uint8)
             + (cmp(middle) & (count >= 3)).astype(jnp.uint8))
      hits.append(hit.reshape(1) if hit.ndim == 0 else hit)
    hits = jnp.stack(hits)
    narrow = jnp.uint8 if 3 * hits.shape[-1] <= 255 else jnp.int32
    per.append(hits.sum(axis=-1, dtype=narrow).astype(jnp.int32)
               .sum(axis=tuple(range(1, hits.ndim - 1)), dtype=jnp.int32))
  return _segment_sum(per, [r[0] for r in found_rows], segments,
                      jnp.zeros(len(strict), jnp.int32)).T


def _bisect_rows(found_rows, segments, ranks, key_type, bits, lower, upper):
  """Per group, the ranks[g]-th largest of the rows' keys, known to lie in [lower, upper].

  A bisection over the bits below the common prefix of the bounds, each
  step one fused count (`_rows_counts`) over the extraction's row results.
  """
  one = np.array(1, key_type)
  span = bits - jax.lax.clz(jnp.max(lower ^ upper)).astype(jnp.int32)
  low_bits = jnp.where(span >= bits, np.array(np.iinfo(key_type).max, key_type),
                       (one << span.astype(key_type)) - one)

  def step(i, prefix):
    candidate = prefix | (one << jnp.asarray(bits - 1 - i).astype(key_type))
    counts = _rows_counts(found_rows, segments, candidate)[0]
    return jnp.where(counts >= ranks, candidate, prefix)

  return jax.lax.fori_loop(bits - span, bits, step, lower & ~low_bits)


_FEW = 4  # ranks up to this are found by repeated maxima rather than a bisection


def _nth_largest_few(values, segments, n):
  """Per group, the n[g]-th largest of distinct valid uint32 values, n[g] in [1, _FEW].

  One max reduction per rank (the largest value below the last one found),
  against a bisection's 32 counting steps: the ties kept at the threshold
  are usually one or two.
  """
  def step(i, last):
    per = [jnp.max(jnp.where(ok & (v < last[s]), v, np.uint32(0))) for s, v, ok in values]
    largest = jnp.stack([jnp.max(jnp.stack([p for p, (t, _, _) in zip(per, values) if t == g]
                                           or [jnp.uint32(0)]))
                         for g in range(segments)])
    return jnp.where(i < n, largest, last)

  return jax.lax.fori_loop(0, _FEW, step, jnp.full(segments, np.uint32(2**32 - 1)))


def kth_largest(key_fns: Sequence[Callable[..., jax.Array]], shapes: Sequence[tuple[int, ...]],
                segment_of: Sequence[int], k: jax.Array, key_type, floats: Sequence[bool],
                sample: int = _SAMPLE, bounds: tuple[jax.Array, ...] | None = None,
                ties: bool = False, operands=()) -> tuple[jax.Array, ...]:
  """The k[g]-th largest key T of each group g, and count(key >= T), count(key > T).

  Args:
    key_fns: one function per array, called as key_fn(operands, part=None),
      returning its keys (unsigned ints of `key_type`) from `operands`;
      called inside every pass, so keys are never stored. Given a tuple of
      slices as `part`, it returns the keys of that part.
    shapes: the arrays' shapes.
    segment_of: the group of each array.
    k: int32 (groups,), each in [1, group size] (groups of size 0 may hold
      anything: their results are meaningless).
    key_type: jnp.uint32 or jnp.uint64.
    floats: per group, whether its keys come from floats (thresholds are
      then interpolated in value).
    sample: keys sampled per group; a group of at most this many keys is
      ranked by bisection over all of them (no counting passes).
    bounds: optional (L, U, count(key >= L), count(key > U)) per group, known
      to hold T: no sample is taken and the passes start from there.
    ties: whether to find where the ties at T are, from an extraction pass
      (when each lies alone in its row): positions are flat indices in the
      concatenation of the group's arrays, in order.
    operands: the pytree of arrays the keys are computed from. Each
      straight-line pass reads them through its own select, so that XLA
      computes the keys inside each pass instead of storing them once for
      all passes.

  Returns:
    (T, count(key >= T), count(key > T), cutoff, known), each (groups,):
    where `known`, the ties at T kept are those of reversed position
    (group size - position) >= cutoff (uint32), the first k - count(key >
    T) of them.
  """
  segments = k.shape[0]
  sizes = [sum(int(np.prod(sh)) for sh, s in zip(shapes, segment_of) if s == g)
           for g in range(segments)]
  offsets = [sum(int(np.prod(sh)) for sh, t in zip(shapes[:i], segment_of[:i]) if t == s)
             for i, s in enumerate(segment_of)]
  live = [i for i, sh in enumerate(shapes) if int(np.prod(sh)) > 0]
  key_fns = [_Keys(key_fns[i], operands) for i in live]
  offsets = [offsets[i] for i in live]
  shapes = [shapes[i] for i in live]
  segment_of = [segment_of[i] for i in live]
  size = jnp.asarray(sizes, jnp.int32)
  k = jnp.clip(k, 1, jnp.maximum(size, 1))
  unknown = (jnp.zeros(segments, jnp.uint32), jnp.zeros(segments, bool))

  if bounds is None:
    quantiles, start = _sampled_start(key_fns, shapes, segment_of, segments, k, size, sizes,
                                      key_type, sample)
    if quantiles is None:
      return start + unknown
  else:
    quantiles, start = jnp.zeros((segments, _THRESHOLDS), key_type), tuple(bounds)
  start = start + (size, jnp.zeros(segments, bool), jnp.ones(segments, jnp.float32)) + unknown
  return _narrow_loop(key_fns, shapes, segment_of, offsets, sizes, segments, k, size, key_type,
                      np.asarray(floats, bool), quantiles, start, sampled=bounds is None,
                      ties=ties)


class _Keys:
  """A key function bound to its operands: `keys()` or `keys(part)`."""

  def __init__(self, fn, operands):
    self.fn, self.operands = fn, operands

  def __call__(self, part=None):
    return self.fn(self.operands, part)


def _fresh(key_fns, token: jax.Array):
  """The key functions of one straight-line pass, rebound to fresh operands.

  Each operand goes through `where(never, 0, operand)`, with `never` False
  computed from this pass's `token` (a result of the pass before), which
  XLA cannot fold. Passes so built do not share their key computation (an
  optimization barrier does not survive XLA:CPU's pipeline), so each
  computes the keys inside its own fused reduction and none are stored.
  """
  x = token.ravel()[0]
  never = (x == 0) & (x == 1)
  # 0-d operands stay as they are: XLA rewrites x / c as x * (1 / c) where c
  # comes out of the select, so scores divided by a 0-d array would differ
  # by an ulp between passes. A 0-d operand alone shares no work among passes.
  fresh = lambda a: a if jnp.ndim(a) == 0 else jnp.where(never, jnp.zeros((), a.dtype), a)
  return [_Keys(f.fn, jax.tree.map(fresh, f.operands)) for f in key_fns]


def _sampled_start(key_fns, shapes, segment_of, segments, k, size, sizes, key_type, sample):
  """Sample quantiles for the first pass, and the starting (L, U, count(>= L), count(> U)).

  Groups whose sample is all of them are ranked exactly on it and start
  done; if all are, returns (None, (T, count(>= T), count(> T))).
  """
  bits = 8 * jnp.dtype(key_type).itemsize
  key_max = np.array(np.iinfo(key_type).max, key_type)
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
  # The sample slices the caller's arrays before keys are made: the same key
  # expression as in the passes would be shared with them, and stored.
  values = [(s, key_fns[i](tuple(slice(None, None, st) for st in strides[i])),
             jnp.ones((), bool)) for i, s in enumerate(segment_of)]
  quantiles = _bisect(values, segments, ranks, key_type, bits)
  exact = quantiles[:, 0]
  # Equal neighbours (a tied sample): count above the tie too (q + 1), so
  # that a T tied with many keys is found by the first pass.
  tied = quantiles[:, :-1] == quantiles[:, 1:]
  raised = jnp.where(tied & (quantiles[:, :-1] != key_max), quantiles[:, :-1] + np.array(1, key_type),
                     quantiles[:, :-1])
  quantiles = jnp.concatenate([raised, quantiles[:, -1:]], axis=1)
  at_exact = _segment_sum([((v >= exact[s]) & ok).sum(dtype=jnp.int32) for s, v, ok in values],
                          segment_of, segments, jnp.zeros((), jnp.int32))
  above_exact = _segment_sum([((v > exact[s]) & ok).sum(dtype=jnp.int32) for s, v, ok in values],
                             segment_of, segments, jnp.zeros((), jnp.int32))
  if complete.all():
    return None, (exact, at_exact, above_exact)
  # Groups ranked on their whole sample start done: L = U = T.
  return quantiles, (jnp.where(complete, exact, np.array(0, key_type)),
                     jnp.where(complete, exact, key_max),
                     jnp.where(complete, at_exact, size), jnp.where(complete, above_exact, 0))


def _narrow_loop(key_fns, shapes, segment_of, offsets, sizes, segments, k, size, key_type, floats,
                 quantiles, start, sampled, ties):
  """Counting and extraction passes from `start` until every group's interval is one key."""
  bits = 8 * jnp.dtype(key_type).itemsize
  one = np.array(1, key_type)
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
    below = jnp.where(~enough, thresholds - one, upper[:, None])
    new_upper = jnp.minimum(jnp.min(below, axis=1), upper)
    above_new_upper = jnp.max(jnp.where(~enough & (below <= new_upper[:, None]), counts,
                                        above_upper[:, None]), axis=1)
    return new_lower, new_upper, at_new_lower, above_new_upper

  def estimate(state):
    """(j, keys in [L, U], margin): T is the j-th largest key in [L, U], +- margin."""
    lower, upper, at_lower, above_upper = state[:4]
    inside = (at_lower - above_upper).astype(jnp.float32)
    j = (k - above_upper).astype(jnp.float32)
    margin = (_MARGIN_SDS * jnp.sqrt(j * (inside - j) / jnp.maximum(inside, 1)) + 2.0
              + _MARGIN_FRACTION * inside)
    return j, inside, margin

  def count_thresholds(state):
    stalled = state[5]
    j, inside, margin = estimate(state)
    spread = jnp.asarray([-1.0, -1 / 3, 1 / 3, 1.0], jnp.float32)
    interp = j[:, None] + margin[:, None] * spread
    even = inside[:, None] * jnp.arange(1, _THRESHOLDS + 1, dtype=jnp.float32) / (_THRESHOLDS + 1)
    fraction = jnp.clip(jnp.where(stalled[:, None], even, interp) / jnp.maximum(inside, 1)[:, None],
                        0, 1)
    return keys_at(state, fraction, stalled)

  def keys_at(state, fraction, stalled):
    """Keys about `fraction` of the way down [L, U]'s keys (groups, columns), in (L, U]."""
    lower, upper = state[:2]
    # In key space: offsets down from U (U - (o - 1) has about o keys of [L, U] at or above it).
    width = (upper - lower).astype(jnp.float32) + 1.0
    top = np.nextafter(np.float32(2.0 ** bits), np.float32(0))
    offset = jnp.clip(jnp.floor(fraction * width[:, None]), 1.0, top).astype(key_type)
    offset = jnp.maximum(jnp.minimum(offset, (upper - lower)[:, None]), one)
    by_key = upper[:, None] - (offset - one)
    # In value (float keys): the same fractions of [value(L), value(U)].
    high, low = _to_space(upper, key_type, floats), _to_space(lower, key_type, floats)
    by_value = _from_space(high[:, None] - fraction.astype(high.dtype) * (high - low)[:, None],
                           key_type, floats)
    by_value = jnp.clip(by_value, (lower + one)[:, None], upper[:, None])
    use_value = jnp.asarray(floats)[:, None] & ~stalled[:, None] & (lower < upper)[:, None]
    return jnp.where(use_value, by_value, by_key)

  def after_count(state, first: bool, fns=key_fns):
    # The first pass counts at the sample's quantiles, later ones interpolate.
    thresholds = quantiles if first else count_thresholds(state)
    counts = _count_pass(fns, segment_of, segments, thresholds)
    lower, upper, at_lower, above_upper = narrow(state, thresholds, counts)
    before = state[2] - state[3]
    stalled = (at_lower - above_upper) * 4 > before
    return (lower, upper, at_lower, above_upper, before, stalled) + state[6:]

  def after_extract(state, fns=key_fns):
    rows = _extract_pass(fns, segment_of, offsets, sizes, state[0], state[1])
    return finish(state, rows, jnp.ones(segments, bool))

  def after_band(state, fns):
    """An extraction of a band [lo, hi] of [L, U] around the estimated T that also counts the
    keys above hi: where T is in the band (as is likely), this pass finishes the search;
    elsewhere it narrows [L, U] to the part above or below the band."""
    lower, upper, at_lower, above_upper = state[:4]
    j, inside, margin = estimate(state)
    # The band is kept within what one extraction holds.
    margin = jnp.minimum(margin, 0.5 * capacity * state[6])
    fraction = jnp.clip((j[:, None] + margin[:, None] * jnp.asarray([-1.0, 1.0], jnp.float32))
                        / jnp.maximum(inside, 1)[:, None], 0, 1)
    ends = keys_at(state, fraction, jnp.zeros(segments, bool))
    open_ = lower != upper
    hi = jnp.where(open_, ends[:, 0], upper)
    lo = jnp.where(open_, jnp.where(fraction[:, 1] >= 1, lower, jnp.minimum(ends[:, 1], hi)), lower)
    rows = _extract_pass(fns, segment_of, offsets, sizes, lo, hi)
    groups = [r[0] for r in rows]
    zero = jnp.zeros((), jnp.int32)
    above_hi = _segment_sum([r[6].sum(dtype=jnp.int32) for r in rows], groups, segments, zero)
    at_lo = above_hi + _segment_sum([r[1].astype(jnp.int32).sum(dtype=jnp.int32) for r in rows],
                                    groups, segments, zero)
    hit = open_ & (above_hi < k) & (at_lo >= k)
    band = (jnp.where(hit, lo, lower), jnp.where(hit, hi, upper),
            jnp.where(hit, at_lo, at_lower), jnp.where(hit, above_hi, above_upper)) + state[4:]
    done = finish(band, rows, hit)
    high_miss = open_ & (above_hi >= k)      # T > hi
    low_miss = open_ & (at_lo < k)           # T < lo
    new_lower = jnp.where(high_miss, hi + one, done[0])
    new_at_lower = jnp.where(high_miss, above_hi, done[2])
    new_upper = jnp.where(low_miss, lo - one, done[1])
    new_above_upper = jnp.where(low_miss, at_lo, done[3])
    before = at_lower - above_upper
    stalled = (new_at_lower - new_above_upper) * 4 > before
    return (new_lower, new_upper, new_at_lower, new_above_upper, before, stalled) + done[6:]

  def finish(state, rows, eligible):
    """T from an extraction of each eligible group's [L, U] (where no row holds more than 3)."""
    lower, upper, at_lower, above_upper, before, stalled, cap_scale, cutoff, known = state
    groups = [r[0] for r in rows]
    # Each row's keys in the interval: its max, min and the rest of its sum
    # (exact where the row holds at most 3).
    found_rows = [(s, count, high, ~low_inverted, total - high - ~low_inverted)
                  for s, count, high, low_inverted, total, _, _ in rows]
    # Only the groups finished here bound the search; the others' answers are not used.
    pending_now = (lower != upper) & (size > 0) & eligible
    found = _bisect_rows(found_rows, segments, k - above_upper, key_type, bits,
                         jnp.where(pending_now, lower, upper), upper)
    ge, gt = _rows_counts(found_rows, segments, found, (False, True))
    # Reductions of one kind over the same rows share one reduction (each
    # costs XLA:CPU per execution of the program, also where it does not run).
    # Per group: rows holding more than 3 keys of the interval (column 0)
    # and, where ties are searched, ties at T alone in their row (column 1).
    alone = [(s, rev, (count == 1) & (high == found[s])) for s, count, high, _, _, rev, _ in rows]
    columns = lambda r, a: [r[1] > 3] + ([a] if ties else [])
    tallies = _segment_sum(
        [_reduce_rest(jnp.stack(columns(r, a)), jnp.sum, dtype=jnp.int32)
         for r, (_, _, a) in zip(rows, alone)], groups, segments,
        jnp.zeros(2 if ties else 1, jnp.int32))
    ok = tallies[:, 0] == 0
    take = ok & (lower != upper) & eligible
    if ties:
      # Ties at T alone in their row: the row gives their reversed position.
      need = jnp.maximum(k - (above_upper + gt), 1)
      straddle = take & (need < ge - gt)
      few = jnp.max(jnp.where(straddle, need, 0)) <= _FEW
      tie_cut = jax.lax.cond(
          jnp.any(straddle),
          lambda: jax.lax.cond(
              few, lambda: _nth_largest_few(alone, segments, need),
              lambda: _bisect(alone, segments, need[:, None], jnp.uint32, 32)[:, 0]),
          lambda: jnp.zeros(segments, jnp.uint32))
      cutoff = jnp.where(take, tie_cut, cutoff)
      known = jnp.where(take, tallies[:, 1] == ge - gt, known)
    # The interval's extreme keys are exact even from rows holding more than
    # 3 of its keys: where T is not found here, the interval shrinks to them
    # (a few distinct keys, each tied many times, end at the next count).
    # Both in one max: the lowest key is ~ the largest ~key.
    nothing = np.array(0, key_type)
    ends = _segment_reduce([_reduce_rest(jnp.stack([jnp.where(r[1] >= 1, r[2], nothing),
                                                 jnp.where(r[1] >= 1, r[3], nothing)]), jnp.max)
                            for r in rows],
                           groups, segments, jnp.maximum, np.zeros(2, key_type))
    band_high, band_low = ends[:, 0], ~ends[:, 1]
    shrink = eligible & ~take & (lower != upper) & (band_low <= band_high)
    return (jnp.where(take, found, jnp.where(shrink, band_low, lower)),
            jnp.where(take, found, jnp.where(shrink, band_high, upper)),
            jnp.where(take, above_upper + ge, at_lower),
            jnp.where(take, above_upper + gt, above_upper),
            before, stalled, jnp.where(ok | ~eligible, cap_scale, cap_scale * 0.25), cutoff, known)

  def pending(state):
    return (state[0] != state[1]) & (size > 0)

  def more(carry):
    passes, state, _ = carry
    return (passes < _MAX_PASSES) & jnp.any(pending(state))

  def step(carry):
    passes, state, extracted = carry
    inside = (state[2] - state[3]).astype(jnp.float32)
    small = jnp.all(~pending(state) | (inside <= capacity * state[6]))
    # After a pass that did not shrink a group's interval 4x, one extraction
    # (not two in a row) shrinks it to its extreme keys: a few distinct keys
    # tied many times (quantized scores) are then its ends.
    probe = jnp.any(pending(state) & state[5]) & ~extracted
    new = jax.lax.cond(small | probe, after_extract, lambda st: after_count(st, False), state)
    # An extraction made as a probe does not lower the extraction capacity.
    new = new[:6] + (jnp.where(small, new[6], state[6]),) + new[7:]
    return passes + 1, new, small | probe

  # The usual course, straight-line so that XLA fuses the caller's score
  # computation into each pass (a loop or conditional would take the scores
  # as a stored operand): the sampled counting pass, then one extraction of
  # a band around the estimated T. Groups left pending (few: T outside the
  # band, skewed or tied keys) go on in the loop.
  state = start
  if sampled:
    state = after_count(state, True, _fresh(key_fns, quantiles))
  state = after_band(state, _fresh(key_fns, state[0]))
  passes = jnp.int32(2 if sampled else 1)
  _, state, _ = jax.lax.cond(jnp.any(pending(state)),
                             lambda carry: jax.lax.while_loop(more, step, carry),
                             lambda carry: carry, (passes, state, jnp.asarray(True)))
  lower, _, at_lower, above_upper = state[:4]
  return lower, at_lower, above_upper, state[7], state[8]
