"""Structured groups: the slices of several leaves that go (or stay) together.

A unit of structure (an MLP hidden unit, an attention head, a Conv output
channel) lives in several leaves at once: the producing kernel's output
column, its bias, the next layer's input row, the BatchNorm entries between.
A `Group` lists those slices as members (`Member`), each an axis of a leaf on which
the group's `units` lie; removing unit u removes slice u of every member.

Along a member's axis of length L the units are read as (outer, units,
block) in row-major order: unit u owns the `block` consecutive entries at
u * block of every one of the `outer` repeats. So:

  Dense column / row                       block 1, outer 1
  a head in a 2-D (d, heads * head_dim)    block head_dim
  a KV group of query heads (GQA)          block head_dim * query heads per KV head
  a Conv channel read by a Dense after     outer = H * W of the flattened map
  flattening (H, W, C)

Groups come from the params and a small per-model spec, a table of rules (`Rule`)
(like `sparsejax.layouts`): a rule's `anchor` regex is matched against every
params path, and each match, with its named regex groups, fills in the
member path templates. A member path may name a module instead of a leaf
(e.g. a BatchNorm): then every leaf under it, in every collection, is a
member on that axis. Anything that cannot be coupled (a missing leaf, an
axis whose length is not a multiple of units * block, a leaf claimed twice on
one axis) is a one-line ValueError naming the leaf.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from sparsejax import trees

PyTree = Any
KINDS = ("channel", "head")


class Member(NamedTuple):
  """One coupled slice: `axis` of the leaf (or of every leaf under the module) at `path`.

  Attributes:
    path: '/'-joined path of a leaf, or of a module whose leaves all couple.
    axis: the axis the group's units lie on.
    block: consecutive entries per unit along that axis (head_dim for a head
      of a 2-D projection).
    optional: the path may be absent (an optional bias).
  """

  path: str
  axis: int
  block: int = 1
  optional: bool = False


@dataclasses.dataclass(frozen=True)
class Rule:
  """A row of a structure spec: which leaves form a group, found from an anchor.

  Attributes:
    anchor: regex matched (`re.fullmatch`) against every params path; each match
      starts one group. Its named groups fill the templates below.
    name: template of the group's name (e.g. '{b}/mlp').
    kind: 'channel' (hidden units, Conv channels) or 'head'.
    members: `Member` entries whose paths are templates; the first one fixes the
      number of units (its axis length / block, outer 1).
    consumer: template of the kernel whose input features are the units
      (the down / out projection): calibration-based scores read its inputs
      and FLAP adds its compensation to `bias`. None: scores from the
      weights only.
    bias: template of the consumer's output bias.
    field: the model config field that holds this group's width; with
      `index` (a template giving an int) the field is a per-layer tuple.
      Or several fields as ((name, entries per unit), ...), e.g. a KV group
      of grouped-query attention: (('num_kv_heads', 1), ('num_heads', 2)).
      A field without `index` is one width for every layer: `shrink` then
      needs every group that sets it to keep the same count.
    index: template of the position in `field`, e.g. '{i}', or a function
      of the anchor's named groups (a dict) returning it.
  """

  anchor: str
  name: str
  kind: str
  members: tuple[Member, ...]
  consumer: str | None = None
  bias: str | None = None
  field: str | tuple[tuple[str, int], ...] | None = None
  index: str | Callable[[dict], int] | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"structure rule {self.name!r}: kind {self.kind!r} is not one of {KINDS}.")
    if not self.members:
      raise ValueError(f"structure rule {self.name!r} has no members.")
    try:
      re.compile(self.anchor)
    except re.error as e:
      raise ValueError(f"structure rule {self.name!r}: anchor {self.anchor!r} does not compile: "
                       f"{e}") from None


@dataclasses.dataclass(frozen=True)
class Group:
  """One layer's units and the leaf slices that hold them.

  Attributes:
    name: e.g. 'block_0/mlp' or 'block_0/attention'.
    kind: 'channel' or 'head'.
    units: number of units.
    members: resolved `Member` entries (leaf paths relative to the params).
    consumer, bias: the consumer kernel and its output bias, or None.
    field, index: the model config field(s) (and position) of the width.
  """

  name: str
  kind: str
  units: int
  members: tuple[Member, ...]
  consumer: Member | None = None
  bias: str | None = None
  field: str | tuple[tuple[str, int], ...] | None = None
  index: int | None = None

  def cost(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Parameters per unit: the entries of every member leaf in `shapes` one unit owns.

    A member that names a module (a BatchNorm) counts every leaf under it in
    `shapes`: given the params, its scale and bias (its running mean and
    variance are state in 'batch_stats', not parameters, and count only if
    `shapes` holds them).

    >>> g = Group('c', 'channel', 4, (Member('conv', 1), Member('bn', 0)))
    >>> g.cost({'conv': (3, 4), 'bn/scale': (4,), 'bn/bias': (4,)})
    5
    """
    return sum(math.prod(shapes[path]) // self.units
               for m in self.members for path in resolve(shapes, m.path))


Spec = Sequence[Rule]


def _leaf_paths(tree: PyTree) -> dict[str, tuple[int, ...]]:
  return {leaf.path: tuple(np.shape(leaf.value)) for leaf in trees.named_leaves(tree)}


def resolve(shapes: Mapping[str, tuple[int, ...]], path: str) -> list[str]:
  """The leaf paths of `shapes` at `path` or under the module `path`."""
  if path in shapes:
    return [path]
  prefix = path + "/"
  return [p for p in shapes if p.startswith(prefix)]


def _check_axis(group: str, path: str, shape: tuple[int, ...], axis: int, units: int,
                block: int) -> None:
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"group {group!r}: cannot couple leaf '{path}' of shape {shape}: it has no "
                     f"axis {axis}.")
  length = shape[axis]
  if block < 1 or length % (units * block):
    raise ValueError(f"group {group!r}: cannot couple leaf '{path}' of shape {shape}: axis "
                     f"{axis} has {length} entries, not a multiple of {units} units x block "
                     f"{block}.")


def build_groups(params: PyTree, spec: Spec) -> tuple[Group, ...]:
  """The structured groups of `params` under `spec`, checked against the tree.

  >>> params = {'fc_0': {'kernel': jnp.zeros((4, 8)), 'bias': jnp.zeros(8)},
  ...           'fc_1': {'kernel': jnp.zeros((8, 4))}}
  >>> rule = Rule(r'fc_0/kernel', 'mlp', 'channel',
  ...             (Member('fc_0/kernel', 1), Member('fc_0/bias', 0), Member('fc_1/kernel', 0)))
  >>> [(g.name, g.units) for g in build_groups(params, [rule])]
  [('mlp', 8)]

  Args:
    params: the params pytree (Linen dict, NNX state, plain dict).
    spec: `Rule` entries; the groups come out in rule order, then params order.

  Returns:
    A tuple of `Group` objects.

  Raises:
    ValueError: naming the rule or leaf, if a rule matches no leaf (the spec
      does not match the tree), a member leaf is missing, an axis does not
      hold units x block entries, or one leaf axis is claimed by two groups.
  """
  shapes = _leaf_paths(params)
  groups: list[Group] = []
  claimed: dict[tuple[str, int], str] = {}
  for rule in spec:
    matches = [re.fullmatch(rule.anchor, p) for p in shapes]
    matches = [m for m in matches if m]
    if not matches:
      raise ValueError(f"structure spec does not match the params: rule {rule.name!r} "
                       f"(anchor {rule.anchor!r}) matches no leaf.")
    for match in matches:
      fill = lambda t: t.format(**match.groupdict())
      name = fill(rule.name)
      first = rule.members[0]
      first_path = fill(first.path)
      if first_path not in shapes:
        raise ValueError(f"group {name!r}: leaf '{first_path}' is not in the params.")
      shape = shapes[first_path]
      _check_axis(name, first_path, shape, first.axis, 1, first.block)
      units = shape[first.axis] // first.block
      members = []
      for member in rule.members:
        path = fill(member.path)
        leaves = resolve(shapes, path)
        if not leaves:
          if member.optional:
            continue
          raise ValueError(f"group {name!r}: leaf '{path}', coupled to '{first_path}', is not in "
                           "the params.")
        for leaf in leaves:
          _check_axis(name, leaf, shapes[leaf], member.axis, units, member.block)
          axis = member.axis % len(shapes[leaf])
          if (leaf, axis) in claimed:
            raise ValueError(f"group {name!r}: axis {axis} of leaf '{leaf}' is already coupled in "
                             f"group {claimed[leaf, axis]!r}; a leaf axis can belong to one group.")
          claimed[leaf, axis] = name
        members.append(Member(path, member.axis, member.block))
      consumer = None
      if rule.consumer is not None:
        path = fill(rule.consumer)
        found = [m for m in members if m.path == path]
        if not found:
          raise ValueError(f"group {name!r}: consumer '{path}' is not one of its members.")
        consumer = found[0]
      bias = fill(rule.bias) if rule.bias is not None else None
      if bias is not None and bias not in shapes:
        raise ValueError(f"group {name!r}: consumer bias '{bias}' is not in the params.")
      if rule.index is None:
        index = None
      elif callable(rule.index):
        index = int(rule.index(match.groupdict()))
      else:
        index = int(fill(rule.index))
      groups.append(Group(name, rule.kind, units, tuple(members), consumer, bias, rule.field,
                          index))
  names = [g.name for g in groups]
  duplicate = next((n for n in names if names.count(n) > 1), None)
  if duplicate is not None:
    raise ValueError(f"structure spec gives two groups named {duplicate!r}; make rule names "
                     "unique.")
  return tuple(groups)


def unit_major(x, member: Member, units: int):
  """`x` (a member leaf's shape) as (units, rest): the entries each unit owns, one row each."""
  axis = member.axis % x.ndim
  length = x.shape[axis]
  outer = length // (units * member.block)
  y = jnp.moveaxis(x, axis, 0).reshape(outer, units, member.block, -1)
  return jnp.swapaxes(y, 0, 1).reshape(units, -1)


def axis_mask(keep, member: Member, units: int, length: int):
  """The (length,) keep-mask along a member's axis from a (units,) keep-mask."""
  outer = length // (units * member.block)
  if isinstance(keep, np.ndarray):   # concrete (shrink): stay on the host
    return np.tile(np.repeat(keep, member.block), outer)
  return jnp.tile(jnp.repeat(keep, member.block, total_repeat_length=units * member.block), outer)


def broadcast_mask(keep, member: Member, units: int, shape: tuple[int, ...]):
  """A bool mask of `shape` that keeps the slices of the units `keep` keeps."""
  axis = member.axis % len(shape)
  along = axis_mask(jnp.asarray(keep, bool), member, units, shape[axis])
  return jnp.broadcast_to(along.reshape([-1 if a == axis else 1 for a in range(len(shape))]),
                          shape)
