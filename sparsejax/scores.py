"""Scores: how much each weight is worth keeping (higher is kept first).

A score function takes one parameter array and a PRNG key (ignored by
deterministic scores) and returns an array of the same shape. Scores that
need the loss gradient (SNIP) also take it, as a third argument: pass
`grads=` to `compute_masks`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ScoreFn = Callable[[jax.Array, jax.Array | None], jax.Array]


def magnitude_score(param: jax.Array, key: jax.Array | None = None,
                    grad: jax.Array | None = None) -> jax.Array:
  """|w|: magnitude pruning keeps the largest weights.

  Signed integers get their magnitude as the unsigned integer of the same
  width, which holds |INT_MIN| (`jnp.abs` would wrap it to INT_MIN, the
  smallest score, and prune the largest weight first).

  >>> magnitude_score(jnp.array([-3., 1.])).tolist()
  [3.0, 1.0]
  >>> magnitude_score(jnp.array([-128, 127], jnp.int8)).tolist()
  [128, 127]
  """
  del key, grad
  param = jnp.asarray(param)
  if jnp.issubdtype(param.dtype, jnp.signedinteger):
    unsigned = param.astype(jnp.dtype(f"uint{8 * param.dtype.itemsize}"))  # two's complement bits
    return jnp.where(param < 0, -unsigned, unsigned)
  return jnp.abs(param)


def snip_score(param: jax.Array, key: jax.Array | None = None,
               grad: jax.Array | None = None) -> jax.Array:
  """|g * w|, SNIP's connection sensitivity (Lee et al. 2019): the first-order
  change of the loss if the weight were removed.

  >>> snip_score(jnp.array([2., -1.]), grad=jnp.array([0.5, 3.])).tolist()
  [1.0, 3.0]

  Raises:
    ValueError: no gradient given.
  """
  del key
  if grad is None:
    raise ValueError("the 'snip' score needs the loss gradient: pass grads= (a params-shaped "
                     "tree of gradients on a batch) to compute_masks.")
  return jnp.abs(jnp.asarray(grad) * jnp.asarray(param))


def random_score(param: jax.Array, key: jax.Array | None = None,
                 grad: jax.Array | None = None) -> jax.Array:
  """Uniform random scores: random pruning, the standard control baseline.

  Raises:
    ValueError: if no PRNG key is given (random scores never use a hidden key).
  """
  del grad
  if key is None:
    raise ValueError("random scores need a PRNG key: pass key=jax.random.key(seed).")
  return jax.random.uniform(key, jnp.shape(param))


SCORES: dict[str, ScoreFn] = {
    "magnitude": magnitude_score,
    "random": random_score,
    "snip": snip_score,
}
GRADIENT_SCORES = ("snip",)  # called as score(param, key, grad)


def get_score_fn(score: str | ScoreFn) -> ScoreFn:
  """Returns the score function named `score` (or `score` if it is callable).

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if callable(score):
    return score
  if score not in SCORES:
    raise ValueError(f"unknown score {score!r}; known: {sorted(SCORES)}.")
  return SCORES[score]
