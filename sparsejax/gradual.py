"""Gradual magnitude pruning (Zhu & Gupta 2017) as an optax wrapper.

`GradualMagnitudePruning(schedule).wrap(tx)` returns an optax transformation
whose state carries the masks and a step counter. On the schedule's update
steps the masks are recomputed from the current weights inside the (jitted)
update; on every step gradients of pruned weights are masked before `tx`
sees them, and the returned updates drive pruned weights to exactly zero:
`optax.apply_updates(params, updates)` leaves them 0.0 after every step.

The wrapper must produce the final updates: wrap the whole optimizer
(`wrap(optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1)))`), do
not chain transforms after it, since anything that rescales its updates
also rescales the -w that zeroes pruned weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx.training import optimizer as nnx_optimizer

from sparsejax import allocation as allocation_lib
from sparsejax import masks as masks_lib
from sparsejax import pruning
from sparsejax import scores as scores_lib
from sparsejax import structure
from sparsejax import trees

PyTree = Any


class PruningState(NamedTuple):
  """State of a pruning wrapper.

  Attributes:
    count: int32 scalar, number of updates applied so far (the step).
    masks: bool arrays shaped like the pruned params, or with packed masks
      uint8 arrays of their bits packed along the last axis
      (`masks.pack_bits`); None for leaves that are not pruned. Read them
      with `state_masks(opt_state, params)`.
    inner_state: the wrapped optimizer's state.
  """

  count: jax.Array
  masks: PyTree
  inner_state: optax.OptState


def find_pruning_state(opt_state: optax.OptState) -> PruningState:
  """Returns the first `PruningState` inside an optimizer state (e.g. a chain).

  Raises:
    ValueError: if the state holds none.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruningState))
           if isinstance(s, PruningState)]
  if not found:
    raise ValueError("no PruningState in this optimizer state: was the optimizer "
                     "built with GradualMagnitudePruning(...).wrap(tx)?")
  return found[0]


def with_masks(opt_state: optax.OptState, masks: PyTree,
               params: PyTree = None) -> optax.OptState:
  """The optimizer state with `masks` in its `PruningState` (e.g. a new IMP level).

  The next update zeroes the weights the new masks prune; with a
  `FixedMaskSchedule` the masks then stay as given. A state that keeps its
  masks bit-packed (`packed_masks=True`) gets them packed; it needs
  `params`, since a packed mask's shape does not tell its last axis exactly.

  Raises:
    ValueError: if the state holds no PruningState, or `masks` does not have
      the structure and shapes of the masks it replaces (names the leaf), or
      the state's masks are packed and `params` is not given.
  """
  stored = find_pruning_state(opt_state).masks
  packed = any(jnp.result_type(m) == jnp.uint8 for m in jax.tree.leaves(stored))
  if packed:
    if params is None:
      raise ValueError("this optimizer state keeps its masks bit-packed: pass params= to "
                       "with_masks, whose shapes the new masks must have.")
    stored = masks_lib.bool_masks(stored, params)
  current = trees.named_leaves(stored, keep_none=True)
  given = trees.named_leaves(masks, keep_none=True)
  if [leaf.path for leaf in current] != [leaf.path for leaf in given]:
    raise ValueError(f"new masks have leaves {[l.path for l in given]}, but the optimizer "
                     f"state's masks have {[l.path for l in current]}.")
  shape = lambda m: None if trees.is_empty(m) else np.shape(m)
  for old, new in zip(current, given):
    if shape(old.value) != shape(new.value):
      raise ValueError(
          f"new mask '{new.path}' has shape {shape(new.value)} but the optimizer state's has "
          f"{shape(old.value)} (None: not pruned).")
  masks_lib.check_bool(masks)
  # Each new mask goes into the container the state already has there (an
  # `nnx.Optimizer` keeps its masks in `OptVariable`s; given masks may be
  # `nnx.Param`s or plain arrays), so the state keeps its tree structure.
  flat_stored, treedef = jax.tree.flatten(find_pruning_state(opt_state).masks,
                                          is_leaf=trees.is_empty)
  flat_given = jax.tree.leaves(masks, is_leaf=trees.is_empty)
  masks = jax.tree.unflatten(treedef, [
      old if trees.is_empty(old) else (masks_lib.pack_bits(new) if packed else jnp.asarray(new))
      for old, new in zip(flat_stored, flat_given, strict=True)])
  return jax.tree.map(lambda s: s._replace(masks=masks) if isinstance(s, PruningState) else s,
                      opt_state, is_leaf=lambda x: isinstance(x, PruningState))


def state_masks(opt_state: optax.OptState, params: PyTree = None) -> PyTree:
  """The masks of the `PruningState` in `opt_state`, None for unpruned leaves.

  Inside `optax.multi_transform` the leaves another transform owns are
  `optax.MaskedNode`s; they come back as None too. With `params`, masks kept
  bit-packed (`packed_masks=True`) come back unpacked, as bool arrays, and
  the masks tree has the containers of `params`.

  Masks of an `nnx.Optimizer` come back as an `nnx.State` of `nnx.Param`s
  (the optimizer keeps them in its own `OptVariable`s), the type that
  `magnitude_masks(nnx.state(model, nnx.Param), ...)` and a checkpoint
  restored with `masks_like=nnx.state(model, nnx.Param)` give, so that masks
  obtained either way combine with `jax.tree.map`.

  Raises:
    ValueError: if the state holds no PruningState, or `params` does not
      match the masks (names the leaf).
  """
  masks = jax.tree.map(_mask_entry, find_pruning_state(opt_state).masks,
                       is_leaf=lambda m: trees.is_empty(m) or isinstance(m, nnx.Variable))
  if params is None:
    return masks
  masks = masks_lib.bool_masks(masks, params)
  return jax.tree.unflatten(jax.tree.structure(params, is_leaf=trees.is_empty),
                            jax.tree.leaves(masks, is_leaf=trees.is_empty))


def _mask_entry(m: Any) -> Any:
  """A stored mask as `state_masks` returns it: `MaskedNode` -> None and an
  `nnx.Optimizer`'s `OptVariable` -> `nnx.Param` (same metadata)."""
  if isinstance(m, nnx_optimizer.OptVariable):
    return nnx.Param(_mask_entry(m.get_value()), **m.get_metadata())
  return None if isinstance(m, optax.MaskedNode) else m


def masked_params(params: PyTree, opt_state: optax.OptState) -> PyTree:
  """Params with the optimizer state's masks applied, for the forward pass.

  After the first update the wrapper keeps pruned weights at exactly zero, so
  this only matters for params that did not come out of the wrapper (restored
  from elsewhere, or edited by hand), but it is cheap and always safe.
  """
  return masks_lib.apply_masks(params, state_masks(opt_state, params))


def ste_masked_params(params: PyTree, opt_state: optax.OptState) -> PyTree:
  """Params with the masks applied for the forward pass, with a straight-through
  gradient: the gradient with respect to the params is the gradient with
  respect to the masked weights, also where they are pruned (the dense
  gradient RigL grows by, and the gradient STE training updates pruned
  weights with).
  """
  masks = state_masks(opt_state, params)
  return trees.map_with_masks(lambda p, m: p if m is None else _straight_through(p, m),
                              params, masks)


@jax.custom_vjp
def _straight_through(param: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.where(mask, param, jnp.zeros((), param.dtype))


def _straight_through_fwd(param, mask):
  return _straight_through(param, mask), None


def _straight_through_bwd(residual, grad):
  del residual
  return grad, None


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def zero_pruned(grads: PyTree, masks: PyTree) -> PyTree:
  """Gradients with the entries `masks` prune set to 0 (None masks: unchanged)."""
  return trees.map_with_masks(
      lambda g, m: g if m is None else jnp.where(m, g, jnp.zeros((), g.dtype)), grads, masks)


def updates_to_zero(updates: PyTree, params: PyTree, masks: PyTree) -> PyTree:
  """`updates` with -p on the entries `masks` prune, so that the update leaves them 0.0.

  p + (-p) is exactly 0.0 in IEEE arithmetic. `updates` may carry a different
  tree type than `params` (e.g. an NNX State), with the same leaf order.
  """
  flat_m = jax.tree.leaves(masks, is_leaf=trees.is_empty)
  flat_p = jax.tree.leaves(params, is_leaf=trees.is_empty)
  flat_u, treedef = jax.tree.flatten(updates, is_leaf=trees.is_empty)
  return jax.tree.unflatten(treedef, [
      u if trees.is_empty(m) or trees.is_empty(u) else jnp.where(m, u, -p.astype(u.dtype))
      for u, p, m in zip(flat_u, flat_p, flat_m, strict=True)])


@dataclasses.dataclass(frozen=True)
class GradualMagnitudePruning:
  """Gradual magnitude pruning of any optax optimizer.

  Each prunable leaf follows `schedule` toward its own target: the schedule's
  final sparsity split across leaves by `allocation` (for 'global', one
  threshold across all prunable leaves at the scheduled sparsity).

  Example:
    >>> schedule = PolynomialSchedule(0.0, 0.9, begin_step=0, end_step=1000,
    ...                               update_frequency=100)
    >>> tx = GradualMagnitudePruning(schedule).wrap(optax.adam(1e-3))
    >>> # opt_state = tx.init(params)
    >>> # updates, opt_state = tx.update(grads, opt_state, params)

  Attributes:
    schedule: a schedule from `sparsejax.schedules`.
    allocation: 'uniform', 'erk', 'global' or {path_regex: sparsity}.
    leaf_filter: (path, leaf) -> bool; default prunes arrays with ndim >= 2.
    score: 'magnitude' (default) or another score name or function.
    key: PRNG key for random scores (unused by magnitude).
    packed_masks: keep the masks in the optimizer state at 1 bit per weight
      (uint8, packed along each leaf's last axis) instead of a bool byte;
      unpacked inside the update, where XLA fuses it with its use.
    straight_through: STE training (as JaxPruner's STE pruners): pruned
      weights keep their values and keep being updated with the gradient
      of the masked network (use `ste_masked_params` in the forward), and
      each mask update ranks all weights, so a pruned one can come back.
      The params are then dense; `masked_params` gives the sparse network.
    structure: a structure spec (`sparsejax.structure.Rule` entries) for
      structured gradual pruning: the schedule's sparsity is then the
      fraction of units (hidden units, channels, heads) each group removes,
      ranked by the L2 norm of their slices (`structure.magnitude_sp`); the
      masks cover every member leaf (biases and norms included), so the
      pruned model can be `shrink`-ed. `allocation` and `leaf_filter` are
      not used.
  """

  schedule: Any
  allocation: allocation_lib.Allocation = "uniform"
  leaf_filter: trees.LeafFilter | None = None
  score: Any = "magnitude"
  key: jax.Array | None = None
  packed_masks: bool = False
  straight_through: bool = False
  structure: Any = None

  def __post_init__(self):
    allocation_lib.validate_allocation(self.allocation)
    if self.structure is not None:
      object.__setattr__(self, "structure", tuple(self.structure))
      if not self.structure:
        raise ValueError("structure= must hold at least one sparsejax.structure.Rule.")
    if scores_lib.get_score_fn(self.score) is scores_lib.random_score and self.key is None:
      raise ValueError("score='random' needs key=jax.random.key(seed).")

  def masks_at(self, params: PyTree, step, previous_masks: PyTree | None = None) -> PyTree:
    """The masks the schedule asks for at `step` (traced step allowed).

    Entries pruned by `previous_masks` stay pruned while sparsity grows.
    """
    if self.structure is not None:
      return self._structured_masks_at(params, step, previous_masks)
    return pruning.compute_masks(
        params, self.schedule.final_sparsity, score=self.score, allocation=self.allocation,
        leaf_filter=self.leaf_filter, key=self.key, previous_masks=previous_masks,
        ramp=lambda target: self.schedule.with_final(target)(step))

  def _structured_masks_at(self, params, step, previous_masks):
    groups = structure.build_groups(params, self.structure)
    fraction = self.schedule.with_final(self.schedule.final_sparsity)(step)
    previous = None
    if previous_masks is not None:
      leaves = {leaf.path: leaf.value for leaf in trees.named_leaves(previous_masks)}
      previous = {}
      for g in groups:
        first = g.members[0]
        previous[g.name] = structure.groups.unit_major(leaves[first.path], first, g.units).any(1)
    keep = structure.keep_uniform(structure.magnitude_sp(params, groups), groups, fraction,
                                  previous)
    return structure.structured_masks(params, groups, keep)

  def _store(self, masks: PyTree) -> PyTree:
    """Masks as the state keeps them: bool, or bit-packed with `packed_masks`."""
    if not self.packed_masks:
      return masks
    return jax.tree.map(lambda m: m if trees.is_empty(m) else masks_lib.pack_bits(m), masks,
                        is_leaf=trees.is_empty)

  def wrap(self, inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` so that its updates prune along the schedule.

    By default the update decides inside the step whether the masks are
    recomputed (`lax.cond`), which is right for any caller, but every
    compiled step then holds the mask selection's buffers, also on the
    steps between recomputes, and on XLA:CPU pays for the selection's
    reductions on every call (~0.5 us each, a few dozen per prunable leaf:
    2-5% of a 2M-param MLP's step; benchmarks/branch_cost.py). A training
    loop that knows the step on the host can pass
    `recompute=bool(schedule.is_update_step(t))` (a Python
    bool, static under jit) to `update` and compile two programs: with
    False, one without the selection, which holds what a fixed-mask step
    does; with True, the default's program (the recompute still follows
    the schedule's step). Both give the default's numbers.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
      if self.structure is not None:
        groups = structure.build_groups(params, self.structure)
        masks = structure.structured_masks(
            params, groups, {g.name: jnp.ones(g.units, bool) for g in groups})
        return PruningState(jnp.zeros((), jnp.int32), self._store(masks), inner.init(params))
      leaves = trees.named_leaves(params)
      chosen = pruning.prunable_leaves(params, self.leaf_filter)
      allocation_lib.allocate(  # fail at init, not at the first update, on a bad map
          self.allocation, self.schedule.final_sparsity, [leaves[i].path for i in chosen],
          [leaves[i].value.shape for i in chosen])
      masks = self._store(pruning.dense_masks(params, chosen))
      return PruningState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def update_fn(updates, state, params=None, recompute: bool | None = None, **extra_args):
      if params is None:
        raise ValueError("GradualMagnitudePruning needs params: call "
                         "tx.update(grads, opt_state, params).")
      if recompute is not None and not isinstance(recompute, (bool, np.bool_)):
        raise ValueError(f"recompute={recompute!r} must be None or a Python bool (static under "
                         "jit): bool(schedule.is_update_step(step)) on the host.")
      recomputed = lambda: self.masks_at(
          params, state.count,
          None if self.straight_through else masks_lib.bool_masks(state.masks, params))
      if recompute is None or recompute:
        # The branch returns the masks as the state keeps them (bit-packed
        # with `packed_masks`), so the conditional's output, live through the
        # rest of the step, is the small stored form; the bool masks are
        # unpacked where they are used, inside the elementwise fusions.
        # recompute=True compiles this same program: XLA:CPU schedules the
        # conditional early in the step, where the selection's buffers
        # overlap less with the step's than the same selection inline
        # (temporaries 1.33x the dense step's vs 2.21x, 2M-weight MLP).
        stored = jax.lax.cond(self.schedule.is_update_step(state.count),
                              lambda: self._store(recomputed()), lambda: state.masks)
      else:  # the caller knows: no recompute in this program
        stored = state.masks
      masks = masks_lib.bool_masks(stored, params)
      if self.straight_through:  # dense weights, dense updates: only the forward is masked
        inner_updates, inner_state = inner.update(updates, state.inner_state, params,
                                                  **extra_args)
        count = optax.safe_int32_increment(state.count)
        return inner_updates, PruningState(count, stored, inner_state)
      grads = zero_pruned(updates, masks)
      inner_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
      count = optax.safe_int32_increment(state.count)
      return (updates_to_zero(inner_updates, params, masks),
              PruningState(count, stored, inner_state))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
