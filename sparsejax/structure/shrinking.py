"""Physical shrink: the pruned units cut out of every member leaf, and a smaller config.

`shrink` takes the params (or a variables dict with a 'params' collection
and others such as 'batch_stats', whose leaves under a member module are cut
alike), the groups and a keep, and returns new, smaller arrays: the kept
slices of every member, in their order. With `multiple`, each group keeps
its count rounded up to a multiple (8 or 128 for hardware): the extra units
are the first pruned ones, kept as zeros in the params, so the outputs are
still those of the masked model. A model config (a Linen module, a
dataclass or a dict) gets each group's `field` set to its new width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import trees
from sparsejax.structure import groups as groups_lib

PyTree = Any


def rounded_keep(groups: Sequence[groups_lib.Group], keep: Mapping[str, Any],
                 multiple: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(units that stay, units that stay as zeros) per group, with counts rounded up to `multiple`.

  Raises:
    ValueError: if `multiple` is not a positive int or is larger than a group's
      units (names the group and its first leaf), or a keep is missing, of
      the wrong shape, or keeps no unit.
  """
  if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int)
                               or multiple < 1):
    raise ValueError(f"multiple must be a positive int, got {multiple!r}.")
  stay, zero = {}, {}
  for g in groups:
    if g.name not in keep:
      raise ValueError(f"keep has no entry for group {g.name!r}.")
    k = np.asarray(keep[g.name])
    if k.shape != (g.units,) or k.dtype != np.bool_:
      raise ValueError(f"keep[{g.name!r}] must be a bool array of shape ({g.units},), got "
                       f"{k.dtype}{k.shape}.")
    if not k.any():
      raise ValueError(f"keep[{g.name!r}] keeps no unit of '{g.members[0].path}': keep at least "
                       "one per group.")
    padded = k.copy()
    if multiple is not None:
      if multiple > g.units:
        raise ValueError(f"multiple={multiple} is larger than group {g.name!r} "
                         f"('{g.members[0].path}', {g.units} units).")
      target = min(g.units, math.ceil(k.sum() / multiple) * multiple)
      extra = np.nonzero(~k)[0][:target - int(k.sum())]
      padded[extra] = True
    stay[g.name] = padded
    zero[g.name] = padded & ~k
  return stay, zero


def _set_field(config: Any, group: groups_lib.Group, kept: int, updates: dict[str, Any],
               setters: dict[str, tuple[str, int]]) -> None:
  fields = ((group.field, 1),) if isinstance(group.field, str) else group.field
  for name, per_unit in fields:
    value = kept * per_unit
    current = updates.get(name, _get(config, name))
    if group.index is None:
      if name in setters and setters[name][1] != value:
        raise ValueError(f"groups {setters[name][0]!r} and {group.name!r} keep different widths "
                         f"({setters[name][1]} and {value}) for the one config field {name!r}: "
                         "keep the same count in every layer (a uniform fraction).")
      setters[name] = (group.name, value)
      updates[name] = value
      continue
    if current is None or not hasattr(current, "__len__") or len(current) <= group.index:
      raise ValueError(f"config field {name!r} is {current!r}: group {group.name!r} needs "
                       f"a per-layer sequence with an entry {group.index}.")
    seq = list(current)
    seq[group.index] = value
    updates[name] = tuple(seq)


def _get(config: Any, name: str) -> Any:
  if isinstance(config, Mapping):
    if name not in config:
      raise ValueError(f"config has no field {name!r}.")
    return config[name]
  if not hasattr(config, name):
    raise ValueError(f"config {type(config).__name__} has no field {name!r}.")
  return getattr(config, name)


def _replace(config: Any, updates: Mapping[str, Any]) -> Any:
  if isinstance(config, nn.Module):
    return config.clone(**updates)
  if dataclasses.is_dataclass(config):
    return dataclasses.replace(config, **updates)
  if isinstance(config, Mapping):
    return {**config, **updates}
  raise ValueError(f"cannot set fields of a config of type {type(config).__name__}: give a Linen "
                   "module, a dataclass or a dict.")


def shrink(tree: PyTree, groups: Sequence[groups_lib.Group], keep: Mapping[str, Any], *,
           config: Any = None, multiple: int | None = None) -> tuple[PyTree, Any]:
  """The params (or variables) with the pruned units removed, and the config with new widths.

  >>> g = groups_lib.Group('fc', 'channel', 3, (groups_lib.Member('w', 1),), field='width')
  >>> small, cfg = shrink({'w': jnp.arange(6.).reshape(2, 3)}, [g],
  ...                     {'fc': np.array([True, False, True])}, config={'width': 3})
  >>> small['w'].tolist(), cfg
  ([[0.0, 2.0], [3.0, 5.0]], {'width': 2})

  Args:
    tree: params, or a variables dict with a 'params' collection (member
      leaves of every collection are cut, e.g. BatchNorm statistics).
    groups: from `build_groups` on the params.
    keep: {group name: (units,) bool}, concrete.
    config: optional model config whose group fields get the new widths.
    multiple: round every group's kept count up to a multiple of this.

  Returns:
    (smaller tree, new config or None).

  Raises:
    ValueError: (nothing is modified) for a bad keep or multiple, a config
      without a group's field, or a member leaf missing from the tree.
  """
  stay, zero = rounded_keep(groups, keep, multiple)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=trees.is_empty)
  names = [trees.path_name(p) for p, _ in flat]
  collections = isinstance(tree, Mapping) and "params" in tree and not any(
      groups_lib.resolve({n: () for n in names}, m.path) for g in groups for m in g.members)
  relative = [n.split("/", 1)[1] if collections and "/" in n else n for n in names]
  in_params = [not collections or n.split("/", 1)[0] == "params" for n in names]
  shapes = {r: tuple(np.shape(v)) for r, ok, (_, v) in zip(relative, in_params, flat)
            if ok and not trees.is_empty(v)}
  for g in groups:
    for m in g.members:
      if not groups_lib.resolve(shapes, m.path):
        raise ValueError(f"group {g.name!r}: leaf '{m.path}' is not in the tree to shrink.")
  updates: dict[str, Any] = {}
  setters: dict[str, tuple[str, int]] = {}
  if config is not None:
    for g in groups:
      if g.field is not None:
        _set_field(config, g, int(stay[g.name].sum()), updates, setters)
    new_config = _replace(config, updates)
  else:
    new_config = None
  # Per leaf: (axis, indices that stay, zero-mask along that axis or None).
  cuts: dict[str, list] = {}
  all_shapes = {r: tuple(np.shape(v)) for r, (_, v) in zip(relative, flat) if not trees.is_empty(v)}
  for g in groups:
    for m in g.members:
      for path in groups_lib.resolve(all_shapes, m.path):
        shape = all_shapes[path]
        axis = m.axis % len(shape)
        along = np.asarray(groups_lib.axis_mask(stay[g.name], m, g.units, shape[axis]))
        zeros = np.asarray(groups_lib.axis_mask(zero[g.name], m, g.units, shape[axis]))
        cuts.setdefault(path, []).append((axis, np.nonzero(along)[0], zeros[along]))
  out = []
  for rel, ok, (_, v) in zip(relative, in_params, flat):
    if trees.is_empty(v) or rel not in cuts:
      out.append(v)
      continue
    v = np.asarray(v)   # a one-off cut on the host: new shapes, no compile per leaf
    for axis, index, zeros in cuts[rel]:
      v = np.take(v, index, axis=axis)
      if ok and zeros.any():
        v = np.where((~zeros).reshape([-1 if a == axis else 1 for a in range(v.ndim)]), v,
                     np.zeros((), v.dtype))
    out.append(jnp.asarray(v))
  return jax.tree.unflatten(treedef, out), new_config
