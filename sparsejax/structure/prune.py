"""One-shot structured pruning: score the units, choose, mask, compensate.

`prune_structured` runs the pipeline score -> select -> masks (-> FLAP
bias) for one of the three methods of An et al. (2024):

  'magnitude_sp'  weight norms, `keep_uniform` per group;
  'wanda_sp'      |W| * ||X||, `keep_uniform` per group;
  'flap'          standardised WIFV, `keep_global` by parameter cost, and the
                  compensation bias.

It returns the masked params (same shapes; `shrink` then cuts them) and the
keep, so the masked and the shrunk model can be compared.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax

from sparsejax import masks as masks_lib
from sparsejax.structure import groups as groups_lib
from sparsejax.structure import masks as structure_masks
from sparsejax.structure import scores as scores_lib

PyTree = Any
METHODS = ("magnitude_sp", "wanda_sp", "flap")


class StructuredPruning(NamedTuple):
  """The result of `prune_structured`.

  Attributes:
    params: the params with pruned units zeroed (and FLAP's bias added).
    masks: bool masks shaped like the params (None on non-member leaves).
    keep: {group name: (units,) bool}.
    scores: {group name: (units,) float32}.
  """

  params: PyTree
  masks: PyTree
  keep: dict[str, jax.Array]
  scores: dict[str, jax.Array]


def prune_structured(params: PyTree, groups: Sequence[groups_lib.Group], method: str,
                     fraction: float, *, stats: Mapping[str, scores_lib.InputStats] | None = None,
                     bias: bool | None = None, ord: int = 2,
                     over: str = "group") -> StructuredPruning:
  """Removes `fraction` of the groups' units (or, for 'flap', of their parameters).

  Args:
    params: the params.
    groups: from `build_groups`.
    method: 'magnitude_sp', 'wanda_sp' or 'flap'.
    fraction: in [0, 1): of each group's units (magnitude_sp, wanda_sp) or of
      all the groups' parameters (flap, chosen globally).
    stats: consumer input statistics (`linen_input_stats`), for wanda_sp and flap.
    bias: add FLAP's compensation bias (default: True for flap only).
    ord, over: magnitude_sp's norm and extent (`scores.magnitude_sp`).

  Returns:
    A `StructuredPruning`.

  Raises:
    ValueError: for an unknown method, a fraction outside [0, 1), missing
      statistics, or (with the bias) a consumer without a bias, naming it;
      nothing is modified.
  """
  if method not in METHODS:
    raise ValueError(f"unknown structured method {method!r}; use one of {METHODS}.")
  structure_masks.check_fraction(fraction)
  if method != "magnitude_sp" and stats is None:
    raise ValueError(f"{method} needs stats= (the consumers' input statistics, "
                     "sparsejax.structure.linen_input_stats).")
  if bias is None:
    bias = method == "flap"
  if bias and stats is None:
    raise ValueError("the compensation bias needs stats= (input means).")
  if bias:   # before any scoring: a consumer without a bias cannot take the compensation
    structure_masks.check_biases(groups)
  if method == "magnitude_sp":
    scores = scores_lib.magnitude_sp(params, groups, ord=ord, over=over)
  elif method == "wanda_sp":
    scores = scores_lib.wanda_sp(params, groups, stats)
  else:
    scores = scores_lib.flap(params, groups, stats)
  if method == "flap":
    keep = structure_masks.keep_global(scores, groups, params, fraction)
  else:
    keep = structure_masks.keep_uniform(scores, groups, fraction)
  masks = structure_masks.structured_masks(params, groups, keep)
  if bias:   # from the unpruned consumer weights; the bias itself is not masked
    params = structure_masks.flap_bias(params, groups, keep, stats)
  pruned = masks_lib.apply_masks(params, masks)
  return StructuredPruning(pruned, masks, keep, scores)
