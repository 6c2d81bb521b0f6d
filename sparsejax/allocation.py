"""Allocation: how a total sparsity is split across prunable leaves.

- `uniform`: every prunable leaf gets the same sparsity.
- `erk`: Erdos-Renyi-Kernel (Evci et al. 2020, RigL): the density of leaf l
  is proportional to sum(shape_l) / prod(shape_l), scaled so that the total
  density is 1 - sparsity; leaves that would exceed density 1 are made dense
  and the scale is solved again for the rest.
- `global`: one threshold across all prunable leaves (no per-leaf split);
  `allocate` returns None and the selection compares scores across leaves.
- `lamp`: LAMP (Lee et al. 2021): like `global`, after each leaf's scores
  are LAMP-normalised (`sparsejax.lamp`), which makes the threshold fair
  across leaves of different scale; `allocate` returns None.
- a mapping {regex: sparsity}: a leaf whose '/'-joined path matches a regex
  (`re.search`, first match wins) gets that sparsity; other prunable leaves
  get the overall sparsity.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Mapping, Sequence, Union

import jax.numpy as jnp
import numpy as np

from sparsejax import counts

Allocation = Union[str, Mapping[str, float]]
ALLOCATIONS = ("uniform", "erk", "global", "lamp")
SHARED_THRESHOLD = ("global", "lamp")  # one threshold across leaves


def validate_allocation(allocation: Allocation) -> None:
  """Raises ValueError for an unknown name or a malformed custom map."""
  if isinstance(allocation, str):
    if allocation not in ALLOCATIONS:
      raise ValueError(
          f"unknown allocation {allocation!r}; use one of {ALLOCATIONS} "
          "or a mapping {path_regex: sparsity}."
      )
    return
  if not isinstance(allocation, Mapping):
    raise ValueError(f"allocation must be a name or a mapping, got {type(allocation).__name__}.")
  for pattern, value in allocation.items():
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"custom allocation regex {pattern!r} does not compile: {e}") from e
    counts.check_sparsity(value, f"sparsity for {pattern!r}")


def erk_densities(sparsity, shapes: Sequence[tuple[int, ...]]):
  """Per-leaf ERK densities whose size-weighted total is 1 - sparsity.

  `sparsity` may be a Python number (numpy result) or traced (jnp result).

  >>> [round(float(d), 4) for d in erk_densities(0.5, [(4, 4), (100, 100)])]
  [1.0, 0.4992]
  """
  static = isinstance(sparsity, numbers.Real)
  xp, dtype = (np, np.float64) if static else (jnp, jnp.float32)
  # A leaf within rounding of density 1 is dense: at sparsity 0 every leaf
  # must keep every weight, even where float32 gives 0.99999994.
  tolerance = 1e-12 if static else 1e-6
  sizes = xp.asarray([math.prod(s) for s in shapes], dtype=dtype)
  raw = xp.asarray([sum(s) / math.prod(s) if math.prod(s) else 0.0 for s in shapes], dtype=dtype)
  budget = (1.0 - xp.asarray(sparsity, dtype)) * sizes.sum()
  dense = xp.zeros(len(shapes), dtype=bool)
  # Each round makes dense every leaf that reaches density 1; the scale only
  # grows as leaves are removed, so at most len(shapes) rounds are needed.
  for _ in range(len(shapes)):
    free = xp.where(dense, 0.0, sizes * raw).sum()
    left = budget - xp.where(dense, sizes, 0.0).sum()
    scale = xp.where(free > 0, left / xp.where(free > 0, free, 1.0), 0.0)
    dense = dense | (scale * raw >= 1.0 - tolerance)
  return xp.clip(xp.where(dense, 1.0, scale * raw), 0.0, 1.0)


def _custom(mapping: Mapping[str, float], sparsity, paths: Sequence[str]) -> list:
  patterns = [(re.compile(p), p, v) for p, v in mapping.items()]
  used = set()
  out = []
  for path in paths:
    for regex, pattern, value in patterns:
      if regex.search(path):
        out.append(value)
        used.add(pattern)
        break
    else:
      out.append(sparsity)
  unused = [p for _, p, _ in patterns if p not in used]
  if unused:
    raise ValueError(
        f"custom allocation regex(es) {unused} match no prunable leaf; "
        f"prunable leaves are {list(paths)}."
    )
  return out


def allocate(allocation: Allocation, sparsity, paths: Sequence[str],
             shapes: Sequence[tuple[int, ...]]) -> list | None:
  """Per-leaf sparsities for the prunable leaves, or None for `global`/`lamp`.

  Args:
    allocation: 'uniform', 'erk', 'global', 'lamp' or a {regex: sparsity}
      mapping.
    sparsity: total sparsity in [0, 1]; may be traced.
    paths: the '/'-joined paths of the prunable leaves.
    shapes: their shapes.

  Returns:
    A list with one sparsity per leaf (Python floats or traced scalars), or
    None when one threshold is shared by all leaves.

  Raises:
    ValueError: for an unknown allocation, a sparsity outside [0, 1], or a
      custom regex that matches no prunable leaf.
  """
  validate_allocation(allocation)
  counts.check_sparsity(sparsity)
  if allocation in SHARED_THRESHOLD:
    return None
  if allocation == "uniform":
    return [sparsity] * len(paths)
  if allocation == "erk":
    if not shapes:
      return []
    densities = erk_densities(sparsity, shapes)
    if isinstance(sparsity, numbers.Real):
      return [float(1.0 - d) for d in densities]
    return [1.0 - densities[i] for i in range(len(shapes))]
  return _custom(allocation, sparsity, paths)

