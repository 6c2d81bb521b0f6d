"""OWL: per-block sparsities from the blocks' outlier Wanda scores (Yin et al., ICML 2024).

Outlier Weighed Layerwise sparsity keeps more weights in the transformer
blocks that hold more outlier features. For each block l, D_l is the share
(in percent) of the Wanda scores |W_ij| * ||X_i||_2 of all its kernels,
taken together, that are above M times their mean (M = 5). The D_l are
scaled to [0, 2 lambda] (lambda = 0.08) and shifted so that their mean is
1 - S: block l keeps that density of its weights, prunes 1 - density. Then
each block is pruned with Wanda or SparseGPT at its own sparsity
(`oneshot.prune_sequentially(..., sparsity={block: sparsity})`).

Read from the authors' code (luuyin/OWL, `lib/prune_all.py`:
`prune_wanda_outlier`, `prune_sparsegpt_outlier`, `check_outlier_mean`) and
followed: the mean is over every score of the block (all its kernels
flattened and concatenated, so a larger kernel weighs more); the test is
strict (score > M * mean); the ratio is in percent; the shift uses the
unweighted mean over blocks (so the overall sparsity is exactly S only when
the blocks are of equal size, as in a transformer); the scores come from
the dense model's inputs, each block seeing the outputs of the dense blocks
before it (`linen_hessians(...)(params)` on the unpruned params). The authors
score and prune only the blocks' linear layers: a kernel outside the blocks
(an output head) here forms a group of its own and gets a sparsity too
unless `leaf_filter` (the same in `outlier_ratios` and `prune_sequentially`)
leaves it out.

The N:M variant (`owl_nm`; the authors' `prune_wanda_outlier_structure`)
gives each block its own N of every M instead: the D_l are scaled to
[0, lambda] with lambda in weights per group of M (the authors' README
runs it with lambda = 2), centred on 0, and block l keeps N + that of every
M, rounded to an integer N_l (see `owl_nm` for the rounding).

Where this differs, on purpose: when every block has the same ratio (or
there is one block) the authors divide by zero (NaN sparsities); here every
block gets S. A block sparsity outside [0, 1) is an error naming the block
(lower lambda), where the authors' Wanda path silently prunes 1% instead of
a negative fraction.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import layouts
from sparsejax import oneshot
from sparsejax import pruning
from sparsejax import trees

PyTree = Any


def outlier_ratios(params: PyTree, hessians: Mapping[str, jax.Array], *,
                   group: Callable[[str], str] | None = None, m: float = 5.0,
                   leaf_filter: trees.LeafFilter | None = None,
                   axes: layouts.AxesSpec = None) -> dict[str, float]:
  """{group: percent of its Wanda scores above `m` times their mean}, OWL's D_l.

  Args:
    params: any params pytree (Linen dict, NNX state).
    hessians: {kernel path: X^T X of its inputs, or its diagonal (d_in,)},
      e.g. `oneshot.linen_hessians(model, batches, diagonal=True)(params)`
      on the dense params.
    group: path -> group name; default `oneshot.block_group()` (transformer
      blocks).
    m: the outlier threshold, in multiples of the group's mean score (> 0).
    leaf_filter: (path, leaf) -> bool chooses the kernels, as in
      `prune_sequentially` (pass the same one).
    axes: contraction axes of each kernel (`layouts`); default rule.

  Returns:
    The groups in the order `hessians` lists their kernels (call order).

  Raises:
    ValueError: naming the kernel, for a chosen kernel with no entry in
      `hessians`, or a Gram matrix of the wrong shape; for a bad `m`.
  """
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
    raise ValueError(f"m={m!r} (outlier threshold, in multiples of the mean score) must be a "
                     "finite number > 0.")
  group = group or oneshot.block_group()
  rule = layouts.as_rule(axes)
  leaves = trees.named_leaves(params)
  index = {leaves[i].path: i for i in pruning.prunable_leaves(params, leaf_filter)}
  missing = [p for p in index if p not in hessians]
  if missing:
    raise ValueError(f"no calibration inputs were captured for {missing}: their modules were not "
                     "called, or hessians names them differently (captured: "
                     f"{list(hessians)[:8]}...). Exclude them with leaf_filter.")
  scores: dict[str, list[jax.Array]] = {}
  for path in (p for p in hessians if p in index):
    kernel = leaves[index[path]].value
    contraction = tuple(layouts.leaf_axes(tuple(rule(path, kernel.shape)), path, kernel.shape))
    matrix, _ = oneshot.as_matrix(jnp.asarray(kernel), contraction)
    hessian = jnp.asarray(hessians[path])
    if tuple(hessian.shape) not in ((matrix.shape[0],) * 2, (matrix.shape[0],)):
      raise ValueError(f"{path}: expected X^T X of shape {(matrix.shape[0],) * 2} or its diagonal "
                       f"({matrix.shape[0]},) for a kernel of shape {kernel.shape}, got "
                       f"{hessian.shape}.")
    scores.setdefault(group(path), []).append(oneshot.wanda_scores(matrix, hessian))
  ratios = {}
  for name, block in scores.items():
    # The mean over all the block's scores, without concatenating them.
    total = sum(float(jnp.sum(s, dtype=jnp.float32)) for s in block)
    size = sum(s.size for s in block)
    threshold = jnp.float32(total / size * m)
    above = sum(int(jnp.sum(s > threshold)) for s in block)
    ratios[name] = above / size * 100.0
  return ratios


def _checked_ratios(outlier_ratios: Mapping[str, float], caller: str):
  """(group names, their outlier ratios as float64), each ratio finite; at least one group."""
  if not outlier_ratios:
    raise ValueError(f"{caller} needs at least one group's outlier ratio.")
  names = list(outlier_ratios)
  ratios = np.asarray([outlier_ratios[n] for n in names], np.float64)
  for name, value in zip(names, ratios):
    if not math.isfinite(value):
      raise ValueError(f"group {name!r}: outlier ratio {value} is not finite.")
  return names, ratios


def owl_sparsities(outlier_ratios: Mapping[str, float], sparsity: float, *,
                   lam: float = 0.08) -> dict[str, float]:
  """{group: 1 - density}: OWL's densities from the groups' outlier ratios D.

  density = (D - min D) / (max D - min D) * 2 lam, shifted to mean 1 - S
  (the unweighted mean over groups, as the authors do).

  >>> s = owl_sparsities({'block_0': 1.0, 'block_1': 3.0, 'block_2': 2.0}, 0.5, lam=0.1)
  >>> {k: round(v, 6) for k, v in s.items()}
  {'block_0': 0.6, 'block_1': 0.4, 'block_2': 0.5}

  Raises:
    ValueError: for no groups, a non-finite ratio (naming the group),
      `sparsity` outside [0, 1), `lam` outside [0, 0.5), or a group's
      sparsity outside [0, 1) (naming it: lower `lam`).
  """
  oneshot.check_target(sparsity)
  if (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam)
      or not 0.0 <= lam < 0.5):
    raise ValueError(f"lam={lam!r} must be in [0, 0.5): the densities span 2 lam, shifted to "
                     "mean 1 - sparsity (the paper uses 0.08).")
  names, ratios = _checked_ratios(outlier_ratios, "owl_sparsities")
  spread = ratios.max() - ratios.min()
  if spread > 0:
    density = (ratios - ratios.min()) * (1.0 / spread * lam * 2)
  else:   # the authors divide by zero here
    density = np.zeros_like(ratios)
  density = density - np.mean(density) + (1.0 - float(sparsity))
  result = {}
  for name, d in zip(names, density):
    s = 1.0 - float(d)
    if not 0.0 <= s < 1.0:
      raise ValueError(f"group {name!r}: OWL sparsity {s:.4g} is outside [0, 1) at sparsity "
                       f"{sparsity} and lam={lam}; lower lam.")
    result[name] = s
  return result


ROUNDINGS = ("exact", "nearest")   # owl_nm: largest remainder (the sum kept) or the authors' np.round


def owl_nm(outlier_ratios: Mapping[str, float], nm: tuple[int, int], *, lam: float = 2.0,
           rounding: str = "exact") -> dict[str, tuple[int, int]]:
  """{group: (N_l, M)}: OWL's N:M variant, each group keeping its own N_l of every M.

  Read from the authors' `prune_wanda_outlier_structure` (luuyin/OWL,
  `lib/prune_all.py`): the offsets c = (D - min D) / (max D - min D) * lam,
  less their (unweighted) mean, so they sum to 0; lam is in weights per group
  of M (their `--Lamda`, 2 in their README's N:M example; the unstructured
  `owl_sparsities` spans 2 lam of density instead). Group l keeps N + c_l of
  every M, rounded (the authors prune `prune_n - round(c_l)` of every M: the
  same N_l in their convention of N counting pruned weights)::

    exact    (default) largest remainder: every group gets floor(N + c_l),
             then the groups with the largest fractional parts (compared to 9
             decimals; ties: the larger outlier ratio, then the earlier group)
             get one more, as many as make sum N_l = groups * N.
             So the mean of N_l / M is exactly N / M (the overall density,
             when the groups are of equal size, as transformer blocks are),
             and each N_l is N + c_l rounded down or up. Where the
             authors' roundings do not add up to groups * N, it differs
             from them, and groups with equal offsets can get different
             N_l (the earlier ones the larger): e.g. offsets (-0.29 x 6,
             1.71) at 4:8 give 'nearest' (4 x 6, 6), sum 30, and 'exact'
             (4, 4, 4, 4, 3, 3, 6), sum 28.
    nearest  the authors' `np.round` (halves to even) of each c_l on its
             own: the sum may miss groups * N by up to groups / 2.

  Their `..._structure_special` variant (an offset of exactly 1 made 2) is
  not ported. Equal ratios (or one group) give every group N, where the
  authors divide by zero.

  >>> owl_nm({'block_0': 1.0, 'block_1': 4.0, 'block_2': 2.0}, (2, 4), lam=2.0)
  {'block_0': (1, 4), 'block_1': (3, 4), 'block_2': (2, 4)}

  Raises:
    ValueError: for no groups, a non-finite ratio (naming the group), a bad
      `nm`, `lam` < 0 or not finite, an unknown `rounding`, or a group's
      N_l outside [1, M] (naming it: lower `lam`).
  """
  oneshot.check_target(nm=nm)
  n, m = nm
  if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
    raise ValueError(f"lam={lam!r} must be a finite number >= 0: the spread of N over the groups, "
                     "in weights of every M (the authors use 2).")
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding={rounding!r}: use one of {ROUNDINGS}.")
  names, ratios = _checked_ratios(outlier_ratios, "owl_nm")
  spread = ratios.max() - ratios.min()
  offsets = (ratios - ratios.min()) * (1.0 / spread * lam) if spread > 0 else np.zeros_like(ratios)
  offsets = offsets - np.mean(offsets)
  if rounding == "nearest":
    kept = n + np.round(offsets).astype(np.int64)
  else:
    quotas = n + offsets
    floors = np.floor(quotas)
    remainders = np.round(quotas - floors, 9)   # float noise must not decide a floor or a tie
    floors, remainders = floors + (remainders == 1.0), np.where(remainders == 1.0, 0.0, remainders)
    kept = floors.astype(np.int64)
    short = len(names) * n - int(kept.sum())  # in [0, groups): the offsets sum to 0
    by_remainder = sorted(range(len(names)), key=lambda i: (-remainders[i], -ratios[i], i))
    kept[by_remainder[:short]] += 1
  result = {}
  for name, k in zip(names, kept.tolist()):
    if not 1 <= k <= m:
      raise ValueError(f"group {name!r}: OWL keeps {k} of every {m}, outside [1, {m}] at N:M "
                       f"{n}:{m} and lam={lam}; lower lam.")
    result[name] = (int(k), m)
  return result
