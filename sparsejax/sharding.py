"""FSDP layouts: each large leaf of a pytree sharded along one mesh axis.

Fully sharded data parallelism keeps 1/n of every large parameter (and of
its optimizer moments and mask) on each of the n devices of an `fsdp` mesh
axis, so a model need not fit on one device. The rule is per leaf and
depends only on its shape, so params, Adam's `mu`/`nu` and the bool masks of
a `PruningState` (same shapes) get the same layout and the elementwise parts
of a step need no communication. sparsejax's mask transforms count on the
shards (`kth` reduces blocks of the last axis that split on its shards): a
pruning update on sharded params exchanges counts only, never a kernel.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

PyTree = Any


def fsdp_axis(shape: Sequence[int], shards: int, min_size: int = 0) -> int | None:
  """The axis of `shape` to shard `shards` ways: the largest one it divides
  (the last of equals), or None when there is none or the leaf has fewer
  than `min_size` entries (small leaves are cheaper replicated).

  >>> fsdp_axis((64, 300), 2), fsdp_axis((3, 3, 16, 32), 4), fsdp_axis((10,), 4)
  (1, 3, None)
  """
  if shards < 1:
    raise ValueError(f"shards={shards} must be at least 1.")
  if shards == 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
    return None
  candidates = [axis for axis, size in enumerate(shape) if size % shards == 0]
  if not candidates:
    return None
  return max(candidates, key=lambda axis: (shape[axis], axis))


def fsdp_shardings(tree: PyTree, mesh: jax.sharding.Mesh, axis: str = "fsdp",
                   min_size: int = 0) -> PyTree:
  """A `NamedSharding` per leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s):
  sharded along mesh axis `axis` on the leaf's `fsdp_axis`, replicated over
  every other mesh axis; replicated where no axis fits.

  Use it for `jax.jit`'s `in_shardings` / `out_shardings` and for Orbax
  restore targets.

  Raises:
    ValueError: `axis` is not an axis of `mesh`.
  """
  if axis not in mesh.shape:
    raise ValueError(f"mesh axis {axis!r} is not one of the mesh's axes {tuple(mesh.shape)}.")
  shards = mesh.shape[axis]

  def one(leaf):
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
    spec = [None] * len(shape)
    chosen = fsdp_axis(shape, shards, min_size)
    if chosen is not None:
      spec[chosen] = axis
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

  return jax.tree.map(one, tree)
