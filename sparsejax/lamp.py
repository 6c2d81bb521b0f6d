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


def lamp_keep_counts(scores: Sequence[jax.Array], keep,
                     candidates: Sequence[jax.Array | None] | None = None) -> list[jax.Array]:
  """How many entries of each leaf LAMP keeps when `keep` are kept in all.

  Each leaf's squared scores are sorted (values only: LAMP is monotone in
  the score within a leaf, so only the sorted LAMP scores matter), and one
  exact global top-`keep` over them gives each leaf its count; ties go to
  the earlier leaf. Entries where `candidates` is False count as 0 (pruned
  earlier, they add to no denominator).

  >>> [int(c) for c in lamp_keep_counts([jnp.array([1., 2., 3.]), jnp.array([10., 0.1])], 3)]
  [2, 1]

  (LAMP scores: 1/14, 4/13, 1 and 0.0001, 1: the top 3 are 1, 1, 4/13.)
  """
  candidates = [None] * len(scores) if candidates is None else candidates
  ascending_lamp = []
  for s, candidate in zip(scores, candidates):
    squared = jnp.square(jnp.asarray(s, jnp.float32)).ravel()
    if candidate is not None:
      squared = jnp.where(jnp.asarray(candidate).ravel(), squared, 0.0)
    # Non-negative floats order as their bit patterns: XLA sorts uint32 several times faster
    # than float32 on CPU (no NaN-aware comparator).
    ascending = jax.lax.bitcast_convert_type(
        jnp.sort(jax.lax.bitcast_convert_type(squared, jnp.uint32)), jnp.float32)
    at_or_above = jnp.cumsum(ascending[::-1])[::-1]
    ascending_lamp.append(jnp.where(at_or_above > 0,
                                    ascending / jnp.where(at_or_above > 0, at_or_above, 1.0), 0.0))
  kept = selection.topk_masks_by_count(ascending_lamp, keep)
  return [k.sum(dtype=jnp.int32) for k in kept]
