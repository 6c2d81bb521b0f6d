"""Scores: how much each weight is worth keeping (higher is kept first).

A score function takes one parameter array and a PRNG key (ignored by
deterministic scores) and returns an array of the same shape.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ScoreFn = Callable[[jax.Array, jax.Array | None], jax.Array]


def magnitude_score(param: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """|w|: magnitude pruning keeps the largest weights.

  Signed integers get their magnitude as the unsigned integer of the same
  width, which holds |INT_MIN| (`jnp.abs` would wrap it to INT_MIN, the
  smallest score, and prune the largest weight first).

  >>> magnitude_score(jnp.array([-3., 1.])).tolist()
  [3.0, 1.0]
  >>> magnitude_score(jnp.array([-128, 127], jnp.int8)).tolist()
  [128, 127]
  """
  del key
  param = jnp.asarray(param)
  if jnp.issubdtype(param.dtype, jnp.signedinteger):
    unsigned = param.astype(jnp.dtype(f"uint{8 * param.dtype.itemsize}"))  # two's complement bits
    return jnp.where(param < 0, -unsigned, unsigned)
  return jnp.abs(param)


def random_score(param: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """Uniform random scores: random pruning, the standard control baseline.

  Raises:
    ValueError: if no PRNG key is given (random scores never use a hidden key).
  """
  if key is None:
    raise ValueError("random scores need a PRNG key: pass key=jax.random.key(seed).")
  return jax.random.uniform(key, jnp.shape(param))


SCORES: dict[str, ScoreFn] = {
    "magnitude": magnitude_score,
    "random": random_score,
}


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
