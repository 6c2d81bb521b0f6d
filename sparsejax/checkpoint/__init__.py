"""Checkpoints for sparse training: Orbax items and compressed export."""

from sparsejax.checkpoint.manager import CheckpointError
from sparsejax.checkpoint.manager import Restored
from sparsejax.checkpoint.manager import SparseCheckpointManager

__all__ = [
    "CheckpointError",
    "Restored",
    "SparseCheckpointManager",
]
