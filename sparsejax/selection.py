"""Selection: which entries a mask keeps, given scores.

`topk_mask` keeps exactly k = round((1 - sparsity) * size) entries, the
largest scores, ties going to the lower flat index. It never sorts: scores are
mapped to unsigned integer keys whose order is the scores' order, the k-th
largest key is found by bisection over its 32 bits (one counting pass per bit),
and ties at that key are split by a bisection over the flat index, run only
when ties straddle the cut. Each pass is a compare and a count, so the whole
select costs a few dozen cheap reductions instead of an O(n log n) sort.

`nm_mask` keeps the n largest of every m consecutive entries along an axis.

NaN scores raise an error when the scores are concrete; inside `jit` (where
values cannot be checked) a NaN ranks below every number, so it is pruned
first.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_NAN_KEY = 1  # below the key of -inf; only NaNs get it
_COUNT_ROW = 32  # entries summed in uint8 before widening: cheap on every backend
_MAX_ENTRIES = 2**31 - 1  # counts and flat indices are int32


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


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
  if not wide and dtype != jnp.float32:
    x = x.astype(jnp.float32)  # exact for bf16, f16, bool and small integers
  x = jnp.where(x == 0, jnp.zeros((), x.dtype), x)
  bits = jax.lax.bitcast_convert_type(x, key_type)
  keys = jnp.where(bits >= sign, ~bits, bits | sign)
  return jnp.where(jnp.isnan(x), np.array(_NAN_KEY, key_type), keys)


def count_true(pred: jax.Array) -> jax.Array:
  """Counts True entries as int32.

  Rows of 32 are summed in uint8 first: this keeps the count fused with the
  comparison that produces `pred` (XLA:CPU otherwise materialises an int32
  copy of the whole array), which makes a counting pass ~10x cheaper there.
  """
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


def check_sparsity(sparsity, name: str = "sparsity") -> None:
  """Raises ValueError if a sparsity is not a scalar, or (when concrete) is
  outside [0, 1] or NaN."""
  if np.ndim(sparsity) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(sparsity)}.")
  if isinstance(sparsity, numbers.Real) or (
      _is_concrete(sparsity) and np.ndim(sparsity) == 0
  ):
    value = float(sparsity)
    if not 0.0 <= value <= 1.0:  # also False for NaN
      raise ValueError(f"{name} must be in [0, 1], got {value}.")


def check_no_nan(scores: jax.Array, name: str = "scores") -> None:
  """Raises ValueError naming `name` if concrete `scores` contain NaN."""
  if _is_concrete(scores) and jnp.issubdtype(jnp.asarray(scores).dtype, jnp.floating):
    if bool(jnp.isnan(scores).any()):
      raise ValueError(f"NaN in the scores of '{name}': cannot rank them.")


def keep_count(size: int, sparsity) -> jax.Array | int:
  """Returns round((1 - sparsity) * size), exact for Python numbers.

  A traced sparsity is a float32 (float64 under jax_enable_x64): k is
  computed in that precision, from that value. float32 cannot hold every
  count above 2**24, so there k may differ from the exact value by about
  size * 2**-24 (a few entries for a leaf of 100M weights).

  >>> keep_count(10, 0.85), int(keep_count(10, jnp.float32(0.85)))
  (2, 1)
  """
  if isinstance(sparsity, numbers.Real):
    return int(round((1.0 - float(sparsity)) * size))
  dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
  s = jnp.clip(jnp.asarray(sparsity, dtype), 0.0, 1.0)
  return jnp.round((1.0 - s) * size).astype(jnp.int32)


def _kth_largest_key(keys: Sequence[jax.Array], k) -> tuple[jax.Array, jax.Array]:
  """The k-th largest key T (k >= 1) and count(keys >= T).

  T is the largest value with count(keys >= T) >= k, built bit by bit from
  the most significant one: a bit is set when enough keys are still at or
  above the candidate.
  """

  key_type = keys[0].dtype
  bits = 8 * key_type.itemsize

  def body(i, carry):
    prefix, at_or_above = carry
    candidate = prefix | (jnp.ones((), key_type) << jnp.asarray(bits - 1 - i, key_type))
    count = sum(count_true(key >= candidate) for key in keys)
    take = count >= k
    return jnp.where(take, candidate, prefix), jnp.where(take, count, at_or_above)

  total = jnp.int32(sum(key.size for key in keys))
  return jax.lax.fori_loop(0, bits, body, (jnp.zeros((), key_type), total))


def _flat_indices(keys: Sequence[jax.Array]) -> list[jax.Array]:
  out, offset = [], 0
  for key in keys:
    out.append(offset + jnp.arange(key.size, dtype=jnp.int32).reshape(key.shape))
    offset += key.size
  return out


def _tie_cutoff(keys, threshold, need) -> jax.Array:
  """Smallest flat index I with count(key == T and index < I) >= need."""
  indices = _flat_indices(keys)
  total = sum(key.size for key in keys)
  steps = max(1, int(np.ceil(np.log2(total + 1))))

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    count = sum(
        count_true((key == threshold) & (index < mid))
        for key, index in zip(keys, indices)
    )
    enough = count >= need
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = jax.lax.fori_loop(0, steps, body, (jnp.int32(0), jnp.int32(total)))
  return lo


def topk_masks(scores: Sequence[jax.Array], sparsity) -> list[jax.Array]:
  """Top-k over several arrays at once, as if they were concatenated.

  Keeps exactly round((1 - sparsity) * total_size) entries with one threshold
  across all arrays (global magnitude pruning); ties go to the lower position
  in the concatenation order.

  Args:
    scores: arrays of scores (any float or integer dtype, any shapes).
    sparsity: fraction pruned, in [0, 1]; may be a traced scalar.

  Returns:
    A list of boolean masks, one per input, same shapes.
  """
  check_sparsity(sparsity)
  scores = [jnp.asarray(s) for s in scores]
  for i, s in enumerate(scores):
    check_no_nan(s, f"scores[{i}]")
  total = sum(s.size for s in scores)
  if total == 0:
    return [jnp.zeros(s.shape, bool) for s in scores]
  if total > _MAX_ENTRIES:
    raise ValueError(f"top-k over {total} entries: at most {_MAX_ENTRIES} are supported.")
  k = keep_count(total, sparsity)
  common = jnp.result_type(*scores)  # one key order across arrays
  keys = [sortable_keys(s.astype(common)) for s in scores]
  k_at_least_one = jnp.maximum(k, 1)
  threshold, n_at_or_above = _kth_largest_key(keys, k_at_least_one)
  cutoff = jax.lax.cond(
      n_at_or_above == k_at_least_one,
      lambda: jnp.int32(total),
      lambda: _tie_cutoff(keys, threshold, k_at_least_one - sum(
          count_true(key > threshold) for key in keys)),
  )
  masks = []
  for key, index in zip(keys, _flat_indices(keys)):
    keep = (key > threshold) | ((key == threshold) & (index < cutoff))
    masks.append(keep & (k > 0))
  return masks


def topk_mask(scores: jax.Array, sparsity) -> jax.Array:
  """Boolean mask keeping the round((1 - sparsity) * size) largest scores.

  Exactly that many entries are kept; ties go to the lower flat index. Works
  under jit, vmap, pmap and sharding; `sparsity` may be traced.

  >>> topk_mask(jnp.array([3., 1., 2., 2.]), 0.5).tolist()
  [True, False, True, False]

  Args:
    scores: array of scores, any shape.
    sparsity: fraction of entries to drop, in [0, 1].

  Returns:
    A bool array with the shape of `scores`.

  Raises:
    ValueError: if a concrete sparsity is outside [0, 1] or scores hold NaN.
  """
  return topk_masks([scores], sparsity)[0]


def nm_mask(scores: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
  """Boolean N:M mask: in every m consecutive entries along `axis`, keep n.

  The n largest scores of each group are kept, ties going to the lower index.
  For a Flax Dense kernel (in, out) the default axis -2 groups along the
  input (reduction) dimension; for a Conv kernel (H, W, Cin, Cout) along Cin.

  >>> nm_mask(jnp.array([[1.], [4.], [3.], [2.]]), n=2, m=4).ravel().tolist()
  [False, True, True, False]

  Raises:
    ValueError: if not 0 <= n <= m, m < 1, the axis is out of range, its
      length is not divisible by m, or concrete scores hold NaN.
  """
  for name, value in (("n", n), ("m", m)):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
      raise ValueError(f"{name} must be a Python int, got {value!r}.")
  if m < 1 or not 0 <= n <= m:
    raise ValueError(f"N:M needs 0 <= N <= M and M >= 1, got N={n}, M={m}.")
  scores = jnp.asarray(scores)
  if not -scores.ndim <= axis < scores.ndim:
    raise ValueError(f"axis {axis} is out of range for scores of shape {scores.shape}.")
  axis %= scores.ndim
  length = scores.shape[axis]
  if length % m:
    raise ValueError(
        f"axis {axis} of shape {scores.shape} has length {length}, not divisible by M={m}."
    )
  check_no_nan(scores)
  keys = sortable_keys(scores)
  grouped = keys.reshape(scores.shape[:axis] + (length // m, m) + scores.shape[axis + 1:])
  member = axis + 1  # position of the within-group axis
  mine = jnp.expand_dims(grouped, member + 1)   # i along `member`
  other = jnp.expand_dims(grouped, member)      # j along `member + 1`
  i = jax.lax.broadcasted_iota(jnp.int32, (m, m), 0).reshape((m, m) + (1,) * (grouped.ndim - member - 1))
  j = jax.lax.broadcasted_iota(jnp.int32, (m, m), 1).reshape(i.shape)
  beats = (other > mine) | ((other == mine) & (j < i))
  rank_dtype = jnp.uint8 if m <= 255 else jnp.int32
  rank = beats.astype(rank_dtype).sum(axis=member + 1, dtype=rank_dtype)
  return (rank < n).reshape(scores.shape)
