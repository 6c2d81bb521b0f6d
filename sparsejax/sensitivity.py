"""Per-layer sensitivity: the loss after pruning one layer (or group) alone, at each sparsity.

How much each layer can lose before the model notices is the classic way to
choose per-layer rates by hand (Han et al. 2015, "Learning both weights and
connections"; Distiller's sensitivity analysis). `sweep` prunes one group of
leaves at a time, every other leaf left dense, at each sparsity of a list,
and records `loss_fn` of the result; `rates` turns the table into per-group
sparsities (the largest swept sparsity whose loss increase stays within a
tolerance), as a `{path regex: sparsity}` allocation that `compute_masks`,
`magnitude_masks` and the wrappers take as they are::

  table = sensitivity.sweep(params, loss_fn, (0.5, 0.7, 0.9))
  allocation = sensitivity.rates(table, max_increase=0.05)
  masks = sparsejax.magnitude_masks(params, 0.0, allocation=allocation)

A group is one prunable leaf (the default) or the leaves a regex matches.
By default a group is pruned by magnitude, each of its leaves keeping its
round((1 - s) n) largest |w| (the library's exact top-k); `prune=` takes any
(params, paths, sparsity) -> params, e.g. one-shot Wanda from calibration
statistics.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import counts
from sparsejax import pruning
from sparsejax import selection
from sparsejax import trees

PyTree = Any
PruneFn = Callable[[PyTree, Sequence[str], float], PyTree]


class Sensitivity(NamedTuple):
  """The sweep's table: `losses[g, j]` is the loss with group g alone pruned to `sparsities[j]`.

  Attributes:
    groups: group names, in order (a leaf's path, or the group's regex).
    patterns: for each group, the regex that selects its leaves (for a
      leaf, its escaped path anchored at both ends).
    paths: for each group, the paths of its leaves.
    sizes: for each group, its number of weights.
    sparsities: the swept sparsities, in the order given.
    dense_loss: `loss_fn` of the unpruned params.
    losses: float64 array (len(groups), len(sparsities)).
  """
  groups: tuple[str, ...]
  patterns: tuple[str, ...]
  paths: tuple[tuple[str, ...], ...]
  sizes: tuple[int, ...]
  sparsities: tuple[float, ...]
  dense_loss: float
  losses: np.ndarray


def magnitude_prune(params: PyTree, paths: Sequence[str], sparsity: float) -> PyTree:
  """`params` with each leaf of `paths` keeping its round((1 - s) n) largest |w|, others as they are.

  One compiled program per leaf shape, the sparsity traced (a sweep over
  many sparsities compiles once).
  """
  chosen = frozenset(paths)
  leaves = trees.named_leaves(params)
  known = {leaf.path for leaf in leaves}
  unknown = sorted(chosen - known)
  if unknown:
    raise ValueError(f"no leaf at path {unknown[0]!r} to prune.")
  values = [_keep_largest(leaf.value, jnp.float32(sparsity)) if leaf.path in chosen else leaf.value
            for leaf in leaves]
  return jax.tree.unflatten(jax.tree.structure(params), values)


@jax.jit
def _keep_largest(leaf: jax.Array, sparsity: jax.Array) -> jax.Array:
  """The leaf with all but its round((1 - sparsity) n) largest |w| zeroed (exact top-k)."""
  return jnp.where(selection.topk_mask(jnp.abs(leaf), sparsity), leaf, jnp.zeros((), leaf.dtype))


def groups_of(params: PyTree, groups: Sequence[str] | None = None,
              leaf_filter: trees.LeafFilter | None = None
              ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]:
  """(names, patterns, paths) of the groups: one per prunable leaf, or one per regex of `groups`.

  A leaf joins the first regex that matches its path (`re.search`; the rule of a
  custom allocation); leaves no regex matches are left out of the sweep.

  Raises:
    ValueError: naming the regex, for an invalid one or one matching no
      prunable leaf; for no prunable leaf at all.
  """
  leaves = trees.named_leaves(params)
  chosen = [leaves[i].path for i in pruning.prunable_leaves(params, leaf_filter)]
  if not chosen:
    raise ValueError("no prunable leaf: the sensitivity sweep has nothing to prune "
                     "(check leaf_filter).")
  if groups is None:
    return (tuple(chosen), tuple(f"^{re.escape(p)}$" for p in chosen),
            tuple((p,) for p in chosen))
  compiled = []
  for pattern in groups:
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise ValueError(f"group regex {pattern!r} is invalid: {e}") from None
  members: dict[str, list[str]] = {p: [] for p in groups}
  for path in chosen:
    for pattern, regex in zip(groups, compiled):
      if regex.search(path):
        members[pattern].append(path)
        break
  empty = [p for p in groups if not members[p]]
  if empty:
    raise ValueError(f"group regex {empty[0]!r} matches no prunable leaf (an earlier group may "
                     f"take them); prunable leaves: {chosen[:8]}{'...' if len(chosen) > 8 else ''}.")
  return tuple(groups), tuple(groups), tuple(tuple(members[p]) for p in groups)


def sweep(params: PyTree, loss_fn: Callable[[PyTree], Any], sparsities: Sequence[float], *,
          groups: Sequence[str] | None = None, leaf_filter: trees.LeafFilter | None = None,
          prune: PruneFn | None = None,
          log: Callable[[str], None] | None = None) -> Sensitivity:
  """`loss_fn` after pruning each group alone at each sparsity: a `Sensitivity` table.

  Args:
    params: any params pytree (Linen dict, NNX state, plain dict).
    loss_fn: params -> scalar loss (lower is better), e.g. the mean
      cross-entropy on a held-out batch; called 1 + len(groups) *
      len(sparsities) times.
    sparsities: each in [0, 1].
    groups: None: one group per prunable leaf; else regexes, one group each
      (see `groups_of`).
    leaf_filter: (path, leaf) -> bool: the prunable leaves; default ndim >= 2.
    prune: (params, paths, sparsity) -> params pruning the leaves `paths`;
      default `magnitude_prune`.
    log: called with one line per group.

  Raises:
    ValueError: for no sparsities or one outside [0, 1] (naming it), a bad
      group regex (naming it), or a loss that is not a finite scalar
      (naming the group and sparsity).
  """
  sparsities = tuple(sparsities)
  if not sparsities:
    raise ValueError("sparsities is empty: give the sparsities to sweep, e.g. (0.5, 0.7, 0.9).")
  for s in sparsities:
    try:
      counts.check_sparsity(s)
    except ValueError as e:
      raise ValueError(f"sparsities: {e}") from None
  sparsities = tuple(float(s) for s in sparsities)
  prune = prune or magnitude_prune
  names, patterns, paths = groups_of(params, groups, leaf_filter)
  sizes_of = {leaf.path: int(np.prod(np.shape(leaf.value))) for leaf in trees.named_leaves(params)}

  def loss(p, where):
    value = np.asarray(jax.device_get(loss_fn(p)), np.float64)
    if value.shape != () or not math.isfinite(float(value)):
      raise ValueError(f"{where}: loss_fn returned {value!r}, not a finite scalar.")
    return float(value)

  dense = loss(params, "dense params")
  losses = np.zeros((len(names), len(sparsities)), np.float64)
  for g, (name, group_paths) in enumerate(zip(names, paths)):
    for j, s in enumerate(sparsities):
      losses[g, j] = loss(prune(params, group_paths, s), f"group {name!r} at sparsity {s}")
    if log:
      log(f"[sensitivity] {name}: " + ", ".join(
          f"{s:g}: {l:.4f}" for s, l in zip(sparsities, losses[g])) + f" (dense {dense:.4f})")
  return Sensitivity(names, patterns, paths, tuple(sum(sizes_of[p] for p in ps) for ps in paths),
                     sparsities, dense, losses)


def rates(table: Sensitivity, max_increase: float) -> dict[str, float]:
  """{group regex: sparsity}: per group, the largest swept sparsity within `max_increase` of dense.

  A group gets the largest swept s such that at every swept sparsity up to
  s its loss is at most dense + `max_increase` (so one lucky point past a
  bad one is not taken); a group with none gets 0. The dict is a custom
  allocation: `compute_masks(params, 0.0, allocation=rates(...))` prunes
  each group at its rate (and leaves outside every group dense).

  >>> t = Sensitivity(('a', 'b'), ('^a$', '^b$'), (('a',), ('b',)), (10, 30), (0.5, 0.9), 1.0,
  ...                 np.array([[1.01, 1.5], [1.2, 1.3]]))
  >>> rates(t, 0.1)
  {'^a$': 0.5, '^b$': 0.0}

  Raises:
    ValueError: for a `max_increase` that is negative or not finite.
  """
  if (isinstance(max_increase, bool) or not isinstance(max_increase, (int, float))
      or not math.isfinite(max_increase) or max_increase < 0):
    raise ValueError(f"max_increase={max_increase!r} must be a finite number >= 0 (the loss "
                     "increase over dense each group may cost).")
  order = np.argsort(np.asarray(table.sparsities), kind="stable")
  out = {}
  for pattern, row in zip(table.patterns, np.asarray(table.losses)):
    chosen = 0.0
    for j in order:
      if not row[j] <= table.dense_loss + max_increase:
        break
      chosen = max(chosen, table.sparsities[j])
    out[pattern] = chosen
  return out


def overall_sparsity(table: Sensitivity, group_rates: Mapping[str, float]) -> float:
  """The fraction of the swept groups' weights that `group_rates` (from `rates`) prunes.

  >>> t = Sensitivity(('a', 'b'), ('^a$', '^b$'), (('a',), ('b',)), (10, 30), (0.5,), 1.0,
  ...                 np.zeros((2, 1)))
  >>> overall_sparsity(t, {'^a$': 0.5, '^b$': 0.0})
  0.125
  """
  total = sum(table.sizes)
  return sum(size * group_rates.get(p, 0.0)
             for p, size in zip(table.patterns, table.sizes)) / total if total else 0.0
