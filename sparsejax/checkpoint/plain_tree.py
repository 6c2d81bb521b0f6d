"""One on-disk form for every array pytree: nested dicts keyed by path parts.

A Flax Linen params dict, the `nnx.State` of the same model and that
state's `nnx.to_pure_dict` name their leaves alike (`Dense_0/kernel`,
`sparsejax.trees.path_name`), but Orbax stores their containers differently
(an NNX Variable's `.value` as an extra level, a NamedTuple by field, a
tuple as a list). Checkpoints therefore store the *plain* form of a tree: a
nested dict whose keys are the '/'-separated parts of each leaf's path, so
all three are stored identically and one restores into another:

>>> params = {'Dense_0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)}}
>>> sorted(to_plain(params)['Dense_0'])
['bias', 'kernel']
>>> state = (jnp.zeros(()), {'mu': params['Dense_0']['kernel'], 'skip': None})
>>> {path: value.shape for path, value in path_leaves(state).items()}
{'0': (), '1/mu': (2, 3)}

NamedTuple fields and sequence indices become string keys; None, empty
containers and `optax.MaskedNode` hold no leaves and are absent. The plain
form loses the container types, so a restore goes back through the target:
`from_plain(stored, like)` puts the leaves of `stored`, picked by path, into
the tree structure of `like` (an `nnx.State` in gives an `nnx.State` out).
"""

from __future__ import annotations

from typing import Any

import jax

from sparsejax import trees

PyTree = Any


def path_leaves(tree: PyTree) -> dict[str, Any]:
  """The leaves of `tree` by '/'-joined path, in jax.tree order.

  Args:
    tree: any pytree of arrays (or `jax.ShapeDtypeStruct`s, metadata, ...).

  Returns:
    {path: leaf}, None entries dropped.

  Raises:
    ValueError: if `tree` is a bare leaf (its path is empty), or naming the
      path if two leaves share one, or one leaf's path lies under another's
      (`{'a': x, 'a/b': y}`): the plain form could not hold both.
  """
  out = {}
  for leaf in trees.named_leaves(tree):
    if not leaf.path:
      raise ValueError("a bare leaf has no path; put it in a dict to checkpoint it.")
    if leaf.path in out:
      raise ValueError(f"two leaves have the path {leaf.path!r}; checkpoints need unique paths.")
    out[leaf.path] = leaf.value
  ordered = sorted(out)
  for shorter, longer in zip(ordered, ordered[1:]):
    if longer.startswith(shorter + "/"):
      raise ValueError(f"leaf {longer!r} lies under leaf {shorter!r}; checkpoints need each "
                       "path to end at one leaf.")
  return out


def to_plain(tree: PyTree) -> dict:
  """The plain form of `tree`: nested dicts keyed by the parts of each path.

  Raises:
    ValueError: as `path_leaves`.
  """
  root: dict = {}
  for path, value in path_leaves(tree).items():
    *parents, last = path.split("/")
    node = root
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return root


def from_plain(stored: PyTree, like: PyTree) -> PyTree:
  """The leaves of `stored` in the tree structure of `like`, matched by path.

  Args:
    stored: a tree holding (at least) every path of `like`: a plain form, or
      any tree with the same paths (what Orbax restored).
    like: the target; its treedef (containers, NNX Variables, None entries)
      is kept and only its leaves are replaced.

  Returns:
    A tree of `like`'s type whose leaf at each path is `stored`'s.

  Raises:
    ValueError: naming the first path of `like` that `stored` lacks, or as
      `path_leaves`.
  """
  have = path_leaves(stored)
  wanted = path_leaves(like)
  missing = [path for path in wanted if path not in have]
  if missing:
    raise ValueError(f"leaf {missing[0]!r} of the target is not in the stored tree.")
  return jax.tree.unflatten(jax.tree.structure(like), [have[path] for path in wanted])
