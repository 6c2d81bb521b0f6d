"""BiP (Zhang et al., NeurIPS 2022): pruning as a bi-level problem.

Scores s (one per weight of a learned kernel, initialised to
`score_init_scale` * |theta|) give the mask m = top-k(|s|) per kernel, the
exact sort-free selection. Updates alternate, each on its own batch:

  lower level (updates 0, 2, 4, ... after start_step; batch A):
      theta <- tx(grad_theta L) with m fixed, grad_theta L = g * m;
  upper level (updates 1, 3, 5, ...; batch B):
      s <- score_tx(g * theta + implicit),
      implicit = -lr2 * (grad_m L) * (grad_theta L) = -lr2 * (g * theta) * (g * m),

where g is the gradient with respect to the masked weights the model saw
and g * theta the straight-through gradient of the mask. With lr2 = 0 the
upper level is the straight-through score method of Hydra. One BiP
iteration is two updates (two batches, two forward/backward passes, as in
the authors' trainer); the mask goes straight to the target sparsity.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax import learned
from sparsejax import trees
from sparsejax.counts import check_sparsity

PyTree = Any


def implicit_gradient(grad_mask: jax.Array, grad_theta: jax.Array, lr2: float) -> jax.Array:
  """BiP's implicit-gradient term: -lr2 * grad_m L * grad_theta L (elementwise).

  >>> implicit_gradient(jnp.array([2.]), jnp.array([3.]), 0.1).tolist()
  [-0.6000000238418579]
  """
  return -lr2 * grad_mask * grad_theta


def score_gradients(grads: PyTree, params: PyTree, masks: PyTree, lr2: float) -> PyTree:
  """The upper level's score gradient on learned leaves (None elsewhere):
  g * theta + implicit_gradient(g * theta, g * m, lr2), from the gradient g
  with respect to the masked weights."""
  def one(path, g, w, m):
    del path
    grad_mask = g * w
    return grad_mask + implicit_gradient(grad_mask, g * m.astype(g.dtype), lr2)
  return learned.zip_learned(one, grads, params, masks)


class BiP(learned.LearnedMask):
  """BiP's alternating lower/upper updates (see the module docstring).

  >>> method = BiP(0.5, lr2=0.1, num_steps=4)
  >>> state = method.wrap(optax.sgd(0.1), optax.sgd(0.1)).init({'w': jnp.array([[1.], [-3.]])})
  >>> state.scores['w'].ravel().tolist(), state.masks['w'].ravel().tolist()
  ([1.0, 3.0], [False, True])

  Args:
    sparsity: fraction pruned in every learned kernel.
    lr2: the implicit-gradient coefficient (0: Hydra).
    num_steps: total steps of the run.
    start_step: dense training with `tx` first (BiP prunes a trained dense
      model; 0: the params given are that model).
    score_init_scale: scores start at this times |theta|.
    leaf_filter: (path, leaf) -> bool, which kernels get masks.

  Raises:
    ValueError: a bad value, naming it.
  """

  def __init__(self, sparsity: float, *, lr2: float, num_steps: int, start_step: int = 0,
               score_init_scale: float = 1.0, leaf_filter: trees.LeafFilter | None = None):
    check_sparsity(sparsity, "sparsity")
    if not lr2 >= 0:
      raise ValueError(f"BiP lr2={lr2!r} must be >= 0.")
    if not isinstance(num_steps, int) or num_steps < 1:
      raise ValueError(f"BiP num_steps={num_steps!r} must be a positive int.")
    if not isinstance(start_step, int) or not 0 <= start_step < num_steps:
      raise ValueError(f"BiP start_step={start_step!r} must be an int in [0, num_steps).")
    if not score_init_scale > 0:
      raise ValueError(f"BiP score_init_scale={score_init_scale!r} must be > 0.")
    self.sparsity, self.lr2 = sparsity, float(lr2)
    self.num_steps, self.start_step = num_steps, start_step
    self.score_init_scale = float(score_init_scale)
    self.leaf_filter = leaf_filter or trees.default_filter

  def init_scores(self, params: PyTree) -> PyTree:
    return learned.learned_tree(
        params, lambda _, w: self.score_init_scale * jnp.abs(w).astype(jnp.float32),
        self.leaf_filter)

  def hard_masks(self, scores: PyTree, params: PyTree) -> PyTree:
    del params
    return learned.topk_by_leaf(jax.tree.map(jnp.abs, scores), self.sparsity)

  @staticmethod
  def is_upper(count: jax.Array, start_step: int) -> jax.Array:
    """Whether update `count` is an upper-level (score) update."""
    return (count - start_step) % 2 == 1

  def learn(self, grads, state, params, tx, score_tx, **extra):
    def lower(state):
      masked = learned.zip_learned(lambda _, g, m: g * m.astype(g.dtype), grads, state.masks,
                                   passthrough=True)
      ups, inner = tx.update(masked, state.inner_state, params, **extra)
      return ups, state._replace(inner_state=inner)

    def upper(state):
      g = score_gradients(grads, params, state.masks, self.lr2)
      ups, score_state = score_tx.update(g, state.score_state, state.scores)
      scores = optax.apply_updates(state.scores, ups)
      new = state._replace(scores=scores, masks=self.hard_masks(scores, params),
                           score_state=score_state)
      return jax.tree.map(jnp.zeros_like, grads), new

    return jax.lax.cond(self.is_upper(state.count, self.start_step), upper, lower, state)
