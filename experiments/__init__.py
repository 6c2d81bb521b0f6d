"""Experiment binaries for sparsejax (absl apps); not part of the library."""
