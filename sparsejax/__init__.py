"""sparsejax: pure functional pruning and sparse training for JAX."""

from sparsejax.allocation import erk_densities
from sparsejax.at_init import snip_masks
from sparsejax.bip import BiP
from sparsejax.at_init import synflow_masks
from sparsejax.dst import DropAndGrow
from sparsejax.dst import drop_and_grow
from sparsejax.gradual import GradualMagnitudePruning
from sparsejax.gradual import PruningState
from sparsejax.gradual import find_pruning_state
from sparsejax.gradual import masked_params
from sparsejax.gradual import state_masks
from sparsejax.gradual import ste_masked_params
from sparsejax.gradual import with_masks
from sparsejax.jackpots import LotteryJackpots
from sparsejax.learned import LearnedMaskState
from sparsejax.learned import find_learned_state
from sparsejax.masks import SparsityReport
from sparsejax.masks import apply_masks
from sparsejax.masks import bool_masks
from sparsejax.masks import pack_bits
from sparsejax.masks import pack_masks
from sparsejax.masks import sparsity_report
from sparsejax.masks import unpack_bits
from sparsejax.masks import unpack_masks
from sparsejax.maskllm import MaskLLM
from sparsejax.nm import NMSparsity
from sparsejax.nm import gradient_flow
from sparsejax.nm_schedules import NMSchedule
from sparsejax.nm_schedules import mask_decay
from sparsejax.nm_schedules import structure_patterns
from sparsejax.pruning import compute_masks
from sparsejax.pruning import magnitude_masks
from sparsejax.pruning import nm_masks
from sparsejax.pruning import random_masks
from sparsejax.schedules import ConstantSchedule
from sparsejax.schedules import FixedMaskSchedule
from sparsejax.schedules import OneShotSchedule
from sparsejax.schedules import PolynomialSchedule
from sparsejax.scores import magnitude_score
from sparsejax.scores import random_score
from sparsejax.scores import snip_score
from sparsejax.selection import elementwise_scores
from sparsejax.selection import nm_mask
from sparsejax.sharding import fsdp_shardings
from sparsejax.selection import topk_mask
from sparsejax.selection import topk_mask_along
from sparsejax.selection import topk_masks
from sparsejax.selection import topk_masks_by_count
from sparsejax.structure import build_groups
from sparsejax.structure import prune_structured
from sparsejax.structure import shrink
from sparsejax.structure import structured_masks
from sparsejax.trees import default_filter
from sparsejax.trees import leaves_with_masks
from sparsejax.trees import map_with_masks

from sparsejax import bip
from sparsejax import dst
from sparsejax import jackpots
from sparsejax import lamp
from sparsejax import layouts
from sparsejax import learned
from sparsejax import lottery
from sparsejax import maskllm
from sparsejax import nm
from sparsejax import nm_schedules
from sparsejax import oneshot
from sparsejax import owl
from sparsejax import sensitivity
from sparsejax import structure

__version__ = "0.1.0"

__all__ = [
    "BiP",
    "ConstantSchedule",
    "DropAndGrow",
    "FixedMaskSchedule",
    "GradualMagnitudePruning",
    "LearnedMaskState",
    "LotteryJackpots",
    "MaskLLM",
    "NMSchedule",
    "NMSparsity",
    "OneShotSchedule",
    "PolynomialSchedule",
    "PruningState",
    "SparsityReport",
    "apply_masks",
    "bip",
    "bool_masks",
    "build_groups",
    "compute_masks",
    "default_filter",
    "drop_and_grow",
    "dst",
    "elementwise_scores",
    "erk_densities",
    "find_learned_state",
    "find_pruning_state",
    "fsdp_shardings",
    "gradient_flow",
    "jackpots",
    "lamp",
    "layouts",
    "learned",
    "leaves_with_masks",
    "magnitude_masks",
    "lottery",
    "magnitude_score",
    "map_with_masks",
    "mask_decay",
    "masked_params",
    "maskllm",
    "nm",
    "nm_mask",
    "nm_masks",
    "nm_schedules",
    "oneshot",
    "owl",
    "pack_bits",
    "pack_masks",
    "prune_structured",
    "random_masks",
    "random_score",
    "sensitivity",
    "shrink",
    "snip_score",
    "snip_masks",
    "sparsity_report",
    "state_masks",
    "ste_masked_params",
    "structure",
    "structured_masks",
    "structure_patterns",
    "synflow_masks",
    "topk_mask",
    "topk_mask_along",
    "topk_masks",
    "topk_masks_by_count",
    "unpack_bits",
    "unpack_masks",
    "with_masks",
]
