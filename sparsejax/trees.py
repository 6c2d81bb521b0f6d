"""Named views of parameter pytrees: '/'-joined paths, prunable-leaf filters
and structure checks shared by every mask transform.

Paths are what users write in custom sparsity maps and what reports print,
so a Flax Linen params dict (`{'Dense_0': {'kernel': ...}}`) and a Flax NNX
state (whose leaves sit under a `.value` attribute) both give names such as
`Dense_0/kernel` (a full Linen variables dict gives `params/Dense_0/kernel`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

PyTree = Any
LeafFilter = Callable[[str, Any], bool]


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: tuple[Any, ...]) -> str:
  """Returns the '/'-joined name of a jax key path.

  A trailing `value` attribute (how Flax NNX variables hold their array) is
  dropped so that Linen and NNX parameters get the same names.

  >>> path_name((jax.tree_util.DictKey('Dense_0'), jax.tree_util.DictKey('kernel')))
  'Dense_0/kernel'
  """
  parts = [_key_name(k) for k in path]
  if parts and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    parts = parts[:-1]
  return "/".join(parts)


def _is_none(x: Any) -> bool:
  return x is None


class Leaf(NamedTuple):
  """One leaf of a flattened tree with its '/'-joined path."""

  path: str
  value: Any


def named_leaves(tree: PyTree, keep_none: bool = False) -> list[Leaf]:
  """Flattens `tree` into `Leaf(path, value)` pairs, in jax.tree order.

  Args:
    tree: any pytree.
    keep_none: if True, `None` entries (unpruned leaves of a masks tree) are
      returned as leaves instead of being dropped as empty subtrees.
  """
  is_leaf = _is_none if keep_none else None
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [Leaf(path_name(p), v) for p, v in flat]


def default_filter(path: str, leaf: Any) -> bool:
  """Prunes arrays with at least two dimensions (kernels, embeddings).

  Biases, norm scales and other vectors are left dense, as in most of the
  pruning literature.
  """
  del path
  return np.ndim(leaf) >= 2


def _describe(x: Any) -> str:
  if x is None:
    return "None (not pruned)"
  shape = getattr(x, "shape", None)
  return f"array of shape {tuple(shape)}" if shape is not None else type(x).__name__


def check_same_paths(params: PyTree, other: PyTree, what: str = "masks") -> None:
  """Raises ValueError naming the first path where `other` and `params` differ.

  `other` (a masks tree, packed or not) may hold None where a parameter is
  not pruned.
  """
  p_leaves = named_leaves(params)
  o_leaves = named_leaves(other, keep_none=True)
  for i in range(max(len(p_leaves), len(o_leaves))):
    p = p_leaves[i].path if i < len(p_leaves) else "<none: params end here>"
    o = o_leaves[i].path if i < len(o_leaves) else f"<none: {what} end here>"
    if p != o:
      raise ValueError(
          f"{what} tree does not match params: first difference at leaf {i}: "
          f"params has '{p}', {what} has '{o}'."
      )


def check_same_structure(params: PyTree, masks: PyTree, what: str = "masks") -> None:
  """Raises ValueError naming the first leaf where `masks` and `params` differ.

  `masks` may hold `None` where a parameter is not pruned; every other entry
  must have the shape of the parameter at the same path.

  Raises:
    ValueError: if the trees have different paths or a mask's shape differs.
  """
  check_same_paths(params, masks, what)
  for p, m in zip(named_leaves(params), named_leaves(masks, keep_none=True)):
    if m.value is not None and np.shape(m.value) != np.shape(p.value):
      raise ValueError(
          f"{what} leaf '{m.path}' is {_describe(m.value)} but the parameter "
          f"is {_describe(p.value)}."
      )


def map_with_masks(fn: Callable[[Any, Any], Any], params: PyTree, masks: PyTree) -> PyTree:
  """Maps `fn(param, mask)` over leaves; `mask` is None where not pruned.

  The result has the structure of `params`. Structure is checked first, so a
  mismatched masks tree fails with the path of the first difference.
  """
  check_same_structure(params, masks)
  treedef = jax.tree.structure(params)
  p_flat = jax.tree.leaves(params)
  m_flat = jax.tree.leaves(masks, is_leaf=_is_none)
  return jax.tree.unflatten(treedef, [fn(p, m) for p, m in zip(p_flat, m_flat)])
