"""Which units to keep, and the weight masks and FLAP bias that follow from it.

A keep is {group name: (units,) bool}. Two selections:

  `keep_uniform`  every group keeps round((1 - s) * units) of its best-scored
                  units (at least one): the per-layer rule of Wanda-sp and
                  magnitude_sp, and the structured gradual pruning in
                  training (traced `s` allowed);
  `keep_global`   FLAP's global choice: all units ranked by score, the
                  threshold put where the parameters of the units above it
                  come closest to (1 - s) of the groups' parameters (each unit
                  weighted by its parameter cost: a head costs 4 * d * head_dim,
                  an MLP unit 2 or 3 * d), units above it kept; a group left
                  with none keeps its best unit.

`structured_masks` broadcasts a keep to bool masks shaped like the params
(every member leaf, biases and BatchNorm entries included; None elsewhere),
so training with them is the existing masked path. `flap_bias` adds FLAP's
compensation W[pruned, :]^T mean(X_pruned) to each consumer's output bias.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import selection
from sparsejax import trees
from sparsejax.structure import groups as groups_lib
from sparsejax.structure import scores as scores_lib

PyTree = Any
Keep = dict[str, jax.Array]


def check_fraction(fraction, what: str = "fraction") -> None:
  """A concrete fraction of units (or parameters) removed must be in [0, 1)."""
  if isinstance(fraction, jax.core.Tracer):
    return
  if (isinstance(fraction, (bool, np.bool_)) or np.ndim(fraction) != 0
      or not np.issubdtype(np.asarray(fraction).dtype, np.number)):
    raise ValueError(f"{what} must be a number in [0, 1), got {fraction!r}.")
  if not 0.0 <= float(fraction) < 1.0:
    raise ValueError(f"{what}={fraction} must be in [0, 1): removing every unit of a group is "
                     "not allowed.")


def _at_least_one(keep: jax.Array, score: jax.Array) -> jax.Array:
  best = jnp.arange(keep.shape[0]) == jnp.argmax(score)
  return keep | (~keep.any() & best)


def keep_uniform(scores: Mapping[str, jax.Array], groups: Sequence[groups_lib.Group], fraction,
                 previous: Mapping[str, jax.Array] | None = None) -> Keep:
  """Each group keeps round((1 - fraction) * units) of its best units, at least one.

  Ties go to the lower unit index. Units `previous` pruned stay pruned.
  `fraction` may be traced (structured gradual pruning).

  >>> g = groups_lib.Group('fc', 'channel', 4, ())
  >>> keep_uniform({'fc': jnp.array([1., 4., 3., 2.])}, [g], 0.5)['fc'].tolist()
  [False, True, True, False]
  """
  check_fraction(fraction)
  names = [g.name for g in groups]
  previous = None if previous is None else {n: previous[n] for n in names}
  return _keep_uniform({n: scores[n] for n in names}, tuple(groups), fraction, previous)


@functools.partial(jax.jit, static_argnums=1)
def _keep_uniform(scores, groups, fraction, previous):
  names = [g.name for g in groups]
  candidates = None if previous is None else [jnp.asarray(previous[n]) for n in names]
  kept = selection.topk_masks([jnp.asarray(scores[n], jnp.float32) for n in names],
                              [fraction] * len(names), candidates)
  return {n: _at_least_one(k, jnp.asarray(scores[n])) for n, k in zip(names, kept)}


def keep_global(scores: Mapping[str, jax.Array], groups: Sequence[groups_lib.Group],
                params: PyTree, fraction: float) -> Keep:
  """FLAP's global choice by parameter cost (concrete scores; see the module docstring).

  Follows `prune_flap` ('AL-AM'): scores sorted descending, the threshold
  is the score at argmin |cumsum(cost) - (1 - fraction) * sum(cost)|, and a
  unit is kept if its score is strictly above it (so the threshold unit goes
  too, as in the authors' code). A fraction of 0 keeps every unit.
  """
  check_fraction(fraction)
  if float(fraction) == 0.0:
    return {g.name: jnp.ones(g.units, bool) for g in groups}
  shapes = {leaf.path: tuple(np.shape(leaf.value)) for leaf in trees.named_leaves(params)}
  flat = np.concatenate([np.asarray(scores[g.name], np.float64).ravel() for g in groups])
  cost = np.concatenate([np.full(g.units, g.cost(shapes), np.float64) for g in groups])
  order = np.argsort(-flat, kind="stable")
  cumulative = np.cumsum(cost[order])
  threshold = flat[order][np.argmin(np.abs(cumulative - cost.sum() * (1.0 - fraction)))]
  out, start = {}, 0
  for g in groups:
    s = flat[start:start + g.units]
    start += g.units
    out[g.name] = _at_least_one(jnp.asarray(s > threshold), jnp.asarray(s))
  return out


def structured_masks(params: PyTree, groups: Sequence[groups_lib.Group], keep: Keep) -> PyTree:
  """Bool masks shaped like `params` for the units `keep` keeps; None on non-member leaves.

  A leaf in several groups (on different axes) gets the AND of their masks.

  >>> members = (groups_lib.Member('w', 1), groups_lib.Member('b', 0))
  >>> g = groups_lib.Group('fc', 'channel', 2, members)
  >>> m = structured_masks({'w': jnp.ones((3, 2)), 'b': jnp.ones(2), 'c': jnp.ones(2)}, [g],
  ...                      {'fc': jnp.array([True, False])})
  >>> m['b'].tolist(), m['c']
  ([True, False], None)
  """
  for g in groups:
    if g.name not in keep:
      raise ValueError(f"keep has no entry for group {g.name!r}.")
    k = keep[g.name]
    if np.shape(k) != (g.units,) or jnp.result_type(k) != jnp.bool_:
      raise ValueError(f"keep[{g.name!r}] must be a bool array of shape ({g.units},), got "
                       f"{jnp.result_type(k)}{tuple(np.shape(k))}.")
  return _structured_masks(params, tuple(groups), {g.name: keep[g.name] for g in groups})


@functools.partial(jax.jit, static_argnums=1)
def _structured_masks(params, groups, keep):
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=trees.is_empty)
  paths = [trees.path_name(p) for p, _ in flat]
  shapes = {p: tuple(np.shape(v)) for p, (_, v) in zip(paths, flat) if not trees.is_empty(v)}
  masks: dict[str, jax.Array] = {}
  for g in groups:
    k = jnp.asarray(keep[g.name])
    for m in g.members:
      for path in groups_lib.resolve(shapes, m.path):
        mask = groups_lib.broadcast_mask(k, m, g.units, shapes[path])
        masks[path] = mask if path not in masks else masks[path] & mask
  return jax.tree.unflatten(treedef, [None if trees.is_empty(v) else masks.get(p)
                                      for p, (_, v) in zip(paths, flat)])


def check_biases(groups: Sequence[groups_lib.Group]) -> None:
  """Every group has a consumer with an output bias, which FLAP's compensation is added to.

  The authors' code creates a bias where a projection has none (LLaMA's); a
  params tree cannot grow a leaf its model does not declare, so here the
  model must have one (e.g. `attention_bias`), or FLAP runs without the
  compensation (`prune_structured(..., bias=False)`).

  Raises:
    ValueError: naming the first group and its consumer without a bias.
  """
  for g in groups:
    if g.bias is None:
      where = (f"a bias on its consumer '{g.consumer.path}' (Rule.bias); the model has none"
               if g.consumer else "a consumer with a bias; the group has no consumer")
      raise ValueError(f"group {g.name!r}: FLAP's compensation needs {where}: prune with "
                       "bias=False, or give the model one.")


def flap_bias(params: PyTree, groups: Sequence[groups_lib.Group], keep: Keep,
              stats: Mapping[str, scores_lib.InputStats]) -> PyTree:
  """Params with FLAP's compensation added to each consumer's output bias.

  bias += sum over pruned inputs j of mean(X_j) * W[j, :] (the authors'
  `(mean_inp * ~mask) @ W.T`), so that the pruned units' average
  contribution stays in the output. Other leaves are unchanged.

  Raises:
    ValueError: if a group has no consumer or no consumer bias (`check_biases`).
  """
  check_biases(groups)
  return _flap_bias(params, tuple(groups), {g.name: keep[g.name] for g in groups}, stats)


@functools.partial(jax.jit, static_argnums=1)
def _flap_bias(params, groups, keep, stats):
  leaves = {leaf.path: leaf.value for leaf in trees.named_leaves(params)}
  added: dict[str, jax.Array] = {}
  for g in groups:
    w, in_shape, s = scores_lib._consumer(g, leaves, stats)  # pylint: disable=protected-access
    pruned = ~groups_lib.broadcast_mask(jnp.asarray(keep[g.name]), g.consumer, g.units,
                                        in_shape).reshape(-1)
    extra = (jnp.where(pruned, s.mean, 0.0) @ w).reshape(np.shape(leaves[g.bias]))
    added[g.bias] = added.get(g.bias, 0.0) + extra
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=trees.is_empty)
  return jax.tree.unflatten(treedef, [
      v if trees.path_name(p) not in added else (v + added[trees.path_name(p)]).astype(v.dtype)
      for p, v in flat])
