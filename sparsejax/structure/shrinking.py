"""Physical shrink: the pruned units cut out of every member leaf, and a smaller config.

`shrink` takes the params (or a variables dict with a 'params' collection
and others such as 'batch_stats', whose leaves under a member module are cut
alike), the groups and a keep, and returns new, smaller arrays: the kept
slices of every member, in their order. With `multiple`, each group keeps
its count rounded up to a multiple (8 or 128 for hardware): the extra units
are the first pruned ones, kept as zeros in the params, so the outputs are
still those of the masked model. A model config (a Linen module, a
dataclass or a dict) gets each group's `field` set to its new width.

`multiple` is one int for every group or a {kind: int} mapping ('channel',
'head'; a kind left out is not rounded), e.g. {'channel': 8} for MLP
widths that are multiples of 8 with the heads as chosen. The rule, for
both forms: a group rounds its kept count up to the next multiple, at most
its number of units; a group with no more units than the multiple is not
rounded (rounding it could only keep every unit and undo its pruning), and
neither is a group whose next multiple is above its number of units (12
units of which 9 are kept, multiple 8: 9 stay, not all 12), so
`multiple=8` on a model with 4 heads and 1024 MLP units rounds the MLP
units and leaves the heads.
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


def _multiples(groups: Sequence[groups_lib.Group], multiple: Any) -> dict[str, int]:
  """{group name: the multiple its count rounds to (1: none)} from an int or {kind: int}."""
  def check(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{what} must be a positive int, got {value!r}.")
    return int(value)

  if multiple is None:
    return {g.name: 1 for g in groups}
  if isinstance(multiple, Mapping):
    for kind, value in multiple.items():
      if kind not in groups_lib.KINDS:
        raise ValueError(f"multiple has key {kind!r}; give one per group kind, "
                         f"{groups_lib.KINDS}, or one int.")
      check(value, f"multiple[{kind!r}]")
    return {g.name: int(multiple.get(g.kind, 1)) for g in groups}
  value = check(multiple, "multiple")
  return {g.name: value for g in groups}


def rounded_keep(groups: Sequence[groups_lib.Group], keep: Mapping[str, Any],
                 multiple: int | Mapping[str, int] | None
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(units that stay, units that stay as zeros) per group, with counts rounded up to `multiple`.

  A group's kept count goes up to the next multiple of its kind's `multiple`
  (an int for every kind, or {'channel': m, 'head': m}); a group whose next
  multiple is above its number of units (so also one with no more units
  than its multiple) is left as it is (see the module docstring). The extra
  units are the first pruned ones.

  >>> g = groups_lib.Group('heads', 'head', 4, ())
  >>> h = groups_lib.Group('mlp', 'channel', 32, ())
  >>> stay, zero = rounded_keep([g, h], {'heads': np.arange(4) < 3, 'mlp': np.arange(32) < 5}, 8)
  >>> int(stay['heads'].sum()), int(stay['mlp'].sum()), int(zero['mlp'].sum())
  (3, 8, 3)
  >>> twelve = groups_lib.Group('mlp', 'channel', 12, ())
  >>> int(rounded_keep([twelve], {'mlp': np.arange(12) < 9}, 8)[0]['mlp'].sum())
  9

  Raises:
    ValueError: if `multiple` is not a positive int or a {kind: positive int}
      mapping, or a keep is missing, of the wrong shape, or keeps no unit
      (names the group and its first leaf).
  """
  multiples = _multiples(groups, multiple)
  stay, zero = {}, {}
  for g in groups:
    if g.name not in keep:
      raise ValueError(f"keep has no entry for group {g.name!r}.")
    k = np.asarray(keep[g.name])
    if k.shape != (g.units,) or k.dtype != np.bool_:
      raise ValueError(f"keep[{g.name!r}] must be a bool array of shape ({g.units},), got "
                       f"{k.dtype}{k.shape}.")
    if not k.any():
      where = f" of '{g.members[0].path}'" if g.members else ""
      raise ValueError(f"keep[{g.name!r}] keeps no unit{where}: keep at least one per group.")
    padded = k.copy()
    m = multiples[g.name]
    target = math.ceil(k.sum() / m) * m
    if target <= g.units:
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
           config: Any = None,
           multiple: int | Mapping[str, int] | None = None) -> tuple[PyTree, Any]:
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
    multiple: round each group's kept count up to a multiple of this: one int
      for every group, or {kind: int} ('channel', 'head'); a group with no
      more units than its multiple is not rounded (`rounded_keep`).

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
