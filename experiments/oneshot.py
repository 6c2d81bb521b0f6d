"""One-shot pruning of a trained model: magnitude, Wanda, SparseGPT, LAMP, OWL at every target.

  python -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=runs/lm
  python -m experiments.oneshot --config=experiments/configs/oneshot_lm.py \
      --workdir=runs/lm_oneshot --config.train_workdir=runs/lm

(With `configs/oneshot_hf.py` and `--config.model_path=<dir>` it prunes a
Hugging Face checkpoint instead: `experiments.hf_oneshot`.) Restores the
final checkpoint of the finished training run in `config.train_workdir`
(opened read-only; a damaged latest step falls back to the newest intact
one, in one line), calibrates on `config.calibration_sequences` training
examples (seeded; an NNX model such as 'llama' through
`oneshot.nnx_hessians`), and prunes it, without retraining, with every method of
`config.methods` at every unstructured sparsity of `config.sparsities` and
every N:M pattern of `config.patterns` (along each kernel's contraction
axes; every kernel is checked against every pattern before the workdir is
claimed), block by block (`sparsejax.oneshot.prune_sequentially`). Each pruned
model is evaluated on the training run's evaluation split (for a language
model: loss in bits per byte), checkpointed in <workdir>/pruned/<name>
through `SparseCheckpointManager` and exported with `export_sparse` to
<workdir>/pruned/<name>.npz; its row is saved to <workdir>/rows/<name>.json,
so a killed run resumes at the first row not done. At the end the workdir
gets summary.csv, final.json (rows and markdown table) and oneshot.png, and
the table is printed. For text the table also gives a unigram model (byte
frequencies of the training split): what a model that learned nothing about
context scores.

Besides the library's methods, three layer-adaptive rows:

  lamp           magnitude pruning with LAMP's allocation (Lee et al. 2021):
                 one global top-k over the LAMP scores of every chosen kernel
                 gives each kernel its count (`allocation='lamp'`); unstructured
                 targets only (its N:M rows are left out, '-' in the table);
  owl_wanda      Wanda, and SparseGPT, with OWL's per-block sparsities (Yin
  owl_sparsegpt  et al. 2024): from the dense model's outlier ratios
                 (`config.owl.m`, `config.owl.lam`), recorded in the row's
                 JSON as `group_sparsities` and `outlier_ratios`. At an N:M
                 target of `config.patterns`, OWL's N:M variant: each block
                 keeps its own N_l of every M (`sparsejax.owl.owl_nm`, spread
                 `config.owl.nm_lam` in weights of every M, sum of N_l kept),
                 recorded as `group_patterns`; exported with bit masks (the
                 N:M file layout needs one N).
"""

from __future__ import annotations

import csv
import math
import os
import time

from absl import app
import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
import numpy as np

import sparsejax
from sparsejax import oneshot as oneshot_lib
from sparsejax import owl as owl_lib
from sparsejax import pruning as pruning_lib
from sparsejax.checkpoint import SparseCheckpointManager
from sparsejax.checkpoint import export_sparse
from experiments import cli
from experiments import config_checks
from experiments import input_pipeline
from experiments import methods as methods_lib
from experiments import plots
from experiments import trainer as trainer_lib
from experiments import workdir as workdir_lib

CSV_FILE = "summary.csv"
PLOT_FILE = "oneshot.png"
ROWS_DIR = "rows"
PRUNED_DIR = "pruned"
RUN_FILES = workdir_lib.BINARY_RUN_FILES["experiments.oneshot"]
SOURCE_KEY = "source"  # in each row file and final.json: workdir.identity of the trained model
# Rows of the binary beyond the library's methods: name -> the one-shot method that prunes.
ADAPTIVE = {"lamp": "magnitude", "owl_wanda": "wanda", "owl_sparsegpt": "sparsegpt"}
METHODS = oneshot_lib.METHODS + tuple(ADAPTIVE)
ROW_FIELDS = ("method", "pattern", "test_loss", "test_bits_per_byte", "test_accuracy",
              "sparsity", "max_nonzeros_per_group", "export_bytes", "prune_seconds")


def targets(config: ml_collections.ConfigDict) -> list[tuple[str, dict]]:
  """(row name, {'sparsity': s} or {'nm': (n, m)}) for every target, config order.

  Raises:
    ConfigError: naming the key, for a sparsity outside [0, 1) or a bad N:M pair.
  """
  out = []
  for s in config.sparsities:
    try:
      oneshot_lib.check_target(sparsity=s)
    except ValueError as e:
      raise config_checks.ConfigError(f"config.sparsities: {e}") from e
    out.append((f"{round(100 * s)}pct", {"sparsity": float(s)}))
  for pattern in config.patterns:
    if len(pattern) != 2:
      raise config_checks.ConfigError(
          f"config.patterns: {tuple(pattern)!r} is not an (N, M) pair.")
    try:
      oneshot_lib.check_target(nm=tuple(int(v) for v in pattern))
    except ValueError as e:
      raise config_checks.ConfigError(f"config.patterns: {e}") from e
    out.append((f"{pattern[0]}of{pattern[1]}", {"nm": (int(pattern[0]), int(pattern[1]))}))
  if not out:
    raise config_checks.ConfigError("config.sparsities and config.patterns are both empty.")
  return out


def _pattern(target: dict) -> str:
  return (f"{target['nm'][0]}:{target['nm'][1]}" if "nm" in target
          else f"{round(100 * target['sparsity'])}%")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects, naming the key, what the run could not do."""
  if not config.train_workdir:
    raise config_checks.ConfigError(
        "config.train_workdir is empty: give the workdir of a finished experiments.train run.")
  for method in config.methods:
    if method not in METHODS:
      raise config_checks.ConfigError(
          f"config.methods: unknown one-shot method {method!r}; use one of {METHODS}.")
  if not config.methods:
    raise config_checks.ConfigError("config.methods is empty.")
  if any(m.startswith("owl_") for m in config.methods):
    if "owl" not in config:
      raise config_checks.ConfigError("config.owl is missing: OWL rows need config.owl.m and "
                                      "config.owl.lam (see experiments/configs/oneshot_lm.py).")
    config_checks.number(config.owl.m, "owl.m", 0.0, low_open=True)
    config_checks.number(config.owl.lam, "owl.lam", 0.0, 0.5, high_open=True)
    if config.patterns:
      if "nm_lam" not in config.owl:
        raise config_checks.ConfigError("config.owl.nm_lam is missing: OWL's N:M rows need it "
                                        "(see experiments/configs/oneshot_lm.py).")
      config_checks.number(config.owl.nm_lam, "owl.nm_lam", 0.0)
  config_checks.at_least(config.calibration_sequences, 1, "calibration_sequences")
  config_checks.at_least(config.calibration_batch, 1, "calibration_batch")
  config_checks.at_least(config.block_size, 1, "block_size")
  try:
    oneshot_lib.check_solver(config.block_size, config.dampening)
  except ValueError as e:
    raise config_checks.ConfigError(f"config.{e}") from e
  methods_lib.leaf_filter(config, section="")
  targets(config)


def check_layers(config: ml_collections.ConfigDict, trainer: trainer_lib.Trainer) -> None:
  """Every (method, target) against every chosen kernel's shape, before the workdir is claimed.

  Raises:
    ConfigError: naming config.patterns (or block_size) and the kernel.
  """
  data = trainer.data
  shapes = jax.eval_shape(lambda: trainer.model.init(
      jax.random.PRNGKey(0), jax.numpy.zeros((1,) + data.image_shape, data.input_dtype),
      train=False))["params"]
  leaf_filter = methods_lib.leaf_filter(config, section="")
  for method in config.methods:
    for _, target in targets(config):
      if method == "lamp" and "nm" in target:
        continue
      try:
        oneshot_lib.check_layers(shapes, ADAPTIVE.get(method, method), leaf_filter=leaf_filter,
                                 block_size=config.block_size, **target)
      except ValueError as e:
        key = "block_size" if str(e).startswith("sparsegpt N:M") else "patterns"
        raise config_checks.ConfigError(
            f"config.{key}: {e} [config.include / config.exclude choose the kernels]") from e


def trained(train_workdir: str) -> trainer_lib.Trainer:
  """A Trainer for the finished run in `train_workdir` (its own config, eval split).

  Raises:
    ConfigError: `train_workdir` holds no finished training run.
  """
  for name in (workdir_lib.CONFIG_FILE, workdir_lib.FINAL_FILE):
    if not os.path.exists(os.path.join(train_workdir, name)):
      raise config_checks.ConfigError(
          f"config.train_workdir={train_workdir!r} holds no finished experiments.train run "
          f"(no {name}); train the model first.")
  config = ml_collections.ConfigDict(workdir_lib.load_json(train_workdir, workdir_lib.CONFIG_FILE))
  return trainer_lib.Trainer(config)


def calibration_batches(data: input_pipeline.Data, count: int, batch: int,
                        seed: int) -> list[np.ndarray]:
  """`count` training inputs, drawn without replacement by `seed`, in batches of `batch`."""
  count = min(count, len(data.train))
  chosen = np.sort(np.random.default_rng(seed).permutation(len(data.train))[:count])
  inputs, _ = data.train.examples(chosen)
  inputs = data.preprocess(np.stack(inputs))
  return [inputs[i:i + batch] for i in range(0, count, batch)]


def unigram_loss(data: input_pipeline.Data, chunk: int = 4096) -> float:
  """Cross-entropy (nats per token) on the eval split of the training split's token
  frequencies (add-one smoothed): the loss of a model that ignores context."""
  def counts(split):
    total = np.zeros(data.num_classes, np.int64)
    for start in range(0, len(split), chunk):
      _, labels = split.examples(range(start, min(start + chunk, len(split))))
      total += np.bincount(labels.ravel(), minlength=data.num_classes)
    return total
  train, test = counts(data.train), counts(data.eval)
  p = (train + 1) / (train + 1).sum()
  return float(-(test * np.log(p)).sum() / test.sum())


def hessians_functions(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState,
                       batches: list[np.ndarray]) -> dict:
  """{diagonal: params -> {kernel path: X^T X (or its diagonal)}} for the trained model.

  Wanda needs only each input's squared norm: diag(X^T X), d_in times less
  work. A Linen model is captured by `linen_hessians`; a Linen wrapper of an
  NNX model (one with `nnx_model(params)`, e.g. 'llama', whose parameters lie
  under 'model') by `nnx_hessians`.
  """
  if hasattr(trainer.model, "nnx_model"):
    model = trainer.model.nnx_model(state.params)
    return {diagonal: oneshot_lib.nnx_hessians(model, batches, prefix="model", diagonal=diagonal)
            for diagonal in (False, True)}
  return {diagonal: oneshot_lib.linen_hessians(
      trainer.model, batches, apply_kwargs={"train": False}, diagonal=diagonal,
      variables={"batch_stats": state.batch_stats} if state.batch_stats else None)
          for diagonal in (False, True)}


def _scores(test: dict, text: bool) -> dict:
  return {"test_loss": test["loss"], "test_accuracy": test["accuracy"],
          "test_bits_per_byte": test["loss"] / math.log(2) if text else ""}


def owl_targets(params, dense_norms, config: ml_collections.ConfigDict, target: dict,
                leaf_filter) -> tuple[dict[str, float], dict]:
  """OWL's (outlier ratios, per-block targets) of the dense `params` at `target`.

  `dense_norms` holds diag(X^T X) of every kernel's inputs in the dense model.
  `target` is {'sparsity': s} (per-block sparsities, `owl_sparsities`) or
  {'nm': (n, m)} (per-block (N_l, m), `owl_nm`).

  Raises:
    ConfigError: naming config.owl.lam (or config.owl.nm_lam), when a
      block's sparsity would leave [0, 1) (or its N_l leave [1, M]).
  """
  ratios = owl_lib.outlier_ratios(params, dense_norms, m=config.owl.m, leaf_filter=leaf_filter)
  key = "nm_lam" if "nm" in target else "lam"
  try:
    if "nm" in target:
      return ratios, owl_lib.owl_nm(ratios, target["nm"], lam=config.owl.nm_lam)
    return ratios, owl_lib.owl_sparsities(ratios, target["sparsity"], lam=config.owl.lam)
  except ValueError as e:
    raise config_checks.ConfigError(f"config.owl.{key}: {e}") from e


def prune_row(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState, hessians_fn,
              config: ml_collections.ConfigDict, method: str, target: dict, directory: str,
              log=print, dense_norms=None) -> dict:
  """Prunes `state`'s params by `method` to `target`, evaluates, checkpoints and exports.

  `method` is a library method or one of `ADAPTIVE`; OWL rows need
  `dense_norms`, a callable returning diag(X^T X) of the dense model's inputs.
  """
  start = time.perf_counter()
  leaf_filter = methods_lib.leaf_filter(config, section="")
  base = ADAPTIVE.get(method, method)
  extra = {}
  if method == "lamp":
    masks = pruning_lib.compute_masks(state.params, target["sparsity"], allocation="lamp",
                                      leaf_filter=leaf_filter)
    params = sparsejax.apply_masks(state.params, masks)
  else:
    kwargs = dict(target)
    if method.startswith("owl_"):
      ratios, groups = owl_targets(state.params, dense_norms(), config, target, leaf_filter)
      log("  [owl] outlier ratios (%): " + ", ".join(f"{g} {r:.3f}" for g, r in ratios.items()))
      if "nm" in target:
        kwargs["nm"] = groups
        extra = {"outlier_ratios": ratios,
                 "group_patterns": {g: f"{n}:{m}" for g, (n, m) in groups.items()}}
        log("  [owl] N of every M: " + ", ".join(f"{g} {n}" for g, (n, _) in groups.items()))
      else:
        kwargs["sparsity"] = groups
        extra = {"outlier_ratios": ratios, "group_sparsities": groups}
    params, masks = oneshot_lib.prune_sequentially(
        state.params, hessians_fn if base != "magnitude" else None, base,
        leaf_filter=leaf_filter,
        per_output=config.magnitude_per_output if method == "magnitude" else None,
        block_size=config.block_size, dampening=config.dampening,
        log=lambda line: log(f"  {line}"), **kwargs)
  params = jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  placed = jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params))
  test = trainer.evaluate(state._replace(params=placed))
  kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
  total = sum(m.size for m in jax.tree.leaves(masks))
  worst = ""
  nm = target.get("nm")
  if nm is not None:
    group, patterns = oneshot_lib.block_group(), extra.get("group_patterns")
    by_leaf = sparsejax.nm.max_nonzeros_per_group(params, masks, nm[1])
    worst = max(by_leaf.values())
    for path, most in by_leaf.items():   # OWL: each block against its own N
      if most > (nm[0] if patterns is None else int(patterns[group(path)].split(":")[0])):
        raise RuntimeError(f"{method} {_pattern(target)}: {path} kept {most} weights in a group "
                           "(a bug)")
  name = os.path.basename(directory)
  with SparseCheckpointManager(directory, async_save=False) as manager:
    manager.save(int(state.step), params=params, masks=masks, overwrite=True,
                 meta={"train_config": workdir_lib.config_dict(trainer.config),
                       "method": method, "pattern": _pattern(target)})
  stats = export_sparse(params, masks, directory + ".npz",
                        nm=None if "group_patterns" in extra else nm)
  log(f"  {name}: pruned in {seconds:.1f} s, test loss {test['loss']:.4f}")
  return {"method": method, "pattern": _pattern(target), **_scores(test, trainer.data.text),
          "sparsity": 1.0 - kept / total, "max_nonzeros_per_group": worst,
          "export_bytes": stats.file_bytes, "prune_seconds": seconds, **extra}


def format_table(rows: list[dict], dense: dict, unigram: float | None) -> str:
  """Markdown: one row per method, one column per pattern; bits per byte for
  text (lower is better), else test accuracy."""
  key = "test_bits_per_byte" if unigram is not None else "test_accuracy"
  patterns = list(dict.fromkeys(r["pattern"] for r in rows))
  cell = {(r["method"], r["pattern"]): r[key] for r in rows}
  lines = ["| method | " + " | ".join(patterns) + " |",
           "| --- | " + " | ".join("---" for _ in patterns) + " |",
           "| dense (no pruning) | " + " | ".join(f"{dense[key]:.3f}" for _ in patterns) + " |"]
  for method in dict.fromkeys(r["method"] for r in rows):
    lines.append(f"| {method} | " + " | ".join(
        f"{cell[(method, p)]:.3f}" if (method, p) in cell else "-" for p in patterns) + " |")
  if unigram is not None:
    lines.append("| unigram (no context) | " +
                 " | ".join(f"{unigram / math.log(2):.3f}" for _ in patterns) + " |")
  return "\n".join(lines)


def plot(workdir: str, rows: list[dict], dense: dict, unigram: float | None) -> str:
  """Bars per pattern, one colour per method; the dense (and unigram) levels as lines."""
  key = "test_bits_per_byte" if unigram is not None else "test_accuracy"
  patterns = list(dict.fromkeys(r["pattern"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  cell = {(r["method"], r["pattern"]): r[key] for r in rows}
  fig, ax = plt.subplots(figsize=(8, 4.2))
  width = 0.8 / len(methods)
  for j, method in enumerate(methods):
    xs = [i + (j - (len(methods) - 1) / 2) * width for i, p in enumerate(patterns)
          if (method, p) in cell]
    ax.bar(xs, [cell[(method, p)] for p in patterns if (method, p) in cell], width, label=method)
  ax.axhline(dense[key], color="k", linestyle="--", linewidth=1, label="dense")
  if unigram is not None:
    ax.axhline(unigram / math.log(2), color="grey", linestyle=":", linewidth=1, label="unigram")
  ax.set_xticks(range(len(patterns)), patterns)
  ax.set(xlabel="target (unstructured fraction or N:M)",
         ylabel="test bits per byte (lower is better)" if unigram is not None
         else "test accuracy", title="one-shot pruning without retraining")
  ax.grid(axis="y", alpha=0.3)
  ax.legend()
  return plots.save(fig, os.path.join(workdir, PLOT_FILE))


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        log=print) -> dict:
  """Prunes (or reads back) every (method, target) row; returns rows, dense and table.

  A config with `model_path` (`configs/oneshot_hf.py`) prunes a Hugging Face
  checkpoint instead (`experiments.hf_oneshot.run`).
  """
  if "model_path" in config:
    from experiments import hf_oneshot  # pylint: disable=g-import-not-at-top
    return hf_oneshot.run(config, workdir, overwrite, log)
  check_config(config)
  planned = [(f"{method}_{name}", method, target)
             for method in config.methods for name, target in targets(config)
             if not (method == "lamp" and "nm" in target)]   # lamp: unstructured only
  trainer = trained(config.train_workdir)
  config_checks.check_leaf_filters(config, jax.eval_shape(trainer.initial_state).params, "")
  check_layers(config, trainer)
  # The trained model every row comes from: a row of another (the training redone since) is redone.
  source = workdir_lib.identity(workdir_lib.config_dict(trainer.config), os.path.join(
      config.train_workdir, trainer_lib.CHECKPOINT_DIR))
  status = workdir_lib.check(workdir, config, overwrite, RUN_FILES)
  if status is workdir_lib.Status.FINISHED:
    final = workdir_lib.load_json(workdir, workdir_lib.FINAL_FILE)
    why = workdir_lib.identity_mismatch(final.get(SOURCE_KEY), source)
    if why is None:
      return final
    log(f"[oneshot] {os.path.join(workdir, workdir_lib.FINAL_FILE)} comes from another trained "
        f"model than {config.train_workdir} holds now ({why}); redoing its rows.")
  if status is workdir_lib.Status.NEW:
    workdir_lib.start(workdir, config, overwrite, RUN_FILES)
  # Read-only: the training run's checkpoints are never changed; a damaged
  # latest step is skipped (one line) for the newest intact one.
  manager = SparseCheckpointManager(
      os.path.join(config.train_workdir, trainer_lib.CHECKPOINT_DIR), read_only=True)
  try:
    state = trainer.restore(manager, log=lambda line: log(f"[oneshot] {line}"))
  finally:
    manager.close()
  log(f"[oneshot] {trainer.config.model.name} from {config.train_workdir} at step "
      f"{int(state.step)}; {len(planned)} pruned models, calibrated on "
      f"{min(config.calibration_sequences, len(trainer.data.train))} training examples")
  text = trainer.data.text
  dense = _scores(trainer.evaluate(state), text)
  unigram = unigram_loss(trainer.data) if text else None
  log(f"[oneshot] dense test loss {dense['test_loss']:.4f}"
      + (f" ({dense['test_bits_per_byte']:.3f} bits per byte; unigram "
         f"{unigram / math.log(2):.3f})" if text else ""))
  batches = calibration_batches(trainer.data, config.calibration_sequences,
                                config.calibration_batch, config.seed)
  hessians_fns = hessians_functions(trainer, state, batches)
  dense_cache = []

  def dense_norms():   # OWL's statistics: the dense model's input norms, computed once
    if not dense_cache:
      dense_cache.append(hessians_fns[True](state.params))
    return dense_cache[0]

  os.makedirs(os.path.join(workdir, ROWS_DIR), exist_ok=True)
  rows = []
  for i, (name, method, target) in enumerate(planned):
    rows_dir, row_file = os.path.join(workdir, ROWS_DIR), f"{name}.json"
    if os.path.exists(os.path.join(rows_dir, row_file)):
      saved = workdir_lib.load_json(rows_dir, row_file)
      why = workdir_lib.identity_mismatch(saved.pop(SOURCE_KEY, None), source)
      if why is None:
        rows.append(saved)
        continue
      log(f"[oneshot] {row_file} comes from another trained model ({why}); redoing it.")
    log(f"[oneshot] {i + 1}/{len(planned)}: {method} at {_pattern(target)}")
    row = prune_row(trainer, state, hessians_fns[ADAPTIVE.get(method, method) == "wanda"], config,
                    method, target, os.path.join(workdir, PRUNED_DIR, name), log,
                    dense_norms=dense_norms)
    workdir_lib.save_json(rows_dir, row_file, {**row, SOURCE_KEY: source})  # last: marks it done
    rows.append(row)
  result = {"dense": dense, "unigram_loss": unigram, "rows": rows,
            "markdown": format_table(rows, dense, unigram), SOURCE_KEY: source}
  with open(os.path.join(workdir, CSV_FILE), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  plot(workdir, rows, dense, unigram)
  workdir_lib.save_json(workdir, workdir_lib.FINAL_FILE, result)  # last: marks it done
  return result


def report(result: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Prints the table (or, for a Hugging Face checkpoint, the files written)."""
  if "model_path" in config:
    from experiments import hf_oneshot  # pylint: disable=g-import-not-at-top
    hf_oneshot.report(result, config, workdir)
    return
  what = ("test bits per byte (lower is better)" if result["unigram_loss"] is not None
          else "test accuracy")
  print(f"one-shot pruning without retraining, {what}:")
  print(result["markdown"])
  print(f"table: {os.path.join(workdir, CSV_FILE)}, plot: {os.path.join(workdir, PLOT_FILE)}")

main = cli.main_for(run, report)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
