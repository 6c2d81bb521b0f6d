"""Trains and prunes a model with a config file; writes everything to --workdir.

  python -m experiments.train --config=experiments/configs/default.py --workdir=runs/default
  python -m experiments.train --config=experiments/configs/default.py --workdir=runs/d95 \
      --config.pruning.sparsity=0.95 --config.pruning.allocation=global

Any config key can be overridden as --config.<key>=<value>; a key the config
does not have is an error. For a pruning method the binary first trains the
dense baseline (same config, method 'dense') in <workdir>/dense_baseline,
unless --config.dense_baseline=False. The workdir gets config.json,
metrics.jsonl, tensorboard/, final.json (metrics, per-layer sparsity) and
curves.png; the last line printed compares dense and pruned test accuracy.
"""

from __future__ import annotations

import os
import runpy
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow_datasets as tfds

from experiments import config_checks
from experiments import input_pipeline
from experiments import plots
from experiments import trainer
from experiments import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/configs/default.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and results.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a run already in --workdir (only the files a run writes).")

BASELINE_DIR = "dense_baseline"


def final_line(summary: dict, baseline: dict | None, config: ml_collections.ConfigDict) -> str:
  """The one-line result: dense and pruned test accuracy, achieved sparsity."""
  parts = []
  if baseline is not None:
    parts.append(f"dense test accuracy {baseline['test']['accuracy']:.4f}")
  if summary["method"] == "dense":
    parts.append(f"dense test accuracy {summary['test']['accuracy']:.4f}")
  else:
    parts.append(f"pruned test accuracy {summary['test']['accuracy']:.4f}")
  method = summary["method"]
  if method != "dense":
    method += f", {config.pruning.allocation}"
  parts.append(f"sparsity {summary['sparsity']:.4f} ({method})")
  return " | ".join(parts)


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        devices=None) -> dict:
  """Trains the dense baseline (if asked) and `config`; returns the final summary.

  A workdir that already holds this config's finished run is not retrained:
  its saved summary is returned; an unfinished one is resumed from its latest
  checkpoint (the baseline first, if it had not finished). Data and config
  are checked before anything is written, so a run that cannot start leaves
  the workdir as it was.
  """
  status = workdir_lib.check(workdir, config, overwrite)
  if status is workdir_lib.Status.FINISHED:
    print(f"{workdir} already holds this finished run; reporting its saved results.")
    return workdir_lib.load_json(workdir, workdir_lib.FINAL_FILE)
  pruned = trainer.Trainer(config, devices)
  dense = None
  if config.pruning.method != "dense" and config.dense_baseline:
    dense_config = ml_collections.ConfigDict(config.to_dict())
    dense_config.pruning.method = "dense"
    dense_config.dense_baseline = False
    dense = trainer.Trainer(dense_config, devices, data=pruned.data)
  if status is workdir_lib.Status.NEW:
    workdir_lib.start(workdir, config, overwrite)
  baseline = None
  if dense is not None:
    baseline = _fit_or_load(dense, os.path.join(workdir, BASELINE_DIR), "dense")
  summary = pruned.fit(workdir, label=config.pruning.method,
                       resume=status is workdir_lib.Status.RESUME).summary
  if baseline is not None:
    summary["dense_baseline"] = {k: baseline[k] for k in ("test", "best_test_accuracy", "train")}
  plots.plot_curves(workdir, os.path.join(workdir, BASELINE_DIR) if baseline else None)
  workdir_lib.save_json(workdir, workdir_lib.FINAL_FILE, summary)  # written last: marks the run done
  return summary


def _fit_or_load(run_trainer: trainer.Trainer, workdir: str, label: str) -> dict:
  """Trains (or resumes) the sub-run in `workdir`; a finished one is only read."""
  status = workdir_lib.check(workdir, run_trainer.config)
  if status is workdir_lib.Status.FINISHED:
    return workdir_lib.load_json(workdir, workdir_lib.FINAL_FILE)
  if status is workdir_lib.Status.NEW:
    workdir_lib.start(workdir, run_trainer.config)
  summary = run_trainer.fit(workdir, label=label,
                            resume=status is workdir_lib.Status.RESUME).summary
  workdir_lib.save_json(workdir, workdir_lib.FINAL_FILE, summary)
  return summary


def _unknown_overrides(argv: list[str]) -> list[str]:
  """The --config.<key> overrides of `argv` naming a key the config file lacks."""
  config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_file is None:
    return []
  config = runpy.run_path(config_file)["get_config"]()
  unknown = []
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node, path = config, arg[len("--config."):].split("=", 1)[0].split(".")
    for part in path:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        unknown.append("--config." + ".".join(path))
        break
      node = node[part]
  return unknown


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for an unknown --config key."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # how ml_collections reports unknown keys
    unknown = _unknown_overrides(argv)
    if not unknown:
      raise  # not an override: a real error, keep its traceback
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    detail = str(e.args[0] if e.args else e).replace("\n", "; ")
    sys.exit(f"error: unknown config key {unknown[0]} (the config has no such field): {detail}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the progress
  tfds.disable_progress_bar()
  config = _CONFIG.value
  print(f"JAX {jax.__version__} on {jax.local_device_count()} {jax.default_backend()} device(s); "
        f"workdir {_WORKDIR.value}")
  try:
    summary = run(config, _WORKDIR.value, _OVERWRITE.value)
  except (config_checks.ConfigError, input_pipeline.DatasetNotFoundError,
          workdir_lib.WorkdirError) as e:
    sys.exit(f"error: {e}")
  baseline = summary.get("dense_baseline")
  print(final_line(summary, baseline, config))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
