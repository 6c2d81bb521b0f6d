"""Structured pruning: groups of coupled slices, unit scores, masks and physical shrink.

Build the groups of a params tree from a per-model spec (`build_groups`,
`Rule`, `Member`), score their units (`magnitude_sp`, `wanda_sp`, `flap`
from `linen_input_stats`), choose the units to keep (`keep_uniform`,
`keep_global`), mask them for training (`structured_masks`) or prune once
(`prune_structured`, with FLAP's compensation bias), and cut the pruned
units out of the arrays and the model config (`shrink`).
"""

from sparsejax.structure.groups import Group
from sparsejax.structure.groups import Member
from sparsejax.structure.groups import Rule
from sparsejax.structure.groups import build_groups
from sparsejax.structure.masks import flap_bias
from sparsejax.structure.masks import keep_global
from sparsejax.structure.masks import keep_uniform
from sparsejax.structure.masks import structured_masks
from sparsejax.structure.prune import METHODS
from sparsejax.structure.prune import StructuredPruning
from sparsejax.structure.prune import prune_structured
from sparsejax.structure.scores import InputStats
from sparsejax.structure.scores import flap
from sparsejax.structure.scores import flap_feature_scores
from sparsejax.structure.scores import linen_input_stats
from sparsejax.structure.scores import magnitude_sp
from sparsejax.structure.scores import standardise
from sparsejax.structure.scores import wanda_sp
from sparsejax.structure.shrinking import rounded_keep
from sparsejax.structure.shrinking import shrink

__all__ = [
    "Group",
    "InputStats",
    "METHODS",
    "Member",
    "Rule",
    "StructuredPruning",
    "build_groups",
    "flap",
    "flap_bias",
    "flap_feature_scores",
    "keep_global",
    "keep_uniform",
    "linen_input_stats",
    "magnitude_sp",
    "prune_structured",
    "rounded_keep",
    "shrink",
    "standardise",
    "structured_masks",
    "wanda_sp",
]
