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
import optax

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


def is_empty(x: Any) -> bool:
  """None or `optax.MaskedNode`: a place in a tree that holds no array.

  Params may hold them (an optional bias set to None, the leaves another
  transform owns inside `optax.multi_transform`); they pass through every
  mask transform untouched. In a masks tree they mean "not pruned".
  """
  return x is None or isinstance(x, optax.MaskedNode)


class Leaf(NamedTuple):
  """One leaf of a flattened tree with its '/'-joined path."""

  path: str
  value: Any


def named_leaves(tree: PyTree, keep_none: bool = False) -> list[Leaf]:
  """Flattens `tree` into `Leaf(path, value)` pairs, in jax.tree order.

  Args:
    tree: any pytree.
    keep_none: if True, empty entries (None, `optax.MaskedNode`: unpruned
      leaves of a masks tree) are returned as leaves instead of being
      dropped as empty subtrees.
  """
  is_leaf = is_empty if keep_none else None
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [Leaf(path_name(p), v) for p, v in flat]


def default_filter(path: str, leaf: Any) -> bool:
  """Prunes floating arrays with at least two dimensions (kernels, embeddings).

  Biases, norm scales and other vectors are left dense, as in most of the
  pruning literature, including the 2-D (heads, head_dim) biases of Flax's
  attention projections (any leaf named 'bias'); so are integer and bool
  arrays (step counters, index tables, quantised weights).

  >>> default_filter('w', jnp.zeros((2, 2))), default_filter('idx', jnp.zeros((2, 2), int))
  (True, False)
  >>> default_filter('attention/query/bias', jnp.zeros((4, 16)))
  False
  """
  if path.rsplit("/", 1)[-1] == "bias":
    return False
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = np.asarray(leaf).dtype
  return np.ndim(leaf) >= 2 and jax.numpy.issubdtype(dtype, jax.numpy.floating)


def _describe(x: Any) -> str:
  if x is None:
    return "None (not pruned)"
  shape = getattr(x, "shape", None)
  return f"array of shape {tuple(shape)}" if shape is not None else type(x).__name__


def check_same_paths(params: PyTree, other: PyTree, what: str = "masks") -> None:
  """Raises ValueError naming the first path where `other` and `params` differ.

  `other` (a masks tree, packed or not) may hold None (or `optax.MaskedNode`)
  where a parameter is not pruned, and must where params hold one.
  """
  p_leaves = named_leaves(params, keep_none=True)
  o_leaves = named_leaves(other, keep_none=True)
  for i in range(max(len(p_leaves), len(o_leaves))):
    p = p_leaves[i].path if i < len(p_leaves) else "<none: params end here>"
    o = o_leaves[i].path if i < len(o_leaves) else f"<none: {what} end here>"
    if p != o:
      raise ValueError(
          f"{what} tree does not match params: first difference at leaf {i}: "
          f"params has '{p}', {what} has '{o}'."
      )
    if is_empty(p_leaves[i].value) and not is_empty(o_leaves[i].value):
      raise ValueError(
          f"{what} leaf '{o}' is {_describe(o_leaves[i].value)} but the parameter is "
          f"{p_leaves[i].value!r} (no array to mask).")


def check_same_structure(params: PyTree, masks: PyTree, what: str = "masks") -> None:
  """Raises ValueError naming the first leaf where `masks` and `params` differ.

  `masks` may hold `None` where a parameter is not pruned; every other entry
  must have the shape of the parameter at the same path.

  Raises:
    ValueError: if the trees have different paths or a mask's shape differs.
  """
  check_same_paths(params, masks, what)
  for p, m in zip(named_leaves(params, keep_none=True), named_leaves(masks, keep_none=True)):
    if not is_empty(m.value) and np.shape(m.value) != np.shape(p.value):
      raise ValueError(
          f"{what} leaf '{m.path}' is {_describe(m.value)} but the parameter "
          f"is {_describe(p.value)}."
      )


class MaskedLeaf(NamedTuple):
  """A parameter with its mask: `mask` is None where the leaf is not pruned."""

  path: str
  param: Any
  mask: Any


def leaves_with_masks(params: PyTree, masks: PyTree | None,
                      what: str = "masks") -> list[MaskedLeaf]:
  """Every array of `params` with its path and mask (None: not pruned), in jax.tree order.

  Walk params and masks together with this rather than zipping
  `jax.tree.leaves` of both: those drop the None entries of a masks tree and
  silently pair a weight with another leaf's mask. `masks=None` (no masks at
  all, e.g. a dense run) lists every array with mask None.

  >>> params = {'b': jnp.zeros(2), 'w': jnp.ones((2, 2))}
  >>> [(l.path, l.mask) for l in leaves_with_masks(params, sparsejax.magnitude_masks(params, 0.5))]
  [('b', None), ('w', Array([[ True,  True],
         [False, False]], dtype=bool))]

  Raises:
    ValueError: if the masks tree does not match params (names the leaf).
  """
  if masks is None:
    return [MaskedLeaf(p.path, p.value, None) for p in named_leaves(params)]
  check_same_structure(params, masks, what)
  return [MaskedLeaf(p.path, p.value, None if is_empty(m.value) else m.value)
          for p, m in zip(named_leaves(params, keep_none=True), named_leaves(masks, keep_none=True))
          if not is_empty(p.value)]


def map_with_masks(fn: Callable[[Any, Any], Any], params: PyTree, masks: PyTree) -> PyTree:
  """Maps `fn(param, mask)` over the arrays of params; `mask` is None where not pruned.

  The result has the structure of `params`; its None and `optax.MaskedNode`
  entries pass through untouched. Structure is checked first, so a
  mismatched masks tree fails with the path of the first difference.

  >>> map_with_masks(lambda p, m: p if m is None else p * m,
  ...                {'w': jnp.ones(2), 'b': None}, {'w': jnp.array([True, False]), 'b': None})
  {'b': None, 'w': Array([1., 0.], dtype=float32)}
  """
  check_same_structure(params, masks)
  flat_p, treedef = jax.tree.flatten(params, is_leaf=is_empty)
  flat_m = jax.tree.leaves(masks, is_leaf=is_empty)
  return jax.tree.unflatten(treedef, [
      p if is_empty(p) else fn(p, None if is_empty(m) else m) for p, m in zip(flat_p, flat_m)])
