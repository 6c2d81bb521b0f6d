"""Dynamic sparse training: drop and grow (SET, RigL) and GraNet, as an optax wrapper.

Every `update_every` steps until `end_step`, each masked leaf drops the
floor(f * active) (or ceil) active weights of smallest magnitude and grows
as many among the weights inactive after the drop: at random (SET, Mocanu
et al. 2018) or by largest |dense gradient| (RigL, Evci et al. 2020). The
drop fraction f decays from `drop_fraction` (alpha) by a cosine to
`min_drop_fraction` (RigL: 0) at `end_step`, as in RigL. A grown weight
starts at 0.0 with its optimizer moments reset to 0; a weight dropped and
grown back in the same update is left as it was (RigL's rule), so per leaf
the count of active weights never changes (with `regrow_scope='global'`,
the total count). On an update step each method does what its authors'
code does (google-research/rigl, `rigl/sparse_optimizers.py`): RigL
(`SparseRigLOptimizer`) only drops and grows, the mask update replacing the
optimizer step; SET (`SparseSETOptimizer`) takes the optimizer step and then
drops and grows from the stepped weights, and so does GraNet's code.
`gradient_on_update` picks either for any method (default: SET's order for
grow='random' and for a growing schedule (GraNet), RigL's otherwise).

With a growing sparsity schedule this is GraNet (Liu et al. 2021): on the
same update steps the masks first follow the schedule by magnitude (Zhu &
Gupta, `GradualMagnitudePruning.masks_at`), then drop and regrow. GraNet's
code (VITA-Group/GraNet, `sparselearning/core.py`) sets three things
differently from RigL, each an option here: its death rate decays by a
cosine from 0.5 to 0.005 over the whole run and drop and grow go on to
its end (`drop_fraction=0.5, min_drop_fraction=0.005, end_step=` the
number of steps), it drops ceil(f * active) (`rounding='ceil'`), and its
global variant prunes globally but regrows per layer
(`allocation='global', regrow_scope='leaf'`).

Both run the one pipeline: magnitude and gradient scores, the allocation's
per-leaf counts, and `selection.topk_masks_by_count` for the exact counts
of both halves of an update.

The wrapper needs the gradient of the loss with respect to the weights as
the network sees them, also where pruned (RigL's dense gradient): compute it
with the forward on `sparsejax.ste_masked_params(params, opt_state)` (masked
values, straight-through gradient). `masked_params` would give pruned
weights a zero gradient, and RigL would grow by position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import allocation as allocation_lib
from sparsejax import gradual
from sparsejax import keys
from sparsejax import pruning
from sparsejax import schedules
from sparsejax import selection
from sparsejax import trees

PyTree = Any

GROW = ("gradient", "random")
DECAYS = ("cosine", "constant")
ROUNDINGS = ("floor", "ceil")
REGROW_SCOPES = ("leaf", "global")


def cosine_drop_fraction(alpha, step, end_step: int, minimum=0.0) -> jax.Array:
  """minimum + (alpha - minimum) / 2 * (1 + cos(pi * min(step, end) / end)).

  RigL's drop fraction (minimum 0); GraNet's death rate with minimum 0.005
  (its `CosineDecay`, PyTorch's `CosineAnnealingLR` with eta_min=0.005).

  >>> [round(float(cosine_drop_fraction(0.3, t, 100)), 4) for t in (0, 50, 100, 150)]
  [0.3, 0.15, 0.0, 0.0]
  >>> round(float(cosine_drop_fraction(0.5, 100, 100, minimum=0.005)), 4)
  0.005
  """
  t = jnp.minimum(jnp.asarray(step, jnp.float32), end_step)
  low = jnp.float32(minimum)
  return low + (jnp.float32(alpha) - low) / 2 * (
      1 + jnp.cos(jnp.float32(math.pi) * t / end_step))


def drop_and_grow(params: PyTree, masks: PyTree, grow_scores: PyTree, fraction,
                  shared: bool = False, rounding: str = "floor") -> tuple[PyTree, PyTree]:
  """One drop-and-grow update of `masks`; returns (new masks, grown).

  Each masked leaf with n active weights drops the floor(fraction * n)
  (RigL; with rounding='ceil', GraNet's ceil(fraction * n), counted in
  float32) active ones of smallest |param| and grows as many, with the largest
  `grow_scores`, among the entries inactive after the drop (a just-dropped
  weight may come back). `grown` marks the entries that were inactive and
  are now active (None where a leaf is not masked). With `shared`, counts
  are one total across leaves (global) instead of one per leaf. Ties go to
  the lower flat index.

  >>> w = {'k': jnp.array([[3., -1.], [0., 2.]])}
  >>> m = {'k': jnp.array([[True, True], [False, True]])}
  >>> new, grown = drop_and_grow(w, m, {'k': jnp.array([[0., 0.], [5., 0.]])}, 0.5)
  >>> new['k'].tolist(), grown['k'].tolist()
  ([[True, False], [True, True]], [[False, False], [True, False]])

  Raises:
    ValueError: masks or grow scores whose tree does not match params, or an
      unknown rounding.
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding={rounding!r}: use one of {ROUNDINGS}.")
  leaves = [leaf for leaf in trees.leaves_with_masks(params, masks) if leaf.mask is not None]
  trees.check_same_paths(params, grow_scores, what="grow scores")
  score_of = {leaf.path: leaf.value for leaf in trees.named_leaves(grow_scores)}
  active = [leaf.mask for leaf in leaves]
  counts = [keys.count_true(m) for m in active]  # no int32 copy of the masks (XLA:CPU)
  fraction = jnp.asarray(fraction, jnp.float32)
  round_fn = jnp.floor if rounding == "floor" else jnp.ceil
  drop = lambda n: round_fn(n.astype(jnp.float32) * fraction).astype(jnp.int32)
  # |w| is computed inside the selection's passes, never stored.
  magnitudes = [selection.elementwise_scores(jnp.abs, leaf.param) for leaf in leaves]
  grow_by = [jnp.asarray(score_of[leaf.path], jnp.float32) for leaf in leaves]
  if shared:
    total = sum(counts, jnp.int32(0))
    kept = selection.topk_masks_by_count(magnitudes, total - drop(total), active)
    grow = selection.topk_masks_by_count(grow_by, drop(total), [~k for k in kept])
  else:
    kept = selection.topk_masks_by_count(magnitudes, [n - drop(n) for n in counts], active)
    grow = selection.topk_masks_by_count(grow_by, [drop(n) for n in counts], [~k for k in kept])
  new = [k | g for k, g in zip(kept, grow)]
  grown = [g & ~m for g, m in zip(grow, active)]
  by_path = {leaf.path: (n, g) for leaf, n, g in zip(leaves, new, grown)}
  out_new, out_grown = [], []
  for leaf in trees.named_leaves(masks, keep_none=True):
    n, g = by_path.get(leaf.path, (None, None))
    out_new.append(leaf.value if n is None else n)
    out_grown.append(None if g is None else g)
  treedef = jax.tree.structure(masks, is_leaf=trees.is_empty)
  return jax.tree.unflatten(treedef, out_new), jax.tree.unflatten(treedef, out_grown)


def reset_where(opt_state: optax.OptState, init_fn, where: PyTree) -> optax.OptState:
  """`opt_state` with its parameter-shaped leaves (Adam's mu and nu, momentum
  traces) set to 0 where `where` is True (None: leaf untouched, also where
  the parameter itself is None)."""
  return optax.tree_utils.tree_map_params(
      init_fn,
      lambda v, w: v if v is None or w is None else jnp.where(w, jnp.zeros((), v.dtype), v),
      opt_state, where, transform_non_params=lambda v: v, is_leaf=lambda x: x is None)


@dataclasses.dataclass(frozen=True)
class DropAndGrow:
  """SET, RigL or GraNet around any optax optimizer.

  With `regrow=True` passed to `update` the caller promises an update step
  (`is_update_step`); see `wrap`.

  Example (RigL's defaults, 80% sparse, ERK, updates every 100 steps until
  75% of 10,000 steps):

    >>> tx = DropAndGrow(sparsejax.ConstantSchedule(0.8), end_step=7500,
    ...                  allocation='erk', key=jax.random.key(0)).wrap(optax.adam(1e-3))
    >>> # forward on sparsejax.ste_masked_params(params, opt_state)

  Attributes:
    schedule: the sparsity over time: `ConstantSchedule(s)` for SET and
      RigL; a `PolynomialSchedule` for GraNet (its update_frequency should
      be `update_every`).
    end_step: the last step with a drop-and-grow update; the cosine drop
      fraction reaches `min_drop_fraction` there (RigL: 75% of training;
      GraNet: the end of training, its updates going on to the last step).
    grow: 'gradient' (RigL, GraNet) or 'random' (SET).
    update_every: delta_T, steps between updates (RigL: 100).
    drop_fraction: alpha, the drop fraction at step 0 (RigL: 0.3; GraNet's
      death rate: 0.5).
    decay: 'cosine' (RigL) or 'constant' (SET's fixed zeta).
    min_drop_fraction: where the cosine ends (RigL: 0; GraNet: 0.005).
    rounding: the drop count per update, 'floor' (RigL) or 'ceil' (GraNet)
      of fraction * active.
    allocation: 'uniform', 'erk', 'global' or {path_regex: sparsity}: the
      per-leaf counts of the initial masks and of the schedule's pruning.
    regrow_scope: 'leaf' (each leaf drops and regrows its own count, so
      regrowth leaves per-leaf counts unchanged: RigL's layer-wise counts,
      and GraNet's global variant, which prunes globally but regrows per
      layer) or 'global' (one drop count and one regrowth across leaves;
      needs allocation='global'). None: 'global' with
      allocation='global', else 'leaf'.
    initial_masks: 'random' (sparse from step 0 at the schedule's step-0
      sparsity: SET, RigL, GraNet from a sparse start) or 'dense' (GraNet
      from dense).
    leaf_filter: (path, leaf) -> bool; default: arrays with ndim >= 2.
    key: PRNG key for the random initial masks and SET's growth.
    gradient_on_update: False (RigL's code, `SparseRigLOptimizer`: the
      mask update replaces the optimizer step): on an update step the inner
      optimizer is not called; the kept weights keep their values, dropped
      ones go to 0.0, grown ones start at 0.0, and the inner state is the
      one from before the step (its step count, hence Adam's bias
      correction and an optax learning-rate schedule, does not advance:
      RigL's global_step does not either) except that the parameter-shaped
      leaves (momentum, Adam's mu and nu) are 0 at the grown entries
      (RigL's `reset_momentum`, initial_acc_scale=0). This wrapper's own
      count advances, so update steps stay multiples of `update_every`.
      True (RigL's code's SET, `SparseSETOptimizer.apply_gradients`): the
      optimizer step first, on the weights active before the update, then
      the schedule's pruning and the drop by the magnitudes of the stepped
      weights, and the growth; kept weights keep their stepped values,
      grown ones start at 0.0 with their moments reset after the step.
      None (default): True for grow='random' (SET) and for a schedule
      that is not a `ConstantSchedule` (GraNet: its code,
      VITA-Group/GraNet `Masking.step`, steps the optimizer, then prunes and
      regrows), False otherwise (RigL).
  """

  schedule: Any
  end_step: int
  grow: str = "gradient"
  update_every: int = 100
  drop_fraction: float = 0.3
  decay: str = "cosine"
  allocation: allocation_lib.Allocation = "uniform"
  initial_masks: str = "random"
  leaf_filter: trees.LeafFilter | None = None
  key: jax.Array | None = None
  gradient_on_update: bool | None = None
  min_drop_fraction: float = 0.0
  rounding: str = "floor"
  regrow_scope: str | None = None

  def __post_init__(self):
    allocation_lib.validate_allocation(self.allocation)
    if self.grow not in GROW:
      raise ValueError(f"grow={self.grow!r}: use one of {GROW}.")
    if self.decay not in DECAYS:
      raise ValueError(f"decay={self.decay!r}: use one of {DECAYS}.")
    if self.initial_masks not in ("random", "dense"):
      raise ValueError(f"initial_masks={self.initial_masks!r}: use 'random' or 'dense'.")
    if not 0.0 <= self.drop_fraction < 1.0:
      raise ValueError(f"drop_fraction={self.drop_fraction!r} must be in [0, 1).")
    if not 0.0 <= self.min_drop_fraction <= self.drop_fraction:
      raise ValueError(f"min_drop_fraction={self.min_drop_fraction!r} must be in [0, "
                       f"drop_fraction={self.drop_fraction!r}].")
    if self.min_drop_fraction and self.decay != "cosine":
      raise ValueError(f"min_drop_fraction={self.min_drop_fraction!r} is the end of the cosine "
                       f"decay; decay={self.decay!r} has none (set it to 0).")
    if self.rounding not in ROUNDINGS:
      raise ValueError(f"rounding={self.rounding!r}: use one of {ROUNDINGS}.")
    if self.regrow_scope is not None and self.regrow_scope not in REGROW_SCOPES:
      raise ValueError(f"regrow_scope={self.regrow_scope!r}: use one of {REGROW_SCOPES} "
                       "or None.")
    if self.regrow_scope == "global" and self.allocation != "global":
      raise ValueError(f"regrow_scope='global' moves weights between leaves, which would undo "
                       f"allocation={self.allocation!r}'s per-leaf counts; use "
                       "allocation='global' or regrow_scope='leaf'.")
    for name in ("update_every", "end_step"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1.")
    if self.gradient_on_update is not None and not isinstance(self.gradient_on_update, bool):
      raise ValueError(f"gradient_on_update={self.gradient_on_update!r} must be a bool or None.")
    if self.key is None and (self.grow == "random" or self.initial_masks == "random"):
      raise ValueError("random initial masks and random growth need key=jax.random.key(seed).")

  def steps_on_update(self) -> bool:
    """Whether an update step takes the optimizer step before it drops and grows
    (`gradient_on_update`; None: SET's and GraNet's code do, RigL's does not)."""
    if self.gradient_on_update is None:
      return self.grow == "random" or not isinstance(self.schedule, schedules.ConstantSchedule)
    return self.gradient_on_update

  def _magnitude(self) -> gradual.GradualMagnitudePruning:
    return gradual.GradualMagnitudePruning(self.schedule, allocation=self.allocation,
                                           leaf_filter=self.leaf_filter)

  def initial(self, params: PyTree) -> PyTree:
    """The masks training starts from: random at the schedule's step-0
    sparsity (per leaf by the allocation), or dense."""
    chosen = pruning.prunable_leaves(params, self.leaf_filter)
    if self.initial_masks == "dense":
      return pruning.dense_masks(params, chosen)
    return pruning.compute_masks(
        params, self.schedule.final_sparsity, score="random", allocation=self.allocation,
        leaf_filter=self.leaf_filter, key=jax.random.fold_in(self.key, 0),
        ramp=lambda target: self.schedule.with_final(target)(0))

  def fraction(self, step) -> jax.Array:
    """The drop fraction at `step` (`min_drop_fraction` at `end_step`; no
    update after it)."""
    if self.decay == "cosine":
      return cosine_drop_fraction(self.drop_fraction, step, self.end_step,
                                  self.min_drop_fraction)
    return jnp.where(jnp.asarray(step) <= self.end_step, jnp.float32(self.drop_fraction), 0.0)

  def is_update_step(self, step) -> jax.Array:
    """Drop and grow at every multiple of `update_every` in (0, end_step]."""
    step = jnp.asarray(step)
    return (step > 0) & (step <= self.end_step) & (step % self.update_every == 0)

  def _scheduled(self, params: PyTree, masks: PyTree, step) -> PyTree:
    """The masks after the schedule's magnitude step (GraNet's pruning; a no-op
    for a constant sparsity the masks already have)."""
    if isinstance(self.schedule, schedules.ConstantSchedule) and self.initial_masks == "random":
      return masks  # random initial masks already hold the schedule's counts
    magnitude = self._magnitude()
    return jax.lax.cond(self.schedule.is_update_step(step),
                        lambda: magnitude.masks_at(params, step, masks), lambda: masks)

  def _regrown(self, params: PyTree, masks: PyTree, grads: PyTree, step) -> tuple[PyTree, PyTree]:
    """drop_and_grow at `step`, growing by |grads| or at random."""
    if self.grow == "random":
      key = jax.random.fold_in(self.key, step + 1)
      flat, treedef = jax.tree.flatten(grads, is_leaf=trees.is_empty)
      scores = jax.tree.unflatten(treedef, [
          g if trees.is_empty(g) else jax.random.uniform(jax.random.fold_in(key, i), g.shape)
          for i, g in enumerate(flat)])
    else:
      scores = jax.tree.map(jnp.abs, grads)
    scope = self.regrow_scope or ("global" if self.allocation == "global" else "leaf")
    return drop_and_grow(params, masks, scores, self.fraction(step), shared=scope == "global",
                         rounding=self.rounding)

  def update_masks(self, params: PyTree, masks: PyTree, grads: PyTree, step
                   ) -> tuple[PyTree, PyTree]:
    """(masks, grown) after `step`'s schedule and drop-and-grow update (traced
    step allowed; unchanged masks and no growth off the update steps)."""
    masks = self._scheduled(params, masks, step)
    no_growth = jax.tree.map(lambda m: None if m is None else jnp.zeros(m.shape, bool), masks,
                             is_leaf=lambda x: x is None)
    return jax.lax.cond(self.is_update_step(step),
                        lambda: self._regrown(params, masks, grads, step),
                        lambda: (masks, no_growth))

  def wrap(self, inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner`: its state becomes a `PruningState` holding the masks.

    A step off the update steps trains the weights active in the masks. On
    an update step the masks change (drop and grow): with RigL's growth the
    weights are not trained, with SET's they are trained first (each as its
    authors' code does; see `gradient_on_update`); dropped weights go to
    0.0, grown ones stay 0.0 with their moments reset.

    By default the update decides inside the step (`lax.cond`), which is
    right for any caller but costs every step on CPU: the drop and grow sits
    in the program's branch, whose reductions XLA:CPU pays for on every call
    (see `GradualMagnitudePruning.wrap`). The optimizer step sits outside
    the branch, so that XLA fuses it with the gradient: for RigL it is
    taken on every step and its results selected away on the update steps
    (1.27x the dense step on benchmarks/dst.py's MLP; 2.0x with the
    optimizer inside the branch); for SET and GraNet it is taken on the
    masks before the update and the branch drops and grows from the
    stepped weights. These programs agree with the host-dispatched ones to
    float rounding (XLA fuses Adam differently), masks exactly. A
    training loop that knows the step on the host can pass
    `regrow=bool(self.is_update_step(t))` (a Python bool, static under jit)
    to `update` and compile two programs: then the steps between updates
    cost what a fixed-mask step does.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
      chosen = pruning.prunable_leaves(params, self.leaf_filter)
      leaves = trees.named_leaves(params)
      allocation_lib.allocate(self.allocation, self.schedule.final_sparsity,
                              [leaves[i].path for i in chosen],
                              [leaves[i].value.shape for i in chosen])
      return gradual.PruningState(jnp.zeros((), jnp.int32), self.initial(params),
                                  inner.init(params))

    def update_fn(updates, state, params=None, regrow: bool | None = None, **extra_args):
      if params is None:
        raise ValueError("DropAndGrow needs params: call tx.update(grads, opt_state, params).")
      if regrow is not None:
        if not isinstance(regrow, (bool, np.bool_)):
          raise ValueError(f"regrow={regrow!r} must be None or a Python bool (static under "
                           "jit): bool(is_update_step(step)) on the host.")
        regrow = bool(regrow)
      step = state.count
      masks = self._scheduled(params, state.masks, step)

      def train():  # the inner optimizer's step on the weights `masks` keep
        return inner.update(gradual.zero_pruned(updates, masks), state.inner_state, params,
                            **extra_args)

      # Grown weights start at 0.0 (their update is -w: they are 0.0 already
      # unless the schedule pruned them this step) and their moments restart.
      trained_of = lambda new, grown: _tree_with_masks(lambda m, g: m & ~g, new, grown)

      def regrow_after(new, grown):
        # RigL's update step: no optimizer step; (inner state, updates).
        zeros = jax.tree.map(jnp.zeros_like, updates)
        return (reset_where(state.inner_state, inner.init, grown),
                gradual.updates_to_zero(zeros, params, trained_of(new, grown)))

      def keep():
        inner_updates, inner_state = train()
        return masks, inner_state, gradual.updates_to_zero(inner_updates, params, masks)

      def stepped_update(is_update):
        # SET, GraNet: the optimizer step (on an update step on the masks
        # before it), then the schedule, the drop (by the stepped magnitudes)
        # and the growth. `is_update` is True (host-dispatched) or traced (in
        # the step: the optimizer step stays outside the branch, where XLA
        # fuses it with the gradient; off the update steps nothing grows, so
        # resetting moments and zeroing dropped weights change nothing).
        step_masks = state.masks if is_update is True else _tree_with_masks(
            lambda old, now: jnp.where(is_update, old, now), state.masks, masks)
        inner_updates, inner_state = inner.update(
            gradual.zero_pruned(updates, step_masks), state.inner_state, params, **extra_args)

        def regrown():
          stepped = _add(params, gradual.updates_to_zero(inner_updates, params, state.masks))
          return self._regrown(stepped, self._scheduled(stepped, state.masks, step), updates,
                               step)

        if is_update is True:
          new, grown = regrown()
        else:
          no_growth = _tree_with_masks(lambda m, _: jnp.zeros(m.shape, bool), masks, masks)
          new, grown = jax.lax.cond(is_update, regrown, lambda: (masks, no_growth))
        return (new, reset_where(inner_state, inner.init, grown),
                gradual.updates_to_zero(inner_updates, params, trained_of(new, grown)))

      if regrow is False:  # the caller knows: no update in this program
        masks, inner_state, out = keep()
      elif self.steps_on_update():
        masks, inner_state, out = stepped_update(True if regrow else self.is_update_step(step))
      elif regrow:  # RigL: the mask update replaces the optimizer step
        new, grown = self._regrown(params, masks, updates, step)
        masks, (inner_state, out) = new, regrow_after(new, grown)
      else:
        # RigL decided in the step: only the mask update is in the branch.
        # The optimizer step runs on every step and the update step's
        # results are selected leaf by leaf (its step is discarded there,
        # as RigL's code skips it), so XLA fuses the gradient, the optimizer
        # and the selection into one pass per leaf; with the optimizer
        # inside the branch the step took twice the dense step on CPU.
        is_update = self.is_update_step(step)
        new = jax.lax.cond(is_update, lambda: self._regrown(params, masks, updates, step)[0],
                           lambda: masks)
        grown = _tree_with_masks(lambda n, m: n & ~m, new, masks)  # drop_and_grow's `grown`
        trained_state, trained_out = keep()[1:]
        regrown_state, regrown_out = regrow_after(new, grown)
        pick = lambda a, b: jnp.where(is_update, a, b)
        masks = new
        inner_state = jax.tree.map(pick, regrown_state, trained_state)
        out = jax.tree.map(pick, regrown_out, trained_out)
      count = optax.safe_int32_increment(state.count)
      return out, gradual.PruningState(count, masks, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _tree_with_masks(fn, a: PyTree, b: PyTree) -> PyTree:
  """fn(a_leaf, b_leaf) on two mask trees, None where a leaf is not masked."""
  return jax.tree.map(lambda x, y: None if x is None else fn(x, y), a, b,
                      is_leaf=lambda x: x is None)


def _add(params: PyTree, updates: PyTree) -> PyTree:
  """params + updates leaf by leaf, in params' tree type (updates may be another, e.g.
  an NNX State, with the same leaf order)."""
  flat_p, treedef = jax.tree.flatten(params, is_leaf=trees.is_empty)
  flat_u = jax.tree.leaves(updates, is_leaf=trees.is_empty)
  return jax.tree.unflatten(treedef, [
      p if trees.is_empty(p) or trees.is_empty(u) else (p + u).astype(p.dtype)
      for p, u in zip(flat_p, flat_u, strict=True)])


def active_counts(masks: PyTree) -> dict[str, int]:
  """{path: active weights} of every masked leaf (on the host)."""
  return {leaf.path: int(jnp.sum(leaf.value)) for leaf in trees.named_leaves(masks)}


def ever_active(history: list[PyTree]) -> float:
  """The fraction of maskable weights active in at least one of `history`'s masks."""
  union = None
  for masks in history:
    leaves = [jnp.asarray(leaf.value) for leaf in trees.named_leaves(masks)]
    union = leaves if union is None else [u | m for u, m in zip(union, leaves)]
  total = sum(int(u.size) for u in union)
  return sum(int(jnp.sum(u)) for u in union) / total

