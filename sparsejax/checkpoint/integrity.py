"""Checksums that let a restore tell intact checkpoint data from damaged data.

Orbax reads back whatever bytes are on disk: one flipped byte in a weight
file restores as a plausible-looking garbage value, and a missing chunk file
reads as zeros. So every step's `meta` records, at save time, a CRC-32 of
each leaf of each item (computed from the arrays in memory) and a CRC-32 of
the rest of `meta` itself; a restore recomputes them from what it read.

CRC-32 detects every burst error of up to 32 bits and any random damage
with probability 1 - 2^-32: it is a guard against corruption, not against
someone forging a checkpoint.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import numpy as np

CHECKSUMS = "checksums"          # meta key: {item: {leaf path: crc32 hex}}
META_CHECKSUM = "meta_checksum"  # meta key: crc32 hex of the rest of meta


def leaf_checksum(value: Any) -> str | None:
  """The CRC-32 of an array's bytes as 8 hex digits; None when this process
  cannot see the whole array (a multi-host array: its shards are checked
  where they live)."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return None
  data = np.ascontiguousarray(np.asarray(value))
  return f"{zlib.crc32(data.view(np.uint8).reshape(-1)):08x}"


def tree_checksums(leaves: dict[str, Any]) -> dict[str, str]:
  """{path: checksum} of {path: array}, leaving out arrays this process cannot see whole."""
  sums = {path: leaf_checksum(value) for path, value in leaves.items()}
  return {path: value for path, value in sums.items() if value is not None}


def first_mismatch(leaves: dict[str, Any], expected: dict[str, str]) -> str | None:
  """A description of the first leaf whose bytes differ from its recorded
  checksum, or None when all that can be checked agree.

  Leaves without a recorded checksum (not visible whole at save) are skipped;
  a recorded leaf that was not read is a mismatch.
  """
  for path, want in expected.items():
    if path not in leaves:
      return f"leaf {path!r} is missing"
    got = leaf_checksum(leaves[path])
    if got is not None and got != want:
      return f"leaf {path!r} fails its checksum (crc32 {got}, saved as {want})"
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
