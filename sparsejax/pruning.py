"""One-shot pruning of a params pytree: score -> allocate -> select.

Every method in sparsejax produces its masks through `compute_masks` (top-k
selection) or `nm_masks` (N:M selection, where the pattern fixes each leaf's
sparsity, so there is nothing to allocate); they differ in the score, the
allocation and when they are called.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import allocation as allocation_lib
from sparsejax import counts
from sparsejax import lamp
from sparsejax import layouts
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
                  ramp: Callable[[Any], Any] | None = None,
                  grads: PyTree | None = None,
                  normalize: bool = False) -> PyTree:
  """Masks for `params` at the given total sparsity: score -> allocate -> select.

  Args:
    params: any params pytree (Flax Linen dict, NNX State, plain dict).
    sparsity: fraction of the prunable weights to prune, in [0, 1]; may be
      traced (inside jit).
    score: 'magnitude', 'random' or a function (param, key) -> scores.
    allocation: 'uniform', 'erk', 'global', 'lamp' (LAMP-normalised scores,
      one threshold: `sparsejax.lamp`) or {path_regex: sparsity}.
    leaf_filter: (path, leaf) -> bool choosing prunable leaves; default:
      arrays with ndim >= 2.
    key: PRNG key, required by random scores; folded with each leaf's index.
    previous_masks: masks from an earlier call; entries they pruned rank
      below every other entry, so a growing sparsity never revives a weight.
    ramp: maps each leaf's allocated sparsity (for 'global', the total) to
      the sparsity used now, e.g. `lambda s: schedule.with_final(s)(step)`;
      default: use the allocation as is.
    grads: a params-shaped tree of loss gradients, for scores that need
      them ('snip'); a score function is then called as (param, key, grad).
    normalize: divide each leaf's scores by their L2 norm (+1e-8) before
      selecting, as JaxPruner's global pruners do, so that a global
      threshold does not favour layers with large scores.

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
    aligned = trees.leaves_with_masks(params, previous_masks, "previous_masks")
    previous = [leaf.mask for leaf in aligned]
  grad_leaves = None
  if grads is not None:
    trees.check_same_paths(params, grads, what="grads")
    grad_leaves = trees.named_leaves(grads)
  elif score in scores_lib.GRADIENT_SCORES:
    raise ValueError(f"score {score!r} needs the loss gradient: pass grads= to compute_masks.")
  # Magnitude and SNIP scores are computed inside the selection's passes
  # (never stored) unless something else must read them first.
  lazy = not normalize and allocation != "lamp"
  scores = _scores(leaves, chosen, score_fn, key, grad_leaves, lazy=lazy)
  if normalize:
    scores = [s / (jnp.linalg.norm(s.astype(jnp.float32)) + 1e-8) for s in scores]
  targets = allocation_lib.allocate(
      allocation, sparsity, [leaves[i].path for i in chosen], [leaves[i].value.shape for i in chosen])
  current = ramp(sparsity) if targets is None else [ramp(t) for t in targets]
  candidates = None if previous is None else [previous[i] for i in chosen]
  if allocation == "lamp":  # per-leaf counts from LAMP scores, then each leaf's largest scores
    keep = counts.keep_count(sum(int(np.size(s)) for s in scores), current)
    masks = selection.topk_masks_by_count(scores, lamp.lamp_keep_counts(scores, keep, candidates),
                                          candidates)
  else:
    masks = selection.topk_masks(scores, current, candidates=candidates)
  return assemble_masks(params, chosen, masks)


def _snip(param: jax.Array, grad: jax.Array) -> jax.Array:
  """SNIP's score as a function of arrays only (for `selection.elementwise_scores`)."""
  return scores_lib.snip_score(param, grad=grad)


def _scores(leaves: Sequence[trees.Leaf], chosen: Sequence[int], score_fn: scores_lib.ScoreFn,
            key: jax.Array | None, grads: Sequence[trees.Leaf] | None = None,
            lazy: bool = False) -> list[jax.Array | selection.ElementwiseScores]:
  """The score of every chosen leaf; `key` is folded with each leaf's index.

  With `lazy`, the built-in elementwise scores (magnitude, SNIP) are
  returned as `selection.elementwise_scores`, computed by the selection.
  """
  scores = []
  for i in chosen:
    leaf_key = None if key is None else jax.random.fold_in(key, i)
    if lazy and score_fn is scores_lib.magnitude_score:
      scores.append(selection.elementwise_scores(scores_lib.magnitude_score, leaves[i].value))
    elif (lazy and score_fn is scores_lib.snip_score and grads is not None
          and np.shape(grads[i].value) == np.shape(leaves[i].value)):
      scores.append(selection.elementwise_scores(_snip, leaves[i].value, grads[i].value))
    elif grads is None:
      scores.append(score_fn(leaves[i].value, leaf_key))
    else:
      scores.append(score_fn(leaves[i].value, leaf_key, grads[i].value))
    selection.check_no_nan(scores[-1], leaves[i].path)
  return scores


NON_DIVISIBLE = ("error", "dense")


def nm_leaves(params: PyTree, ms: Sequence[int], *, axes: layouts.AxesSpec = None,
              leaf_filter: trees.LeafFilter | None = None,
              non_divisible: str = "error") -> list[int]:
  """Indices of the prunable leaves whose contraction length every M in `ms` divides.

  Args:
    params: the params pytree.
    ms: the group sizes the leaves must take (all the patterns of a schedule).
    axes: the contraction axes of each leaf (`sparsejax.layouts`): None for
      the default rule (Dense, Conv, attention), a {path_regex: axes} map,
      an int or tuple for every leaf, or a function (path, shape) -> axes.
    leaf_filter: chooses the candidate leaves (default: floating, ndim >= 2).
    non_divisible: 'error' raises for a candidate that some M does not
      divide; 'dense' leaves it out (unpruned).

  Raises:
    ValueError: naming the leaf, its shape and the M, for a candidate whose
      axes are out of range or unknown, or (with 'error') not divisible.
  """
  if non_divisible not in NON_DIVISIBLE:
    raise ValueError(f"non_divisible must be one of {NON_DIVISIBLE}, got {non_divisible!r}.")
  leaves = trees.named_leaves(params)
  out = []
  for i in prunable_leaves(params, leaf_filter):
    shape = np.shape(leaves[i].value)
    leaf_axes = layouts.leaf_axes(axes, leaves[i].path, shape)
    length = layouts.GroupedView(shape, leaf_axes).length
    bad = [m for m in ms if length % m]
    if not bad:
      out.append(i)
    elif non_divisible == "error":
      raise ValueError(
          f"'{leaves[i].path}' of shape {shape}: its contraction axes {leaf_axes} hold {length} "
          f"entries, not divisible by M={bad[0]}. Exclude the leaf, set its axes, or pass "
          f"non_divisible='dense' to leave such leaves unpruned.")
  return out


def nm_masks(params: PyTree, n: int, m: int, *, axes: layouts.AxesSpec = None,
             chosen: Sequence[int] | None = None, score: str | scores_lib.ScoreFn = "magnitude",
             leaf_filter: trees.LeafFilter | None = None, non_divisible: str = "error",
             key: jax.Array | None = None) -> PyTree:
  """N:M masks for `params`: score -> select (n kept in every m) per leaf.

  The groups run along the contraction (input) axes of each pruned leaf, so
  every output unit's input vector, read in contraction order, keeps n of
  every m: axis 0 of a Dense kernel (in, out) and of attention query / key /
  value kernels (in, heads, head_dim), Cin of a Conv kernel (H, W, Cin,
  Cout), the flattened (heads, head_dim) of an attention output kernel. See
  `sparsejax.layouts` for the rule and how to set it per leaf.

  >>> masks = nm_masks({'w': jnp.array([[1.], [-4.], [3.], [2.]])}, 2, 4)
  >>> masks['w'].ravel().tolist()
  [False, True, True, False]

  Args:
    params: any params pytree.
    n, m: keep n of every m.
    axes: the contraction axes rule (see `nm_leaves`).
    chosen: leaf indices to prune (from `nm_leaves`); default: `nm_leaves`
      of `leaf_filter` and `non_divisible`.
    score: 'magnitude', 'random' or a function (param, key) -> scores.
    leaf_filter, non_divisible: see `nm_leaves`.
    key: PRNG key for random scores.

  Returns:
    Bool masks for the pruned leaves, None elsewhere.

  Raises:
    ValueError: bad n or m, unknown or out-of-range axes, or a leaf not
      divisible by m (unless non_divisible='dense'), naming the leaf.
  """
  score_fn = scores_lib.get_score_fn(score)
  if chosen is None:
    chosen = nm_leaves(params, [m], axes=axes, leaf_filter=leaf_filter,
                       non_divisible=non_divisible)
  leaves = trees.named_leaves(params)
  masks = []
  for i, s in zip(chosen, _scores(leaves, chosen, score_fn, key)):
    view = layouts.GroupedView(s.shape, layouts.leaf_axes(axes, leaves[i].path, s.shape))
    masks.append(view.from_view(selection.nm_mask(view.to_view(s), n, m, axis=view.axis)))
  return assemble_masks(params, chosen, masks)


def dense_masks(params: PyTree, chosen: Sequence[int]) -> PyTree:
  """All-True masks on the leaves `chosen` (jax.tree leaf indices), None elsewhere."""
  leaves = jax.tree.leaves(params)
  return assemble_masks(params, chosen, [jax.numpy.ones(np.shape(leaves[i]), bool) for i in chosen])


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
