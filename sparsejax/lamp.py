"""LAMP: layer-adaptive magnitude pruning (Lee et al., ICLR 2021).

LAMP decides how much of each layer to prune by making scores comparable
across layers: within a leaf, with its squared scores sorted ascending
(a_1 <= ... <= a_n),

    lamp(u) = a_u / sum_{v >= u} a_v,

the entry's share of everything at least as large as it. The largest entry
of every leaf scores 1, so no leaf is ever emptied, and scaling a leaf by a
constant changes none of its LAMP scores. One global top-k over the LAMP
scores then gives every leaf its count. Within a leaf the LAMP score is
monotone in the score, so the entries kept are the leaf's largest scores:
LAMP only changes the allocation.

In sparsejax LAMP is the allocation `'lamp'`: `compute_masks(...,
allocation='lamp')` (and every wrapper that takes an allocation, and the
lottery's `prune_level`) takes each leaf's count from `lamp_keep_counts`,
then keeps that many of the leaf's largest scores. With the default magnitude score this is the paper's
method (a = w^2); with another score (e.g. SNIP) it is the same
normalisation of that score.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from sparsejax import keys as keys_lib
from sparsejax import selection


def lamp_normalize(scores: jax.Array) -> jax.Array:
  """The LAMP score of every entry of one leaf, from its (unsquared) scores.

  Entries scoring 0 (for example weights already pruned) get 0 and add
  nothing to the others' denominators, so LAMP of a masked leaf is LAMP of
  its surviving entries. A leaf of zeros scores 0 everywhere (the authors'
  code divides 0 by 0 there).

  >>> [round(float(x), 4) for x in lamp_normalize(jnp.array([1., 2., 3.]))]
  [0.0714, 0.3077, 1.0]

  (1 / (1 + 4 + 9), 4 / (4 + 9), 9 / 9.)
  """
  shape = jnp.shape(scores)
  squared = jnp.square(jnp.asarray(scores, jnp.float32)).ravel()
  order = jnp.argsort(squared, stable=True)
  ascending = squared[order]
  at_or_above = jnp.cumsum(ascending[::-1])[::-1]
  normalized = jnp.where(at_or_above > 0, ascending / jnp.where(at_or_above > 0, at_or_above, 1.0),
                         0.0)
  return jnp.zeros_like(squared).at[order].set(normalized).reshape(shape)


METHODS = ("auto", "sort", "bisection")


def lamp_keep_counts(scores: Sequence[jax.Array], keep,
                     candidates: Sequence[jax.Array | None] | None = None, *,
                     method: str = "auto") -> list[jax.Array]:
  """How many entries of each leaf LAMP keeps when `keep` are kept in all.

  One exact global top-`keep` over every leaf's LAMP scores gives each leaf
  its count; ties go to the earlier leaf. Entries where `candidates` is
  False count as 0 (pruned earlier, they add to no denominator). Two ways
  to the same counts:

  - 'sort': sort each leaf's squared scores (values only: LAMP is monotone
    in the score within a leaf), turn them into LAMP scores and run the
    sort-free global top-k over those. Fast on one device, but a sharded
    kernel is gathered to be sorted.
  - 'bisection': no sort and no kernel gathered. Within a leaf the LAMP
    score is monotone in the score, so the entries whose LAMP score is at
    least tau are the leaf's largest, down to the smallest value a with
    a / (S_>(a) + a) >= tau (S_> the sum of the squares above a). The
    global threshold tau is found by bisection over its float32 bits, and
    for each candidate tau every leaf's cut by a bisection over the bits of
    its squared scores, each step one masked sum: only per-leaf scalar sums
    and counts cross devices (~1000 passes over the weights in all, against
    a sort per leaf).
  - 'auto' (default): 'bisection' when JAX sees more than one device
    (where kernels may be sharded), else 'sort'.

  >>> [int(c) for c in lamp_keep_counts([jnp.array([1., 2., 3.]), jnp.array([10., 0.1])], 3)]
  [2, 1]
  >>> [int(c) for c in lamp_keep_counts([jnp.array([1., 2., 3.]), jnp.array([10., 0.1])], 3,
  ...                                   method="bisection")]
  [2, 1]

  (LAMP scores: 1/14, 4/13, 1 and 0.0001, 1: the top 3 are 1, 1, 4/13.)

  Raises:
    ValueError: for an unknown `method`.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}: LAMP keep counts are computed by one of {METHODS}.")
  if method == "auto":
    method = "bisection" if jax.device_count() > 1 else "sort"
  candidates = [None] * len(scores) if candidates is None else candidates
  squares = []
  for s, candidate in zip(scores, candidates):
    squared = jnp.square(jnp.asarray(s, jnp.float32))
    if candidate is not None:
      squared = jnp.where(jnp.asarray(candidate), squared, 0.0)
    squares.append(squared)
  if not squares:
    return []
  if method == "sort":
    return list(_sorted_counts(squares, jnp.asarray(keep, jnp.int32)))
  return list(_bisection_counts(squares, jnp.asarray(keep, jnp.int32)))


@jax.jit
def _sorted_counts(squares: Sequence[jax.Array], keep: jax.Array) -> list[jax.Array]:
  """Per-leaf counts from each leaf's sorted LAMP scores and one global top-k."""
  ascending_lamp = []
  for squared in squares:
    # Non-negative floats order as their bit patterns: XLA sorts uint32 several times faster
    # than float32 on CPU (no NaN-aware comparator).
    ascending = jax.lax.bitcast_convert_type(
        jnp.sort(jax.lax.bitcast_convert_type(squared.ravel(), jnp.uint32)), jnp.float32)
    at_or_above = jnp.cumsum(ascending[::-1])[::-1]
    ascending_lamp.append(jnp.where(at_or_above > 0,
                                    ascending / jnp.where(at_or_above > 0, at_or_above, 1.0), 0.0))
  kept = selection.topk_masks_by_count(ascending_lamp, keep)
  return [k.sum(dtype=jnp.int32) for k in kept]


_TAU_BITS = 30            # tau's key is below 2**30 (a float32 < 2.0)
_SQUARE_BITS = 31         # a non-negative float32's key is below 2**31


@jax.jit
def _bisection_counts(squares: Sequence[jax.Array], keep: jax.Array) -> jax.Array:
  """Per-leaf LAMP counts by bisection over per-leaf scalar sums (no sort, no gather).

  Every pass is a masked sum, count or min over whole leaves, so under FSDP
  each device reduces its shards and only scalars are all-reduced.
  """
  keys = [jax.lax.bitcast_convert_type(sq, jnp.uint32) for sq in squares]
  sizes = jnp.asarray([sq.size for sq in squares], jnp.int32)
  keep = jnp.clip(keep, 0, sum(sq.size for sq in squares))

  def sums_above(cut):  # per leaf: the sum of the squares whose key is above cut[l]
    return jnp.stack([jnp.sum(jnp.where(key > cut[l], sq, 0.0), dtype=jnp.float32)
                      for l, (key, sq) in enumerate(zip(keys, squares))])

  def counts_at(tau_key):
    """Per leaf: how many entries have a LAMP score >= tau."""
    tau = jax.lax.bitcast_convert_type(tau_key, jnp.float32)

    def cut_step(i, prefix):
      # The largest key T with T / (S_>(T) + T) < tau; every value above it has a group whose
      # largest LAMP score is >= tau (0 / 0 is NaN: never >= tau).
      candidate = prefix | (jnp.uint32(1) << (_SQUARE_BITS - 1 - i).astype(jnp.uint32))
      t = jax.lax.bitcast_convert_type(candidate, jnp.float32)
      return jnp.where(t / (sums_above(candidate) + t) >= tau, prefix, candidate)

    cut = jax.lax.fori_loop(0, _SQUARE_BITS, cut_step, jnp.zeros(len(keys), jnp.uint32))
    above = jnp.stack([keys_lib.count_true(key > cut[l]) for l, key in enumerate(keys)])
    # The smallest value above the cut, a: its m equal entries score a / (S_>(a) + j a) for
    # j = 1..m (the order the sorted scores give them); the first j of them reach tau.
    lowest = jnp.stack([jnp.min(jnp.where(key > cut[l], key, jnp.uint32(0xFFFFFFFF)))
                        for l, key in enumerate(keys)])
    equal = jnp.stack([keys_lib.count_true(key == lowest[l]) for l, key in enumerate(keys)])
    a = jax.lax.bitcast_convert_type(lowest, jnp.float32)
    reach = jnp.floor((a / tau - sums_above(lowest)) / a)
    group = jnp.clip(jnp.nan_to_num(reach, nan=1.0, posinf=2.0**30), 1, equal).astype(jnp.int32)
    counts = jnp.where(above > 0, above - equal + group, 0)
    return jnp.where(tau_key == 0, sizes, counts)   # every score is >= 0

  def tau_step(i, prefix):  # the largest tau with at least `keep` LAMP scores >= tau
    candidate = prefix | (jnp.uint32(1) << (_TAU_BITS - 1 - i).astype(jnp.uint32))
    return jnp.where(counts_at(candidate).sum() >= keep, candidate, prefix)

  tau = jax.lax.fori_loop(0, _TAU_BITS, tau_step, jnp.uint32(0))
  at_least = counts_at(tau)
  above = counts_at(tau + 1)   # the next float32: scores > tau
  # Scores equal to tau go to the earlier leaves, as in one top-k over the concatenation.
  tied = at_least - above
  before = jnp.cumsum(tied) - tied
  return above + jnp.clip(keep - above.sum() - before, 0, tied)
