"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding.

Frankle & Carbin (2019); Frankle et al. (2020, "Linear Mode Connectivity and
the Lottery Ticket Hypothesis"). One IMP level takes the weights at the end
of training and the masks they were trained with, and:

1. `prune_level`: removes a fraction p of the weights the masks still keep,
   the smallest |w|, per leaf ('uniform', the name `sparsejax.compute_masks`
   uses) or with one threshold across leaves ('global'). `layer_fractions`
   gives chosen leaves their own rate, e.g. {'head/': 0.0} keeps the output
   layer dense (OpenLTH's LeNet default) or {'head/': 0.1} prunes it at half
   of p = 0.2 (Frankle & Carbin 2019). A pruned weight is never revived.
   After L levels from dense, each leaf ('uniform') keeps (1 - p)**L of its
   weights, to rounding.
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
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import allocation as allocation_lib
from sparsejax import masks as masks_lib
from sparsejax import pruning
from sparsejax import selection
from sparsejax import trees

__all__ = [
    "ALLOCATIONS",
    "check_fraction",
    "dense_masks",
    "match_layer_fractions",
    "prune_level",
    "random_prune",
    "reinitialize",
    "rewind",
]

PyTree = Any
ALLOCATIONS = ("uniform", "global", "lamp", "erk")


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


def _masked_leaves(params: PyTree, masks: PyTree) -> list[tuple[str, int, int]]:
  """(path, size, kept count) of every leaf `masks` prunes; checks the trees.

  The count is taken where the mask lives (also a mask sharded over
  processes); only the number comes to the host.
  """
  trees.check_same_structure(params, masks)
  out = []
  for leaf in trees.named_leaves(masks, keep_none=True):
    if trees.is_empty(leaf.value):
      continue
    if isinstance(leaf.value, jax.core.Tracer):
      raise ValueError(
          "prune_level and random_prune count the weights each mask keeps on the host, so "
          "that every level keeps an exact number of them: call them between training runs, "
          f"outside jit (mask '{leaf.path}' is traced).")
    out.append((leaf.path, int(np.size(leaf.value)),
                int(jnp.count_nonzero(jnp.asarray(leaf.value, bool)))))
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


def _check_allocation(allocation: str) -> None:
  if allocation == "layerwise":
    raise ValueError(
        "IMP allocation 'layerwise' is called 'uniform' in sparsejax, as in "
        "sparsejax.compute_masks: every leaf loses the same fraction of the weights it keeps. "
        "Pass allocation='uniform'.")
  if allocation not in ALLOCATIONS:
    raise ValueError(f"unknown IMP allocation {allocation!r}; use one of {ALLOCATIONS}.")


def match_layer_fractions(paths: Sequence[str],
                          layer_fractions: Mapping[str, float] | None) -> dict[str, float]:
  """The leaves of `paths` that `layer_fractions` gives their own fraction.

  A path takes the fraction of the first regex that `re.search` matches it.

  >>> match_layer_fractions(['hidden_0/kernel', 'head/kernel'], {'^head/': 0.0})
  {'head/kernel': 0.0}

  Args:
    paths: the '/'-joined paths of the pruned leaves.
    layer_fractions: {path_regex: fraction in [0, 1)}, or None.

  Returns:
    {path: fraction} for the matched paths only.

  Raises:
    ValueError: not a mapping, a regex that does not compile or matches no
      path, or a fraction outside [0, 1) (each naming the regex).
  """
  if layer_fractions is None:
    return {}
  if not isinstance(layer_fractions, Mapping):
    raise ValueError("layer_fractions must be a mapping {path_regex: fraction}, got "
                     f"{type(layer_fractions).__name__}.")
  patterns = []
  for pattern, value in layer_fractions.items():
    try:
      regex = re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"layer_fractions regex {pattern!r} does not compile: {e}") from e
    patterns.append((regex, pattern, check_fraction(value, f"layer_fractions[{pattern!r}]")))
  matched, used = {}, set()
  for path in paths:
    hit = next((p for p in patterns if p[0].search(path)), None)
    if hit is not None:
      matched[path] = hit[2]
      used.add(hit[1])
  unused = [pattern for _, pattern, _ in patterns if pattern not in used]
  if unused:
    raise ValueError(f"layer_fractions regex(es) {unused} match no pruned leaf "
                     f"(first match wins); the pruned leaves are {list(paths)}.")
  return matched


def _merge(first: PyTree, second: PyTree) -> PyTree:
  """Two masks trees on disjoint leaves (None elsewhere) as one."""
  return jax.tree.map(lambda a, b: b if a is None else a, first, second,
                      is_leaf=lambda x: x is None)


def prune_level(params: PyTree, masks: PyTree | None, fraction: float = 0.2, *,
                allocation: str = "uniform",
                layer_fractions: Mapping[str, float] | None = None,
                leaf_filter: trees.LeafFilter | None = None) -> PyTree:
  """The masks of the next IMP level: prune `fraction` of the weights still kept.

  >>> params = {'hidden': {'kernel': jnp.arange(1., 101.).reshape(10, 10)},
  ...           'head': {'kernel': jnp.ones((10, 2))}}
  >>> masks = prune_level(params, None, 0.2, layer_fractions={'^head/': 0.0})
  >>> int(masks['hidden']['kernel'].sum()), int(masks['head']['kernel'].sum())
  (80, 20)

  Args:
    params: the weights at the end of the level's training (magnitudes rank).
    masks: the masks they were trained with, None on leaves that are not
      pruned; None for the first level (all prunable weights kept).
    fraction: p in [0, 1): the share of the *remaining* weights to prune.
    allocation: 'uniform' (each masked leaf keeps round((1 - p) * kept_l)
      of its weights) or 'global' (the leaves `layer_fractions` does not
      match keep round((1 - p) * their total kept), one magnitude threshold
      across them) or 'lamp' (as 'global', ranking LAMP scores: Lee et al.
      2021 use it inside IMP; see `sparsejax.lamp`) or 'erk' (the same
      leaves keep, in all, round((1 - p) * their total kept), split by the
      ERK densities of `erk_densities` at that total, each leaf its own
      magnitudes; ERK's densities only fall as the total does, so no leaf
      needs a weight back).
    layer_fractions: {path_regex: fraction in [0, 1)}: a leaf whose
      '/'-joined path a regex `re.search` matches (first match wins) keeps
      round((1 - fraction) * kept_l) of its own weights, under either
      allocation; fraction 0 leaves it at its current mask (e.g. an output
      layer kept dense). Every regex must match a masked leaf.
    leaf_filter: which leaves are pruned, for the first level only (default:
      ndim >= 2); later levels prune the leaves `masks` masks.

  Returns:
    A masks tree like `masks`: it keeps a subset of what `masks` kept.

  Raises:
    ValueError: a fraction outside [0, 1) (of `fraction` or of a
      `layer_fractions` entry, naming its regex), an unknown allocation
      (including 'layerwise', now 'uniform'), a regex that matches no masked
      leaf, masks whose tree or shapes do not match params (naming the
      leaf), both masks and leaf_filter given, NaN weights, or traced masks.
  """
  p = check_fraction(fraction)
  _check_allocation(allocation)
  if masks is None:
    masks = dense_masks(params, leaf_filter)
  elif leaf_filter is not None:
    raise ValueError("leaf_filter chooses the leaves of the first level only; with masks "
                     "given, the pruned leaves are the ones they mask. Pass one of the two.")
  leaves = _masked_leaves(params, masks)
  own = match_layer_fractions([path for path, _, _ in leaves], layer_fractions)
  weights = {leaf.path: leaf.value for leaf in trees.named_leaves(params)}
  for path, _, _ in leaves:  # checked here: inside the compiled selection a NaN would just rank last
    selection.check_no_nan(weights[path], path)
  # Leaves pruned at their own rate ('uniform', or matched by layer_fractions) and
  # the leaves that share one threshold ('global', unmatched): (path, size, kept).
  alone, pooled = [], []
  for path, size, kept in leaves:
    shared = allocation in ("global", "lamp", "erk") and path not in own
    (pooled if shared else alone).append((path, size, kept))
  keep_alone = [int(round((1.0 - own.get(path, p)) * kept)) for path, _, kept in alone]
  pool_size = sum(size for _, size, _ in pooled)
  pool_keep = int(round((1.0 - p) * sum(kept for _, _, kept in pooled)))
  if allocation == "erk" and pooled:   # per-leaf counts from ERK at the pool's new density
    densities = allocation_lib.erk_densities(1.0 - pool_keep / pool_size,
                                             [tuple(weights[path].shape) for path, _, _ in pooled])
    keep_alone += [min(kept, int(round(float(d) * size)))
                   for d, (_, size, kept) in zip(densities, pooled)]
    alone, pooled, pool_size = alone + pooled, [], 0
  exact = _exact_map([path for path, _, _ in alone], [size for _, size, _ in alone], keep_alone)

  def select(w, m):
    out = pruning.compute_masks(w, 0.0, allocation=exact,
                                leaf_filter=_only([path for path, _, _ in alone]),
                                previous_masks=m)
    if pooled:
      out = _merge(out, pruning.compute_masks(
          w, 1.0 - pool_keep / pool_size if pool_size else 0.0, allocation=allocation,
          leaf_filter=_only([path for path, _, _ in pooled]), previous_masks=m))
    return out

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
                          [kept for _, _, kept in leaves])
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
