"""The results of a lottery run: one row per (replicate, branch, level), a
table of means and spreads over replicates, a CSV and a plot.

Rows are plain dicts with the keys of `ROW_FIELDS`; `density` is the
fraction of the prunable weights that remain.
"""

from __future__ import annotations

import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from experiments import plots

ROW_FIELDS = ("replicate", "seed", "branch", "level", "density", "test_accuracy",
              "best_test_accuracy", "test_loss")
BRANCH_ORDER = ("ticket", "random_reinit", "random_prune")
CSV_FILE = "summary.csv"
PLOT_FILE = "lottery.png"


def aggregate(rows: list[dict]) -> list[dict]:
  """Per (branch, level): mean density, and test accuracy (end and best) as
  mean, standard deviation (ddof=0), min and max over replicates."""
  groups: dict[tuple[str, int], list[dict]] = {}
  for row in rows:
    groups.setdefault((row["branch"], row["level"]), []).append(row)
  out = []
  for (branch, level), members in sorted(
      groups.items(), key=lambda kv: (kv[0][1], BRANCH_ORDER.index(kv[0][0]))):
    entry = {"branch": branch, "level": level, "replicates": len(members),
             "density": float(np.mean([m["density"] for m in members]))}
    for key in ("test_accuracy", "best_test_accuracy"):
      values = np.array([m[key] for m in members], np.float64)
      entry[key] = {"mean": float(values.mean()), "std": float(values.std()),
                    "min": float(values.min()), "max": float(values.max())}
    out.append(entry)
  return out


def write_csv(workdir: str, rows: list[dict]) -> str:
  """One line per row, columns ROW_FIELDS; returns the file's path."""
  path = os.path.join(workdir, CSV_FILE)
  with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row[k] for k in ROW_FIELDS})
  os.replace(path + ".tmp", path)
  return path


def format_table(table: list[dict]) -> str:
  """Test accuracy at the end of training per level: mean [min, max] per branch."""
  branches = [b for b in BRANCH_ORDER if any(e["branch"] == b for e in table)]
  by_level: dict[int, dict[str, dict]] = {}
  for entry in table:
    by_level.setdefault(entry["level"], {})[entry["branch"]] = entry
  lines = ["level  weights  " + "  ".join(f"{b:>24}" for b in branches)]
  for level, entries in sorted(by_level.items()):
    density = entries.get("ticket", next(iter(entries.values())))["density"]
    cells = []
    for branch in branches:
      entry = entries.get(branch)
      if entry is None:
        cells.append(f"{'-':>24}")
        continue
      acc = entry["test_accuracy"]
      cells.append(f"{acc['mean']:.4f} [{acc['min']:.4f}, {acc['max']:.4f}]".rjust(24))
    lines.append(f"{level:5d}  {100 * density:6.2f}%  " + "  ".join(cells))
  return "\n".join(lines)


def plot(workdir: str, table: list[dict], title: str = "") -> str:
  """Test accuracy vs. percent of weights remaining (log x, sparser to the
  right): mean over replicates, shaded from min to max. Returns the path."""
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for branch in BRANCH_ORDER:
    entries = sorted((e for e in table if e["branch"] == branch), key=lambda e: e["level"])
    if not entries:
      continue
    x = [100 * e["density"] for e in entries]
    mean = [e["test_accuracy"]["mean"] for e in entries]
    ax.plot(x, mean, marker="o", markersize=3, label=branch.replace("_", " "))
    ax.fill_between(x, [e["test_accuracy"]["min"] for e in entries],
                    [e["test_accuracy"]["max"] for e in entries], alpha=0.2)
  ax.set_xscale("log")
  ax.invert_xaxis()
  levels = sorted({(e["level"], e["density"]) for e in table if e["branch"] == "ticket"})
  step = max(1, len(levels) // 8)  # at most ~8 labelled levels
  ticks = [100 * density for _, density in levels[::step]]
  ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
  ax.minorticks_off()
  replicates = max((e["replicates"] for e in table), default=0)
  ax.set(xlabel="percent of prunable weights remaining (log scale)",
         ylabel="test accuracy at the end of training",
         title=title or f"lottery tickets vs. controls ({replicates} replicate"
                        f"{'s' if replicates != 1 else ''}: mean, min to max)")
  ax.grid(alpha=0.3)
  ax.legend()
  return plots.save(fig, os.path.join(workdir, PLOT_FILE))
