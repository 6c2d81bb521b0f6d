"""Structured one-shot pruning of a trained model, shrunk to smaller arrays and timed.

  python -m experiments.structured --config=experiments/configs/structured_lm.py \
      --workdir=runs/lm2_structured --config.train_workdir=runs/lm2

Restores the final checkpoint of the finished training run in
`config.train_workdir` (read-only), calibrates on `config.calibration_sequences`
training examples (the inputs of every group's consumer: mean, variance and
norm, `sparsejax.structure.linen_input_stats`), and prunes whole units (heads
and MLP units, the model's spec in experiments/models/structure.py) with every
method of `config.methods` ('flap', 'wanda_sp', 'magnitude_sp') at every
fraction of `config.fractions` of the groups' parameters. Each pruned model
is physically shrunk (`sparsejax.shrink`; its outputs are checked against
the masked model's on an evaluation batch) and the shrunk model is evaluated
on the first `eval_sequences` examples of the training run's evaluation split
(0: all; bits per byte for text), its parameters counted
and its jitted forward timed on this machine's CPU against the dense one
(medians of `latency_repeats` interleaved passes of `latency_batch` sequences). Rows go to
<workdir>/rows/<name>.json as they finish (a killed run resumes at the first
row not done); summary.csv and final.json (rows and a markdown table) at the
end, and the table is printed.
"""

from __future__ import annotations

import csv
import math
import os
import time

from absl import app
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sparsejax import structure
from sparsejax.checkpoint import SparseCheckpointManager
from experiments import cli
from experiments import config_checks
from experiments import oneshot
from experiments import trainer as trainer_lib
from experiments import workdir as workdir_lib
from experiments.models import structure as model_structure

CSV_FILE = "summary.csv"
ROWS_DIR = "rows"
RUN_FILES = workdir_lib.BINARY_RUN_FILES["experiments.structured"]
SOURCE_KEY = oneshot.SOURCE_KEY
ROW_FIELDS = ("method", "fraction", "test_loss", "test_bits_per_byte", "test_accuracy",
              "params", "params_fraction", "heads", "mlp_units", "latency_ms", "dense_latency_ms",
              "latency_ratio",
              "shrunk_max_abs_diff", "prune_seconds")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects, naming the key, what the run could not do."""
  if not config.train_workdir:
    raise config_checks.ConfigError(
        "config.train_workdir is empty: give the workdir of a finished experiments.train run.")
  if not config.methods:
    raise config_checks.ConfigError("config.methods is empty.")
  for method in config.methods:
    config_checks.choice(method, structure.METHODS, "methods")
  if not config.fractions:
    raise config_checks.ConfigError("config.fractions is empty.")
  for f in config.fractions:
    config_checks.number(f, "fractions", 0.0, 1.0)
    if not 0.0 <= f < 1.0:
      raise config_checks.ConfigError(f"config.fractions: {f} must be in [0, 1).")
  config_checks.at_least(config.calibration_sequences, 1, "calibration_sequences")
  config_checks.at_least(config.calibration_batch, 1, "calibration_batch")
  config_checks.at_least(config.multiple, 0, "multiple")
  config_checks.at_least(config.latency_batch, 1, "latency_batch")
  config_checks.at_least(config.latency_repeats, 1, "latency_repeats")
  config_checks.at_least(config.eval_sequences, 0, "eval_sequences")


def check_groups(config: ml_collections.ConfigDict, model, name: str, groups) -> None:
  """Rejects, naming the key and the layer, a method or multiple the model's groups cannot take.

  Run before anything is restored, calibrated or written: calibrated methods
  need Linen Dense consumers (input statistics), FLAP needs a bias on every
  consumer (its compensation is added to it; a params tree cannot grow a
  leaf its model does not declare), and `multiple` must be valid.
  """
  calibrated = [m for m in config.methods if m != "magnitude_sp"]
  if calibrated:   # Wanda-sp and FLAP read the inputs of each group's consumer kernel
    if hasattr(model, "nnx_model"):
      raise config_checks.ConfigError(
          f"config.methods: {calibrated} need input statistics, captured from Linen Dense "
          f"layers; model '{name}' is NNX: use magnitude_sp.")
    without = [g.name for g in groups if g.consumer is None]
    if without:
      raise config_checks.ConfigError(
          f"config.methods: {calibrated} need each group's consumer kernel; model "
          f"'{name}' has groups without one ({', '.join(without)}): use magnitude_sp.")
  if "flap" in config.methods:
    without = [g.consumer.path for g in groups if g.bias is None]
    if without:
      raise config_checks.ConfigError(
          f"config.methods: flap adds its compensation to each consumer's bias; model '{name}' "
          f"has consumers without one ({', '.join(without)}): use wanda_sp or magnitude_sp.")
  if config.multiple:
    try:
      structure.rounded_keep(
          groups, {g.name: np.ones(g.units, bool) for g in groups}, config.multiple)
    except ValueError as e:
      raise config_checks.ConfigError(f"config.multiple: {e}") from e


def count(tree) -> int:
  """Number of parameters (entries of every array) of a tree."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def latency_ms(models_and_variables, inputs, repeats: int) -> list[float]:
  """Median wall time (ms) of each (model, variables)'s jitted forward of `inputs`.

  Compiled and warmed up first; the models then run interleaved, one pass of
  each per round, so that a phase of machine load hits them alike.
  """
  forwards = [(jax.jit(lambda v, x, m=m: m.apply(v, x, train=False)), v)
              for m, v in models_and_variables]
  for forward, variables in forwards:
    jax.block_until_ready(forward(variables, inputs))
  times = [[] for _ in forwards]
  for _ in range(repeats):
    for t, (forward, variables) in zip(times, forwards):
      start = time.perf_counter()
      jax.block_until_ready(forward(variables, inputs))
      t.append(time.perf_counter() - start)
  return [1e3 * float(np.median(t)) for t in times]


def evaluate(model, variables, data, count: int, batch: int = 64) -> dict:
  """Mean loss and accuracy (per example, as the trainer's) of `model` on the first `count`
  examples of the evaluation split (0: all of them)."""
  count = len(data.eval) if count == 0 else min(count, len(data.eval))

  @jax.jit
  def step(v, x, y):
    logits = model.apply(v, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y), jnp.argmax(logits, -1) == y

  losses, correct = [], []
  for start in range(0, count, batch):
    inputs, labels = data.eval.examples(range(start, min(start + batch, count)))
    loss, hit = step(variables, data.preprocess(np.stack(inputs)), np.asarray(labels))
    losses.append(np.asarray(loss).reshape(len(inputs), -1).mean(-1))
    correct.append(np.asarray(hit, np.float32).reshape(len(inputs), -1).mean(-1))
  return {"loss": float(np.concatenate(losses).mean()),
          "accuracy": float(np.concatenate(correct).mean())}


def prune_row(trainer, state, groups, stats, method: str, fraction: float,
              config: ml_collections.ConfigDict, timing_inputs, dense_vars,
              dense_params: int, log=print) -> dict:
  """Prunes, evaluates, shrinks, checks and times one (method, fraction)."""
  params = jax.device_get(state.params)
  start = time.perf_counter()
  pruned = structure.prune_structured(params, groups, method, fraction,
                                      stats=None if method == "magnitude_sp" else stats)
  keep = jax.device_get(pruned.keep)
  seconds = time.perf_counter() - start
  variables = {"params": pruned.params}
  if state.batch_stats:
    variables["batch_stats"] = jax.device_get(state.batch_stats)
  small, small_model = model_structure.shrink_model(trainer.model, variables, groups, keep,
                                                    multiple=config.multiple or None)
  masked_out = trainer.model.apply(variables, timing_inputs, train=False)
  small_out = small_model.apply(small, timing_inputs, train=False)
  diff = float(np.max(np.abs(np.asarray(masked_out) - np.asarray(small_out))))
  test = evaluate(small_model, small, trainer.data, config.eval_sequences)   # the shrunk model
  dense_ms, ms = latency_ms([(trainer.model, dense_vars), (small_model, small)], timing_inputs,
                            config.latency_repeats)
  n = count(small["params"])
  heads = [int(np.sum(keep[g.name])) for g in groups if g.kind == "head"]
  units = [int(np.sum(keep[g.name])) for g in groups if g.kind == "channel"]
  log(f"  {method} {round(100 * fraction)}%: test loss {test['loss']:.4f}, {n} params, heads "
      f"{heads}, MLP units {units}, {ms:.2f} ms ({ms / dense_ms:.2f}x dense), shrunk vs masked "
      f"max |diff| {diff:.1e}")
  scores = oneshot._scores(test, trainer.data.text)  # pylint: disable=protected-access
  return {"method": method, "fraction": fraction, **scores,
          "params": n, "params_fraction": n / dense_params, "heads": heads, "mlp_units": units,
          "latency_ms": ms, "dense_latency_ms": dense_ms, "latency_ratio": ms / dense_ms,
          "shrunk_max_abs_diff": diff,
          "prune_seconds": seconds}


def format_table(rows: list[dict], dense: dict, dense_params: int, text: bool) -> str:
  """Markdown: one row per (method, fraction) with the score, parameters and latency."""
  key = "test_bits_per_byte" if text else "test_accuracy"
  label = "bits per byte" if text else "test accuracy"
  lines = [f"| method | removed | {label} | parameters | CPU latency vs dense |",
           "| --- | --- | --- | --- | --- |",
           f"| dense | 0% | {dense[key]:.3f} | {dense_params:,} | 1.00x |"]
  for r in rows:
    lines.append(f"| {r['method']} | {round(100 * r['fraction'])}% | {r[key]:.3f} | "
                 f"{r['params']:,} | {r['latency_ratio']:.2f}x |")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        log=print) -> dict:
  """Prunes (or reads back) every (method, fraction) row; returns rows, dense and table."""
  check_config(config)
  planned = [(f"{method}_{round(100 * f)}pct", method, float(f))
             for method in config.methods for f in config.fractions]
  trainer = oneshot.trained(config.train_workdir)
  shapes = jax.eval_shape(trainer.initial_state).params
  try:
    groups = model_structure.groups(trainer.model, shapes)
  except ValueError as e:
    raise config_checks.ConfigError(f"config.train_workdir: {e}") from e
  check_groups(config, trainer.model, trainer.config.model.name, groups)
  calibrated = [m for m in config.methods if m != "magnitude_sp"]
  source = workdir_lib.identity(workdir_lib.config_dict(trainer.config), os.path.join(
      config.train_workdir, trainer_lib.CHECKPOINT_DIR))
  status = workdir_lib.check(workdir, config, overwrite, RUN_FILES)
  if status is workdir_lib.Status.FINISHED:
    final = workdir_lib.load_json(workdir, workdir_lib.FINAL_FILE)
    if workdir_lib.identity_mismatch(final.get(SOURCE_KEY), source) is None:
      return final
  if status is workdir_lib.Status.NEW:
    workdir_lib.start(workdir, config, overwrite, RUN_FILES)
  manager = SparseCheckpointManager(
      os.path.join(config.train_workdir, trainer_lib.CHECKPOINT_DIR), read_only=True)
  try:
    state = trainer.restore(manager, log=lambda line: log(f"[structured] {line}"))
  finally:
    manager.close()
  text = trainer.data.text
  params = jax.device_get(state.params)
  dense_vars = {"params": params, **({"batch_stats": jax.device_get(state.batch_stats)}
                                     if state.batch_stats else {})}
  dense_test = evaluate(trainer.model, dense_vars, trainer.data, config.eval_sequences)
  dense = oneshot._scores(dense_test, text)  # pylint: disable=protected-access
  dense_params = count(params)
  batches = oneshot.calibration_batches(trainer.data, config.calibration_sequences,
                                        config.calibration_batch, config.seed)
  variables = {"batch_stats": state.batch_stats} if state.batch_stats else None
  stats = structure.linen_input_stats(
      trainer.model, batches, params, variables=variables, apply_kwargs={"train": False},
      paths=[g.consumer.path for g in groups]) if calibrated else None
  inputs, _ = trainer.data.eval.examples(range(min(config.latency_batch, len(trainer.data.eval))))
  timing_inputs = trainer.data.preprocess(np.stack(inputs))
  log(f"[structured] {trainer.config.model.name} from {config.train_workdir} at step "
      f"{int(state.step)}: {dense_params} params, dense test loss {dense['test_loss']:.4f}"
      + (f" ({dense['test_bits_per_byte']:.3f} bits per byte)" if text else "")
      + f"; {len(groups)} groups, {len(planned)} pruned models")
  rows_dir = os.path.join(workdir, ROWS_DIR)
  os.makedirs(rows_dir, exist_ok=True)
  rows = []
  for i, (name, method, fraction) in enumerate(planned):
    row_file = f"{name}.json"
    if os.path.exists(os.path.join(rows_dir, row_file)):
      saved = workdir_lib.load_json(rows_dir, row_file)
      if workdir_lib.identity_mismatch(saved.pop(SOURCE_KEY, None), source) is None:
        rows.append(saved)
        continue
    log(f"[structured] {i + 1}/{len(planned)}: {method} at {round(100 * fraction)}%")
    row = prune_row(trainer, state, groups, stats, method, fraction, config, timing_inputs,
                    dense_vars, dense_params, log)
    workdir_lib.save_json(rows_dir, row_file, {**row, SOURCE_KEY: source})  # last: marks it done
    rows.append(row)
  result = {"dense": {**dense, "params": dense_params}, "rows": rows,
            "markdown": format_table(rows, dense, dense_params, text), SOURCE_KEY: source}
  with open(os.path.join(workdir, CSV_FILE), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  workdir_lib.save_json(workdir, workdir_lib.FINAL_FILE, result)  # last: marks it done
  return result


def report(result: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Prints the table."""
  del config
  print("structured pruning without retraining (shrunk models, CPU latency of the forward):")
  print(result["markdown"])
  print(f"table: {os.path.join(workdir, CSV_FILE)}")


main = cli.main_for(run, report)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
