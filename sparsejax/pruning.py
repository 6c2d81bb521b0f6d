"""One-shot pruning of a params pytree: score -> allocate -> select.

Every method in sparsejax produces its masks through `compute_masks`; they
differ in the score, the allocation and when it is called.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from sparsejax import allocation as allocation_lib
from sparsejax import counts
from sparsejax import scores as scores_lib
from sparsejax import selection
from sparsejax import trees

PyTree = Any


def prunable_leaves(params: PyTree, leaf_filter: trees.LeafFilter | None = None) -> list[int]:
  """Indices (in jax.tree leaf order) of the leaves that `leaf_filter` prunes."""
  leaf_filter = leaf_filter or trees.default_filter
  return [i for i, leaf in enumerate(trees.named_leaves(params)) if leaf_filter(leaf.path, leaf.value)]


def compute_masks(params: PyTree, sparsity, *, score: str | scores_lib.ScoreFn = "magnitude",
                  allocation: allocation_lib.Allocation = "uniform",
                  leaf_filter: trees.LeafFilter | None = None,
                  key: jax.Array | None = None,
                  previous_masks: PyTree | None = None,
                  ramp: Callable[[Any], Any] | None = None) -> PyTree:
  """Masks for `params` at the given total sparsity: score -> allocate -> select.

  Args:
    params: any params pytree (Flax Linen dict, NNX State, plain dict).
    sparsity: fraction of the prunable weights to prune, in [0, 1]; may be
      traced (inside jit).
    score: 'magnitude', 'random' or a function (param, key) -> scores.
    allocation: 'uniform', 'erk', 'global' or {path_regex: sparsity}.
    leaf_filter: (path, leaf) -> bool choosing prunable leaves; default:
      arrays with ndim >= 2.
    key: PRNG key, required by random scores; folded with each leaf's index.
    previous_masks: masks from an earlier call; entries they pruned rank
      below every other entry, so a growing sparsity never revives a weight.
    ramp: maps each leaf's allocated sparsity (for 'global', the total) to
      the sparsity used now, e.g. `lambda s: schedule.with_final(s)(step)`;
      default: use the allocation as is.

  Returns:
    A masks pytree: bool arrays for pruned leaves, None elsewhere.

  Raises:
    ValueError: for a sparsity outside [0, 1], NaN scores (naming the leaf),
      an unknown score or allocation, or a custom regex matching no leaf.
  """
  score_fn = scores_lib.get_score_fn(score)
  counts.check_sparsity(sparsity)
  allocation_lib.validate_allocation(allocation)
  ramp = ramp or (lambda s: s)
  leaves = trees.named_leaves(params)
  chosen = prunable_leaves(params, leaf_filter)
  previous = None
  if previous_masks is not None:
    trees.check_same_structure(params, previous_masks, "previous_masks")
    previous = jax.tree.leaves(previous_masks, is_leaf=lambda x: x is None)
  scores = []
  for i in chosen:
    leaf_key = None if key is None else jax.random.fold_in(key, i)
    scores.append(score_fn(leaves[i].value, leaf_key))
    selection.check_no_nan(scores[-1], leaves[i].path)
  targets = allocation_lib.allocate(
      allocation, sparsity, [leaves[i].path for i in chosen], [leaves[i].value.shape for i in chosen])
  current = ramp(sparsity) if targets is None else [ramp(t) for t in targets]
  masks = selection.topk_masks(scores, current,
                               candidates=None if previous is None else [previous[i] for i in chosen])
  return assemble_masks(params, chosen, masks)


def assemble_masks(params: PyTree, chosen: Sequence[int], masks: Sequence[jax.Array]) -> PyTree:
  """A masks tree shaped like `params`: `masks[j]` at leaf `chosen[j]`, else None."""
  flat = [None] * len(jax.tree.leaves(params))
  for i, m in zip(chosen, masks):
    flat[i] = m
  return jax.tree.unflatten(jax.tree.structure(params), flat)


def magnitude_masks(params: PyTree, sparsity, allocation: allocation_lib.Allocation = "uniform",
                    leaf_filter: trees.LeafFilter | None = None) -> PyTree:
  """Magnitude pruning masks: keep the largest |w| of each prunable leaf.

  >>> masks = magnitude_masks({'w': jnp.array([[1., -4.], [3., 2.]])}, 0.5)
  >>> masks['w'].tolist()
  [[False, True], [True, False]]

  See `compute_masks` for the arguments.
  """
  return compute_masks(params, sparsity, score="magnitude", allocation=allocation,
                       leaf_filter=leaf_filter)


def random_masks(params: PyTree, sparsity, key: jax.Array,
                 allocation: allocation_lib.Allocation = "uniform",
                 leaf_filter: trees.LeafFilter | None = None) -> PyTree:
  """Random pruning masks with the same per-leaf counts as magnitude pruning."""
  return compute_masks(params, sparsity, score="random", allocation=allocation,
                       leaf_filter=leaf_filter, key=key)
