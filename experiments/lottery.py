"""Lottery tickets: iterative magnitude pruning with rewinding, and its controls.

  python -m experiments.lottery --config=experiments/configs/lottery.py --workdir=runs/lottery

For each replicate (seed = config.seed + r), level 0 trains the dense model
and records the state at the rewind step k. Each of `lottery.levels` levels
then prunes `prune_fraction` of the remaining weights of the previous level's
trained weights ('uniform': every layer at that rate; 'global': one
threshold across layers; `layer_fractions` gives chosen layers their own
rate, e.g. 0 for a dense output layer), rewinds the survivors to their step-k
values, and retrains from step k to the end. On every level's mask the
branches train too: `random_prune` (a random mask with the same per-layer
counts, rewound weights, optimizer as the ticket's) and `random_reinit` (the
same mask on a fresh initialisation, with a fresh optimizer state). Both
train from step k to the end, like the ticket, with the same data order.

The workdir gets config.json, then
  replicates/seed_<s>/rewind/                  the state at step k (item 'rewind')
  replicates/seed_<s>/level_<LL>/<branch>/     checkpoints/, metrics.jsonl,
                                               tensorboard/, final.json
and, at the end, final.json (every row and the table of means), summary.csv
and lottery.png (accuracy vs. weights remaining). Rerunning the command on
an unfinished workdir resumes it: finished levels are read back, not
retrained, and the level that was cut off continues from its last
checkpoint.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable

from absl import app
import jax
import ml_collections
import numpy as np

import sparsejax
from sparsejax import lottery
from sparsejax.checkpoint import CheckpointDamaged
from sparsejax.checkpoint import SparseCheckpointManager
from experiments import cli
from experiments import config_checks
from experiments import distributed
from experiments import lottery_report
from experiments import trainer as trainer_lib
from experiments import workdir as workdir_lib


BRANCHES = ("random_reinit", "random_prune")
REWIND_UNITS = ("steps", "epochs")
REPLICATES_DIR = "replicates"
REWIND_DIR = "rewind"
RUN_FILES = workdir_lib.BINARY_RUN_FILES["experiments.lottery"]


def rewind_step(config: ml_collections.ConfigDict, steps_per_epoch: int, num_steps: int) -> int:
  """Checks `config.lottery` and returns the rewind step k in steps.

  Raises:
    ConfigError: a value or combination that cannot work, naming its key.
  """
  cfg = config.lottery
  config_checks.at_least(cfg.levels, 1, "lottery.levels")
  if not 0.0 < cfg.prune_fraction < 1.0:
    raise config_checks.ConfigError(
        f"config.lottery.prune_fraction={cfg.prune_fraction!r} must be in (0, 1): the share "
        "of the remaining weights pruned at each level.")
  if cfg.allocation == "layerwise":
    raise config_checks.ConfigError(
        "config.lottery.allocation='layerwise' is called 'uniform' in sparsejax (every layer "
        "loses the same fraction of its remaining weights): use 'uniform'.")
  config_checks.choice(cfg.allocation, lottery.ALLOCATIONS, "lottery.allocation")
  config_checks.at_least(cfg.replicates, 1, "lottery.replicates")
  for branch in cfg.branches:
    config_checks.choice(branch, BRANCHES, "lottery.branches")
  if len(set(cfg.branches)) != len(cfg.branches):
    raise config_checks.ConfigError(f"config.lottery.branches={cfg.branches!r} repeats a branch.")
  unit = config_checks.choice(cfg.rewind_unit, REWIND_UNITS, "lottery.rewind_unit")
  k = config_checks.at_least(cfg.rewind_step, 0, "lottery.rewind_step")
  k *= steps_per_epoch if unit == "epochs" else 1
  if k >= num_steps:
    raise config_checks.ConfigError(
        f"config.lottery.rewind_step={cfg.rewind_step} {unit} is step {k}, but training has "
        f"only {num_steps} steps: the rewind point must come before the end.")
  fresh = [] if cfg.rewind_optimizer else ["config.lottery.rewind_optimizer=False"]
  if "random_reinit" in cfg.branches:
    fresh.append("the random_reinit branch")
  if fresh and k > 0 and config.lr_schedule != "constant":
    raise config_checks.ConfigError(
        f"{' and '.join(fresh)} train from a fresh optimizer state, whose "
        f"config.lr_schedule={config.lr_schedule!r} would restart at 0 while training resumes "
        f"at step {k}. Use lr_schedule='constant', rewind_step=0, or (with "
        "rewind_optimizer=True) branches without random_reinit.")
  return k


def _seed(*parts: int) -> int:
  """An independent 32-bit seed for each (replicate seed, level, purpose)."""
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class Replicate:
  """One IMP run (one seed): level 0 dense, then `levels` pruned levels."""

  def __init__(self, trainer: trainer_lib.Trainer, index: int, directory: str, rewind_at: int,
               log: Callable[[str], None] = print):
    self.trainer = trainer
    self.index = index
    self.config = trainer.config
    self.seed = self.config.seed
    self.directory = directory
    self.rewind_at = rewind_at
    self.log = log
    self.identities = {}  # level directory (relative to the workdir) -> identity of its results

  def _rewind_manager(self) -> SparseCheckpointManager:
    return SparseCheckpointManager(os.path.join(self.directory, REWIND_DIR), max_to_keep=1)

  def _save_rewind(self, state: trainer_lib.TrainState) -> None:
    distributed.barrier(f"{self.directory} rewind")  # every process sees the same steps
    with self._rewind_manager() as manager:
      if manager.latest_step() is None:  # a resumed level 0 may pass step k again
        manager.save(int(state.step), rewind=_rewind_tree(state),
                     meta={"config": workdir_lib.config_dict(self.config)})

  def _load_rewind(self) -> trainer_lib.TrainState:
    with self._rewind_manager() as manager:
      if manager.latest_step() is None:
        raise workdir_lib.WorkdirError(
            f"{self.directory}: level 0 has finished but its rewind point ({REWIND_DIR}/), "
            f"which every level of this replicate starts from, is missing; `rm -r "
            f"{self.directory}` and rerun the command to train this replicate again (the "
            "others are kept).")
      like = _rewind_tree(self.trainer.initial_state())
      tree = manager.restore(rewind_like=like).rewind
    return jax.device_put(trainer_lib.TrainState(**{**{"batch_stats": {}}, **tree}),
                          self.trainer.state_sharding)

  def _fit_or_load(self, level: int, branch: str,
                   make_start: Callable[[], trainer_lib.TrainState | None],
                   callbacks=None) -> tuple[dict, trainer_lib.TrainState | None]:
    """Trains one (level, branch) from `make_start()`, resuming it if cut off.

    A finished one is read back: its summary, and for the ticket (whose
    weights the next level prunes) its final state; None for a branch.
    """
    directory = os.path.join(self.directory, f"level_{level:02d}", branch)
    label = f"seed {self.seed} level {level} {branch}"
    final = os.path.join(directory, workdir_lib.FINAL_FILE)
    # Every process decides from the same files (process 0 writes them).
    distributed.barrier(f"{directory} checked")
    checkpoints = os.path.join(directory, trainer_lib.CHECKPOINT_DIR)
    if os.path.exists(final):
      why = workdir_lib.identity_mismatch(
          workdir_lib.load_json(directory, workdir_lib.FINAL_FILE).get(workdir_lib.IDENTITY_KEY),
          workdir_lib.identity(workdir_lib.config_dict(self.config), checkpoints))
      if why is not None:  # e.g. copied from another level: redone from the checkpoints
        self.log(f"[{label}] {final} does not come from this level ({why}); redoing its "
                 "results from its checkpoints.")
        distributed.barrier(f"{directory} final.json read")
        if distributed.is_primary():
          os.remove(final)
        distributed.barrier(f"{directory} final.json removed")
    if os.path.exists(final):
      state = None
      if branch == "ticket":
        manager = SparseCheckpointManager(os.path.join(directory, trainer_lib.CHECKPOINT_DIR))
        try:
          state = self.trainer.restore(manager)
        except CheckpointDamaged as e:
          raise CheckpointDamaged(
              f"{e} The next level prunes this level's final weights: `rm {final}` and rerun "
              "the command to resume this level from its newest intact checkpoint.") from e
        finally:
          manager.close()
      summary = workdir_lib.load_json(directory, workdir_lib.FINAL_FILE)
      self._record_identity(directory, summary)
      return summary, state
    os.makedirs(directory, exist_ok=True)
    # Cut off if it wrote metrics or checkpoints (either alone may have been lost).
    resume = (os.path.exists(os.path.join(directory, "metrics.jsonl")) or
              os.path.isdir(checkpoints))
    distributed.barrier(f"{directory} resume decided")  # before process 0 writes metrics
    try:
      run = self.trainer.fit(directory, log=self.log, label=label, resume=resume,
                             start=make_start(), callbacks=callbacks, level=level)
    except CheckpointDamaged as e:  # every checkpoint damaged (moved aside): retrain the level
      self.log(f"[{label}] {e.args[0].split(';')[0]}; retraining this level from its start.")
      run = self.trainer.fit(directory, log=self.log, label=label, resume=resume,
                             start=make_start(), callbacks=callbacks, level=level)
    run.summary[workdir_lib.IDENTITY_KEY] = workdir_lib.identity(
        workdir_lib.config_dict(self.config), checkpoints)
    if distributed.is_primary():
      workdir_lib.save_json(directory, workdir_lib.FINAL_FILE, run.summary)
    self._record_identity(directory, run.summary)
    density = 1.0 - run.summary["sparsity"]
    self.log(f"[{label}] {100 * density:.2f}% of weights remain | test accuracy "
             f"{run.summary['test']['accuracy']:.4f} (best {run.summary['best_test_accuracy']:.4f})")
    return run.summary, run.state

  def _record_identity(self, directory: str, summary: dict) -> None:
    workdir = os.path.dirname(os.path.dirname(self.directory))  # .../replicates/seed_<s>
    self.identities[os.path.relpath(directory, workdir)] = summary.get(workdir_lib.IDENTITY_KEY)

  def _start(self, point: trainer_lib.TrainState, params, masks,
             rewind_optimizer: bool, batch_stats=None) -> trainer_lib.TrainState:
    """The state a pruned level trains from: step k, `params`, masks in the optimizer."""
    opt_state = point.opt_state if rewind_optimizer else self.trainer.tx.init(params)
    return point._replace(params=params,
                          opt_state=sparsejax.with_masks(opt_state, masks, params),
                          batch_stats=point.batch_stats if batch_stats is None else batch_stats)

  def run(self) -> list[dict]:
    """Trains (or reads back) every level and branch; returns their rows."""
    cfg = self.config.lottery
    callbacks = {self.rewind_at: self._save_rewind}
    summary, state = self._fit_or_load(0, "ticket", lambda: None, callbacks)
    rows = [self._row(0, "ticket", summary)]
    point = self._load_rewind()
    masks = trainer_lib.masks_of(state)
    for level in range(1, cfg.levels + 1):
      masks = lottery.prune_level(state.params, masks, cfg.prune_fraction,
                                  allocation=cfg.allocation,
                                  layer_fractions=layer_fractions(self.config))
      summary, state = self._fit_or_load(level, "ticket", functools.partial(
          self._start, point, lottery.rewind(point.params, masks), masks, cfg.rewind_optimizer))
      rows.append(self._row(level, "ticket", summary))
      for branch in cfg.branches:
        make_start = {"random_prune": self._random_prune_start,
                      "random_reinit": self._random_reinit_start}[branch]
        summary, _ = self._fit_or_load(level, branch,
                                       functools.partial(make_start, point, masks, level))
        rows.append(self._row(level, branch, summary))
    return rows

  def _random_prune_start(self, point, masks, level: int) -> trainer_lib.TrainState:
    """A random mask with the ticket's per-layer counts on the rewound weights."""
    random = lottery.random_prune(point.params, masks, jax.random.key(_seed(self.seed, level, 1)))
    return self._start(point, lottery.rewind(point.params, random), random,
                       self.config.lottery.rewind_optimizer)

  def _random_reinit_start(self, point, masks, level: int) -> trainer_lib.TrainState:
    """The ticket's mask on a fresh initialisation (new seed), fresh optimizer state."""
    fresh = self.trainer.initial_state(seed=_seed(self.seed, level, 2))
    return self._start(point, lottery.reinitialize(fresh.params, masks), masks, False,
                       fresh.batch_stats)

  def _row(self, level: int, branch: str, summary: dict) -> dict:
    return {"replicate": self.index, "seed": self.seed, "branch": branch,
            "level": level, "density": 1.0 - summary["sparsity"],
            "test_accuracy": summary["test"]["accuracy"],
            "best_test_accuracy": summary["best_test_accuracy"],
            "test_loss": summary["test"]["loss"]}


def layer_fractions(config: ml_collections.ConfigDict):
  """`config.lottery.layer_fractions` as a plain dict (or as it is, if not a ConfigDict)."""
  value = config.lottery.layer_fractions
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _check_layer_fractions(config: ml_collections.ConfigDict, masks) -> None:
  """Raises ConfigError, naming the key, for a layer_fractions map prune_level would reject."""
  paths = [leaf.path for leaf in sparsejax.trees.named_leaves(masks)]
  try:
    lottery.match_layer_fractions(paths, layer_fractions(config))
  except ValueError as e:
    raise config_checks.ConfigError(
        f"config.lottery.layer_fractions={layer_fractions(config)!r}: {e}") from e


def _rewind_tree(state: trainer_lib.TrainState) -> dict:
  """The rewind point as a dict (Orbax stores dicts; empty BatchNorm stats left out)."""
  tree = state._asdict()
  if not tree["batch_stats"]:
    del tree["batch_stats"]
  return tree


@workdir_lib.holds_workdirs
def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        devices=None, log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes, or reads back) a lottery experiment; returns final.json's content.

  Config, data and workdir are checked before anything is written.
  """
  if "pruning" in config or "lottery" not in config:
    raise config_checks.ConfigError(
        "a lottery config has a `lottery` section and no `pruning` section; start from "
        "experiments/configs/lottery.py.")
  status = workdir_lib.check(workdir, config, overwrite, RUN_FILES)
  if status is workdir_lib.Status.FINISHED:
    final = workdir_lib.load_json(workdir, workdir_lib.FINAL_FILE)
    why = _stale_level(workdir, config, final.get("identities") or {})
    if why is None:
      log(f"{workdir} already holds this finished lottery run; reporting its saved results.")
      return final
    log(f"{os.path.join(workdir, workdir_lib.FINAL_FILE)} does not come from the levels now in "
        f"{REPLICATES_DIR}/ ({why}); redoing the table from them.")
  first = trainer_lib.Trainer(config, devices)
  k = rewind_step(config, first.steps_per_epoch, first.num_steps)
  masks = trainer_lib.masks_of(first.initial_state())
  if all(m is None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
    raise config_checks.ConfigError(
        f"config.lottery.include={config.lottery.include!r} and exclude="
        f"{config.lottery.exclude!r} leave no kernel to prune.")
  _check_layer_fractions(config, masks)
  if status is workdir_lib.Status.NEW and distributed.is_primary():
    workdir_lib.start(workdir, config, overwrite, RUN_FILES)
  distributed.barrier("workdir claimed")
  cfg = config.lottery
  own = f", layer_fractions {layer_fractions(config)}" if layer_fractions(config) else ""
  log(f"lottery: {cfg.levels} levels of {cfg.prune_fraction:.0%} ({cfg.allocation}{own}), the "
      f"weights pruned at that rate down to {100 * (1 - cfg.prune_fraction) ** cfg.levels:.2f}%; "
      f"rewind to step {k}"
      f" ({'optimizer rewound' if cfg.rewind_optimizer else 'optimizer reset'}); "
      f"{cfg.replicates} replicate(s); branches {list(cfg.branches) or 'none'}")
  begin = time.perf_counter()
  rows, identities = [], {}
  for r in range(cfg.replicates):
    replicate_config = ml_collections.ConfigDict(config.to_dict())
    replicate_config.seed = config.seed + r
    trainer = first if r == 0 else trainer_lib.Trainer(replicate_config, devices, data=first.data)
    directory = os.path.join(workdir, REPLICATES_DIR, f"seed_{config.seed + r}")
    replicate = Replicate(trainer, r, directory, k, log)
    rows += replicate.run()
    identities.update(replicate.identities)
  table = lottery_report.aggregate(rows)
  result = {"config": workdir_lib.config_dict(config), "rewind_step": k, "rows": rows,
            "table": table, "wall_time_s": time.perf_counter() - begin,
            "identities": identities}
  if distributed.is_primary():
    lottery_report.write_csv(workdir, rows)
    lottery_report.plot(workdir, table)
    workdir_lib.save_json(workdir, workdir_lib.FINAL_FILE, result)  # last: marks the run done
  distributed.barrier("lottery finished")
  return result


def _stale_level(workdir: str, config: ml_collections.ConfigDict,
                 identities: dict) -> str | None:
  """The first level directory whose recorded identity (config digest, final
  checkpoint step and checksum) differs from what it holds now, and how; None
  if all match (or none were recorded)."""
  for level_dir, recorded in identities.items():
    seed = int(level_dir.split(os.sep)[1][len("seed_"):])  # replicates/seed_<s>/level_<LL>/...
    replicate_config = ml_collections.ConfigDict(config.to_dict())
    replicate_config.seed = seed
    current = workdir_lib.identity(
        workdir_lib.config_dict(replicate_config),
        os.path.join(workdir, level_dir, trainer_lib.CHECKPOINT_DIR))
    why = workdir_lib.identity_mismatch(recorded, current)
    if why is not None:
      return f"{level_dir}: {why}"
  return None


def report(result: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  del config
  print("test accuracy at the end of training, mean [min, max] over replicates:")
  print(lottery_report.format_table(result["table"]))
  print(f"table: {os.path.join(workdir, lottery_report.CSV_FILE)}, plot: "
        f"{os.path.join(workdir, lottery_report.PLOT_FILE)}")

main = cli.main_for(run, report)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
