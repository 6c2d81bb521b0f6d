"""Trains and prunes a model with a config file; writes everything to --workdir.

  python -m experiments.train --config=experiments/configs/default.py --workdir=runs/default
  python -m experiments.train --config=experiments/configs/default.py --workdir=runs/d95 \
      --config.pruning.sparsity=0.95 --config.pruning.allocation=global

Any config key can be overridden as --config.<key>=<value>; a key the config
does not have is an error. For a pruning method the binary first trains the
dense baseline (same config, method 'dense') in <workdir>/dense_baseline,
unless --config.dense_baseline=False. The workdir gets config.json,
metrics.jsonl, tensorboard/, final.json (metrics, per-layer sparsity) and
curves.png; an N:M run also nm_export.npz, its final weights (checked to keep
at most N of every M) in the compressed N:M format. The last line printed
compares dense and pruned test accuracy.
"""

from __future__ import annotations

import os
from typing import Callable

from absl import app
import jax
import ml_collections

import sparsejax
from sparsejax.checkpoint import export_sparse
from experiments import cli
from experiments import config_checks
from experiments import distributed
from experiments import methods
from experiments import plots
from experiments import trainer
from experiments import workdir as workdir_lib


BASELINE_DIR = "dense_baseline"
NM_EXPORT = "nm_export.npz"  # N:M runs: the final weights in sparsejax's compressed format
CURVES_FILE = "curves.png"
RUN_FILES = workdir_lib.BINARY_RUN_FILES["experiments.train"]


def final_line(summary: dict, baseline: dict | None, config: ml_collections.ConfigDict) -> str:
  """The one-line result: dense and pruned test accuracy (a language model's
  bits per byte), achieved sparsity."""
  def score(run: dict, label: str) -> str:
    test = run["test"]
    if "bits_per_byte" in test:  # a language model
      return (f"{label} test {test['bits_per_byte']:.4f} bits per byte "
              f"(next-byte accuracy {test['accuracy']:.4f})")
    return f"{label} test accuracy {test['accuracy']:.4f}"

  parts = []
  if baseline is not None:
    parts.append(score(baseline, "dense"))
  parts.append(score(summary, "dense" if summary["method"] == "dense" else "pruned"))
  method = summary["method"]
  if method == "nm":
    nm = config.pruning.nm
    method = f"{nm.method} {nm.n}:{nm.m}"
  elif method != "dense":
    method += f", {config.pruning.allocation}"
  parts.append(f"sparsity {summary['sparsity']:.4f} ({method})")
  return " | ".join(parts)


@workdir_lib.holds_workdirs
def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        devices=None) -> dict:
  """Trains the dense baseline (if asked) and `config`; returns the final summary.

  A workdir that already holds this config's finished run is not retrained:
  its saved summary is returned; an unfinished one is resumed from its latest
  checkpoint (the baseline first, if it had not finished). Data and config
  are checked before anything is written, so a run that cannot start leaves
  the workdir as it was. The workdir is locked during the call, as by the
  binary: a second caller, in any process, is refused in one line.
  """
  if "lottery" in config:
    raise config_checks.ConfigError(
        "this is a lottery config (it has a `lottery` section): run it with "
        "python -m experiments.lottery.")
  status = workdir_lib.check(workdir, config, overwrite, RUN_FILES)
  if status is workdir_lib.Status.FINISHED:
    final = read_finished(workdir, config)
    if final is not None:
      print(f"{workdir} already holds this finished run; reporting its saved results.")
      return final
    status = workdir_lib.Status.RESUME
  pruned = trainer.Trainer(config, devices)
  dense = None
  if config.pruning.method != "dense" and config.dense_baseline:
    dense_config = ml_collections.ConfigDict(config.to_dict())
    dense_config.pruning.method = "dense"
    dense_config.dense_baseline = False
    dense = trainer.Trainer(dense_config, devices, data=pruned.data)
  if status is workdir_lib.Status.NEW and distributed.is_primary():
    workdir_lib.start(workdir, config, overwrite, RUN_FILES)
  distributed.barrier("workdir claimed")
  baseline = None
  if dense is not None:
    baseline = _fit_or_load(dense, os.path.join(workdir, BASELINE_DIR), "dense")
  result = pruned.fit(workdir, label=config.pruning.method,
                      resume=status is workdir_lib.Status.RESUME)
  summary = result.summary
  if summary["method"] == "nm":
    summary["nm"] = export_nm(result.state, config.pruning.nm, workdir)
  if baseline is not None:
    summary["dense_baseline"] = {k: baseline[k] for k in ("test", "best_test_accuracy", "train")}
  summary[workdir_lib.IDENTITY_KEY] = workdir_lib.identity(
      workdir_lib.config_dict(config), os.path.join(workdir, trainer.CHECKPOINT_DIR))
  if distributed.is_primary():
    plots.plot_curves(workdir, os.path.join(workdir, BASELINE_DIR) if baseline else None,
                     CURVES_FILE)
    workdir_lib.save_json(workdir, workdir_lib.FINAL_FILE, summary)  # last: marks the run done
  distributed.barrier("run finished")
  return summary


def export_nm(state: trainer.TrainState, nm: ml_collections.ConfigDict, workdir: str) -> dict:
  """Checks that the final weights are N:M and exports them to workdir/NM_EXPORT.

  Returns the pattern, the most nonzeros found in any group of each kernel
  and the export's sizes, in the N:M layout (kept values + in-group
  positions along each kernel's contraction axes).

  Raises:
    RuntimeError: if a group holds more than n nonzeros (a bug, not a config).
  """
  masks = trainer.masks_of(state)
  axes = methods.nm_axes(nm)
  worst = sparsejax.nm.max_nonzeros_per_group(state.params, masks, nm.m, axes)
  over = {path: k for path, k in worst.items() if k > nm.n}
  if over:
    raise RuntimeError(f"final weights are not {nm.n}:{nm.m}: most nonzeros per group {over}")
  path = os.path.join(workdir, NM_EXPORT)
  if not distributed.is_primary():  # written by the primary process only
    path = os.path.join(workdir, f".{NM_EXPORT}.process_{jax.process_index()}")
  stats = export_sparse(state.params, masks, path, nm=(nm.n, nm.m, axes))
  if not distributed.is_primary():
    os.remove(path)
  return {"pattern": f"{nm.n}:{nm.m}", "max_nonzeros_per_group": worst, "export": NM_EXPORT,
          "export_bytes": stats.file_bytes, "export_ratio": stats.ratio}


def read_finished(workdir: str, config: ml_collections.ConfigDict,
                  log: Callable[[str], None] = print) -> dict | None:
  """The final.json of the finished run of `config` in `workdir`, or None when
  it does not come from that run (its recorded identity: config digest, latest
  checkpoint step and checksum, differs: a file copied from another run, or
  the run redone since), after saying so in one line and removing it: the run
  is then resumed from its latest checkpoint, which recomputes its results."""
  final = workdir_lib.load_json(workdir, workdir_lib.FINAL_FILE)
  current = workdir_lib.identity(workdir_lib.config_dict(config),
                                 os.path.join(workdir, trainer.CHECKPOINT_DIR))
  why = workdir_lib.identity_mismatch(final.get(workdir_lib.IDENTITY_KEY), current)
  if why is None:
    return final
  log(f"{os.path.join(workdir, workdir_lib.FINAL_FILE)} does not come from this run ({why}); "
      "redoing the run's results from its checkpoints.")
  distributed.barrier(f"{workdir} final.json read")
  if distributed.is_primary():
    os.remove(os.path.join(workdir, workdir_lib.FINAL_FILE))
  return None


def _fit_or_load(run_trainer: trainer.Trainer, workdir: str, label: str) -> dict:
  """Trains (or resumes) the sub-run in `workdir`; a finished one is only read."""
  status = workdir_lib.check(workdir, run_trainer.config)
  if status is workdir_lib.Status.FINISHED:
    final = read_finished(workdir, run_trainer.config)
    if final is not None:
      return final
    status = workdir_lib.Status.RESUME
  if status is workdir_lib.Status.NEW and distributed.is_primary():
    workdir_lib.start(workdir, run_trainer.config)
  distributed.barrier(f"{workdir} claimed")
  summary = run_trainer.fit(workdir, label=label,
                            resume=status is workdir_lib.Status.RESUME).summary
  summary[workdir_lib.IDENTITY_KEY] = workdir_lib.identity(
      workdir_lib.config_dict(run_trainer.config), os.path.join(workdir, trainer.CHECKPOINT_DIR))
  if distributed.is_primary():
    workdir_lib.save_json(workdir, workdir_lib.FINAL_FILE, summary)
  distributed.barrier(f"{workdir} finished")
  return summary


def report(summary: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  del workdir
  print(final_line(summary, summary.get("dense_baseline"), config))

main = cli.main_for(run, report)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
