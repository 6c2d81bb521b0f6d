"""Sort keys and counting passes: the primitives of selection without sorting.

Scores are mapped to unsigned integer keys whose integer order is the scores'
order, so that a threshold can be found by bisection over key bits, each
step one fused compare-and-count pass over the scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_NAN_KEY = 1  # below the key of -inf; only NaNs get it
_UINT16_MAX = 2**16 - 1
_COUNT_ROW = 32  # entries summed in uint8 before widening: cheap on every backend


def sortable_keys(scores: jax.Array) -> jax.Array:
  """Maps scores to unsigned integer keys with the same order as the values.

  Floats of up to 32 bits (and bool, and integers of up to 16 bits) become
  uint32 keys through float32; int32/uint32 keep all their bits; 64-bit
  dtypes (with jax_enable_x64) get uint64 keys. -0.0 and +0.0 share a key;
  NaN gets key 1, below every number.
  """
  x = jnp.asarray(scores)
  dtype = x.dtype
  wide = dtype.itemsize == 8
  key_type = jnp.uint64 if wide else jnp.uint32
  sign = np.array(1 << (8 * jnp.dtype(key_type).itemsize - 1), key_type)
  if jnp.issubdtype(dtype, jnp.signedinteger) and dtype.itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, key_type) ^ sign
  if jnp.issubdtype(dtype, jnp.unsignedinteger) and dtype.itemsize >= 4:
    return x.astype(key_type)
  if dtype == jnp.bfloat16:
    # Widened from its bits: with `astype`, XLA:CPU (excess precision
    # allowed) drops the rounding to bf16 of a product fused into the pass,
    # so passes would rank unrounded values and stored reads rounded ones.
    x = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16, jnp.float32)
  elif not wide and dtype != jnp.float32:
    x = x.astype(jnp.float32)  # exact for f16, bool and small integers
  bits = jax.lax.bitcast_convert_type(x, key_type)
  # Every test is on the bits, never on the float: XLA:CPU flushes subnormals
  # to zero in float comparisons, and a float test (`x == 0`, `isnan(x)`)
  # fused with the bitcast made XLA:CPU read the subnormals as zero.
  magnitude = bits & ~sign
  infinity = np.array(0x7FF0000000000000 if wide else 0x7F800000, key_type)
  bits = jnp.where(magnitude == 0, np.array(0, key_type), bits)  # -0.0 -> +0.0
  keys = jnp.where(bits >= sign, ~bits, bits | sign)
  return jnp.where(magnitude > infinity, np.array(_NAN_KEY, key_type), keys)


def key_family(dtype) -> str:
  """Scores whose keys can be compared with each other share a family."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer) and dtype.itemsize >= 4:
    return f"{'u' if jnp.issubdtype(dtype, jnp.unsignedinteger) else ''}int{8 * dtype.itemsize}"
  return "float64" if dtype.itemsize == 8 else "float32"


def count_true(pred: jax.Array) -> jax.Array:
  """Counts True entries as int32.

  The last axis is summed in a narrow integer type first, in rows of 32
  where it divides: this keeps the count fused with the comparison that
  produces `pred` (XLA:CPU otherwise materialises an int32 copy of the whole
  array, or for a longer uint8 row a uint8 copy), which makes a counting
  pass ~2-10x cheaper there. Arrays of two or more axes keep their leading
  axes (the last is split into rows of 32 or summed whole), so a `pred`
  sharded along any axis (FSDP) is counted on its shards and only the
  partial counts cross devices; 1-D arrays are summed in rows of 32.
  """
  if pred.ndim >= 2 and pred.shape[-1] % _COUNT_ROW == 0:
    # Rows of 32 along the last axis: a longer uint8/uint16 sum is split by
    # XLA:CPU into a reduce-window over a stored uint8 copy of `pred`.
    rows = pred.reshape(pred.shape[:-1] + (-1, _COUNT_ROW)).astype(jnp.uint8)
    return rows.sum(axis=-1, dtype=jnp.uint8).astype(jnp.int32).sum(dtype=jnp.int32)
  if pred.ndim >= 2 and pred.shape[-1] <= _UINT16_MAX:
    return pred.sum(axis=-1, dtype=jnp.uint16).astype(jnp.int32).sum(dtype=jnp.int32)
  flat = pred.reshape(-1)
  size = flat.shape[0]
  main = size - size % _COUNT_ROW
  total = jnp.zeros((), jnp.int32)
  if main:
    rows = flat[:main].reshape(-1, _COUNT_ROW).astype(jnp.uint8)
    total += rows.sum(axis=1, dtype=jnp.uint8).astype(jnp.int32).sum(dtype=jnp.int32)
  if size - main:
    total += flat[main:].astype(jnp.int32).sum(dtype=jnp.int32)
  return total
