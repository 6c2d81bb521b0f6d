"""Training curves of a run (and its dense baseline) as a PNG in the workdir."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import metrics as metrics_lib


def plot_curves(workdir: str, baseline_dir: str | None = None, filename: str = "curves.png") -> str:
  """Test accuracy and sparsity against step; returns the PNG's path."""
  fig, (acc_ax, sparsity_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
  runs = [("pruned", workdir)] + ([("dense baseline", baseline_dir)] if baseline_dir else [])
  for name, directory in runs:
    test = metrics_lib.read_metrics(directory, "test")
    steps = [r["step"] for r in test]
    acc_ax.plot(steps, [r["accuracy"] for r in test], label=name)
    sparsity_ax.plot(steps, [r["sparsity"] for r in test], label=name)
  acc_ax.set(xlabel="step", ylabel="test accuracy", title="test accuracy (every epoch)")
  sparsity_ax.set(xlabel="step", ylabel="sparsity of pruned leaves", ylim=(-0.02, 1.02),
                  title="sparsity (every epoch)")
  for ax in (acc_ax, sparsity_ax):
    ax.grid(alpha=0.3)
    ax.legend()
  return save(fig, os.path.join(workdir, filename))


def save(fig, path: str) -> str:
  """Lays out `fig`, writes it as a PNG to `path`, closes it; returns `path`."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
