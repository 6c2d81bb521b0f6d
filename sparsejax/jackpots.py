"""Lottery Jackpots (Chen et al.): a mask searched for in frozen weights.

The weights stay at their pretrained (or random) values. Every learned
kernel gets a score per weight, initialised to 1.0 where magnitude pruning
at `sparsity` keeps the weight and 0.99 elsewhere; the forward pass uses the
weights of the top-k scores (k = round((1 - sparsity) * size) per kernel,
the exact sort-free selection), and the scores learn by the straight-through
gradient dL/ds = dL/dm = g * W.

After each score update, the *short restriction* changes the mask by swaps
only: an inactive weight whose score now ranks in the top k comes in, an
active one that fell out of it goes out, so every kernel keeps exactly k.
With `swap_rate` < 1 only the ceil(rate * crossings) best of each (highest
incoming, lowest outgoing scores) swap, as the authors' `ls_pop_up(rate)`.
No swaps from `swap_end_step` on (the authors: none in the last epoch).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax import learned
from sparsejax import trees
from sparsejax.counts import check_sparsity
from sparsejax.selection import topk_masks_by_count

PyTree = Any


def short_restriction(scores: PyTree, masks: PyTree, sparsity, swap_rate: float = 1.0) -> PyTree:
  """The masks after one round of swaps (see the module docstring).

  Incoming: inactive weights in the top k of the scores; outgoing: active
  weights outside it (as many). Of c crossings, all swap when c <= 1 or
  `swap_rate` is 1, else the ceil(swap_rate * c) highest-scored incoming and
  lowest-scored outgoing. Counts never change.

  >>> short_restriction({'w': jnp.array([0.5, 2., 1., 3.])},
  ...                   {'w': jnp.array([True, False, True, False])}, 0.5)['w'].tolist()
  [False, True, False, True]
  """
  check_sparsity(sparsity, "sparsity")
  if not 0.0 < swap_rate <= 1.0:
    raise ValueError(f"swap_rate={swap_rate!r} must be in (0, 1].")
  top = learned.topk_by_leaf(scores, sparsity)
  if swap_rate == 1.0:
    return top
  flat_s, treedef = jax.tree.flatten(scores, is_leaf=trees.is_empty)
  flat_m = jax.tree.flatten(masks, is_leaf=trees.is_empty)[0]
  flat_t = jax.tree.flatten(top, is_leaf=trees.is_empty)[0]
  live = [i for i, s in enumerate(flat_s) if not trees.is_empty(s)]
  incoming = [flat_t[i] & ~flat_m[i] for i in live]
  outgoing = [flat_m[i] & ~flat_t[i] for i in live]
  crossings = [jnp.sum(x, dtype=jnp.int32) for x in incoming]
  swaps = [jnp.where(c > 1, jnp.ceil(swap_rate * c).astype(jnp.int32), c) for c in crossings]
  come = topk_masks_by_count([flat_s[i] for i in live], swaps, incoming)
  go = topk_masks_by_count([-flat_s[i] for i in live], swaps, outgoing)
  out = list(flat_s)
  for j, i in enumerate(live):
    out[i] = (flat_m[i] | (come[j] & incoming[j])) & ~(go[j] & outgoing[j])
  return jax.tree.unflatten(treedef, out)


class LotteryJackpots(learned.LearnedMask):
  """Lottery Jackpots over frozen weights (see the module docstring).

  >>> method = LotteryJackpots(0.5, num_steps=4)
  >>> params = {'w': jnp.array([[1.], [-4.], [3.], [-2.]])}
  >>> state = method.wrap(None, optax.sgd(0.1)).init(params)
  >>> state.scores['w'].ravel().tolist(), state.masks['w'].ravel().tolist()
  ([0.9900000095367432, 1.0, 1.0, 0.9900000095367432], [False, True, True, False])

  Args:
    sparsity: fraction pruned in every learned kernel.
    num_steps: total steps of the run.
    swap_end_step: no swaps from this update on (default num_steps: swaps
      to the end); the authors stop them for the last epoch.
    swap_rate: fraction of the crossings swapped per update, in (0, 1].
    start_step: dense training with `tx` first; 0: weights frozen from the
      start (a pretrained model).
    kept_score, pruned_score: the initial scores (1.0 and 0.99).
    leaf_filter: (path, leaf) -> bool, which kernels get masks.

  Raises:
    ValueError: a bad value, naming it.
  """

  def __init__(self, sparsity: float, *, num_steps: int, swap_end_step: int | None = None,
               swap_rate: float = 1.0, start_step: int = 0, kept_score: float = 1.0,
               pruned_score: float = 0.99, leaf_filter: trees.LeafFilter | None = None):
    check_sparsity(sparsity, "sparsity")
    if not isinstance(num_steps, int) or num_steps < 1:
      raise ValueError(f"LotteryJackpots num_steps={num_steps!r} must be a positive int.")
    if not isinstance(start_step, int) or not 0 <= start_step < num_steps:
      raise ValueError(f"LotteryJackpots start_step={start_step!r} must be an int in "
                       "[0, num_steps).")
    swap_end_step = num_steps if swap_end_step is None else swap_end_step
    if not isinstance(swap_end_step, int) or not start_step <= swap_end_step <= num_steps:
      raise ValueError(f"LotteryJackpots swap_end_step={swap_end_step!r} must be an int in "
                       f"[start_step, num_steps] = [{start_step}, {num_steps}].")
    if not 0.0 < swap_rate <= 1.0:
      raise ValueError(f"LotteryJackpots swap_rate={swap_rate!r} must be in (0, 1].")
    if not kept_score > pruned_score:
      raise ValueError(f"LotteryJackpots kept_score={kept_score!r} must exceed "
                       f"pruned_score={pruned_score!r}.")
    self.sparsity, self.num_steps, self.start_step = sparsity, num_steps, start_step
    self.swap_end_step, self.swap_rate = swap_end_step, float(swap_rate)
    self.kept_score, self.pruned_score = float(kept_score), float(pruned_score)
    self.leaf_filter = leaf_filter or trees.default_filter

  def init_scores(self, params: PyTree) -> PyTree:
    """kept_score where magnitude pruning keeps the weight, pruned_score elsewhere."""
    magnitudes = learned.learned_tree(params, lambda _, w: jnp.abs(w).astype(jnp.float32),
                                      self.leaf_filter)
    kept = learned.topk_by_leaf(magnitudes, self.sparsity)
    return jax.tree.map(lambda m: jnp.where(m, jnp.float32(self.kept_score),
                                            jnp.float32(self.pruned_score)), kept)

  def hard_masks(self, scores: PyTree, params: PyTree) -> PyTree:
    del params
    return learned.topk_by_leaf(scores, self.sparsity)

  def learn(self, grads, state, params, tx, score_tx, **extra):
    del tx, extra
    g = learned.mask_gradients(grads, params, state.masks)
    ups, score_state = score_tx.update(g, state.score_state, state.scores)
    scores = optax.apply_updates(state.scores, ups)
    masks = jax.lax.cond(
        state.count < self.swap_end_step,
        lambda: short_restriction(scores, state.masks, self.sparsity, self.swap_rate),
        lambda: state.masks)
    new = state._replace(scores=scores, masks=masks, score_state=score_state)
    return jax.tree.map(jnp.zeros_like, grads), new
