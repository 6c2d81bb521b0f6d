"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding.

Frankle & Carbin (2019); Frankle et al. (2020, "Linear Mode Connectivity and
the Lottery Ticket Hypothesis"). One IMP level takes the weights at the end
of training and the masks they were trained with, and:

1. `prune_level`: removes a fraction p of the weights the masks still keep,
   the smallest |w|, per leaf ('layerwise') or with one threshold across
   leaves ('global'). A pruned weight is never revived. After L levels from
   dense, each leaf (layerwise) keeps (1 - p)**L of its weights, to rounding.
2. `rewind`: puts the surviving weights back to their values at the rewind
   step k (k = 0: the original initialisation), pruned ones to zero.
3. Retrains with the masks fixed (`sparsejax.FixedMaskSchedule`).

The two controls run on the same level's masks: `random_prune` (a random
mask with the same per-leaf counts, weights rewound as for the ticket) and
`reinitialize` (the ticket's mask on a fresh initialisation).

Every mask goes through `sparsejax.compute_masks` (score -> allocate ->
select). `prune_level` and `random_prune` count the kept weights on the host,
so that each level's counts are exact integers: call them between training
runs, not inside `jit`.

Example, three levels of 20% on a toy model (no training in between):

>>> params = {'w': jnp.arange(1., 101.).reshape(10, 10), 'b': jnp.zeros(10)}
>>> masks = None
>>> for level in range(3):
...   masks = prune_level(params, masks, 0.2)
>>> int(masks['w'].sum()), masks['b']  # round(0.8 * round(0.8 * 80)) = 51
(51, None)
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np

from sparsejax import masks as masks_lib
from sparsejax import pruning
from sparsejax import selection
from sparsejax import trees

PyTree = Any
ALLOCATIONS = ("layerwise", "global")


def check_fraction(fraction, name: str = "fraction") -> float:
  """Returns `fraction` as a float; raises ValueError outside [0, 1)."""
  try:
    value = float(fraction)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a number in [0, 1), got {fraction!r}.") from e
  if not 0.0 <= value < 1.0:  # also False for NaN
    raise ValueError(f"{name} must be in [0, 1) (the fraction of the remaining weights "
                     f"pruned per level), got {fraction!r}.")
  return value


def dense_masks(params: PyTree, leaf_filter: trees.LeafFilter | None = None) -> PyTree:
  """All-True masks on the leaves `leaf_filter` prunes, None elsewhere: level 0.

  >>> dense_masks({'w': jnp.ones((2, 2)), 'b': jnp.ones(2)})['w'].all().item()
  True
  """
  return pruning.dense_masks(params, pruning.prunable_leaves(params, leaf_filter))


def _masked_leaves(params: PyTree, masks: PyTree) -> list[tuple[str, int, np.ndarray]]:
  """(path, size, mask on the host) of every leaf `masks` prunes; checks the trees."""
  trees.check_same_structure(params, masks)
  out = []
  for leaf in trees.named_leaves(masks, keep_none=True):
    if leaf.value is None:
      continue
    if isinstance(leaf.value, jax.core.Tracer):
      raise ValueError(
          "prune_level and random_prune count the weights each mask keeps on the host, so "
          "that every level keeps an exact number of them: call them between training runs, "
          f"outside jit (mask '{leaf.path}' is traced).")
    out.append((leaf.path, int(np.size(leaf.value)), np.asarray(leaf.value, bool)))
  return out


def _exact_map(paths: Sequence[str], sizes: Sequence[int], keep: Sequence[int]) -> dict[str, float]:
  """A custom allocation giving leaf `path` sparsity 1 - keep/size.

  `compute_masks` keeps round((1 - s) * size) entries, which gives back
  `keep` exactly for any leaf below 2**40 entries in float64.
  """
  return {f"^{re.escape(p)}$": 1.0 - k / n if n else 0.0 for p, n, k in zip(paths, sizes, keep)}


def _only(paths: Sequence[str]) -> trees.LeafFilter:
  chosen = set(paths)
  return lambda path, leaf: path in chosen


def prune_level(params: PyTree, masks: PyTree | None, fraction: float = 0.2, *,
                allocation: str = "layerwise",
                leaf_filter: trees.LeafFilter | None = None) -> PyTree:
  """The masks of the next IMP level: prune `fraction` of the weights still kept.

  Args:
    params: the weights at the end of the level's training (magnitudes rank).
    masks: the masks they were trained with, None on leaves that are not
      pruned; None for the first level (all prunable weights kept).
    fraction: p in [0, 1): the share of the *remaining* weights to prune.
    allocation: 'layerwise' (each masked leaf keeps round((1 - p) * kept_l)
      of its weights) or 'global' (round((1 - p) * total kept) across all
      masked leaves, one magnitude threshold).
    leaf_filter: which leaves are pruned, for the first level only (default:
      ndim >= 2); later levels prune the leaves `masks` masks.

  Returns:
    A masks tree like `masks`: it keeps a subset of what `masks` kept.

  Raises:
    ValueError: a fraction outside [0, 1), an unknown allocation, masks
      whose tree or shapes do not match params (naming the leaf), both
      masks and leaf_filter given, NaN weights, or traced masks.
  """
  p = check_fraction(fraction)
  if allocation not in ALLOCATIONS:
    raise ValueError(f"unknown IMP allocation {allocation!r}; use one of {ALLOCATIONS}.")
  if masks is None:
    masks = dense_masks(params, leaf_filter)
  elif leaf_filter is not None:
    raise ValueError("leaf_filter chooses the leaves of the first level only; with masks "
                     "given, the pruned leaves are the ones they mask. Pass one of the two.")
  leaves = _masked_leaves(params, masks)
  paths = [path for path, _, _ in leaves]
  kept = [int(np.count_nonzero(mask)) for _, _, mask in leaves]
  weights = {leaf.path: leaf.value for leaf in trees.named_leaves(params)}
  for path in paths:  # checked here: inside the compiled selection a NaN would just rank last
    selection.check_no_nan(weights[path], path)
  if allocation == "global":
    total_size = sum(size for _, size, _ in leaves)
    keep = int(round((1.0 - p) * sum(kept)))
    sparsity = 1.0 - keep / total_size if total_size else 0.0
    select = lambda w, m: pruning.compute_masks(w, sparsity, allocation="global",
                                                leaf_filter=_only(paths), previous_masks=m)
  else:
    keep = [int(round((1.0 - p) * k)) for k in kept]
    exact = _exact_map(paths, [size for _, size, _ in leaves], keep)
    select = lambda w, m: pruning.compute_masks(w, 0.0, allocation=exact,
                                                leaf_filter=_only(paths), previous_masks=m)
  # One compiled program per level (the counts are baked in as constants)
  # instead of dozens of small eager ones.
  return jax.jit(select)(params, masks)


def rewind(rewind_params: PyTree, masks: PyTree) -> PyTree:
  """The weights a level trains from: step-k values where kept, zero where pruned.

  >>> rewind({'w': jnp.array([0.5, -1.])}, {'w': jnp.array([False, True])})['w'].tolist()
  [0.0, -1.0]

  Raises:
    ValueError: if the masks tree does not match the rewind point (names the leaf).
  """
  return masks_lib.apply_masks(rewind_params, masks)


def random_prune(params: PyTree, masks: PyTree, key: jax.Array) -> PyTree:
  """Control: random masks with exactly the kept count of `masks` on every leaf.

  Pair them with `rewind` (the same rewound weights as the ticket), so that
  only which weights survive differs from the ticket.

  Args:
    params: any tree with the params' structure and shapes.
    masks: the ticket's masks (None on leaves that are not pruned).
    key: PRNG key; each leaf gets its own stream.

  Raises:
    ValueError: masks that do not match params, or traced masks.
  """
  leaves = _masked_leaves(params, masks)
  paths = [path for path, _, _ in leaves]
  allocation = _exact_map(paths, [size for _, size, _ in leaves],
                          [int(np.count_nonzero(mask)) for _, _, mask in leaves])
  return jax.jit(lambda w, k: pruning.compute_masks(
      w, 0.0, score="random", allocation=allocation, leaf_filter=_only(paths), key=k))(params, key)


def reinitialize(fresh_params: PyTree, masks: PyTree) -> PyTree:
  """Control: the ticket's masks on freshly initialised params (a new seed).

  >>> fresh = {'w': jax.random.normal(jax.random.key(1), (2,))}
  >>> float(reinitialize(fresh, {'w': jnp.array([True, False])})['w'][1])
  0.0

  Raises:
    ValueError: if the fresh params do not match the masks (names the leaf).
  """
  return masks_lib.apply_masks(fresh_params, masks)
