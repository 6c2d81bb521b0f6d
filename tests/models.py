"""Small Flax models and data shared by the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class LinenMLP(nn.Module):
  """20 -> 32 -> 16 -> 4 MLP."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


class NnxMLP(nnx.Module):
  """The same MLP in Flax NNX."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden0 = nnx.Linear(20, 32, rngs=rngs)
    self.hidden1 = nnx.Linear(32, 16, rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden1(jax.nn.relu(self.hidden0(x)))))


def batch(seed: int = 0, size: int = 64):
  """A fixed classification batch: inputs (size, 20), labels in [0, 4)."""
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (size, 20))
  return x, jax.random.randint(ky, (size,), 0, 4)


def linen_params(seed: int = 0):
  return LinenMLP().init(jax.random.key(seed), jnp.ones((1, 20)))["params"]
