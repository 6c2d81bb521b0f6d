"""When N:M training is dense, sparse or fine-tuning, with which pattern and decay.

Training of `num_steps` steps falls into three phases (step = updates done)::

  dense     [0, dense_steps)                  forward uses the dense weights;
  sparse    [dense_steps, finetune_start)     forward uses the N:M-masked
                                              weights (with a decay factor);
  fine-tune [finetune_start, ...)             hard N:M mask, pruned weights 0,
                                              where finetune_start =
                                              num_steps - finetune_steps.

Structure decay (SDGF, Bambhaniya et al. 2024) splits the sparse phase into
equal frames whose N:M pattern moves toward the target; frame i starts at
dense_steps + floor(i * (finetune_start - dense_steps) / frames):

  'fixed'     one frame, N:M;
  'stepwise'  (M-1):M, M/2:M, M/4:M, ... down to N:M  (1:8: 7:8 4:8 2:8 1:8);
  'geometric' 8N:8M, 4N:4M, 2N:2M, N:M.

Mask decay (MDGF) scales the pruned weights in the forward pass by
beta(t), t = step - dense_steps: 'linear' max(0, 1 - alpha*t),
'exponential' exp(-alpha*t).

The frames follow the authors' reference code
(abhibambhaniya/progressive_gradient_flow_nm_sparsity, `get_decay_config`,
there in epochs). beta's t does not: the reference's t counts, in effect,
from the start of training (its train.py subtracts the dense phase as a
percentage, `num_updates - updates * dense_steps / 100`, while the dense
phase is set as a fraction, `dense_steps * epochs`); here t starts with the
sparse phase, as the paper describes. The reference's fine-tune recomputes
the mask from the dense weights every step, with STE
(`finetune_mask='recompute'` here); the default here fixes the mask at the
fine-tune's start and holds pruned weights at exactly 0.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

STRUCTURES = ("fixed", "stepwise", "geometric")
DECAYS = ("none", "linear", "exponential")
FINETUNE_MASKS = ("fixed", "recompute")


def _check_int(value, name: str, minimum: int) -> None:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


def structure_patterns(n: int, m: int, structure: str = "fixed") -> tuple[tuple[int, int], ...]:
  """The (n, m) pattern of each frame of the sparse phase, ending at (n, m).

  >>> structure_patterns(1, 8, "stepwise")
  ((7, 8), (4, 8), (2, 8), (1, 8))
  >>> structure_patterns(2, 4, "geometric")
  ((16, 32), (8, 16), (4, 8), (2, 4))

  Consecutive equal patterns are merged (2:4 stepwise is 3:4 then 2:4; 1:2 is
  one frame). Stepwise halves M until it reaches N: for an N that is not
  M/2^k the last halving is clipped to N (3:8: 7:8, 4:8, 3:8).

  Raises:
    ValueError: for n, m outside 1 <= n <= m or an unknown structure.
  """
  _check_int(m, "M", 1)
  _check_int(n, "N", 1)
  if n > m:
    raise ValueError(f"N:M needs N <= M, got N={n}, M={m}.")
  if structure == "fixed":
    patterns = [(n, m)]
  elif structure == "stepwise":
    patterns = [(max(n, m - 1), m)]
    k = 1
    while m // 2**k > n:
      patterns.append((m // 2**k, m))
      k += 1
    patterns.append((n, m))
  elif structure == "geometric":
    patterns = [(n * f, m * f) for f in (8, 4, 2, 1)]
  else:
    raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}.")
  merged = [patterns[0]]
  for p in patterns[1:]:
    if p != merged[-1]:
      merged.append(p)
  return tuple(merged)


def mask_decay(decay: str, alpha: float, t) -> jax.Array:
  """beta(t) of mask-decayed gradient flow; 0 for 'none' (a hard mask).

  >>> [round(float(mask_decay('linear', 0.25, t)), 4) for t in (0, 2, 8)]
  [1.0, 0.5, 0.0]
  >>> round(float(mask_decay('exponential', 0.5, 2)), 4)
  0.3679
  """
  t = jnp.asarray(t, jnp.float32)
  if decay == "none":
    return jnp.zeros_like(t)
  if decay == "linear":
    return jnp.maximum(0.0, 1.0 - alpha * t)
  if decay == "exponential":
    return jnp.exp(-alpha * t)
  raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}.")


@dataclasses.dataclass(frozen=True)
class NMSchedule:
  """Phases, structure frames and mask-update steps of N:M training.

  >>> s = NMSchedule(1, 8, num_steps=100, dense_steps=10, finetune_steps=10,
  ...                structure="stepwise")
  >>> s.patterns, s.frame_starts
  (((7, 8), (4, 8), (2, 8), (1, 8)), (10, 30, 50, 70))

  Attributes:
    n, m: the target pattern (keep n of every m).
    num_steps: training length in steps.
    dense_steps: steps trained dense first.
    finetune_steps: steps trained last with a hard, fixed mask. With 0, the
      update of the last step still applies the hard mask, so the trained
      weights are N:M.
    structure: 'fixed', 'stepwise' or 'geometric' (see module docstring).
    update_every: masks are recomputed from the current dense weights every
      this many steps of the sparse phase, and at the start of every frame
      and of fine-tuning.
    finetune_mask: 'fixed' (default): in fine-tuning the mask stays as
      computed at its start and pruned weights are held at exactly 0.
      'recompute': the mask is recomputed from the dense weights every
      fine-tune step, which train straight through (the reference code's
      fine-tune); the hard mask is applied by the last update only.
  """

  n: int
  m: int
  num_steps: int
  dense_steps: int = 0
  finetune_steps: int = 0
  structure: str = "fixed"
  update_every: int = 1
  finetune_mask: str = "fixed"

  def __post_init__(self):
    if self.finetune_mask not in FINETUNE_MASKS:
      raise ValueError(f"finetune_mask must be one of {FINETUNE_MASKS}, got {self.finetune_mask!r}.")
    _check_int(self.num_steps, "num_steps", 1)
    _check_int(self.dense_steps, "dense_steps", 0)
    _check_int(self.finetune_steps, "finetune_steps", 0)
    _check_int(self.update_every, "update_every", 1)
    patterns = structure_patterns(self.n, self.m, self.structure)
    sparse = self.finetune_start - self.dense_steps
    if sparse < len(patterns):
      raise ValueError(
          f"the sparse phase has {sparse} steps (num_steps={self.num_steps} - dense_steps="
          f"{self.dense_steps} - finetune_steps={self.finetune_steps}), fewer than its "
          f"{len(patterns)} structure frame(s) {self.pattern_names()}.")

  @property
  def finetune_start(self) -> int:
    """The first step of the fine-tune phase (`num_steps - finetune_steps`)."""
    return self.num_steps - self.finetune_steps

  @property
  def sparse_steps(self) -> int:
    """Steps of the sparse phase, between the dense phase and the fine-tune."""
    return self.finetune_start - self.dense_steps

  @property
  def patterns(self) -> tuple[tuple[int, int], ...]:
    """The (n, m) pattern of each structure frame, in order (see `structure_patterns`)."""
    return structure_patterns(self.n, self.m, self.structure)

  def pattern_names(self) -> list[str]:
    """The patterns as "n:m" strings, for logs and errors."""
    return [f"{n}:{m}" for n, m in self.patterns]

  @property
  def frame_starts(self) -> tuple[int, ...]:
    """The first step of each structure frame."""
    frames = len(self.patterns)
    sparse = self.finetune_start - self.dense_steps
    return tuple(self.dense_steps + math.floor(i * sparse / frames) for i in range(frames))

  def frame(self, step) -> jax.Array:
    """Index of the pattern in force at `step` (0 before the sparse phase)."""
    step = jnp.asarray(step, jnp.int32)
    starts = jnp.asarray(self.frame_starts[1:], jnp.int32)
    return jnp.sum(step >= starts, dtype=jnp.int32)

  def is_dense(self, step) -> jax.Array:
    """Whether `step` is in the dense phase, before any mask."""
    return jnp.asarray(step) < self.dense_steps

  def is_finetune(self, step) -> jax.Array:
    """Whether `step` is in the fine-tune phase at the final pattern."""
    return jnp.asarray(step) >= self.finetune_start

  def is_hard(self, step) -> jax.Array:
    """Whether pruned weights are held at 0 from `step` on: the fixed fine-tune, or the end."""
    start = self.finetune_start if self.finetune_mask == "fixed" else self.num_steps
    return jnp.asarray(step) >= start

  def is_update_step(self, step) -> jax.Array:
    """Whether the masks in force from `step` on are recomputed at `step`."""
    step = jnp.asarray(step, jnp.int32)
    sparse = (step >= self.dense_steps) & (step < self.finetune_start)
    on_grid = (step - self.dense_steps) % self.update_every == 0
    frame_start = jnp.any(step == jnp.asarray(self.frame_starts, jnp.int32))
    finetune = (step == self.finetune_start) if self.finetune_mask == "fixed" else (
        step >= self.finetune_start)
    return (sparse & (on_grid | frame_start)) | finetune

  def decay_time(self, step) -> jax.Array:
    """t of beta(t): steps since the sparse phase began (negative before)."""
    return jnp.asarray(step, jnp.int32) - self.dense_steps
