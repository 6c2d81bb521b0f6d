"""MaskLLM (Fang et al., NeurIPS 2024): N:M masks learned end to end.

For every group of M consecutive weights along a kernel's contraction axes
(`sparsejax.layouts`), the C(M, N) candidate N:M masks (`candidates`) get
one learnable logit each, drawn from N(0, init_std). The training forward
pass multiplies the frozen weights by a soft mask: the candidates averaged
with Gumbel-softmax probabilities

    p = softmax((kappa * logits + gumbel) / tau),    mask = p @ candidates,

with tau annealed linearly from temperature[0] to temperature[1] and kappa
from scale[0] to scale[1] over mask learning (the authors' C4 script:
4 -> 0.05 and 1e2 -> 5e2; their class defaults 4 -> 0.1 and 1e3 -> 1e4).
Evaluation (and the masks the state reports) takes the argmax candidate,
so every group keeps exactly N.

A prior mask (one-shot: magnitude here, or SparseGPT / Wanda masks given
to `init_logits`) shifts each group's logits by
(overlap - 1) * std(logits of the leaf) * prior_strength, where overlap is
the number of weights a candidate shares with the prior's choice.

Logits of a kernel whose grouped view (`layouts.GroupedView`) has shape
(..., L, ...) are (..., L / M, ..., C): the kernel's own axes with the
contraction axis divided by M, candidates last, so they shard like the
kernel (`logit_shardings`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import layouts
from sparsejax import learned
from sparsejax import trees
from sparsejax.selection import nm_mask

PyTree = Any
MAX_CANDIDATES = 256


def candidates(n: int, m: int) -> np.ndarray:
  """The C(m, n) N:M masks of one group, float32 (C, m), in lexicographic
  order of their kept positions (2:4: 1100, 1010, 1001, 0110, 0101, 0011,
  the authors' order).

  >>> candidates(1, 3).tolist()
  [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]

  Raises:
    ValueError: not 1 <= n <= m, or more than MAX_CANDIDATES candidates.
  """
  for name, value in (("n", n), ("m", m)):
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f"MaskLLM {name} must be a Python int, got {value!r}.")
  if not 1 <= n <= m:
    raise ValueError(f"MaskLLM needs 1 <= N <= M, got N={n}, M={m}.")
  if math.comb(m, n) > MAX_CANDIDATES:
    raise ValueError(f"MaskLLM {n}:{m} has {math.comb(m, n)} candidate masks per group; at most "
                     f"{MAX_CANDIDATES} are enumerated (e.g. 1:4, 2:4, 2:8, 4:8).")
  out = np.zeros((math.comb(m, n), m), np.float32)
  for i, kept in enumerate(itertools.combinations(range(m), n)):
    out[i, list(kept)] = 1.0
  return out


def _pair(value, name: str) -> tuple[float, float]:
  try:
    a, b = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"MaskLLM {name} must be a (start, end) pair of numbers, got {value!r}.") from None
  if not (a > 0 and b > 0):
    raise ValueError(f"MaskLLM {name}={value!r} must be positive.")
  return a, b


class MaskLLM(learned.LearnedMask):
  """Learnable N:M masks over frozen weights (see the module docstring).

  >>> method = MaskLLM(2, 4, num_steps=10, prior=None)
  >>> params = {'w': jnp.ones((8, 3))}
  >>> state = jax.jit(method.wrap(None, optax.adam(1e-2)).init)(params)
  >>> state.scores['w'].shape, state.masks['w'].reshape(2, 4, 3).sum(1).tolist()
  ((2, 3, 6), [[2, 2, 2], [2, 2, 2]])

  Args:
    n, m: keep n of every m (candidates enumerated: `candidates`).
    num_steps: total steps of the run (the schedules end there).
    start_step: steps of dense training with `tx` first; 0: weights frozen
      from the start (a pretrained model).
    temperature: (start, end) of tau, linear over mask learning.
    scale: (start, end) of kappa, linear over mask learning.
    prior: 'magnitude' (the N:M magnitude mask) or None.
    prior_strength: multiplies the prior's shift (the authors' 3.0).
    init_std: std of the logits' normal initialisation.
    seed: seeds the initial logits and the Gumbel noise of each step.
    axes: contraction axes (`sparsejax.layouts` forms); default rule.
    leaf_filter: (path, leaf) -> bool, which kernels get masks.

  Raises:
    ValueError: a bad value, naming it.
  """

  def __init__(self, n: int = 2, m: int = 4, *, num_steps: int, start_step: int = 0,
               temperature: Sequence[float] = (4.0, 0.05), scale: Sequence[float] = (1e2, 5e2),
               prior: str | None = "magnitude", prior_strength: float = 3.0,
               init_std: float = 0.01, seed: int = 0, axes: layouts.AxesSpec = None,
               leaf_filter: trees.LeafFilter | None = None):
    self.candidates = candidates(n, m)
    self.n, self.m = n, m
    if not isinstance(num_steps, int) or num_steps < 1:
      raise ValueError(f"MaskLLM num_steps={num_steps!r} must be a positive int.")
    if not isinstance(start_step, int) or not 0 <= start_step < num_steps:
      raise ValueError(f"MaskLLM start_step={start_step!r} must be an int in [0, num_steps).")
    if prior not in ("magnitude", None):
      raise ValueError(f"MaskLLM prior={prior!r} must be 'magnitude' or None.")
    if not prior_strength >= 0:
      raise ValueError(f"MaskLLM prior_strength={prior_strength!r} must be >= 0.")
    if not init_std > 0:
      raise ValueError(f"MaskLLM init_std={init_std!r} must be > 0.")
    self.num_steps, self.start_step = num_steps, start_step
    self.temperature = _pair(temperature, "temperature")
    self.scale = _pair(scale, "scale")
    self.prior, self.prior_strength, self.init_std = prior, float(prior_strength), float(init_std)
    self.seed = seed
    self.axes = axes
    self.leaf_filter = leaf_filter or trees.default_filter

  # -- layout --------------------------------------------------------------
  def view(self, path: str, shape: Sequence[int]) -> layouts.GroupedView:
    """The grouped view of a kernel; its contraction length must divide by M."""
    view = layouts.GroupedView(shape, layouts.leaf_axes(self.axes, path, shape))
    if view.length % self.m:
      raise ValueError(f"MaskLLM: the contraction axes of '{path}' (shape {tuple(shape)}) have "
                       f"{view.length} entries, not divisible by M={self.m}.")
    return view

  def group(self, x: jax.Array, view: layouts.GroupedView) -> jax.Array:
    """A kernel-shaped array as (..., L / M, ..., M): each group's M last."""
    v = view.to_view(x)
    a = view.axis
    v = v.reshape(v.shape[:a] + (v.shape[a] // self.m, self.m) + v.shape[a + 1:])
    return jnp.moveaxis(v, a + 1, -1)

  def ungroup(self, g: jax.Array, view: layouts.GroupedView) -> jax.Array:
    """The inverse of `group`."""
    v = jnp.moveaxis(g, -1, view.axis + 1)
    return view.from_view(v.reshape(view.shape))

  def logit_shape(self, path: str, shape: Sequence[int]) -> tuple[int, ...]:
    """(..., L / M, ..., C) for a kernel of `shape`."""
    view = self.view(path, shape)
    s = list(view.shape)
    s[view.axis] //= self.m
    return tuple(s) + (len(self.candidates),)

  # -- logits and masks ----------------------------------------------------
  def init_logits(self, params: PyTree, prior_masks: PyTree | None = None) -> PyTree:
    """Initial logits: N(0, init_std), shifted towards a prior mask.

    `prior_masks` (bool, like params; None where not learned) is the prior
    (e.g. SparseGPT's 2:4 masks); without it, the N:M magnitude mask when
    `prior='magnitude'`, else no prior.

    Raises:
      ValueError: a prior mask missing for a learned kernel, or shaped
        differently (names the leaf).
    """
    cand = jnp.asarray(self.candidates)
    priors = {}
    if prior_masks is not None:
      priors = {leaf.path: leaf.value for leaf in trees.named_leaves(prior_masks)}
    paths = [leaf.path for leaf in trees.named_leaves(params)]
    index = {path: i for i, path in enumerate(paths)}

    def one(path, w):
      view = self.view(path, w.shape)
      logits = self.init_std * learned.normal_noise(self.logit_shape(path, w.shape), self.seed,
                                                    index[path])
      if prior_masks is not None:
        if path not in priors or tuple(priors[path].shape) != tuple(w.shape):
          raise ValueError(f"prior mask of '{path}': missing or not shaped {tuple(w.shape)}.")
        prior = priors[path]
      elif self.prior == "magnitude":
        prior = view.from_view(nm_mask(jnp.abs(view.to_view(w)), self.n, self.m, axis=view.axis))
      else:
        return logits
      overlap = self.group(jnp.asarray(prior, jnp.float32), view) @ cand.T
      return logits + (overlap - 1.0) * jnp.std(logits) * self.prior_strength

    return learned.learned_tree(params, one, self.leaf_filter)

  def init_scores(self, params: PyTree) -> PyTree:
    return self.init_logits(params)

  def hard_masks(self, scores: PyTree, params: PyTree) -> PyTree:
    """The argmax candidate of each group, as bool masks like the params."""
    cand = jnp.asarray(self.candidates) > 0
    return learned.zip_learned(
        lambda path, w, logits: self.ungroup(cand[jnp.argmax(logits, axis=-1)],
                                             self.view(path, w.shape)),
        params, scores)

  def schedule(self, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(tau, kappa) at update `count`: linear from start to end values."""
    t = learned.progress(count, self.start_step, self.num_steps)
    (t0, t1), (k0, k1) = self.temperature, self.scale
    return t0 + (t1 - t0) * t, k0 + (k1 - k0) * t

  def soft_masks(self, logits: PyTree, params: PyTree, count: jax.Array) -> PyTree:
    """Gumbel-softmax masks (float, like the params; None where not
    learned) at update `count`, with that step's noise."""
    tau, kappa = self.schedule(count)
    cand = jnp.asarray(self.candidates)
    paths = [leaf.path for leaf in trees.named_leaves(params)]
    index = {path: i for i, path in enumerate(paths)}

    def one(path, w, lg):
      noise = learned.gumbel_noise(lg.shape, self.seed, index[path], count)
      probs = jax.nn.softmax((kappa * lg + noise) / tau, axis=-1)
      return self.ungroup(probs @ cand, self.view(path, w.shape))

    return learned.zip_learned(one, params, logits)

  def train_masks(self, state: learned.LearnedMaskState, params: PyTree) -> PyTree:
    return self.soft_masks(state.scores, params, state.count)

  def logit_gradients(self, grads: PyTree, params: PyTree, logits: PyTree,
                      count: jax.Array) -> PyTree:
    """dL/dlogits from g = dL/dW_eff (W_eff = W * soft mask): the chain rule
    through the Gumbel softmax, with the noise of update `count`."""
    cotangent = learned.zip_learned(lambda _, g, w, lg: g * w, grads, params, logits)

    _, vjp = jax.vjp(lambda lg: self.soft_masks(lg, params, count), logits)
    return vjp(cotangent)[0]

  def learn(self, grads, state, params, tx, score_tx, **extra):
    del tx, extra
    g = self.logit_gradients(grads, params, state.scores, state.count)
    ups, score_state = score_tx.update(g, state.score_state, state.scores)
    scores = optax.apply_updates(state.scores, ups)
    new = state._replace(scores=scores, masks=self.hard_masks(scores, params),
                         score_state=score_state)
    return jax.tree.map(jnp.zeros_like, grads), new

  def logit_shardings(self, param_shardings: PyTree, params: PyTree) -> PyTree:
    """A `NamedSharding` per logits leaf that splits it like its kernel: the
    kernel's spec on the view's axes (the contraction axis keeps its
    sharding where L / M still divides), None on the candidates axis."""
    def one(path, w, sharding):
      view = self.view(path, w.shape)
      spec = tuple(sharding.spec) + (None,) * (len(w.shape) - len(sharding.spec))
      moved = [spec[a] for a in view.perm]
      a, merged = view.axis, len(view.moved_shape) - len(view.shape) + 1
      group = moved[a:a + merged]
      first = group[0] if all(s is None for s in group[1:]) else None
      out = moved[:a] + [first] + moved[a + merged:]
      lshape = self.logit_shape(path, w.shape)
      if out[a] is not None:
        names = out[a] if isinstance(out[a], tuple) else (out[a],)
        if lshape[a] % math.prod(sharding.mesh.shape[nm] for nm in names):
          out[a] = None
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*out, None))

    shardings = jax.tree.leaves(param_shardings, is_leaf=lambda x: x is None)
    flat = jax.tree.flatten(params, is_leaf=trees.is_empty)[0]
    assert len(flat) == len(shardings), "param_shardings must have the structure of params"
    chosen = learned.learned_tree(params, lambda p, x: x, self.leaf_filter)
    return learned.zip_learned(lambda path, w, _, s: one(path, w, s), params, chosen,
                               jax.tree.unflatten(jax.tree.structure(params, is_leaf=trees.is_empty),
                                                  shardings))
