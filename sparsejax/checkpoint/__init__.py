"""Checkpoints for sparse training: Orbax items and compressed export."""

from sparsejax.checkpoint.export import ExportStats
from sparsejax.checkpoint.export import export_sparse
from sparsejax.checkpoint.export import load_sparse
from sparsejax.checkpoint.manager import CheckpointDamaged
from sparsejax.checkpoint.manager import CheckpointError
from sparsejax.checkpoint.manager import CheckpointWriteError
from sparsejax.checkpoint.manager import Restored
from sparsejax.checkpoint.manager import SparseCheckpointManager

__all__ = [
    "CheckpointDamaged",
    "CheckpointError",
    "CheckpointWriteError",
    "ExportStats",
    "Restored",
    "SparseCheckpointManager",
    "export_sparse",
    "load_sparse",
]
