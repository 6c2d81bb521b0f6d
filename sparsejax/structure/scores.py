"""Scores of structured units: magnitude_sp, Wanda-sp and FLAP's fluctuation metric.

Every score maps (params, groups[, input statistics]) to {group name: (units,)
float32}; larger means more important. The calibration-based scores read the
inputs of each group's consumer (the down projection of an MLP, the output
projection of an attention layer), whose input features are the group's
units (a head owns head_dim of them):

  magnitude_sp  the L2 (or L1) norm of each unit's slices over all members
                of the group; `over='consumer'` is the authors' variant:
                the L2 norm of the consumer's input column, summed over the
                unit's features;
  wanda_sp      mean over outputs of |W_jk| * ||X_j||, summed over the unit's
                features (An et al. 2024's structured Wanda baseline);
  flap          WIFV_j = Var(X_j) * sum_k W_jk^2 (An et al., AAAI 2024;
                CASIA-IVA-Lab/FLAP lib/prune.py), squared for attention as
                the authors do, standardised over the layer's features
                (mean 0, unbiased std 1), then averaged over each unit's
                features.

`InputStats` (count, sum and sum of squares of each input feature over the
calibration tokens) come from `linen_input_stats`, one jitted forward per
batch; they give the mean FLAP's compensation bias needs. The variance is
the exact one over all tokens: the authors' running update skips the first
sample and mixes sample and token counts (README, "Structured pruning").
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import oneshot
from sparsejax import trees
from sparsejax.structure import groups as groups_lib

PyTree = Any
Scores = dict[str, jax.Array]


class InputStats(NamedTuple):
  """Sums over the calibration tokens of one kernel's input features.

  Attributes:
    count: number of tokens (float32 scalar).
    total: (d_in,) float32, sum of each feature.
    squares: (d_in,) float32, sum of each feature's square.
  """

  count: jax.Array
  total: jax.Array
  squares: jax.Array

  @property
  def mean(self) -> jax.Array:
    """Mean of each input feature."""
    return self.total / self.count

  @property
  def var(self) -> jax.Array:
    """Population variance of each input feature (never negative)."""
    return jnp.maximum(self.squares / self.count - self.mean**2, 0.0)

  @property
  def norms(self) -> jax.Array:
    """||X_j||_2 of each input feature over all tokens."""
    return jnp.sqrt(self.squares)


def linen_input_stats(model: nn.Module, batches: Iterable[Any], params: PyTree, *,
                      variables: Mapping[str, Any] | None = None,
                      apply_kwargs: Mapping[str, Any] | None = None,
                      paths: Sequence[str] | None = None) -> dict[str, InputStats]:
  """{kernel path: InputStats} of every Dense / DenseGeneral input of a Linen model.

  Inputs are captured with `nn.intercept_methods` (Flax's attention
  projections included), flattened to (tokens, d_in), and summed in float32.

  Args:
    model: the Linen module.
    batches: calibration inputs, each passed as `model.apply(vars, batch)`.
    params: its params.
    variables: other collections (e.g. batch_stats).
    apply_kwargs: keyword arguments of `model.apply`.
    paths: keep only these kernel paths (e.g. the groups' consumers).

  Raises:
    ValueError: if there are no batches, or a path in `paths` is never called.
  """
  batches = list(batches)
  if not batches:
    raise ValueError("linen_input_stats needs at least one calibration batch.")
  extra = dict(variables or {})
  kwargs = dict(apply_kwargs or {})
  wanted = None if paths is None else set(paths)

  @jax.jit
  def one_batch(params, batch):
    captured: dict[str, InputStats] = {}

    def interceptor(next_fun, args, kw, context):
      module = context.module
      if (context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral))
          and args and module.has_variable("params", "kernel")):
        path = oneshot._kernel_path(module)  # pylint: disable=protected-access
        if wanted is None or path in wanted:
          kernel = module.get_variable("params", "kernel")
          out_size = oneshot._out_size(module, kernel)  # pylint: disable=protected-access
          d_in = math.prod(kernel.shape) // out_size
          x = jnp.asarray(args[0]).reshape(-1, d_in).astype(jnp.float32)
          captured[path] = InputStats(jnp.float32(x.shape[0]), x.sum(0), (x * x).sum(0))
      return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
      model.apply({"params": params, **extra}, batch, **kwargs)
    return captured

  total: dict[str, InputStats] = {}
  for batch in batches:
    for path, s in one_batch(params, batch).items():
      total[path] = s if path not in total else InputStats(*(a + b for a, b in zip(total[path], s)))
  missing = sorted((wanted or set()) - set(total))
  if missing:
    raise ValueError(f"kernel '{missing[0]}' is never called as a Dense / DenseGeneral in the "
                     "calibration forward; it has no input statistics.")
  return total


def _leaves(params: PyTree) -> dict[str, jax.Array]:
  return {leaf.path: leaf.value for leaf in trees.named_leaves(params)}


def _consumer(group: groups_lib.Group, leaves: Mapping[str, jax.Array],
              stats: Mapping[str, InputStats] | None = None):
  """The consumer kernel as (d_in, d_out), its input shape, and its stats (if asked).

  With stats, d_in is the width of the inputs they were captured from; without
  them (magnitude_sp), every axis but the last is an input axis, which is
  right for every Dense and attention output projection but not for a
  DenseGeneral with several output axes.
  """
  if group.consumer is None:
    raise ValueError(f"group {group.name!r} has no consumer kernel: calibration-based scores "
                     "and FLAP's bias need one (Rule.consumer).")
  path = group.consumer.path
  kernel = leaves[path]
  s = None
  if stats is not None:
    if path not in stats:
      raise ValueError(f"no input statistics for '{path}', the consumer of group {group.name!r}.")
    s = stats[path]
    d_in = int(np.shape(s.total)[0])
  else:
    d_in = math.prod(kernel.shape[:-1])
  sizes = np.cumprod(kernel.shape)
  if d_in not in sizes[:-1]:
    raise ValueError(f"'{path}' of shape {tuple(kernel.shape)} has no leading axes of {d_in} "
                     f"inputs (group {group.name!r}).")
  k = int(np.nonzero(sizes == d_in)[0][0]) + 1
  return kernel.reshape(d_in, -1).astype(jnp.float32), tuple(kernel.shape[:k]), s


def per_unit(features: jax.Array, group: groups_lib.Group, in_shape: tuple[int, ...]) -> jax.Array:
  """A (d_in,) vector over the consumer's input features as (units, features per unit)."""
  return groups_lib.unit_major(features.reshape(in_shape), group.consumer, group.units)


def magnitude_sp(params: PyTree, groups: Sequence[groups_lib.Group], ord: int = 2,
                 over: str = "group") -> Scores:
  """Each unit's weight norm: over all its slices (`over='group'`) or the consumer's.

  >>> g = groups_lib.Group('fc', 'channel', 2, (groups_lib.Member('w', 1),))
  >>> magnitude_sp({'w': jnp.array([[3., 1.], [4., 0.]])}, [g], ord=2)['fc'].tolist()
  [5.0, 1.0]

  Args:
    params: the params.
    groups: from `build_groups`.
    ord: 1 or 2.
    over: 'group' (every params member) or 'consumer' (the authors' magnitude_sp:
      the L2 norm of each consumer input feature over the outputs, summed over
      the unit's features; `ord` must be 2).
  """
  if ord not in (1, 2):
    raise ValueError(f"magnitude_sp ord must be 1 or 2, got {ord!r}.")
  if over not in ("group", "consumer"):
    raise ValueError(f"magnitude_sp over must be 'group' or 'consumer', got {over!r}.")
  return _magnitude_sp(params, tuple(groups), ord, over)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _magnitude_sp(params, groups, ord, over):
  leaves = _leaves(params)
  out = {}
  for g in groups:
    if over == "consumer":
      w, in_shape, _ = _consumer(g, leaves)
      out[g.name] = per_unit(jnp.linalg.norm(w, axis=1), g, in_shape).sum(1)
      continue
    total = jnp.zeros(g.units, jnp.float32)
    for m in g.members:
      for path in groups_lib.resolve({p: () for p in leaves}, m.path):
        rows = groups_lib.unit_major(leaves[path].astype(jnp.float32),
                                     m._replace(axis=m.axis % leaves[path].ndim), g.units)
        total = total + (jnp.abs(rows).sum(1) if ord == 1 else (rows * rows).sum(1))
    out[g.name] = total if ord == 1 else jnp.sqrt(total)
  return out


def wanda_sp(params: PyTree, groups: Sequence[groups_lib.Group],
             stats: Mapping[str, InputStats]) -> Scores:
  """Wanda-sp: mean_k |W_jk| * ||X_j||_2 per consumer input j, summed over each unit's inputs."""
  return _wanda_sp(params, tuple(groups), stats)


@functools.partial(jax.jit, static_argnums=1)
def _wanda_sp(params, groups, stats):
  leaves = _leaves(params)
  out = {}
  for g in groups:
    w, in_shape, s = _consumer(g, leaves, stats)
    metric = jnp.mean(jnp.abs(w) * s.norms[:, None], axis=1)
    out[g.name] = per_unit(metric, g, in_shape).sum(1)
  return out


def standardise(x: jax.Array) -> jax.Array:
  """(x - mean) / std with the unbiased std, as torch.std; 0 where std is 0."""
  std = jnp.std(x, ddof=1) if x.size > 1 else jnp.float32(0.0)
  return jnp.where(std > 0, (x - x.mean()) / jnp.where(std > 0, std, 1.0), 0.0)


def flap_feature_scores(params: PyTree, groups: Sequence[groups_lib.Group],
                        stats: Mapping[str, InputStats]) -> Scores:
  """FLAP's WIFV per consumer input feature, before standardisation: Var(X_j) * ||W_j||^2.

  Squared for head groups (the authors square the attention metric).
  """
  leaves = _leaves(params)
  out = {}
  for g in groups:
    w, _, s = _consumer(g, leaves, stats)
    metric = s.var * jnp.sum(w * w, axis=1)
    out[g.name] = metric**2 if g.kind == "head" else metric
  return out


def flap(params: PyTree, groups: Sequence[groups_lib.Group],
         stats: Mapping[str, InputStats]) -> Scores:
  """FLAP scores: WIFV standardised within each group (a layer's module), mean per unit."""
  return _flap(params, tuple(groups), stats)


@functools.partial(jax.jit, static_argnums=1)
def _flap(params, groups, stats):
  leaves = _leaves(params)
  features = flap_feature_scores(params, groups, stats)
  out = {}
  for g in groups:   # the input width from the stats, as the features: a kernel with several
    _, in_shape, _ = _consumer(g, leaves, stats)   # output axes has more leading axes than inputs
    out[g.name] = per_unit(standardise(features[g.name]), g, in_shape).mean(1)
  return out
