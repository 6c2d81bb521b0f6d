"""N:M sparse training: STE, SR-STE and progressive gradient flow, as optax + a forward transform.

The params stay dense; the forward pass sees `forward(params, opt_state)`,
per pruned leaf W -> W*(E + (1-E)*beta), E the N:M mask (top n of every m
|w| along the reduction axis). Its gradient reaches the dense W straight
through (STE), plus lambda*(1-E)*W for SR-STE (Zhou et al. 2021). The methods
of Bambhaniya et al. (2024) differ in beta and in the pattern over time:

  step            beta = 0, fixed N:M                       (STE)
  srste           beta = 0, fixed N:M, + lambda*(1-E)*W     (SR-STE)
  mdgf_linear     beta(t) = max(0, 1 - alpha*t)             (mask decay)
  mdgf_exp        beta(t) = exp(-alpha*t)
  sdgf_stepwise   beta = 0, (M-1):M -> M/2:M -> ... -> N:M  (structure decay)
  sdgf_geometric  beta = 0, 8N:8M -> 4N:4M -> 2N:2M -> N:M

with the phases of `NMSchedule`: dense first (beta = 1), hard mask last
(beta = 0; by default the mask is fixed and pruned weights are held at
exactly 0 by the optimizer; `finetune_mask='recompute'` instead recomputes it
from the dense weights every step with STE, as the authors' code does).

Usage inside any jitted step::

  nm = NMSparsity.from_method('srste', NMSchedule(2, 4, num_steps))
  tx = nm.wrap(optax.adam(1e-3))
  def loss_fn(params, opt_state, batch):
    return loss(model.apply(nm.forward(params, opt_state), batch))
  grads = jax.grad(loss_fn)(params, opt_state, batch)
  updates, opt_state = tx.update(grads, opt_state, params)

The masks live in the optimizer state (a `sparsejax.PruningState`), computed
inside `update` from the weights the update produces, so the masks in the
state always belong to the current step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import gradual
from sparsejax import layouts
from sparsejax import nm_schedules
from sparsejax import pruning
from sparsejax import trees

PyTree = Any

FLOWS = ("ste", "srste")
METHODS = {  # name: (structure, decay, flow)
    "step": ("fixed", "none", "ste"),
    "srste": ("fixed", "none", "srste"),
    "mdgf_linear": ("fixed", "linear", "ste"),
    "mdgf_exp": ("fixed", "exponential", "ste"),
    "sdgf_stepwise": ("stepwise", "none", "ste"),
    "sdgf_geometric": ("geometric", "none", "ste"),
}


@jax.custom_vjp
def gradient_flow(w: jax.Array, keep: jax.Array, beta: jax.Array, lam: jax.Array) -> jax.Array:
  """W*(E + (1-E)*beta) forward; backward g + lam*(1-E)*W to W (straight through).

  >>> w = jnp.array([3., -1.])
  >>> gradient_flow(w, jnp.array([True, False]), 0.5, 0.0).tolist()
  [3.0, -0.5]
  >>> jax.grad(lambda w: gradient_flow(w, jnp.array([True, False]), 0.0, 0.5).sum())(w).tolist()
  [1.0, 0.5]
  """
  return jnp.where(keep, w, jnp.asarray(beta, w.dtype) * w)


def _flow_fwd(w, keep, beta, lam):
  return gradient_flow(w, keep, beta, lam), (w, keep, beta, lam)


def _flow_bwd(residuals, g):
  w, keep, beta, lam = residuals
  decay = jnp.where(keep, jnp.zeros((), g.dtype), jnp.asarray(lam, g.dtype) * w.astype(g.dtype))
  return g + decay, None, jnp.zeros_like(beta), jnp.zeros_like(lam)


gradient_flow.defvjp(_flow_fwd, _flow_bwd)


@dataclasses.dataclass(frozen=True)
class NMSparsity:
  """N:M sparse training of any optax optimizer.

  Attributes:
    schedule: an `NMSchedule` (pattern, phases, frames, update_every).
    decay: 'none', 'linear' or 'exponential' mask decay of pruned weights.
    flow: 'ste' (gradient straight to W) or 'srste' (plus lambda*(1-E)*W).
    decay_coef: alpha of the mask decay, per step; None (the default) takes
      4 / (sparse-phase steps): linear beta reaches 0 a quarter into the
      sparse phase, exponential beta is e^-1 there and e^-4 at its end.
    srste_lambda: lambda of SR-STE (Zhou et al.: 2e-4).
    axes: the contraction axes of each kernel, along which groups run (see
      `sparsejax.layouts`; None: the default rule for Dense, Conv and
      attention kernels).
    leaf_filter: (path, leaf) -> bool; default: floating arrays with ndim >= 2.
    non_divisible: 'error' or 'dense' for leaves some pattern's M does not
      divide.
  """

  schedule: nm_schedules.NMSchedule
  decay: str = "none"
  flow: str = "ste"
  decay_coef: float | None = None
  srste_lambda: float = 2e-4
  axes: layouts.AxesSpec = None
  leaf_filter: trees.LeafFilter | None = None
  non_divisible: str = "error"

  def __post_init__(self):
    if self.decay not in nm_schedules.DECAYS:
      raise ValueError(f"decay must be one of {nm_schedules.DECAYS}, got {self.decay!r}.")
    if self.flow not in FLOWS:
      raise ValueError(f"flow must be one of {FLOWS}, got {self.flow!r}.")
    if self.decay_coef is not None and not self.decay_coef > 0:
      raise ValueError(f"decay_coef must be > 0 (or None: 4 / sparse-phase steps), "
                       f"got {self.decay_coef!r}.")
    if not self.srste_lambda >= 0:
      raise ValueError(f"srste_lambda must be >= 0, got {self.srste_lambda!r}.")
    if self.non_divisible not in pruning.NON_DIVISIBLE:
      raise ValueError(
          f"non_divisible must be one of {pruning.NON_DIVISIBLE}, got {self.non_divisible!r}.")

  @property
  def alpha(self) -> float:
    """The mask-decay coefficient in use: `decay_coef`, or 4 / (sparse-phase steps)."""
    if self.decay_coef is not None:
      return float(self.decay_coef)
    return 4.0 / self.schedule.sparse_steps

  @classmethod
  def from_method(cls, method: str, schedule: nm_schedules.NMSchedule, **kwargs) -> "NMSparsity":
    """A method of `sparsejax.nm.METHODS` on `schedule`, whose structure becomes the method's.

    The methods: step, srste, mdgf_linear, mdgf_exp, sdgf_stepwise,
    sdgf_geometric (see the `sparsejax.nm` module docstring).

    >>> nm = NMSparsity.from_method('sdgf_stepwise', NMSchedule(1, 8, 1000))
    >>> nm.schedule.pattern_names()
    ['7:8', '4:8', '2:8', '1:8']
    """
    if method not in METHODS:
      raise ValueError(f"N:M method must be one of {tuple(METHODS)}, got {method!r}.")
    structure, decay, flow = METHODS[method]
    schedule = dataclasses.replace(schedule, structure=structure)
    return cls(schedule, decay=decay, flow=flow, **kwargs)

  def pruned_leaves(self, params: PyTree) -> list[int]:
    """Leaf indices that take N:M masks: every pattern's M divides their axis."""
    s = self.schedule
    try:
      return pruning.nm_leaves(params, [m for _, m in s.patterns], axes=self.axes,
                               leaf_filter=self.leaf_filter, non_divisible=self.non_divisible)
    except ValueError as e:
      if len(s.patterns) == 1:
        raise
      raise ValueError(f"{e} (the {s.structure!r} structure moves through the patterns "
                       f"{s.pattern_names()})") from e

  def masks_at(self, params: PyTree, step) -> PyTree:
    """The N:M masks of `step`'s pattern, from the magnitudes of `params` (traced step ok)."""
    chosen = self.pruned_leaves(params)
    branches = [
        lambda p, n=n, m=m: pruning.nm_masks(p, n, m, axes=self.axes, chosen=chosen)
        for n, m in self.schedule.patterns]
    if len(branches) == 1:
      return branches[0](params)
    return jax.lax.switch(self.schedule.frame(step), branches, params)

  def beta(self, step) -> jax.Array:
    """The forward factor of pruned weights: 1 dense, beta(t) sparse, 0 fine-tuning."""
    s = self.schedule
    decayed = nm_schedules.mask_decay(self.decay, self.alpha, s.decay_time(step))
    return jnp.where(s.is_dense(step), 1.0, jnp.where(s.is_finetune(step), 0.0, decayed))

  def srste_weight(self, step) -> jax.Array:
    """lambda of SR-STE in the sparse phase, else 0."""
    s = self.schedule
    sparse = ~s.is_dense(step) & ~s.is_finetune(step)
    lam = self.srste_lambda if self.flow == "srste" else 0.0
    return jnp.where(sparse, jnp.float32(lam), jnp.float32(0.0))

  def forward(self, params: PyTree, opt_state: optax.OptState) -> PyTree:
    """The weights the forward pass uses at the optimizer state's step.

    Differentiate through it: the gradient reaches the dense params as the
    method prescribes. Unpruned leaves pass through unchanged.
    """
    count = gradual.find_pruning_state(opt_state).count
    beta, lam = self.beta(count), self.srste_weight(count)
    return trees.map_with_masks(lambda w, keep: w if keep is None else
                                gradient_flow(w, keep, beta, lam),
                                params, gradual.state_masks(opt_state))

  def wrap(self, inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner`: masks follow the schedule; a hard mask holds pruned weights at 0.

    The wrapper must produce the final updates (do not chain transforms
    after it), as for `GradualMagnitudePruning`.
    """
    inner = optax.with_extra_args_support(inner)
    schedule = self.schedule

    def init_fn(params):
      chosen = self.pruned_leaves(params)  # raises here, naming a leaf that cannot be grouped
      if schedule.dense_steps == 0:
        masks = self.masks_at(params, 0)
      else:
        masks = pruning.dense_masks(params, chosen)
      return gradual.PruningState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
      if params is None:
        raise ValueError("NMSparsity needs params: call tx.update(grads, opt_state, params).")
      # Only a hard mask (the fixed fine-tune, the end of training) zeroes
      # pruned weights; before it, STE trains every weight.
      hard_only = lambda masks, hard: jax.tree.map(lambda m: m | ~hard, masks)
      grads = gradual.zero_pruned(updates, hard_only(state.masks, schedule.is_hard(state.count)))
      inner_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
      step = optax.safe_int32_increment(state.count)
      update = schedule.is_update_step(step)
      fresh = lambda: self.masks_at(optax.apply_updates(params, inner_updates), step)
      if schedule.update_every == 1:
        # Masks recomputed on every sparse step: computed on every step and
        # selected elementwise, so XLA fuses the N:M selection with the
        # optimizer's update. A conditional would need the updates written
        # out in full as its operand (the step's temporaries were 1.67x the
        # dense step's for a 2M-weight MLP, 1.22x this way); the price is
        # the selection (~0.1 dense step) on the dense and fine-tune steps.
        masks = jax.tree.map(lambda new, old: jnp.where(update, new, old), fresh(), state.masks)
      else:
        masks = jax.lax.cond(update, fresh, lambda: state.masks)
      new_updates = gradual.updates_to_zero(
          inner_updates, params, hard_only(masks, schedule.is_hard(step)))
      return new_updates, gradual.PruningState(step, masks, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def max_nonzeros_per_group(params: PyTree, masks: PyTree, m: int,
                           axes: layouts.AxesSpec = None) -> dict[str, int]:
  """For each masked leaf, the most nonzero weights in any group of m along its contraction axes.

  An independent check (NumPy, on the host) that trained weights are N:M:
  every value is <= N. `axes` is the rule of `sparsejax.layouts` (None: the
  default rule); several contraction axes are read in row-major order.

  >>> max_nonzeros_per_group({'w': np.array([[1.], [0.], [3.], [0.]])},
  ...                        {'w': np.ones((4, 1), bool)}, 4)
  {'w': 2}
  """
  out = {}
  for leaf in trees.leaves_with_masks(params, masks):
    if leaf.mask is None:
      continue
    w = np.asarray(leaf.param)
    contraction = layouts.leaf_axes(axes, leaf.path, w.shape)
    others = [a for a in range(w.ndim) if a not in contraction]
    w = np.transpose(w, others + list(contraction)).reshape(
        (-1, int(np.prod([w.shape[a] for a in contraction]))))
    groups = (w != 0).reshape(w.shape[0], -1, m)
    out[leaf.path] = int(groups.sum(axis=-1).max())
  return out
