"""Masks pytrees: apply them, pack them to 1 bit per weight, report sparsity.

A masks tree has the structure of the params tree; each pruned leaf holds a
bool array of the parameter's shape, each leaf that is not pruned holds None.
In an optimizer state a mask may also be bit-packed along its last axis
(`pack_bits`: uint8, 8 weights per byte), which `bool_masks` unpacks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import trees

PyTree = Any


def check_bool(masks: PyTree) -> None:
  """Raises ValueError naming the first mask that is not a bool array.

  A float or int "mask" would otherwise be read as True wherever it is
  nonzero (or be multiplied in), which hides a bug rather than pruning.
  Works on traced masks too (the dtype is static).
  """
  for leaf in trees.named_leaves(masks):
    dtype = jnp.result_type(leaf.value)
    if dtype != jnp.bool_:
      raise ValueError(f"mask '{leaf.path}' has dtype {dtype}; masks must be bool "
                       "(e.g. `mask > 0` or `mask.astype(bool)`).")


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the pruned entries of every masked leaf; other leaves pass through.

  >>> apply_masks({'w': jnp.array([1., 2.])}, {'w': jnp.array([True, False])})
  {'w': Array([1., 0.], dtype=float32)}

  Raises:
    ValueError: if the masks tree does not match params, or a mask is not
      bool (names the leaf).
  """
  check_bool(masks)
  return trees.map_with_masks(
      lambda p, m: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
      params, masks)


def pack_masks(masks: PyTree) -> PyTree:
  """Packs every bool mask into uint8 bytes, 8 weights per byte, flattened.

  Shapes are not stored: `unpack_masks` takes them from the params.
  None entries stay None.

  Raises:
    ValueError: if a mask is not bool (names the leaf).
  """
  check_bool(masks)
  return jax.tree.map(
      lambda m: m if trees.is_empty(m) else jnp.packbits(jnp.asarray(m).reshape(-1)),
      masks, is_leaf=trees.is_empty)


def pack_bits(mask: jax.Array) -> jax.Array:
  """A bool mask packed along its last axis: uint8 of shape (..., ceil(d / 8)).

  Unlike `pack_masks` (flat, for files), the leading axes stay, so a mask
  sharded along any of them (FSDP) packs and unpacks on its shards.

  >>> pack_bits(jnp.array([[True] * 9, [False] * 9])).tolist()
  [[255, 128], [0, 0]]
  """
  return jnp.packbits(jnp.asarray(mask, bool), axis=-1)


def unpack_bits(bits: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `pack_bits` for a mask of `shape`."""
  return jnp.unpackbits(bits, axis=-1, count=shape[-1]).astype(bool)


def bool_masks(masks: PyTree, params: PyTree) -> PyTree:
  """`masks` with every bit-packed (uint8) leaf unpacked to a bool array shaped
  like its parameter; bool leaves and None pass through.

  Raises:
    ValueError: a uint8 leaf whose shape is not that of its packed parameter
      (names the leaf).
  """

  trees.check_same_paths(params, masks, what="masks")
  flat_m, treedef = jax.tree.flatten(masks, is_leaf=trees.is_empty)
  flat_p = jax.tree.leaves(params, is_leaf=trees.is_empty)
  paths = [leaf.path for leaf in trees.named_leaves(masks, keep_none=True)]
  out = []
  for path, param, mask in zip(paths, flat_p, flat_m, strict=True):
    if trees.is_empty(mask) or jnp.result_type(mask) != jnp.uint8:
      out.append(mask)
      continue
    shape = np.shape(param)
    packed = shape[:-1] + ((shape[-1] + 7) // 8,) if shape else ()
    if not shape or np.shape(mask) != packed:
      raise ValueError(f"bit-packed mask '{path}' is uint8{list(np.shape(mask))}, but its "
                       f"parameter of shape {shape} packs to uint8{list(packed)}.")
    out.append(unpack_bits(mask, shape))
  return jax.tree.unflatten(treedef, out)


def unpack_masks(packed: PyTree, params: PyTree) -> PyTree:
  """Inverse of `pack_masks`, using the shapes of `params`.

  Raises:
    ValueError: if the tree does not match params, or a packed leaf does not
      hold ceil(size / 8) bytes for its parameter (names the leaf).
  """
  trees.check_same_paths(params, packed, what="packed masks")
  out = []
  for p, k in zip(trees.named_leaves(params, keep_none=True),
                  trees.named_leaves(packed, keep_none=True)):
    if trees.is_empty(p.value) or trees.is_empty(k.value):
      out.append(p.value if trees.is_empty(p.value) else None)
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
  return jax.tree.unflatten(jax.tree.structure(params, is_leaf=trees.is_empty), out)


class LeafSparsity(NamedTuple):
  """Counts for one leaf.

  Attributes:
    size: entries.
    kept: entries the mask keeps (all of them for a leaf without a mask);
      None in a report of params without masks, where it is not known.
    sparsity: 1 - kept / size, the fraction the mask prunes; None where
      `kept` is.
    zero_fraction: the fraction of entries equal to 0 in the params; None in
      a report of masks alone. Zero-initialised biases and dead units count
      here, never as pruned.
  """

  size: int
  kept: int | None
  sparsity: float | None
  zero_fraction: float | None = None


class SparsityReport(NamedTuple):
  """Per-leaf and overall figures, as computed by `sparsity_report`."""

  leaves: dict[str, LeafSparsity]
  size: int
  kept: int | None
  sparsity: float | None
  zero_fraction: float | None = None

  def __str__(self) -> str:
    width = max([len(p) for p in self.leaves] + [7])
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    lines = [f"{'leaf':<{width}}  {'size':>10}  {'kept':>10}  {'sparsity':>8}  {'zeros':>8}"]
    rows = [*self.leaves.items(), ("overall", self)]
    for path, leaf in rows:
      lines.append(f"{path:<{width}}  {leaf.size:>10}  {fmt(leaf.kept, '>10'):>10}  "
                   f"{fmt(leaf.sparsity, '8.4f'):>8}  {fmt(leaf.zero_fraction, '8.4f'):>8}")
    return "\n".join(lines)


def _fraction(part: int | None, whole: int) -> float | None:
  if part is None:
    return None
  return 1.0 - part / whole if whole else 0.0


def sparsity_report(tree: PyTree, masks: PyTree | None = None) -> SparsityReport:
  """Per-leaf and overall mask sparsity and fraction of zero weights.

  - `sparsity_report(masks)`, a tree of bool masks (None where not
    pruned): sparsity of the masked leaves; `zero_fraction` is None.
  - `sparsity_report(params, masks)`: every array of params, with its
    mask's sparsity (0 for unmasked leaves) and its own fraction of zeros.
  - `sparsity_report(params)`: only the fraction of zeros; `kept` and
    `sparsity` are None, since a zero weight is not necessarily a pruned one
    (zero-initialised biases, dead units).

  Runs on the host: call it outside jit.

  >>> r = sparsity_report({'w': jnp.array([True, False, False, False])})
  >>> r.leaves['w'].sparsity, r.sparsity
  (0.75, 0.75)
  >>> r = sparsity_report({'b': jnp.zeros(2), 'w': jnp.array([1., 0.])}, {'b': None, 'w': jnp.array([True, False])})
  >>> r.leaves['b'], r.sparsity, r.zero_fraction
  (LeafSparsity(size=2, kept=2, sparsity=0.0, zero_fraction=1.0), 0.25, 0.75)

  Raises:
    ValueError: if `masks` does not match `tree`, or a mask is not bool.
  """
  if masks is None:
    flat = trees.named_leaves(tree)
    if all(jnp.result_type(leaf.value) == jnp.bool_ for leaf in flat):
      rows = [(leaf.path, None, leaf.value) for leaf in flat]
    else:
      rows = [(leaf.path, leaf.value, False) for leaf in flat]
  else:
    check_bool(masks)
    rows = [(leaf.path, leaf.param, True if leaf.mask is None else leaf.mask)
            for leaf in trees.leaves_with_masks(tree, masks)]
  leaves = {}
  for path, param, mask in rows:
    size = int(np.size(param if param is not None else mask))
    if mask is False:
      kept = None
    elif mask is True:
      kept = size
    else:
      kept = int(np.count_nonzero(np.asarray(mask)))
    zeros = None if param is None else size - int(np.count_nonzero(np.asarray(param)))
    leaves[path] = LeafSparsity(size, kept, _fraction(kept, size),
                                None if zeros is None else (zeros / size if size else 0.0))
  size = sum(l.size for l in leaves.values())
  kept = None if any(l.kept is None for l in leaves.values()) else sum(
      l.kept for l in leaves.values())
  zero_fraction = None
  if all(l.zero_fraction is not None for l in leaves.values()) and leaves:
    zero_fraction = sum(l.zero_fraction * l.size for l in leaves.values()) / size if size else 0.0
  return SparsityReport(leaves, size, kept, _fraction(kept, size), zero_fraction)
