"""How many entries a sparsity keeps: round((1 - sparsity) * size), exactly.

Also the validation of sparsity values shared by every module that takes one.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_sparsity(sparsity, name: str = "sparsity") -> None:
  """Raises ValueError if a sparsity is not a real scalar, or (when concrete) is
  outside [0, 1] or NaN."""
  dtype = getattr(sparsity, "dtype", None)
  real = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool)
  if not real and (dtype is None or np.dtype(dtype).kind not in "iuf"):
    raise ValueError(f"{name} must be a real number in [0, 1], got {sparsity!r}.")
  if np.ndim(sparsity) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(sparsity)}.")
  if isinstance(sparsity, numbers.Real) or (
      _is_concrete(sparsity) and np.ndim(sparsity) == 0
  ):
    value = float(sparsity)
    if not 0.0 <= value <= 1.0:  # also False for NaN
      raise ValueError(f"{name} must be in [0, 1], got {value}.")


def keep_count(size: int, sparsity) -> jax.Array | int:
  """Returns round((1 - sparsity) * size), rounding half to even.

  A Python float gives a Python int by Python's float arithmetic (so 0.15
  behaves as the decimal 0.15 usually does). A float32 sparsity, numpy or
  jax, concrete or traced, gives the exact value for that float32 number,
  computed with integer arithmetic (float32 itself cannot count past 2**24);
  a traced float64 one (under jax_enable_x64) is computed in float64. A
  traced NaN (it cannot be checked) prunes nothing.

  >>> keep_count(10, 0.85), int(keep_count(10, jnp.float32(0.85)))  # 0.85 vs 0.8500000238
  (2, 1)
  """
  if _is_python_number(sparsity):
    return int(round((1.0 - float(sparsity)) * size))
  s = jnp.asarray(sparsity)
  s = jnp.clip(jnp.where(jnp.isnan(s), 0.0, s), 0.0, 1.0)  # a traced NaN prunes nothing
  if s.dtype == jnp.float64:
    return jnp.round((1.0 - s) * size).astype(jnp.int32)
  return _exact_keep_count(size, s.astype(jnp.float32))


def _is_python_number(x) -> bool:
  """Python and numpy 64-bit numbers take Python's arithmetic; float32 values
  (numpy or jax, concrete or traced) take the exact float32 path."""
  if isinstance(x, np.generic):
    return not (jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize <= 4)
  return isinstance(x, numbers.Real)


def _exact_keep_count(size: int, s: jax.Array) -> jax.Array:
  """round_half_even((1 - s) * size) for a float32 s in [0, 1], exactly.

  s = M * 2**-F with M < 2**24, so (1 - s) * size = size - P / 2**F with
  P = M * size < 2**55, held as two uint32 words (hi, lo). With q = P >> F
  and the remainder r, the result is size - q when r < 2**(F-1), size - q - 1
  when r > 2**(F-1), and the even of the two on a tie.
  """
  u32 = jnp.uint32
  bits = jax.lax.bitcast_convert_type(s, u32)
  exponent = (bits >> 23) & u32(0xFF)
  mantissa = jnp.where(exponent == 0, bits & u32(0x7FFFFF), (bits & u32(0x7FFFFF)) | u32(0x800000))
  shift = jnp.where(exponent == 0, 149, 150 - exponent.astype(jnp.int32))  # F, in [23, 149]
  m1, m0 = mantissa >> 16, mantissa & u32(0xFFFF)
  n1, n0 = u32(size >> 16), u32(size & 0xFFFF)
  low_product = m0 * n0
  middle = m1 * n0 + m0 * n1  # < 2**32
  lo = low_product + (middle << 16)
  hi = m1 * n1 + (middle >> 16) + (lo < low_product).astype(u32)

  def shr(x, n):  # logical shift by a traced amount; 0 when n >= 32
    return jnp.where(n >= 32, u32(0), x >> jnp.clip(n, 0, 31).astype(u32))

  def shl(x, n):
    return jnp.where(n >= 32, u32(0), x << jnp.clip(n, 0, 31).astype(u32))

  def low_bits(x, n):  # x mod 2**n
    return jnp.where(n >= 32, x, x & (shl(u32(1), n) - u32(1)))

  # q = P >> F (q <= size < 2**31, so one word); r = P mod 2**F as (r_hi, r_lo).
  q = jnp.where(shift >= 32, shr(hi, shift - 32), shl(hi, 32 - shift) | shr(lo, shift))
  r_hi = jnp.where(shift >= 32, low_bits(hi, shift - 32), u32(0))
  r_lo = jnp.where(shift >= 32, lo, low_bits(lo, shift))
  # half = 2**(F-1) as (h_hi, h_lo).
  h_hi = jnp.where(shift >= 33, shl(u32(1), shift - 33), u32(0))
  h_lo = jnp.where(shift >= 33, u32(0), shl(u32(1), shift - 1))
  above = (r_hi > h_hi) | ((r_hi == h_hi) & (r_lo > h_lo))
  tie = (r_hi == h_hi) & (r_lo == h_lo)
  big = shift >= 56  # P < 2**55 <= half: r < 1/2 and q = 0
  q = jnp.where(big, u32(0), q).astype(jnp.int32)
  down = jnp.where(big, False, above | (tie & ((size - q) % 2 == 1)))
  return jnp.int32(size) - q - down.astype(jnp.int32)


