"""Pruning at initialisation: SNIP and SynFlow, then training with the mask fixed.

SNIP (Lee et al. 2019) keeps the weights with the largest |g * w| on one
batch at initialisation. SynFlow (Tanaka et al. 2020) needs no data: it
replaces every parameter by its absolute value, feeds an all-ones input,
and scores each weight by |w * dR/dw| with R the sum of the outputs (the
"synaptic flow"); it prunes in `iterations` rounds to the exponentially
spaced sparsities 1 - (1 - s)^(k / n), rescoring the masked network each
round, which avoids the layer collapse of one-shot scoring. Both select
globally by default, as the papers do, through `compute_masks`.

Train afterwards with the masks fixed: put them into a
`GradualMagnitudePruning(FixedMaskSchedule()).wrap(tx)` state with
`with_masks`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from sparsejax import allocation as allocation_lib
from sparsejax import pruning
from sparsejax import trees

PyTree = Any


def snip_masks(params: PyTree, grads: PyTree, sparsity, *,
               allocation: allocation_lib.Allocation = "global",
               leaf_filter: trees.LeafFilter | None = None) -> PyTree:
  """SNIP's masks: the top |g * w| of the prunable leaves (`grads`: the loss
  gradient on a batch at initialisation).

  >>> w = {'k': jnp.array([[1., 2.], [3., 4.]])}
  >>> g = {'k': jnp.array([[4., 0.1], [1., -1.]])}
  >>> snip_masks(w, g, 0.5)['k'].tolist()
  [[True, False], [False, True]]
  """
  return pruning.compute_masks(params, sparsity, score="snip", allocation=allocation,
                               leaf_filter=leaf_filter, grads=grads)


def synflow_masks(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, sparsity,
                  input_shape: Sequence[int], *, iterations: int = 100,
                  allocation: allocation_lib.Allocation = "global",
                  leaf_filter: trees.LeafFilter | None = None) -> PyTree:
  """SynFlow's masks, data-free: `iterations` rounds of |w * dR/dw| scoring.

  Args:
    apply_fn: (params, x) -> outputs of the model in evaluation mode (for
      BatchNorm: its running statistics, not the batch's).
    params: the initial params.
    sparsity: the final sparsity.
    input_shape: the shape of one input batch (e.g. (1, 28, 28, 1)).
    iterations: rounds of pruning (the paper: 100).
    allocation, leaf_filter: as in `compute_masks`.

  Raises:
    ValueError: iterations < 1, or what `compute_masks` raises.
  """
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"iterations={iterations!r} must be an int >= 1.")
  chosen = pruning.prunable_leaves(params, leaf_filter)
  masks = pruning.dense_masks(params, chosen)
  linear = jax.tree.map(jnp.abs, params)
  ones = jnp.ones(tuple(input_shape), jnp.float32)

  @jax.jit
  def one_round(masks, target):
    masked = trees.map_with_masks(lambda p, m: p if m is None else jnp.where(m, p, 0), linear,
                                  masks)
    flow = jax.grad(lambda p: jnp.sum(apply_fn(p, ones)))(masked)
    return pruning.compute_masks(masked, target, score="snip", allocation=allocation,
                                 leaf_filter=leaf_filter, grads=flow, previous_masks=masks)

  def earlier_round(k, masks):
    return one_round(masks, 1.0 - (1.0 - sparsity) ** (k.astype(jnp.float32) / iterations))

  # One compiled loop for the rounds before the last (not `iterations` inlined
  # copies); the last one at exactly the target, as a Python number.
  masks = jax.jit(lambda m: jax.lax.fori_loop(1, iterations, earlier_round, m))(masks)
  return one_round(masks, sparsity)
