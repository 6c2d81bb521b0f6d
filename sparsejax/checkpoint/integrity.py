"""Checksums that let a restore tell intact checkpoint data from damaged data.

Orbax reads back whatever bytes are on disk: one flipped byte in a weight
file restores as a plausible-looking garbage value, and a missing chunk file
reads as zeros. So every step's `meta` records, at save time, a CRC-32 of
each leaf of each item (computed from the arrays in memory) and a CRC-32 of
the rest of `meta` itself; a restore recomputes them from what it read.

CRC-32 detects every burst error of up to 32 bits and any random damage
with probability 1 - 2^-32: it is a guard against corruption, not against
someone forging a checkpoint.

An array spread over several processes (multi-host training) is not in any
one process's memory, so it gets a `mix32` sum instead, computed where its
shards live: every byte, hashed with its flat position by a bijective
32-bit mixer, summed modulo 2^32. A sum does not depend on how the array is
split, so a checkpoint written by 2 processes verifies when read by 1 and
the reverse; any one damaged byte changes it, and random damage goes
unnoticed with probability 2^-32.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CHECKSUMS = "checksums"          # meta key: {item: {leaf path: crc32 hex}}
META_CHECKSUM = "meta_checksum"  # meta key: crc32 hex of the rest of meta
FORMAT = "format"                # meta key: the checkpoint format version
# 1: before checksums (steps carry no format record); 2: CRC-32s of every leaf
# and of meta, the format also recorded outside meta (Orbax's step metadata).
FORMAT_VERSION = 2
# Keys every meta has had, before checksums too: a meta without them is not an old one.
PRE_CHECKSUM_KEYS = ("level", "step", "versions")


MIX32 = "mix32:"  # prefix of a position-hashed byte sum (multi-process arrays)


@jax.jit
def _mix32_sum(value: jax.Array) -> jax.Array:
  """sum_i mix(i * 0x9E3779B1 + byte_i) mod 2^32 over the array's bytes in
  C order, mix being murmur3's 32-bit finaliser (a bijection)."""
  if value.dtype == jnp.bool_:
    value = value.astype(jnp.uint8)
  # Bytes in memory order: a trailing axis of itemsize bytes for wider types.
  data = value if value.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(value, jnp.uint8)
  # Each byte's flat position from iotas, so nothing is reshaped (or gathered).
  position = jnp.zeros(data.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(data.ndim)):
    position += jax.lax.broadcasted_iota(jnp.uint32, data.shape, axis) * np.uint32(stride % 2**32)
    stride *= data.shape[axis]
  h = position * np.uint32(0x9E3779B1) + data.astype(jnp.uint32)
  h ^= h >> 16
  h *= np.uint32(0x85EBCA6B)
  h ^= h >> 13
  h *= np.uint32(0xC2B2AE35)
  h ^= h >> 16
  return jnp.sum(h, dtype=jnp.uint32)


def mix32(value: Any) -> str:
  """The `mix32` sum of an array (host or device, whole or spread over
  processes) as 'mix32:' and 8 hex digits; the same for any layout."""
  return f"{MIX32}{int(np.asarray(_mix32_sum(jnp.asarray(value)))):08x}"


def _crc32(value: Any) -> str:
  data = np.ascontiguousarray(np.asarray(value))
  return f"{zlib.crc32(data.view(np.uint8).reshape(-1)):08x}"


def _is_spread(value: Any) -> bool:
  """Whether `value` lives partly in other processes."""
  return isinstance(value, jax.Array) and not value.is_fully_addressable


def leaf_checksum(value: Any) -> str:
  """The CRC-32 of an array's bytes as 8 hex digits; its `mix32` sum when this
  process cannot see the whole array (a multi-host array)."""
  return mix32(value) if _is_spread(value) else _crc32(value)


def _checksum_like(value: Any, recorded: str) -> str:
  """`value`'s checksum in the kind `recorded` is (a CRC-32 needs the whole
  array here: a multi-host array is gathered to every process first)."""
  if recorded.startswith(MIX32):
    return mix32(value)
  if _is_spread(value):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    value = multihost_utils.process_allgather(value, tiled=True)
  return _crc32(value)


def tree_checksums(leaves: dict[str, Any]) -> dict[str, str]:
  """{path: checksum} of {path: array}."""
  return {path: leaf_checksum(value) for path, value in leaves.items()}


def first_mismatch(leaves: dict[str, Any], expected: dict[str, str]) -> str | None:
  """A description of the first leaf whose bytes differ from its recorded
  checksum, or None when all agree.

  Leaves without a recorded checksum (saved by a version that skipped
  multi-host arrays) are not checked; a recorded leaf that was not read is a
  mismatch.
  """
  for path, want in expected.items():
    if path not in leaves:
      return f"leaf {path!r} is missing"
    got = _checksum_like(leaves[path], want)
    if got != want:
      got = got if got.startswith(MIX32) else f"crc32 {got}"
      return f"leaf {path!r} fails its checksum ({got}, saved as {want})"
  return None


def _meta_bytes(meta: dict) -> bytes:
  body = {key: value for key, value in meta.items() if key != META_CHECKSUM}
  return json.dumps(body, sort_keys=True).encode()


def seal_meta(meta: dict) -> dict:
  """`meta` with its own checksum added (over its JSON, keys sorted)."""
  return {**meta, META_CHECKSUM: f"{zlib.crc32(_meta_bytes(meta)):08x}"}


def meta_is_intact(meta: dict) -> bool:
  """Whether `meta` matches its own checksum; True for meta written before checksums."""
  if META_CHECKSUM not in meta:
    return CHECKSUMS not in meta  # a sealed meta that lost its seal is damaged
  return meta[META_CHECKSUM] == f"{zlib.crc32(_meta_bytes(meta)):08x}"
