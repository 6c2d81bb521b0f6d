"""Masks pytrees: apply them, pack them to 1 bit per weight, report sparsity.

A masks tree has the structure of the params tree; each pruned leaf holds a
bool array of the parameter's shape, each leaf that is not pruned holds None.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import trees

PyTree = Any


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the pruned entries of every masked leaf; other leaves pass through.

  >>> apply_masks({'w': jnp.array([1., 2.])}, {'w': jnp.array([True, False])})
  {'w': Array([1., 0.], dtype=float32)}

  Raises:
    ValueError: if the masks tree does not match params (names the leaf).
  """
  return trees.map_with_masks(
      lambda p, m: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
      params, masks)


def pack_masks(masks: PyTree) -> PyTree:
  """Packs every bool mask into uint8 bytes, 8 weights per byte, flattened.

  Shapes are not stored: `unpack_masks` takes them from the params.
  None entries stay None.
  """
  return jax.tree.map(
      lambda m: None if m is None else jnp.packbits(jnp.asarray(m, bool).reshape(-1)),
      masks, is_leaf=lambda x: x is None)


def unpack_masks(packed: PyTree, params: PyTree) -> PyTree:
  """Inverse of `pack_masks`, using the shapes of `params`.

  Raises:
    ValueError: if the tree does not match params, or a packed leaf does not
      hold ceil(size / 8) bytes for its parameter (names the leaf).
  """
  trees.check_same_paths(params, packed, what="packed masks")
  p_leaves = trees.named_leaves(params)
  k_leaves = trees.named_leaves(packed, keep_none=True)
  out = []
  for p, k in zip(p_leaves, k_leaves):
    if k.value is None:
      out.append(None)
      continue
    size = int(np.size(p.value))
    expected = (size + 7) // 8
    dtype = jnp.result_type(k.value)
    if np.shape(k.value) != (expected,) or dtype != jnp.uint8:
      raise ValueError(
          f"packed mask '{k.path}' is {dtype}{list(np.shape(k.value))}, but "
          f"the parameter of shape {np.shape(p.value)} needs uint8[{expected}] (1 bit per weight)."
      )
    bits = jnp.unpackbits(jnp.asarray(k.value), count=size)
    out.append(bits.astype(bool).reshape(np.shape(p.value)))
  return jax.tree.unflatten(jax.tree.structure(params), out)


class LeafSparsity(NamedTuple):
  """Counts for one leaf: entries, kept (nonzero / True) entries, sparsity."""

  size: int
  kept: int
  sparsity: float


class SparsityReport(NamedTuple):
  """Per-leaf and overall sparsity, as computed by `sparsity_report`."""

  leaves: dict[str, LeafSparsity]
  size: int
  kept: int
  sparsity: float

  def __str__(self) -> str:
    width = max([len(p) for p in self.leaves] + [7])
    lines = [f"{'leaf':<{width}}  {'size':>10}  {'kept':>10}  sparsity"]
    for path, leaf in self.leaves.items():
      lines.append(f"{path:<{width}}  {leaf.size:>10}  {leaf.kept:>10}  {leaf.sparsity:8.4f}")
    lines.append(f"{'overall':<{width}}  {self.size:>10}  {self.kept:>10}  {self.sparsity:8.4f}")
    return "\n".join(lines)


def sparsity_report(tree: PyTree) -> SparsityReport:
  """Per-leaf and overall sparsity of a masks tree or a params tree.

  For bool leaves (masks) the kept entries are the True ones; for numeric
  leaves (params) the nonzero ones. None leaves (not pruned) are skipped.
  Runs on the host: call it outside jit.

  >>> r = sparsity_report({'w': jnp.array([True, False, False, False])})
  >>> r.leaves['w'].sparsity, r.sparsity
  (0.75, 0.75)
  """
  leaves = {}
  for leaf in trees.named_leaves(tree):
    value = np.asarray(leaf.value)
    kept = int(np.count_nonzero(value))
    leaves[leaf.path] = LeafSparsity(value.size, kept, 1.0 - kept / value.size if value.size else 0.0)
  size = sum(l.size for l in leaves.values())
  kept = sum(l.kept for l in leaves.values())
  return SparsityReport(leaves, size, kept, 1.0 - kept / size if size else 0.0)
