"""Selection: which entries a mask keeps, given scores.

`topk_mask` keeps exactly k = round((1 - sparsity) * size) entries, the
largest scores, ties going to the lower flat index. It never sorts: scores are
mapped to unsigned integer keys whose order is the scores' order, the k-th
largest key T is found in a few counting passes (`sparsejax.kth`: a sampled
bracket, interpolated thresholds, then one pass that extracts the few keys
left near T), and ties at T are split by position, from that last pass when
each tie is alone in its block, else by a second search over the ties'
positions. A typical selection reads the scores 3 times and writes the mask
once, instead of an O(n log n) sort.

`nm_mask` keeps the n largest of every m consecutive entries along an axis.

NaN scores raise an error when the scores are concrete; inside `jit` (where
values cannot be checked) a NaN ranks below every number, so it is pruned
first.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import kth
from sparsejax.counts import check_sparsity
from sparsejax.counts import keep_count
from sparsejax.keys import key_family
from sparsejax.keys import sortable_keys

_MAX_ENTRIES = 2**31 - 1  # counts and flat indices are int32
_COUNT_ROW = 32  # entries summed in uint8 before widening


@jax.tree_util.register_pytree_node_class
class ElementwiseScores:
  """Scores fn(*arrays) that a selection computes inside each of its passes.

  Made by `elementwise_scores`; accepted wherever `topk_mask`,
  `topk_masks` and `topk_masks_by_count` take a scores array. A scores
  array computed in the caller's jitted program (such as jnp.abs(w)) is
  stored before the selection reads it (its passes sit in XLA control flow,
  which takes stored operands): one scores-sized temporary and one write.
  Scores given this way are never stored. A pytree (the arrays are its
  leaves, `fn` static), so it can be passed into a jitted function.
  """

  def __init__(self, fn: Callable[..., jax.Array], arrays: tuple[jax.Array, ...]):
    self.fn, self.arrays = fn, tuple(arrays)

  def tree_flatten(self):
    """The arrays as children, `fn` as static data."""
    return self.arrays, self.fn

  @classmethod
  def tree_unflatten(cls, fn, arrays):
    """Rebuilds the scores from `tree_flatten`'s parts."""
    return cls(fn, arrays)

  @functools.cached_property
  def _out(self) -> jax.ShapeDtypeStruct:
    return jax.eval_shape(self.fn, *self.arrays)

  @property
  def shape(self) -> tuple[int, ...]:
    """The scores' shape."""
    return tuple(self._out.shape)

  @property
  def dtype(self):
    """The scores' dtype."""
    return self._out.dtype

  @property
  def size(self) -> int:
    """The number of scores."""
    return int(np.prod(self.shape))

  def value(self) -> jax.Array:
    """The scores, computed (and stored)."""
    return self.fn(*self.arrays)

  def __repr__(self) -> str:
    return f"ElementwiseScores({getattr(self.fn, '__name__', self.fn)}, shape={self.shape})"


def elementwise_scores(fn: Callable[..., jax.Array], *arrays) -> ElementwiseScores:
  """Scores fn(*arrays) for a top-k selection that computes them in each pass, never stored.

  `fn` must work entry by entry (jnp.abs, a product of two arrays, ...):
  the selection evaluates it on parts of the arrays too. The arrays share
  one shape (0-d arrays are broadcast). Inside a jitted step this saves the
  scores' temporary and its write; the masks are the same as for
  `fn(*arrays)` given as an array. For eager calls, pass the same `fn`
  object each time (it is a static argument of the compiled selection).

  >>> w = jnp.array([-3., 1., 2., -0.5])
  >>> topk_mask(elementwise_scores(jnp.abs, w), 0.5).tolist()
  [True, False, True, False]

  Raises:
    ValueError: for no arrays, arrays of different shapes, or an `fn` whose
      result has another shape.
  """
  if not arrays:
    raise ValueError("elementwise_scores needs at least one array.")
  arrays = tuple(jnp.asarray(a) for a in arrays)
  shapes = {a.shape for a in arrays if a.ndim}
  if len(shapes) > 1:
    raise ValueError(f"elementwise_scores takes arrays of one shape, got {sorted(shapes)}.")
  lazy = ElementwiseScores(fn, arrays)
  if shapes and lazy.shape != next(iter(shapes)):
    raise ValueError(f"elementwise_scores: fn maps arrays of shape {next(iter(shapes))} to "
                     f"shape {lazy.shape}; it must work entry by entry.")
  return lazy


def _stored(scores) -> jax.Array:
  """Scores as an array (`ElementwiseScores` computed: selections without passes store them)."""
  return scores.value() if isinstance(scores, ElementwiseScores) else jnp.asarray(scores)


def _is_traced(scores) -> bool:
  arrays = scores.arrays if isinstance(scores, ElementwiseScores) else (scores,)
  return any(isinstance(a, jax.core.Tracer) for a in arrays)


def check_no_nan(scores: jax.Array | ElementwiseScores, name: str = "scores") -> None:
  """Raises ValueError naming `name` if `scores` cannot be ranked.

  Complex scores have no order (checked from the dtype, also under a
  trace); concrete scores must not contain NaN. Inside a trace (jit, vmap,
  ...) values are unknown and NaN is not checked.
  """
  if isinstance(scores, ElementwiseScores):
    dtype = scores.dtype
    if not _is_traced(scores) and jnp.issubdtype(dtype, jnp.floating):
      scores = scores.value()
  dtype = jnp.result_type(scores.dtype if isinstance(scores, ElementwiseScores) else scores)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(f"the scores of '{name}' are {dtype}: complex numbers have no order; "
                     "rank a real score such as jnp.abs(w).")
  if not jnp.issubdtype(dtype, jnp.floating):
    return
  if isinstance(scores, ElementwiseScores):
    return  # traced
  has_nan = jnp.isnan(scores).any()
  if not isinstance(has_nan, jax.core.Tracer) and bool(has_nan):
    raise ValueError(f"NaN in the scores of '{name}': cannot rank them.")


def _select(key_fns: Sequence[Callable[..., jax.Array]], shapes: Sequence[tuple[int, ...]],
            segment_of: Sequence[int], k: jax.Array, key_type, floats: Sequence[bool],
            sample: int = kth._SAMPLE, operands=(), live_fns=None) -> list[jax.Array]:
  """Top-k masks of several key arrays grouped in segments.

  Each segment (a set of arrays, in order) keeps its k[j] largest keys with
  one threshold, ties going to the lower position in the segment's
  concatenation. `key_fns`, called as key_fn(operands, part=None), return
  the keys (called inside every pass, so keys are recomputed from the
  scores rather than stored). Every segment
  advances together through the same passes, so a model with hundreds of
  leaves costs as many passes as one leaf.
  """
  segments = len(k)
  keys = [lambda ops, part=None, f=f: f(ops, part).astype(key_type) for f in key_fns]
  sizes = [sum(int(np.prod(sh)) for sh, s in zip(shapes, segment_of) if s == j)
           for j in range(segments)]
  k_min1 = jnp.maximum(k, 1)
  offsets = [sum(int(np.prod(sh)) for sh, t in zip(shapes[:i], segment_of[:i]) if t == s)
             for i, s in enumerate(segment_of)]

  live_fns = live_fns or [None] * len(key_fns)
  lifted = [any(live_fns[i] is not None for i, t in enumerate(segment_of) if t == g)
            for g in range(segments)]

  def reversed_positions(i, part=None, ops=operands):
    # size - position in the segment: larger for earlier entries, >= 1; built
    # where used so that it stays fused. Where non-candidates (key 0) tie with
    # candidates at T = 0 (an integer score at its minimum), the candidates'
    # are lifted by the size, so that they are kept first.
    shape, s = shapes[i], segment_of[i]
    index = jnp.arange(int(np.prod(shape)), dtype=jnp.int32).reshape(shape)
    index = index if part is None else index[part]
    rev = (sizes[s] - offsets[i] - index).astype(jnp.uint32)
    if not lifted[s]:
      return rev
    # A leaf without candidates is all candidates.
    live = True if live_fns[i] is None else live_fns[i](ops, part)
    lift = live & (threshold[s] == 0)
    return rev + jnp.where(lift, np.uint32(sizes[s]), np.uint32(0))

  threshold, at_or_above, above, found_cutoff, found = kth.kth_largest(
      keys, shapes, segment_of, k_min1, key_type, floats, sample, ties=True, operands=operands)
  # The extraction's tie positions are not lifted: at T = 0 with candidates, search them.
  found = found & ~(jnp.asarray(lifted) & (threshold == 0))

  def tie_cutoffs():
    # Ties at T straddle the cut: keep the first `need` of them by position,
    # the `need` largest reversed positions among the keys equal to T.
    tie_keys = [lambda ops, part=None, i=i, s=s: jnp.where(keys[i](ops, part) == threshold[s],
                                                           reversed_positions(i, part, ops),
                                                           np.uint32(0))
                for i, s in enumerate(segment_of)]
    need = jnp.where(settled_or_found, 1, k_min1 - above)
    # Reversed positions of the ties are in [1, size] ([1, 2 size] lifted); the rest are 0.
    ties = at_or_above - above
    top_position = [(2 if up else 1) * n for up, n in zip(lifted, sizes)]
    bounds = (jnp.ones(segments, jnp.uint32),  # settled or found: done
              jnp.where(settled_or_found, np.uint32(1), jnp.asarray(top_position, jnp.uint32)),
              jnp.where(settled_or_found, 1, ties), jnp.zeros(segments, jnp.int32))
    cutoff = kth.kth_largest(tie_keys, shapes, segment_of, need, jnp.uint32, [False] * segments,
                             sample, bounds, operands=operands)[0]
    return jnp.where(settled, np.uint32(0), jnp.where(found, found_cutoff, cutoff))

  # Settled: no ties straddle the cut. Found: the extraction pass saw where the ties are.
  settled = (at_or_above == k_min1) | (k == 0)
  settled_or_found = settled | found
  cutoff = jax.lax.cond(jnp.all(settled_or_found),
                        lambda: jnp.where(settled, np.uint32(0), found_cutoff), tie_cutoffs)
  # Kept: key > T, or key == T and rev >= cutoff. Written with one use of the
  # key, key >= T (+ 1 where rev < cutoff), so that XLA fuses the key
  # computation into the mask instead of storing the keys; at T = the largest
  # key, T + 1 wraps to 0 and the second term keeps only rev >= cutoff.
  top = np.array(np.iinfo(key_type).max, key_type)
  one = np.array(1, key_type)
  masks = []
  for i, s in enumerate(segment_of):
    tie_kept = reversed_positions(i) >= cutoff[s]
    masks.append((keys[i](operands) >= jnp.where(tie_kept, threshold[s], threshold[s] + one))
                 & (tie_kept | (threshold[s] != top)) & (k[s] > 0))
  return masks


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
    scores: arrays of scores (any float, integer or bool dtype, any shapes),
      or `elementwise_scores` (computed in each pass, never stored).
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
  per_array = isinstance(sparsity, (list, tuple))
  sparsities = list(sparsity) if per_array else [sparsity]
  if per_array and len(sparsities) != len(scores):
    raise ValueError(f"{len(sparsities)} sparsities for {len(scores)} score arrays.")
  for i, value in enumerate(sparsities):
    check_sparsity(value, f"sparsity[{i}]" if per_array else "sparsity")
  size_of = lambda s: s.size if isinstance(s, ElementwiseScores) else int(np.size(s))
  sizes = [size_of(s) for s in scores] if per_array else [sum(size_of(s) for s in scores)]
  k = [keep_count(n, value) for n, value in zip(sizes, sparsities)]
  return _topk(scores, k if per_array else k[0], candidates)


def topk_masks_by_count(scores: Sequence[jax.Array], keep,
                        candidates: Sequence[jax.Array | None] | None = None) -> list[jax.Array]:
  """Like `topk_masks`, but told how many entries to keep rather than a sparsity.

  `keep` is one count for a selection across all arrays, or a list of one
  count per array; counts may be traced int32 (a drop-and-grow update keeps
  a number of weights that depends on the masks). Counts are clipped to
  [0, size].

  >>> [m.tolist() for m in topk_masks_by_count([jnp.array([1., 5.]), jnp.array([4., 2.])], [1, 2])]
  [[False, True], [True, True]]
  """
  return _topk(scores, keep, candidates)


def _topk(scores: Sequence[jax.Array], keep, candidates) -> list[jax.Array]:
  """Top-`keep` masks; `keep` a list (per array) or one count (across arrays)."""
  scores = [s if isinstance(s, ElementwiseScores) else jnp.asarray(s) for s in scores]
  per_array = isinstance(keep, (list, tuple))
  keeps = list(keep) if per_array else [keep]
  if per_array and len(keeps) != len(scores):
    raise ValueError(f"{len(keeps)} counts for {len(scores)} score arrays.")
  for i, s in enumerate(scores):
    check_no_nan(s, f"scores[{i}]")
  if per_array:
    segment_of = list(range(len(scores)))
    sizes = [s.size for s in scores]
  else:
    families = sorted({key_family(s.dtype) for s in scores})
    if len(families) > 1:
      raise ValueError(
          f"a global top-k compares scores across arrays, but {families} scores do not "
          f"compare exactly (dtypes {sorted({str(s.dtype) for s in scores})}): cast them to one.")
    segment_of = [0] * len(scores)
    sizes = [sum(s.size for s in scores)]
  if candidates is None:
    candidates = [None] * len(scores)
  elif len(candidates) != len(scores):
    raise ValueError(f"{len(candidates)} candidate arrays for {len(scores)} score arrays.")

  if max(sizes, default=0) > _MAX_ENTRIES:
    raise ValueError(f"top-k over {max(sizes)} entries: at most {_MAX_ENTRIES} are supported.")
  if sum(sizes) == 0:
    return [jnp.zeros(s.shape, bool) for s in scores]
  k = jnp.stack([jnp.clip(jnp.asarray(value, jnp.int32), 0, n) for n, value in zip(sizes, keeps)])
  candidates = tuple(None if c is None else jnp.asarray(c, bool) for c in candidates)
  for i, (s, c) in enumerate(zip(scores, candidates)):
    if c is not None and tuple(c.shape) != tuple(s.shape):
      raise ValueError(f"candidates[{i}] has shape {tuple(c.shape)}, its scores {tuple(s.shape)}.")
  lazy = [isinstance(s, ElementwiseScores) for s in scores]
  arrays = tuple(s.arrays if is_lazy else (s,) for s, is_lazy in zip(scores, lazy))
  fns = tuple(s.fn if is_lazy else None for s, is_lazy in zip(scores, lazy))
  return list(_masks(arrays, candidates, k, segment_of=tuple(segment_of), sample=kth._SAMPLE,
                     fns=fns))


@functools.partial(jax.jit, static_argnames=("segment_of", "sample", "fns"))
def _masks(arrays, candidates, k, segment_of, sample, fns):
  """`_select` on the keys of the scores, jitted so that eager calls reuse the compiled program.

  Scores i are arrays[i][0], or fns[i](*arrays[i]) where fns[i] is set
  (`ElementwiseScores`), computed inside each pass.
  """
  scores = [a[0] if fn is None else ElementwiseScores(fn, a) for a, fn in zip(arrays, fns)]

  def key_fn(i):
    def keys(operands, part=None):
      args, c = operands[0][i], operands[1][i]
      if part is not None:
        args = tuple(a if a.ndim == 0 else a[part] for a in args)
      s = args[0] if fns[i] is None else fns[i](*args)
      key = sortable_keys(s)
      if c is None:
        return key
      live = c if part is None else c[part]
      # Key 0: at or below every live key. No float has it; an integer score
      # at its minimum does, and ties with non-candidates are split by
      # position with candidates first (`_select`'s lifted positions).
      return jnp.where(live, key, np.array(0, key.dtype))
    return keys

  def live_fn(i):
    def live(operands, part=None):
      c = operands[1][i]
      return c if part is None else c[part]
    return None if candidates[i] is None else live

  key_fns = [key_fn(i) for i in range(len(scores))]
  key_type = jnp.uint64 if any(s.dtype.itemsize == 8 for s in scores) else jnp.uint32
  floats = [all(jnp.issubdtype(s.dtype, jnp.floating) for s, t in zip(scores, segment_of) if t == g)
            for g in range(len(k))]
  return tuple(_select(key_fns, [s.shape for s in scores], segment_of, k, key_type, floats,
                       sample, operands=(arrays, candidates),
                       live_fns=[live_fn(i) for i in range(len(scores))]))


def topk_mask(scores: jax.Array | ElementwiseScores, sparsity) -> jax.Array:
  """Boolean mask keeping the round((1 - sparsity) * size) largest scores.

  Exactly that many entries are kept; ties go to the lower flat index. Works
  under jit, vmap, pmap and sharding; `sparsity` may be traced.

  >>> topk_mask(jnp.array([3., 1., 2., 2.]), 0.5).tolist()
  [True, False, True, False]

  Args:
    scores: array of scores, any shape, or `elementwise_scores` (computed
      in each pass, never stored).
    sparsity: fraction of entries to drop, in [0, 1].

  Returns:
    A bool array with the shape of `scores`.

  Raises:
    ValueError: if a concrete sparsity is outside [0, 1] or scores hold NaN.
  """
  return topk_masks([scores], sparsity)[0]


def topk_mask_along(scores: jax.Array, sparsity, axis: int = 0) -> jax.Array:
  """Boolean mask keeping the round((1 - sparsity) * n) largest scores of every slice along `axis`.

  n is the length of `axis`; ties go to the lower index along it (as
  `topk_mask` applied to each slice). All slices are selected together in
  compare-and-count passes that reduce along `axis` (for a (d_in, d_out)
  score matrix and axis 0: a selection per output unit).

  Each entry is ranked by its key followed by its reversed index (so ties
  go to the lower index and every entry's rank is distinct), and the k-th
  largest of those in each slice is found 8 bits at a time: one pass cuts
  every entry to the next 8 bits of its rank (255 where the rank is above
  the bits found so far, 0 where below), then 8 passes over those bytes (a
  quarter of the keys' memory) find the next 8 bits. The loop stops as soon
  as every slice's count is exact: after the 32 bits of the key unless ties
  at the threshold straddle some slice's cut, then the index's 16 bits (32
  past 65,536 entries). `sparsity` is a Python number (the count is static).

  >>> topk_mask_along(jnp.array([[3., 1.], [1., 1.], [2., 5.]]), 1 / 3).tolist()
  [[True, True], [False, False], [True, True]]

  Raises:
    ValueError: for a sparsity outside [0, 1], an axis out of range, NaN in
      concrete scores, or scores with 64-bit keys.
  """
  check_sparsity(sparsity)
  scores = _stored(scores)
  if not -scores.ndim <= axis < scores.ndim:
    raise ValueError(f"axis {axis} is out of range for scores of shape {scores.shape}.")
  axis %= scores.ndim
  check_no_nan(scores)
  length = scores.shape[axis]
  k = keep_count(length, sparsity)
  if k <= 0 or k >= length:
    return jnp.full(scores.shape, k > 0)
  keys = sortable_keys(scores)
  if keys.dtype != jnp.uint32:
    raise ValueError(f"topk_mask_along takes scores with 32-bit keys, got {scores.dtype}.")
  padded = -(-length // _COUNT_ROW) * _COUNT_ROW
  if padded > length:   # key 0 is below every score's key: padding is never counted or kept
    keys = jnp.pad(keys, [(0, padded - length) if a == axis else (0, 0) for a in range(keys.ndim)])
  split = keys.shape[:axis] + (padded // _COUNT_ROW, _COUNT_ROW) + keys.shape[axis + 1:]
  reduced = scores.shape[:axis] + scores.shape[axis + 1:]
  index_bits = 16 if padded <= 2**16 else 32
  # Per stage (8 bits of the rank = key bits, then index bits): which bits
  # of the key and of the reversed index lie above it, and where its 8 bits sit.
  stages = (32 + index_bits) // 8
  above_key = np.array([(0xFFFFFFFF << (32 - 8 * s)) & 0xFFFFFFFF if s < 4 else 0xFFFFFFFF
                        for s in range(stages)], np.uint32)
  above_index = np.array([0 if s <= 4 else ((1 << index_bits) - 1) & ~((1 << (index_bits - 8 * (s - 4))) - 1)
                          for s in range(stages)], np.uint32)
  shift = np.array([24 - 8 * s if s < 4 else index_bits - 8 - 8 * (s - 4) for s in range(stages)],
                   np.uint32)

  def spread(v):
    return jnp.expand_dims(v, axis)

  def reversed_index():  # made where used: a closed-over array would be read on every pass
    index = jax.lax.broadcasted_iota(jnp.int32, keys.shape, axis)
    return (padded - 1 - index).astype(jnp.uint32)

  def count(pred):  # per slice, in uint8 over rows of 32 first: the count stays fused with `pred`
    return pred.reshape(split).sum(axis=axis + 1, dtype=jnp.uint8).astype(jnp.int32).sum(axis=axis)

  def stage(carry):
    s, key_prefix, index_prefix, at_or_above = carry
    high_key = keys & jnp.asarray(above_key)[s]
    high_index = reversed_index() & jnp.asarray(above_index)[s]
    match = (high_key == spread(key_prefix)) & (high_index == spread(index_prefix))
    above = (high_key > spread(key_prefix)) | ((high_key == spread(key_prefix))
                                               & (high_index > spread(index_prefix)))
    source = jnp.where(s < 4, keys, reversed_index())
    digits = jnp.where(match, ((source >> jnp.asarray(shift)[s]) & 0xFF).astype(jnp.uint8),
                       jnp.where(above, np.uint8(255), np.uint8(0)))

    def bit_step(i, carry):
      # count(digit >= candidate) = count(rank >= prefix | candidate): the
      # candidate has a bit set, so ranks below the prefix (digit 0) never count.
      found, at_or_above = carry
      candidate = found | (np.uint8(1) << (7 - i).astype(jnp.uint8))
      counts = count(digits >= spread(candidate))
      take = counts >= k
      return jnp.where(take, candidate, found), jnp.where(take, counts, at_or_above)

    found, at_or_above = jax.lax.fori_loop(0, 8, bit_step,
                                           (jnp.zeros(reduced, jnp.uint8), at_or_above))
    found = found.astype(jnp.uint32) << jnp.asarray(shift)[s]
    return (s + 1, jnp.where(s < 4, key_prefix | found, key_prefix),
            jnp.where(s < 4, index_prefix, index_prefix | found), at_or_above)

  def more(carry):   # a slice whose count is exact is done: its rank >= prefix are its top k
    s, _, _, at_or_above = carry
    return (s < stages) & jnp.any(at_or_above != k)

  _, key_prefix, index_prefix, _ = jax.lax.while_loop(
      more, stage, (jnp.int32(0), jnp.zeros(reduced, jnp.uint32), jnp.zeros(reduced, jnp.uint32),
                    jnp.full(reduced, padded, jnp.int32)))
  keep = (keys > spread(key_prefix)) | ((keys == spread(key_prefix))
                                        & (reversed_index() >= spread(index_prefix)))
  return jax.lax.slice_in_dim(keep, 0, length, axis=axis)


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
  scores = _stored(scores)
  if not -scores.ndim <= axis < scores.ndim:
    raise ValueError(f"axis {axis} is out of range for scores of shape {scores.shape}.")
  axis %= scores.ndim
  length = scores.shape[axis]
  if length % m:
    raise ValueError(
        f"axis {axis} of shape {scores.shape} has length {length}, not divisible by M={m}.")
  check_no_nan(scores)
  keys = sortable_keys(scores)
  grouped = keys.reshape(scores.shape[:axis] + (length // m, m) + scores.shape[axis + 1:])
  rounds = min(n, m - n)
  # Picking the winners (or the losers) one at a time costs `rounds` passes;
  # ranking all pairs costs ~m. Picking needs a key no score can have, which
  # floats guarantee (their keys lie strictly inside the uint32 range).
  floating = jnp.issubdtype(scores.dtype, jnp.floating) and scores.dtype.itemsize <= 4
  if floating and (rounds <= 1 or (rounds <= 2 and m >= 8)):
    keep = _nm_by_picking(grouped, axis + 1, n, m)
  else:
    keep = _nm_by_ranking(grouped, axis + 1, n, m)
  return keep.reshape(scores.shape)


def _nm_by_ranking(grouped: jax.Array, member: int, n: int, m: int) -> jax.Array:
  """Keeps entries of rank < n in their group (`member` is the in-group axis)."""
  mine = jnp.expand_dims(grouped, member + 1)   # i along `member`
  other = jnp.expand_dims(grouped, member)      # j along `member + 1`
  i = jax.lax.broadcasted_iota(jnp.int32, (m, m), 0).reshape((m, m) + (1,) * (grouped.ndim - member - 1))
  j = jax.lax.broadcasted_iota(jnp.int32, (m, m), 1).reshape(i.shape)
  beats = (other > mine) | ((other == mine) & (j < i))
  rank_dtype = jnp.uint8 if m <= 255 else jnp.int32
  rank = beats.astype(rank_dtype).sum(axis=member + 1, dtype=rank_dtype)
  return rank < n


def _nm_by_picking(grouped: jax.Array, member: int, n: int, m: int) -> jax.Array:
  """Picks the n largest (or drops the m - n smallest) of each group, one per pass.

  Ties go to the lower index as in `_nm_by_ranking`: argmax takes the first
  of equal keys, and the drop takes the last of equal minima. A picked
  entry's key becomes one no float key has.
  """
  pick_largest = n <= m - n
  position = jax.lax.broadcasted_iota(jnp.int32, grouped.shape, member)
  if pick_largest:
    spent = np.uint32(0)
    pick = lambda g: jnp.argmax(g, axis=member, keepdims=True)
  else:
    spent = np.uint32(np.iinfo(np.uint32).max)
    pick = lambda g: (m - 1) - jnp.argmin(jnp.flip(g, member), axis=member, keepdims=True)
  picked = jnp.zeros(grouped.shape, bool)
  for _ in range(min(n, m - n)):
    hit = position == pick(grouped)
    picked = picked | hit
    grouped = jnp.where(hit, spent, grouped)
  return picked if pick_largest else ~picked
