"""Learned masks: the machinery MaskLLM, Lottery Jackpots and BiP share.

These methods learn the mask instead of reading it off the weights. Each
keeps a *score tree* (real-valued scores, or MaskLLM's candidate logits)
beside the params, one array per learned kernel and None elsewhere, and an
optax optimizer of its own for it. The hard mask is always chosen by the one
selection engine (`sparsejax.selection`: exact top-k per leaf, or N:M).

A method is used through `wrap(tx, score_tx)`, an optax transformation
whose state (`LearnedMaskState`) carries the scores, their optimizer state,
the current hard masks and the weights' optimizer state; and
`forward(params, opt_state)`, the weights the model must see. `forward`
passes the gradient straight through: the gradient a training step takes
with respect to the params is the gradient with respect to the weights the
model saw (g = dL/dW_eff). From g each method forms its own gradients:
dL/dm = g * W for a mask m (the straight-through estimator of Hydra,
Jackpots and BiP), or the chain rule through MaskLLM's soft mask.

Before `start_step` the wrapper is `tx` on dense weights (pre-training in
the same run); at `start_step` the scores are initialised from the weights
reached, and mask learning begins.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import trees
from sparsejax.counts import check_sparsity
from sparsejax.counts import keep_count
from sparsejax.selection import topk_masks_by_count

PyTree = Any


class LearnedMaskState(NamedTuple):
  """State of a learned-mask wrapper.

  Attributes:
    count: int32 scalar, updates taken so far.
    scores: float32 arrays on learned kernels (shaped like the kernel, or
      MaskLLM's (groups..., candidates) logits), None elsewhere.
    masks: bool arrays like the params on learned kernels, None elsewhere:
      the hard masks now in force.
    score_state: the score optimizer's state (over `scores`).
    inner_state: the weights' optimizer state (over the params).
  """

  count: jax.Array
  scores: PyTree
  masks: PyTree
  score_state: optax.OptState
  inner_state: optax.OptState


def find_learned_state(opt_state: optax.OptState) -> LearnedMaskState:
  """The first `LearnedMaskState` inside an optimizer state (e.g. a chain).

  Raises:
    ValueError: the state holds none.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LearnedMaskState))
           if isinstance(s, LearnedMaskState)]
  if not found:
    raise ValueError("no LearnedMaskState in this optimizer state: was the optimizer built "
                     "with a learned-mask method's .wrap(tx, score_tx)?")
  return found[0]


def with_scores(opt_state: optax.OptState, scores: PyTree, method: "LearnedMask",
                params: PyTree, score_tx: optax.GradientTransformation) -> optax.OptState:
  """The optimizer state with new `scores` (and the hard masks they give).

  Use it to start from scores made elsewhere (MaskLLM logits from a
  SparseGPT prior; restored scores). The score optimizer's state is reset
  (`score_tx.init`); the count is kept.

  Raises:
    ValueError: no LearnedMaskState, or `scores` does not have the paths and
      shapes of the scores it replaces (names the leaf).
  """
  state = find_learned_state(opt_state)
  old = {leaf.path: leaf.value for leaf in trees.named_leaves(state.scores)}
  new = {leaf.path: leaf.value for leaf in trees.named_leaves(scores)}
  if set(old) != set(new):
    raise ValueError(f"scores for {sorted(set(new) ^ set(old))[0]!r}: the new scores and the "
                     "state's differ in their leaves.")
  for path, value in new.items():
    if tuple(value.shape) != tuple(old[path].shape):
      raise ValueError(f"scores of {path!r} have shape {tuple(value.shape)}, the state's "
                       f"{tuple(old[path].shape)}.")
  scores = jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), scores)
  replaced = state._replace(scores=scores, masks=method.hard_masks(scores, params),
                            score_state=score_tx.init(scores))
  return jax.tree.map(lambda s: replaced if s is state else s, opt_state,
                      is_leaf=lambda x: isinstance(x, LearnedMaskState))


def learned_tree(params: PyTree, fn: Callable[[str, jax.Array], Any],
                 leaf_filter: trees.LeafFilter | None = None) -> PyTree:
  """`fn(path, leaf)` on every learned leaf (`leaf_filter`, default
  `sparsejax.default_filter`: kernels of 2 or more dims), None elsewhere;
  the structure of `params`.

  >>> learned_tree({'b': jnp.zeros(2), 'w': jnp.ones((2, 2))}, lambda p, x: x.sum())
  {'b': None, 'w': Array(4., dtype=float32)}
  """
  chosen = leaf_filter or trees.default_filter
  flat, treedef = jax.tree.flatten(params, is_leaf=trees.is_empty)
  named = trees.named_leaves(params, keep_none=True)
  return jax.tree.unflatten(treedef, [
      None if trees.is_empty(x) or not chosen(leaf.path, x) else fn(leaf.path, x)
      for leaf, x in zip(named, flat)])


def zip_learned(fn: Callable[..., Any], params: PyTree, *others: PyTree,
                passthrough: bool = False) -> PyTree:
  """`fn(path, param, *other)` on leaves where every other tree holds an
  array; elsewhere None, or the param itself with `passthrough` (the others
  are trees like params with None where not learned).

  >>> zip_learned(lambda path, w, m: w * m, {'b': 1., 'w': 2.}, {'b': None, 'w': 3.}, passthrough=True)
  {'b': 1.0, 'w': 6.0}
  """
  flat, treedef = jax.tree.flatten(params, is_leaf=trees.is_empty)
  named = trees.named_leaves(params, keep_none=True)
  rest = [jax.tree.flatten(o, is_leaf=trees.is_empty)[0] for o in others]
  out = []
  for i, (leaf, x) in enumerate(zip(named, flat)):
    extra = [r[i] for r in rest]
    if trees.is_empty(x) or any(trees.is_empty(e) for e in extra):
      out.append(x if passthrough else None)
    else:
      out.append(fn(leaf.path, x, *extra))
  return jax.tree.unflatten(treedef, out)


def _mix(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (Wellons' lowbias32): every output bit depends on
  every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def uniform_noise(shape: tuple[int, ...], *words) -> jax.Array:
  """Uniform float32 in (0, 1), a pure function of (`words`, position):
  each entry hashes its flat index with the words (ints, traced or not).

  Counter-based and elementwise, so the same numbers come out under any
  sharding, jitted or not; chosen over `jax.random` for the per-step
  Gumbel noise because threefry takes seconds to compile on CPU.

  The top 23 bits of the hash give (k + 0.5) / 2**23, k < 2**23: every value
  is exact in float32, so u is never 0 or 1 (with 24 bits, k = 2**24 - 1
  rounded to u = 1.0, one entry in 2**24, and the Gumbel noise
  -log(-log(u)) became inf and MaskLLM's soft masks NaN on long runs).

  >>> u = uniform_noise((1000,), 3, 4)
  >>> bool((u > 0).all() & (u < 1).all()), round(float(u.mean()), 1)
  (True, 0.5)
  """
  base = jnp.uint32(0x9E3779B9)
  for word in words:
    base = _mix(base ^ jnp.asarray(word).astype(jnp.uint32))
  index = jax.lax.broadcasted_iota(jnp.uint32, (max(1, int(np.prod(shape))),), 0)
  bits = _mix(_mix(index + base))
  u = ((bits >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-23)
  return u[:int(np.prod(shape))].reshape(shape)


def normal_noise(shape: tuple[int, ...], *words) -> jax.Array:
  """Standard normal float32 from two `uniform_noise` streams (Box-Muller)."""
  u1 = uniform_noise(shape, *words, 1)
  u2 = uniform_noise(shape, *words, 2)
  return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * np.pi * u2)


def gumbel_noise(shape: tuple[int, ...], *words) -> jax.Array:
  """Standard Gumbel float32: -log(-log(u)) of `uniform_noise`."""
  return -jnp.log(-jnp.log(uniform_noise(shape, *words)))


def straight_through(param: jax.Array, mask: jax.Array) -> jax.Array:
  """param * mask in the forward pass; the gradient reaches `param` unchanged
  (it is the gradient with respect to the product, also where mask is 0).

  >>> jax.grad(lambda w: straight_through(w, jnp.array([1., 0.])).sum() * 3.)(jnp.ones(2)).tolist()
  [3.0, 3.0]
  """
  product = param * mask.astype(param.dtype)
  return param + jax.lax.stop_gradient(product - param)


def topk_by_leaf(scores: PyTree, sparsity: float, candidates: PyTree | None = None) -> PyTree:
  """Per leaf, exactly round((1 - sparsity) * size) True at the largest
  scores (ties to the lower flat index), by the sort-free selection; None
  stays None.

  >>> topk_by_leaf({'w': jnp.array([3., 1., 2., 0.])}, 0.5)['w'].tolist()
  [True, False, True, False]
  """
  check_sparsity(sparsity, "sparsity")
  flat, treedef = jax.tree.flatten(scores, is_leaf=trees.is_empty)
  live = [i for i, s in enumerate(flat) if not trees.is_empty(s)]
  keep = [keep_count(flat[i].size, sparsity) for i in live]
  cands = None
  if candidates is not None:
    cflat = jax.tree.flatten(candidates, is_leaf=trees.is_empty)[0]
    cands = [cflat[i] for i in live]
  masks = topk_masks_by_count([flat[i] for i in live], keep, cands) if live else []
  out = list(flat)
  for i, m in zip(live, masks):
    out[i] = m
  return jax.tree.unflatten(treedef, out)


def mask_gradients(grads: PyTree, params: PyTree, masks: PyTree) -> PyTree:
  """dL/dm = g * W on learned leaves (None elsewhere), from the gradient g
  with respect to the weights the model saw: the straight-through gradient
  of a score whose top-k is the mask."""
  return _on_learned(lambda g, w: g * w, masks, grads, params)


def _on_learned(fn, like: PyTree, *trees_: PyTree) -> PyTree:
  """fn(*leaves) where `like` holds an array, None where it holds None."""
  flat_like, treedef = jax.tree.flatten(like, is_leaf=trees.is_empty)
  flats = [jax.tree.flatten(t, is_leaf=trees.is_empty)[0] for t in trees_]
  return jax.tree.unflatten(treedef, [
      None if trees.is_empty(x) else fn(*(f[i] for f in flats)) for i, x in enumerate(flat_like)])


def progress(count: jax.Array, start_step: int, num_steps: int) -> jax.Array:
  """(count - start_step) / (num_steps - start_step), clipped to [0, 1]: how
  far mask learning is (MaskLLM's schedules are linear in it)."""
  span = max(num_steps - start_step, 1)
  return jnp.clip((count - start_step).astype(jnp.float32) / span, 0.0, 1.0)


class LearnedMask:
  """Base of the learned-mask methods: `wrap`, `forward`, `eval_forward`.

  A subclass defines `init_scores(params)`, `hard_masks(scores, params)`,
  `train_masks(scores, masks, params, count)` (the masks the training
  forward pass uses: hard, or MaskLLM's soft ones) and
  `learn(grads, state, params)` -> (param updates, new state) for one step
  after `start_step`.
  """

  start_step: int = 0

  def init_scores(self, params: PyTree) -> PyTree:
    """The learned scores (or logits) at the start, a tree over the pruned leaves."""
    raise NotImplementedError

  def hard_masks(self, scores: PyTree, params: PyTree) -> PyTree:
    """The bool masks the scores select (used for evaluation and saved with the weights)."""
    raise NotImplementedError

  def train_masks(self, state: LearnedMaskState, params: PyTree) -> PyTree:
    """The masks the training forward uses: the hard masks unless a method relaxes them."""
    del params
    return state.masks

  def learn(self, grads, state, params, tx, score_tx):
    """One step of the method: (weight updates, new state) from the step's gradients."""
    raise NotImplementedError

  def wrap(self, tx: optax.GradientTransformation | None,
           score_tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """The optax transformation: `tx` trains the weights (before `start_step`,
    and BiP's lower level; None: weights frozen from step 0), `score_tx`
    the scores.

    Its `update` expects the gradient with respect to the weights the model
    saw, which is what the gradient with respect to the params is when the
    model sees `forward(params, opt_state)`.
    """
    if tx is None:
      if self.start_step > 0:
        raise ValueError(f"start_step={self.start_step} trains the weights first: give tx.")
      tx = optax.set_to_zero()
    tx = optax.with_extra_args_support(tx)

    def init(params):
      scores = self.init_scores(params)
      return LearnedMaskState(count=jnp.zeros((), jnp.int32), scores=scores,
                              masks=self.hard_masks(scores, params),
                              score_state=score_tx.init(scores), inner_state=tx.init(params))

    def update(updates, state, params=None, **extra):
      if params is None:
        raise ValueError("a learned-mask update needs params: call update(grads, state, params).")

      def dense(state):
        ups, inner = tx.update(updates, state.inner_state, params, **extra)
        return ups, state._replace(inner_state=inner)

      def learning(state):
        def fresh(state):  # scores from the weights reached at start_step
          scores = self.init_scores(params)
          return state._replace(scores=scores, masks=self.hard_masks(scores, params),
                                score_state=score_tx.init(scores))
        if self.start_step > 0:
          state = jax.lax.cond(state.count == self.start_step, fresh, lambda s: s, state)
        return self.learn(updates, state, params, tx, score_tx, **extra)

      if self.start_step > 0:
        ups, new = jax.lax.cond(state.count < self.start_step, dense, learning, state)
      else:
        ups, new = learning(state)
      return ups, new._replace(count=state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)

  def forward(self, params: PyTree, opt_state: optax.OptState) -> PyTree:
    """The weights the model sees in training: dense before `start_step`,
    then masked (MaskLLM: soft masks), gradient straight through to params."""
    state = find_learned_state(opt_state)
    masked = lambda: zip_learned(lambda _, w, m: straight_through(w, m), params,
                                 self.train_masks(state, params), passthrough=True)
    if self.start_step <= 0:
      return masked()
    return jax.lax.cond(state.count < self.start_step, lambda: params, masked)

  def eval_forward(self, params: PyTree, opt_state: optax.OptState) -> PyTree:
    """The weights the model sees in evaluation: masked by the hard masks
    (dense before `start_step`)."""
    state = find_learned_state(opt_state)
    masked = lambda: zip_learned(lambda _, w, m: jnp.where(m, w, jnp.zeros((), w.dtype)),
                                 params, state.masks, passthrough=True)
    if self.start_step <= 0:
      return masked()
    return jax.lax.cond(state.count < self.start_step, lambda: params, masked)
