"""Sparsity schedules: pure functions of a (possibly traced) step.

Every schedule answers two questions for a step: what the sparsity is
(`schedule(step)`) and whether masks are recomputed at that step
(`schedule.is_update_step(step)`). `with_final(s)` gives the same schedule
ending at another sparsity, which is how per-leaf targets (ERK, custom maps)
each follow the schedule's shape.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from sparsejax import counts


def _check_step(value, name: str, minimum: int = 0) -> None:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
  """The same sparsity from step 0 on; masks computed once, at step 0.

  >>> round(float(ConstantSchedule(0.8)(5)), 4)
  0.8
  """

  sparsity: float

  def __post_init__(self):
    counts.check_sparsity(self.sparsity)

  @property
  def final_sparsity(self) -> float:
    """The sparsity the schedule ends at (the wrappers size per-leaf targets by it)."""
    return self.sparsity

  def with_final(self, sparsity) -> "ConstantSchedule":
    """This schedule at another sparsity (a leaf's own target under non-uniform allocation)."""
    return dataclasses.replace(self, sparsity=sparsity)

  def __call__(self, step) -> jax.Array:
    return jnp.full((), self.sparsity, jnp.float32) + 0 * jnp.asarray(step, jnp.float32)

  def is_update_step(self, step) -> jax.Array:
    """Whether masks are recomputed at `step`: at step 0 only."""
    return jnp.asarray(step) == 0


@dataclasses.dataclass(frozen=True)
class FixedMaskSchedule:
  """Masks are never recomputed: they stay what the pruning state holds.

  For training with masks chosen elsewhere, as in each level of iterative
  magnitude pruning: build the optimizer with
  `GradualMagnitudePruning(FixedMaskSchedule()).wrap(tx)` and put the masks
  into its state with `sparsejax.with_masks`. Until then the masks are dense.

  >>> bool(FixedMaskSchedule().is_update_step(0))
  False
  """

  @property
  def final_sparsity(self) -> float:
    """0: the masks come from elsewhere, so no per-leaf target is ever asked for."""
    return 0.0  # per-leaf targets are unused: no update step ever asks for them

  def with_final(self, sparsity) -> "FixedMaskSchedule":
    """This schedule unchanged: fixed masks have no target to change."""
    del sparsity
    return self

  def __call__(self, step) -> jax.Array:
    return 0 * jnp.asarray(step, jnp.float32)

  def is_update_step(self, step) -> jax.Array:
    """Never: the masks stay what the pruning state holds."""
    return jnp.zeros(jnp.shape(step), bool)


@dataclasses.dataclass(frozen=True)
class OneShotSchedule:
  """Dense until `step`, then `sparsity`; masks computed once, at `step`.

  >>> [round(float(OneShotSchedule(0.9, step=3)(t)), 4) for t in (2, 3)]
  [0.0, 0.9]
  """

  sparsity: float
  step: int

  def __post_init__(self):
    counts.check_sparsity(self.sparsity)
    _check_step(self.step, "step")

  @property
  def final_sparsity(self) -> float:
    """The sparsity the schedule ends at (the wrappers size per-leaf targets by it)."""
    return self.sparsity

  def with_final(self, sparsity) -> "OneShotSchedule":
    """This schedule at another sparsity (a leaf's own target under non-uniform allocation)."""
    return dataclasses.replace(self, sparsity=sparsity)

  def __call__(self, step) -> jax.Array:
    return jnp.where(jnp.asarray(step) >= self.step, jnp.float32(self.sparsity), jnp.float32(0))

  def is_update_step(self, step) -> jax.Array:
    """Whether masks are recomputed at `step`: at `self.step` only."""
    return jnp.asarray(step) == self.step


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule:
  """Zhu & Gupta (2017) gradual pruning schedule.

  s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power, evaluated at
  the last update step at or before t; masks are recomputed every
  `update_frequency` steps from `begin_step` (t0) and at `end_step` (t1).
  Before t0 the sparsity is s_i (masks untouched: pruning starts at t0);
  from t1 on it is s_f and masks no longer change.

  >>> s = PolynomialSchedule(0.0, 0.9, begin_step=0, end_step=100, update_frequency=10)
  >>> [round(float(s(t)), 4) for t in (0, 50, 55, 100)]
  [0.0, 0.7875, 0.7875, 0.9]
  """

  initial_sparsity: float
  final_sparsity: float
  begin_step: int
  end_step: int
  update_frequency: int = 1
  power: float = 3.0

  def __post_init__(self):
    counts.check_sparsity(self.initial_sparsity, "initial_sparsity")
    counts.check_sparsity(self.final_sparsity, "final_sparsity")
    _check_step(self.begin_step, "begin_step")
    _check_step(self.end_step, "end_step")
    if self.end_step <= self.begin_step:
      raise ValueError(
          f"end_step ({self.end_step}) must be after begin_step ({self.begin_step}).")
    _check_step(self.update_frequency, "update_frequency", minimum=1)
    if not self.power > 0:
      raise ValueError(f"power must be > 0, got {self.power!r}.")

  def with_final(self, sparsity) -> "PolynomialSchedule":
    """This schedule ending at another sparsity (a leaf's own target, non-uniform allocation)."""
    return dataclasses.replace(self, final_sparsity=sparsity)

  def __call__(self, step) -> jax.Array:
    step = jnp.asarray(step, jnp.int32)
    since = jnp.clip(step - self.begin_step, 0, self.end_step - self.begin_step)
    last_update = since - since % self.update_frequency
    last_update = jnp.where(step >= self.end_step, self.end_step - self.begin_step, last_update)
    progress = last_update.astype(jnp.float32) / (self.end_step - self.begin_step)
    s_i, s_f = jnp.float32(self.initial_sparsity), jnp.asarray(self.final_sparsity, jnp.float32)
    value = s_f + (s_i - s_f) * (1.0 - progress) ** self.power
    value = jnp.where(last_update == 0, s_i, value)  # exactly s_i until the first ramp step
    return jnp.where(step >= self.end_step, s_f, value)

  def is_update_step(self, step) -> jax.Array:
    """Whether masks are recomputed at `step`: every `update_frequency` steps from t0, and at t1."""
    step = jnp.asarray(step, jnp.int32)
    in_range = (step >= self.begin_step) & (step <= self.end_step)
    on_grid = ((step - self.begin_step) % self.update_frequency == 0) | (step == self.end_step)
    return in_range & on_grid
