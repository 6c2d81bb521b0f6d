"""Kernel layouts: which axes of a kernel its layer contracts with the input.

N:M sparsity keeps n of every m consecutive weights along a kernel's
contraction (input) dimensions, so that every output unit's input vector,
read in contraction order, is N:M: the structure sparse tensor cores consume.
Where those dimensions lie depends on the layer, and Flax stores it only in
the module, not in the params, so the default rule reads the path and shape::

  Dense / nnx.Linear (in, out)                         (0,)
  Conv (..., Cin, Cout), a path part containing 'conv' (Cin,), or with
                                                       conv_flat the
                                                       flattened (..., Cin)
  attention query/key/value (in, heads, head_dim)      (0,)
  attention out (heads, head_dim, out)                 (0, 1)

Attention kernels are those of Flax's `nn.MultiHeadDotProductAttention` and
NNX `MultiHeadAttention`: a 3-D `kernel` whose parent is `query`, `key`,
`value` or `out`. Any other kernel of 3 or more dimensions is ambiguous (a
`DenseGeneral` may contract any leading axes): the rule raises an error that
says how to name its axes, never guesses. Several contraction axes are read
in row-major order, as the layer flattens them (head-major for `out`).

A rule is given as `axes=`::

  None          the default rule above;
  {regex: v}    v for leaves whose path matches (re.search, first match),
                the default rule for the others;
  int or tuple  the same axes for every leaf;
  callable      (path, shape) -> int or tuple of ints;

where v is an int, a tuple of ints, or one of the names in `NAMED`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Mapping, Sequence, Union

AxesValue = Union[int, Sequence[int], str]
AxesSpec = Union[None, AxesValue, Mapping[str, AxesValue], Callable[[str, tuple], Any]]

ATTENTION_INPUTS = ("query", "key", "value")
ATTENTION_OUTPUT = "out"


def _named(name: str, ndim: int) -> tuple[int, ...]:
  return {
      "input": (0,),                                # Dense, attention q/k/v
      "leading": tuple(range(ndim - 1)),            # all but the last axis: attention out
      "conv": (ndim - 2,),                          # Cin of (..., Cin, Cout)
      "conv_flat": tuple(range(ndim - 1)),          # (..., Cin) flattened
  }[name]


NAMED = ("input", "leading", "conv", "conv_flat")


def _is_conv(path: str) -> bool:
  return any("conv" in part.lower() for part in path.split("/")[:-1])


def default_axes(path: str, shape: Sequence[int], conv_flat: bool = False) -> tuple[int, ...]:
  """The contraction axes of a Flax kernel from its path and shape.

  >>> default_axes('Dense_0/kernel', (784, 300))
  (0,)
  >>> default_axes('Conv_0/kernel', (3, 3, 16, 32)), default_axes('Conv_0/kernel', (3, 3, 16, 32), True)
  ((2,), (0, 1, 2))
  >>> default_axes('attention/query/kernel', (64, 4, 16)), default_axes('attention/out/kernel', (4, 16, 64))
  ((0,), (0, 1))

  Raises:
    ValueError: for a kernel of 3 or more dimensions that is neither an
      attention projection nor under a module named like a convolution.
  """
  ndim = len(shape)
  parts = path.split("/")
  if ndim <= 2:
    return (0,)
  parent = parts[-2] if len(parts) >= 2 else ""
  if ndim == 3 and parent in ATTENTION_INPUTS:
    return _named("input", ndim)
  if ndim == 3 and parent == ATTENTION_OUTPUT:
    return _named("leading", ndim)
  if _is_conv(path):
    return _named("conv_flat" if conv_flat else "conv", ndim)
  raise ValueError(
      f"cannot tell which axes of '{path}' (shape {tuple(shape)}) are its input: a kernel of "
      f"{ndim} dimensions that is neither an attention projection (query/key/value/out) nor "
      "under a module named like a convolution. Name them with axes={regex: value}, e.g. "
      f"axes={{'{re.escape(path)}': (0,)}} for a DenseGeneral contracting axis 0, "
      f"or 'conv' (Cin of (..., Cin, Cout)), 'conv_flat', 'leading' (all but the last axis).")


def _normalise(path: str, shape: Sequence[int], value: Any) -> tuple[int, ...]:
  """`value` (int, ints or a name) as sorted-by-position non-negative axes of `shape`."""
  ndim = len(shape)
  if isinstance(value, str):
    if value not in NAMED:
      raise ValueError(f"unknown axes name {value!r} for '{path}'; use one of {NAMED}, "
                       "an int or a tuple of ints.")
    value = _named(value, ndim)
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    value = (value,)
  try:
    axes = tuple(int(a) for a in value)
    ok = all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in value)
  except TypeError:
    ok = False
  if not ok or not axes:
    raise ValueError(f"axes for '{path}' must be an int, a non-empty tuple of ints or a name "
                     f"in {NAMED}, got {value!r}.")
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(f"axes {axes} are out of range for '{path}' of shape {tuple(shape)}.")
  axes = tuple(a % ndim for a in axes)
  if len(set(axes)) != len(axes):
    raise ValueError(f"axes {axes} of '{path}' repeat an axis.")
  if len(axes) == ndim:
    raise ValueError(f"axes {axes} of '{path}' (shape {tuple(shape)}) leave no output axis.")
  return tuple(sorted(axes))


@dataclasses.dataclass(frozen=True)
class ContractionRule:
  """The contraction axes of each leaf: `rules` first, then `default_axes`.

  >>> rule = ContractionRule({'proj': (0, 1)})
  >>> rule('block/proj/kernel', (4, 16, 64)), rule('Dense_0/kernel', (8, 4))
  ((0, 1), (0,))

  Attributes:
    rules: {path_regex: int | tuple of ints | name in NAMED}; the first
      regex that `re.search` matches the path wins.
    conv_flat: convolutions group along the flattened (..., Cin) instead of
      Cin alone.
  """

  rules: Mapping[str, AxesValue] = dataclasses.field(default_factory=dict)
  conv_flat: bool = False

  def __post_init__(self):
    for pattern in self.rules:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"axes regex {pattern!r} does not compile: {e}") from e

  def __call__(self, path: str, shape: Sequence[int]) -> tuple[int, ...]:
    for pattern, value in self.rules.items():
      if re.search(pattern, path):
        return _normalise(path, shape, value)
    return default_axes(path, shape, self.conv_flat)


def as_rule(axes: AxesSpec) -> Callable[[str, Sequence[int]], tuple[int, ...]]:
  """A (path, shape) -> axes function from any accepted form of `axes`."""
  if axes is None:
    return ContractionRule()
  if isinstance(axes, Mapping):
    return ContractionRule(dict(axes))
  if callable(axes):
    return lambda path, shape: _normalise(path, shape, axes(path, tuple(shape)))
  return lambda path, shape: _normalise(path, shape, axes)


def leaf_axes(axes: AxesSpec, path: str, shape: Sequence[int]) -> tuple[int, ...]:
  """The contraction axes of one leaf under `axes` (sorted, non-negative)."""
  return _normalise(path, shape, as_rule(axes)(path, tuple(shape)))


class GroupedView:
  """A leaf reshaped so that its contraction axes form one axis.

  N:M groups run along that axis (`axis`); `to_view` / `from_view` move an
  array of the leaf's shape there and back. When the contraction axes are
  adjacent (every default layout) this is a reshape, no copy.

  >>> v = GroupedView((4, 16, 64), (0, 1))
  >>> v.shape, v.axis
  ((64, 64), 0)
  """

  def __init__(self, shape: Sequence[int], axes: Sequence[int]):
    self.leaf_shape = tuple(shape)
    others = [a for a in range(len(shape)) if a not in axes]
    at = sum(1 for a in others if a < axes[0])  # the merged axis stays where the first one was
    self.perm = tuple(others[:at]) + tuple(axes) + tuple(others[at:])
    self.axis = at
    moved = tuple(self.leaf_shape[a] for a in self.perm)
    self.moved_shape = moved
    self.shape = moved[:at] + (math.prod(moved[at:at + len(axes)]),) + moved[at + len(axes):]
    self.identity = self.perm == tuple(range(len(shape)))

  @property
  def length(self) -> int:
    """Entries along the merged contraction axis."""
    return self.shape[self.axis]

  def to_view(self, x):
    """An array of the leaf's shape with its contraction axes merged into `axis`."""
    return (x if self.identity else x.transpose(self.perm)).reshape(self.shape)

  def from_view(self, y):
    """The inverse of `to_view`: an array of the view's shape back in the leaf's shape."""
    y = y.reshape(self.moved_shape)
    if self.identity:
      return y
    inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
    return y.transpose(inverse)
