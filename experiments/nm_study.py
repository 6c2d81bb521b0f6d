"""Runs a study: every (method, pattern, seed) of config.study, plus dense.

  python -m experiments.nm_study --config=experiments/configs/nm_study.py --workdir=runs/nm_study
  python -m experiments.nm_study --config=experiments/configs/sparse_study_lenet5.py \
      --workdir=runs/sparse_lenet5

A study's patterns are either N:M pairs (`study.patterns`, the methods are
N:M methods: pruning.nm.method, n and m are set) or unstructured sparsities
(`study.sparsities`, the methods are pruning methods such as gradual, rigl
or snip: pruning.method and pruning.sparsity are set). Each training is an
`experiments.train` run of the base config in <workdir>/runs/<method>_<n>of<m>_seed<s>
or <method>_<percent>pct_seed<s> (dense: dense_seed<s>), so a killed study
resumes: finished runs are read back, an unfinished one continues from its
checkpoint. At the end the workdir gets summary.csv (one row per run),
final.json (rows and the table) and nm_study.png (test accuracy per method
and pattern, mean with min-max over seeds), and the table is printed.
"""

from __future__ import annotations

import csv
import os

from absl import app
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
import numpy as np

import sparsejax
from experiments import cli
from experiments import config_checks
from experiments import distributed
from experiments import methods as methods_lib
from experiments import plots
from experiments import train
from experiments import trainer
from experiments import workdir as workdir_lib

CSV_FILE = "summary.csv"
PLOT_FILE = "nm_study.png"
RUNS_DIR = "runs"
RUN_FILES = workdir_lib.BINARY_RUN_FILES["experiments.nm_study"]
ROW_FIELDS = ("method", "pattern", "seed", "test_accuracy", "best_test_accuracy", "train_loss",
              "sparsity", "max_nonzeros_per_group")


def runs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, config) of every training of the study.

  Raises:
    ConfigError: no `study` section, an empty or unknown method, a pattern
      that is not an (n, m) pair, no seeds, or a repeated method, pattern
      or seed.
  """
  if "study" not in config:
    raise config_checks.ConfigError("a study config has a `study` section; start from "
                                    "experiments/configs/nm_study.py or sparse_study_lenet5.py.")
  study = config.study
  unstructured = "sparsities" in study
  levels = "sparsities" if unstructured else "patterns"
  if unstructured and "patterns" in study:
    raise config_checks.ConfigError("config.study has both patterns (N:M) and sparsities "
                                    "(unstructured): a study is one or the other.")
  if not study.methods or not study[levels] or not study.seeds:
    raise config_checks.ConfigError(
        f"config.study.methods, {levels} and seeds must be non-empty.")
  known = ([m for m in methods_lib.METHODS if m not in ("dense", "nm")] if unstructured
           else tuple(sparsejax.nm.METHODS))
  for method in study.methods:
    config_checks.choice(method, tuple(known), "study.methods")
  for sparsity in study[levels] if unstructured else ():
    if not 0.0 < sparsity < 1.0:
      raise config_checks.ConfigError(
          f"config.study.sparsities holds {sparsity!r}: each must be in (0, 1).")
  for key in ("methods", levels, "seeds"):
    values = [tuple(v) if isinstance(v, (list, tuple)) else v for v in study[key]]
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
      raise config_checks.ConfigError(
          f"config.study.{key}={tuple(study[key])!r} repeats {repeated}: each run would be "
          "trained once but reported twice.")
  out = []
  base = ml_collections.ConfigDict(config.to_dict())
  del base["study"]
  if not unstructured:
    base.pruning.method = "nm"
  base.dense_baseline = False
  for seed in study.seeds:
    if study.dense:
      dense = ml_collections.ConfigDict(base.to_dict())
      dense.pruning.method, dense.seed = "dense", seed
      out.append((f"dense_seed{seed}", dense))
    for sparsity in study[levels] if unstructured else ():
      for method in study.methods:
        run_config = ml_collections.ConfigDict(base.to_dict())
        run_config.seed = seed
        run_config.pruning.method, run_config.pruning.sparsity = method, sparsity
        out.append((f"{method}_{round(100 * sparsity)}pct_seed{seed}", run_config))
    for pattern in () if unstructured else study.patterns:
      if len(pattern) != 2:
        raise config_checks.ConfigError(
            f"config.study.patterns holds {pattern!r}: each pattern is an (n, m) pair.")
      n, m = pattern
      for method in study.methods:
        run_config = ml_collections.ConfigDict(base.to_dict())
        run_config.seed = seed
        run_config.pruning.nm.method = method
        run_config.pruning.nm.n, run_config.pruning.nm.m = n, m
        out.append((f"{method}_{n}of{m}_seed{seed}", run_config))
  return out


def row(config: ml_collections.ConfigDict, summary: dict) -> dict:
  """One run's line of summary.csv; `pattern` is the N:M pattern ('2:4') or the
  unstructured sparsity ('90%')."""
  method = config.pruning.method
  nm = config.pruning.nm
  worst = summary.get("nm", {}).get("max_nonzeros_per_group", {})
  pattern = {"dense": "dense", "nm": f"{nm.n}:{nm.m}"}.get(
      method, f"{round(100 * config.pruning.sparsity)}%")
  return {"method": nm.method if method == "nm" else method,
          "pattern": pattern, "seed": config.seed,
          "test_accuracy": summary["test"]["accuracy"],
          "best_test_accuracy": summary["best_test_accuracy"],
          "train_loss": summary["train"]["loss"], "sparsity": summary["sparsity"],
          "max_nonzeros_per_group": max(worst.values()) if worst else ""}


def table(rows: list[dict]) -> list[dict]:
  """Per (method, pattern), in run order: test accuracy mean, min, max over seeds."""
  groups: dict[tuple[str, str], list[float]] = {}
  for r in rows:
    groups.setdefault((r["method"], r["pattern"]), []).append(r["test_accuracy"])
  return [{"method": method, "pattern": pattern, "seeds": len(values),
           "mean": float(np.mean(values)), "min": float(np.min(values)),
           "max": float(np.max(values))} for (method, pattern), values in groups.items()]


def format_table(entries: list[dict]) -> str:
  """A markdown table: one row per method, one column per pattern."""
  patterns = list(dict.fromkeys(e["pattern"] for e in entries if e["pattern"] != "dense"))
  methods = list(dict.fromkeys(e["method"] for e in entries))
  cell = {(e["method"], e["pattern"]): e for e in entries}
  lines = ["| method | " + " | ".join(patterns) + " |",
           "| --- | " + " | ".join("---" for _ in patterns) + " |"]
  for method in methods:
    if method == "dense":
      e = cell[("dense", "dense")]
      text = f"{e['mean']:.4f} [{e['min']:.4f}, {e['max']:.4f}]"
      lines.append("| dense (no pruning) | " + " | ".join(text for _ in patterns) + " |")
      continue
    cells = [f"{cell[(method, p)]['mean']:.4f} [{cell[(method, p)]['min']:.4f}, "
             f"{cell[(method, p)]['max']:.4f}]" if (method, p) in cell else "-" for p in patterns]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(workdir: str, entries: list[dict]) -> str:
  """Bars of mean test accuracy per method, one colour per pattern, min-max whiskers."""
  patterns = list(dict.fromkeys(e["pattern"] for e in entries if e["pattern"] != "dense"))
  methods = list(dict.fromkeys(e["method"] for e in entries if e["method"] != "dense"))
  cell = {(e["method"], e["pattern"]): e for e in entries}
  fig, ax = plt.subplots(figsize=(8, 4.2))
  width = 0.8 / len(patterns)
  for j, pattern in enumerate(patterns):
    x = [i + (j - (len(patterns) - 1) / 2) * width for i, m in enumerate(methods)
         if (m, pattern) in cell]
    es = [cell[(m, pattern)] for m in methods if (m, pattern) in cell]
    mean = np.array([e["mean"] for e in es])
    err = np.array([mean - [e["min"] for e in es], [e["max"] for e in es] - mean])
    ax.bar(x, mean, width, yerr=err, capsize=3, label=pattern)
  if ("dense", "dense") in cell:
    ax.axhline(cell[("dense", "dense")]["mean"], color="k", linestyle="--", linewidth=1,
               label="dense")
  low = min(e["min"] for e in entries)
  ax.set_ylim(max(0.0, low - 0.05), 1.0)
  ax.set_xticks(range(len(methods)), methods, rotation=20)
  seeds = max(e["seeds"] for e in entries)
  ax.set(ylabel="test accuracy at the end of training",
         title=f"methods by pattern ({seeds} seeds: mean, min to max)")
  ax.grid(axis="y", alpha=0.3)
  ax.legend()
  return plots.save(fig, os.path.join(workdir, PLOT_FILE))


@workdir_lib.holds_workdirs
def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        log=print) -> dict:
  """Trains (or reads back) every run of the study; returns rows and table.

  Every run's config, model and data are checked before the workdir is
  claimed, so a pattern that cannot work fails now, not hours in.
  """
  planned = runs(config)
  data = None
  for name, run_config in planned:
    try:
      data = trainer.Trainer(run_config, data=data).data
    except config_checks.ConfigError as e:
      raise config_checks.ConfigError(f"study run {name}: {e}") from e
  status = workdir_lib.check(workdir, config, overwrite, RUN_FILES)
  if status is workdir_lib.Status.FINISHED:
    final = workdir_lib.load_json(workdir, workdir_lib.FINAL_FILE)
    why = _stale_run(workdir, planned, final.get("identities", {}))
    if why is None:
      return final
    log(f"[study] {os.path.join(workdir, workdir_lib.FINAL_FILE)} does not come from the runs "
        f"now in {RUNS_DIR}/ ({why}); redoing the table from them.")
  if status is workdir_lib.Status.NEW and distributed.is_primary():
    workdir_lib.start(workdir, config, overwrite, RUN_FILES)
  distributed.barrier("workdir claimed")
  rows, identities = [], {}
  for i, (name, run_config) in enumerate(planned):
    log(f"[study] run {i + 1}/{len(planned)}: {name}")
    summary = train.run(run_config, os.path.join(workdir, RUNS_DIR, name))
    rows.append(row(run_config, summary))
    identities[name] = summary.get(workdir_lib.IDENTITY_KEY)
    log(f"[study] {name}: test accuracy {rows[-1]['test_accuracy']:.4f}")
  entries = table(rows)
  result = {"rows": rows, "table": entries, "markdown": format_table(entries),
            "identities": identities}
  if distributed.is_primary():  # the other processes computed the same rows
    with open(os.path.join(workdir, CSV_FILE), "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
      writer.writeheader()
      writer.writerows(rows)
    plot(workdir, entries)
    workdir_lib.save_json(workdir, workdir_lib.FINAL_FILE, result)  # last: marks it done
  distributed.barrier("study finished")
  return result


def _stale_run(workdir: str, planned: list[tuple[str, ml_collections.ConfigDict]],
               identities: dict) -> str | None:
  """The first run whose recorded identity (config digest, final checkpoint
  step and checksum) differs from the run now in the workdir, and how; None
  if every one matches (a study written before identities were kept: None)."""
  for name, run_config in planned:
    current = workdir_lib.identity(workdir_lib.config_dict(run_config),
                                   os.path.join(workdir, RUNS_DIR, name, trainer.CHECKPOINT_DIR))
    why = workdir_lib.identity_mismatch(identities.get(name), current)
    if why is not None:
      return f"run {name}: {why}"
  return None


def report(result: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  del config
  print("test accuracy at the end of training, mean [min, max] over seeds:")
  print(result["markdown"])
  print(f"table: {os.path.join(workdir, CSV_FILE)}, plot: {os.path.join(workdir, PLOT_FILE)}")

main = cli.main_for(run, report)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
