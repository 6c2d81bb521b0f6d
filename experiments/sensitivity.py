"""Per-layer sensitivity of a trained model: the loss with one layer (or group) pruned alone.

  python -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=runs/lm
  python -m experiments.sensitivity --config=experiments/configs/sensitivity_lm.py \
      --workdir=runs/lm_sensitivity --config.train_workdir=runs/lm

Restores the final checkpoint of the finished training run in
`config.train_workdir` (read-only, as experiments.oneshot does), and for
every group (each chosen kernel, or each regex of `config.groups`) and every
sparsity of `config.sparsities` prunes that group alone by magnitude (each
kernel its round((1 - s) n) largest |w|, every other kernel dense,
`sparsejax.sensitivity.sweep`) and evaluates the loss on the first
`config.eval_examples` examples of the evaluation split. Writes to the
workdir: sensitivity.csv (one row per group and sparsity: loss, increase
over dense), sensitivity.png (a heatmap of the increase, groups by
sparsity), rates.json (per-group sparsities within `config.max_increase` of
the dense loss, `sensitivity.rates`: a {path regex: sparsity} allocation for
`compute_masks` or `--config.pruning.allocation`-style custom maps) and
final.json (everything, with the markdown table printed at the end).
"""

from __future__ import annotations

import csv
import os

from absl import app
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
import numpy as np

from sparsejax import sensitivity as sensitivity_lib
from sparsejax.checkpoint import SparseCheckpointManager
from experiments import cli
from experiments import config_checks
from experiments import methods as methods_lib
from experiments import oneshot
from experiments import plots
from experiments import trainer as trainer_lib
from experiments import workdir as workdir_lib

CSV_FILE = "sensitivity.csv"
PLOT_FILE = "sensitivity.png"
RATES_FILE = "rates.json"
RUN_FILES = workdir_lib.BINARY_RUN_FILES["experiments.sensitivity"]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects, naming the key, what the sweep could not do."""
  if not config.train_workdir:
    raise config_checks.ConfigError(
        "config.train_workdir is empty: give the workdir of a finished experiments.train run.")
  if not config.sparsities:
    raise config_checks.ConfigError("config.sparsities is empty.")
  for i, s in enumerate(config.sparsities):
    config_checks.number(s, f"sparsities[{i}]", 0.0, 1.0)
  config_checks.at_least(config.eval_examples, 0, "eval_examples")
  config_checks.number(config.max_increase, "max_increase", 0.0)
  methods_lib.leaf_filter(config, section="")


def eval_subset(trainer: trainer_lib.Trainer, count: int) -> list[tuple[np.ndarray, ...]]:
  """The first `count` evaluation examples (0: all) as (inputs, labels, weights) batches,
  the last padded with weight-0 copies to a whole batch (one compiled eval step)."""
  data = trainer.data
  count = len(data.eval) if count == 0 else min(count, len(data.eval))
  size = trainer.eval_batch_size
  batches = []
  for start in range(0, count, size):
    index = list(range(start, min(start + size, count)))
    inputs, labels = data.eval.examples(index)
    inputs, labels = data.preprocess(np.stack(inputs)), np.asarray(labels)
    weights = np.ones(len(index), np.float32)
    pad = size - len(index)
    if pad:
      inputs = np.concatenate([inputs, np.repeat(inputs[:1], pad, 0)])
      labels = np.concatenate([labels, np.repeat(labels[:1], pad, 0)])
      weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    batches.append((inputs, labels, weights))
  return batches


def format_table(table: sensitivity_lib.Sensitivity) -> str:
  """Markdown: one row per group, the loss increase over dense at each sparsity."""
  lines = ["| group | weights | " + " | ".join(f"{s:.0%}" for s in table.sparsities) + " |",
           "| --- | --- | " + " | ".join("---" for _ in table.sparsities) + " |"]
  for name, size, row in zip(table.groups, table.sizes, table.losses):
    lines.append(f"| {name} | {size} | " + " | ".join(
        f"{l - table.dense_loss:+.4f}" for l in row) + " |")
  return "\n".join(lines)


def plot(workdir: str, table: sensitivity_lib.Sensitivity) -> str:
  """A heatmap of the loss increase over dense: groups (rows) by sparsity (columns)."""
  increase = np.asarray(table.losses) - table.dense_loss
  fig, ax = plt.subplots(figsize=(1.2 * len(table.sparsities) + 4, 0.35 * len(table.groups) + 1.6))
  bound = max(float(np.abs(increase).max()), 1e-12)
  image = ax.imshow(increase, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
  ax.set_xticks(range(len(table.sparsities)), [f"{s:.0%}" for s in table.sparsities])
  ax.set_yticks(range(len(table.groups)), table.groups)
  for (g, j), value in np.ndenumerate(increase):
    ax.text(j, g, f"{value:+.3f}", ha="center", va="center", fontsize=7)
  ax.set(xlabel="sparsity of that group alone", title="loss increase over dense")
  fig.colorbar(image, ax=ax)
  return plots.save(fig, os.path.join(workdir, PLOT_FILE))


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        log=print) -> dict:
  """Sweeps every group at every sparsity (or reads back a finished sweep); returns final.json."""
  check_config(config)
  trainer = oneshot.trained(config.train_workdir)
  shapes = jax.eval_shape(trainer.initial_state).params
  config_checks.check_leaf_filters(config, shapes, "")
  leaf_filter = methods_lib.leaf_filter(config, section="")
  groups = tuple(config.groups) or None
  try:
    sensitivity_lib.groups_of(shapes, groups, leaf_filter)
  except ValueError as e:
    raise config_checks.ConfigError(f"config.groups: {e}") from e
  status = workdir_lib.check(workdir, config, overwrite, RUN_FILES)
  if status is workdir_lib.Status.FINISHED:
    return workdir_lib.load_json(workdir, workdir_lib.FINAL_FILE)
  if status is workdir_lib.Status.NEW:
    workdir_lib.start(workdir, config, overwrite, RUN_FILES)
  manager = SparseCheckpointManager(
      os.path.join(config.train_workdir, trainer_lib.CHECKPOINT_DIR), read_only=True)
  try:
    state = trainer.restore(manager, log=lambda line: log(f"[sensitivity] {line}"))
  finally:
    manager.close()
  batches = [trainer.global_batch(b) for b in eval_subset(trainer, config.eval_examples)]
  log(f"[sensitivity] {trainer.config.model.name} from {config.train_workdir} at step "
      f"{int(state.step)}; loss on {int(sum(float(jnp.sum(b[2])) for b in batches))} "
      "evaluation examples")

  shardings = jax.tree.map(lambda x: x.sharding, state.params)

  def loss_fn(params):
    placed = state._replace(params=jax.device_put(params, shardings))
    total = count = 0.0
    for batch in batches:
      out = trainer.eval_step(placed, *batch)
      total, count = total + float(out["loss"]), count + float(out["count"])
    return total / count

  table = sensitivity_lib.sweep(state.params, loss_fn, config.sparsities, groups=groups,
                                leaf_filter=leaf_filter, log=log)
  rates = sensitivity_lib.rates(table, config.max_increase)
  with open(os.path.join(workdir, CSV_FILE), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(("group", "weights", "sparsity", "loss", "increase", "dense_loss"))
    for name, size, row in zip(table.groups, table.sizes, table.losses):
      for s, l in zip(table.sparsities, row):
        writer.writerow((name, size, s, float(l), float(l) - table.dense_loss, table.dense_loss))
  plot(workdir, table)
  workdir_lib.save_json(workdir, RATES_FILE, rates)
  result = {"dense_loss": table.dense_loss, "groups": list(table.groups),
            "paths": [list(p) for p in table.paths], "sizes": list(table.sizes),
            "sparsities": list(table.sparsities), "losses": np.asarray(table.losses).tolist(),
            "rates": rates, "overall_sparsity": sensitivity_lib.overall_sparsity(table, rates),
            "markdown": format_table(table)}
  workdir_lib.save_json(workdir, workdir_lib.FINAL_FILE, result)  # last: marks it done
  return result


def report(result: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Prints the table, the rates and where the files are."""
  print(f"loss increase over dense ({result['dense_loss']:.4f}) with one group pruned alone:")
  print(result["markdown"])
  print(f"rates within {config.max_increase} of dense (overall "
        f"{result['overall_sparsity']:.1%} of the swept weights): {result['rates']}")
  print(f"table: {os.path.join(workdir, CSV_FILE)}, heatmap: {os.path.join(workdir, PLOT_FILE)}, "
        f"rates: {os.path.join(workdir, RATES_FILE)}")


main = cli.main_for(run, report)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
