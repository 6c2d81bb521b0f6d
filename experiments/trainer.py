"""The training loop: a jitted, data-parallel step, eval each epoch, metrics.

The devices (of every process) form one `jax.sharding.Mesh` with axes
('data', 'fsdp'): the batch is sharded over both, the train state's large
leaves along 'fsdp' (`sparsejax.fsdp_shardings`; config.mesh.fsdp = 1, the
default, replicates it). `jit` sees the global batch and the global state,
so BatchNorm statistics and the loss are those of the whole batch, and a run
gives the same numbers on 1 or 4 devices, with or without FSDP.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import sparsejax
from sparsejax.checkpoint import SparseCheckpointManager
from experiments import config_checks
from experiments import distributed
from experiments import input_pipeline
from experiments import methods
from experiments import metrics as metrics_lib
from experiments import models


CHECKPOINT_DIR = "checkpoints"
MAX_STEPS_IN_FLIGHT = 8  # several processes: at most this many steps dispatched ahead
RESULTS_META = "results"  # checkpoint meta key: the run's results up to that step (see fit)


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite (names the step; no checkpoint after it)."""


class TrainState(NamedTuple):
  """Everything a training step reads and writes (a pytree).

  Attributes:
    step: int32 scalar, number of steps taken.
    params: model parameters; pruned weights are exactly zero.
    batch_stats: BatchNorm running statistics ({} for models without).
    opt_state: optimizer state; holds a `sparsejax.PruningState` (masks) for
      pruning methods.
    rng: uint32 (2,) raw PRNG key data for dropout, folded with the step.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


class Run(NamedTuple):
  """What `train_and_evaluate` returns: final state and summary."""
  state: TrainState
  summary: dict


def make_mesh(devices: Sequence[jax.Device] | None = None, fsdp: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over `devices` (default: every device of every process,
  in process order, so each process holds a contiguous slice of a batch and an
  fsdp group lies within a process where it can).

  Raises:
    ConfigError: `fsdp` does not divide the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) % fsdp:
    raise config_checks.ConfigError(
        f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices; use a divisor.")
  return jax.sharding.Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp),
                           ("data", "fsdp"))


def check_batch_size(batch_size: int, num_devices: int) -> None:
  if batch_size % num_devices:
    raise config_checks.ConfigError(
        f"config.batch_size={batch_size} is not divisible by the {num_devices} devices "
        f"the batch is sharded over; use a multiple of {num_devices}.")


def load_data(config: ml_collections.ConfigDict) -> input_pipeline.Data:
  """The dataset of `config`, opened for streaming (nothing is read but a few examples).

  Raises:
    ConfigError: input options that do not fit (naming the key).
    DatasetNotFoundError: the dataset is not available.
  """
  cfg = config.input
  config_checks.choice(cfg.augment, input_pipeline.AUGMENTATIONS, "input.augment")
  config_checks.at_least(cfg.worker_count, 0, "input.worker_count")
  config_checks.at_least(cfg.prefetch, 1, "input.prefetch")
  if len(cfg.mean) != len(cfg.std):
    raise config_checks.ConfigError(
        f"config.input.mean={tuple(cfg.mean)!r} and config.input.std={tuple(cfg.std)!r}: give "
        "both per-channel statistics (or neither, to estimate them).")
  if any(s <= 0 for s in cfg.std):
    raise config_checks.ConfigError(f"config.input.std={tuple(cfg.std)!r} must be positive.")
  try:
    return input_pipeline.load(
        config.dataset, config.data_dir or None, image_size=config.image_size,
        channels=config.channels, train_split=config.train_split, eval_split=config.eval_split,
        augment=cfg.augment, mean=tuple(cfg.mean), std=tuple(cfg.std), cache_mb=cfg.cache_mb)
  except ValueError as e:
    raise config_checks.ConfigError(f"config.input / image_size / channels: {e}") from e


def _variables(state_params, batch_stats) -> dict:
  variables = {"params": state_params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


Forward = Callable[[Any, Any], Any]  # (params, opt_state) -> weights the model uses


def _dense_forward(params, opt_state):
  del opt_state
  return params


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    forward: Forward = _dense_forward,
                    update_kwargs: dict | None = None) -> Callable:
  """(state, images, labels) -> (state, {'loss', 'accuracy'}), not yet jitted.

  The model sees `forward(params, opt_state)` (N:M training's masked and
  decayed weights); the gradient is taken with respect to the params.
  `update_kwargs` go to `tx.update` (drop and grow's static `regrow`, gradual
  pruning's `recompute`).
  """
  update_kwargs = update_kwargs or {}

  def train_step(state: TrainState, images, labels):
    dropout = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits, updates = model.apply(
          _variables(forward(params, state.opt_state), state.batch_stats), images, train=True,
          mutable=["batch_stats"], rngs={"dropout": dropout})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **update_kwargs)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    new_state = state._replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy}

  return train_step


def make_eval_step(model: nn.Module, forward: Forward = _dense_forward) -> Callable:
  """(state, images, labels, weights) -> summed loss, correct and count.

  Labels of several positions per example (a language model's next tokens)
  count as their mean: every example has the same length.
  """

  def per_example(x):
    return x.reshape(x.shape[0], -1).mean(axis=-1)

  def eval_step(state: TrainState, images, labels, weights):
    logits = model.apply(_variables(forward(state.params, state.opt_state), state.batch_stats),
                         images, train=False)
    loss = per_example(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    correct = per_example((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return {"loss": jnp.sum(loss * weights), "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}

  return eval_step


class Trainer:
  """The jitted steps of one config on one mesh, and the data they read."""

  def __init__(self, config: ml_collections.ConfigDict,
               devices: Sequence[jax.Device] | None = None,
               data: input_pipeline.Data | None = None):
    """Checks `config`, loads its data (unless given) and builds the steps.

    Raises:
      ConfigError: a config value that cannot work (naming its key).
      DatasetNotFoundError: the dataset is not available.
    """
    config_checks.check_training_fields(config)
    self.config = config
    self.mesh = make_mesh(devices, config.mesh.fsdp)
    num_devices = self.mesh.devices.size
    check_batch_size(config.batch_size, num_devices)
    if data is None:
      data = load_data(config)
    self.data = data
    num_train = len(data.train)
    if config.batch_size > num_train:
      raise config_checks.ConfigError(
          f"config.batch_size={config.batch_size} exceeds the {num_train} training examples.")
    self.steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
    self.num_steps = (config.num_train_steps if config.num_train_steps > 0
                      else config.num_epochs * self.steps_per_epoch)
    model_kwargs = {k: v for k, v in config.model.items() if k != "name"}
    try:
      self.model = models.create_model(config.model.name, data.num_classes, **model_kwargs)
      # Shapes only, no compute: a model that cannot take this data fails here,
      # before the run claims its workdir.
      shapes = jax.eval_shape(lambda: self.model.init(
          jax.random.PRNGKey(0), jnp.zeros((1,) + data.image_shape, data.input_dtype), train=False))
    except (TypeError, ValueError) as e:
      raise config_checks.ConfigError(f"config.model: {e}") from e
    self.method = methods.method_name(config)
    if self.method == "synflow" and data.text:
      raise config_checks.ConfigError(
          "config.pruning.method='synflow' feeds the network all-ones float inputs, which a "
          f"model of tokens ({config.dataset}) cannot take; use snip or static instead.")
    self.tx = methods.make_optimizer(config, self.num_steps, self.model)
    if self.method != "dense":
      section = "lottery" if self.method == "lottery" else "pruning"
      config_checks.check_leaf_filters(config[section], shapes["params"], f"{section}.")
    nm = methods.nm_sparsity(config, self.num_steps)
    try:  # also shapes only: e.g. a kernel N:M cannot group fails before the workdir is claimed
      jax.eval_shape(self.tx.init, shapes["params"])
    except ValueError as e:
      if nm is None:
        key = "config.pruning.structure" if config.pruning.get("structure") else "config"
        raise config_checks.ConfigError(f"{key}: {e}") from e
      raise config_checks.ConfigError(
          f"config.pruning.nm: {e} [config keys: pruning.include / pruning.exclude choose the "
          f"kernels, pruning.nm.axes / flatten the contraction axes, pruning.nm.non_divisible="
          f"'dense' leaves such kernels unpruned]") from e
    self.learned = methods.learned_method(config, self.num_steps)
    eval_forward = None
    if self.learned is not None:  # learned masks: soft or top-k in training, hard in evaluation
      forward, eval_forward = self.learned.forward, self.learned.eval_forward
    elif nm is not None:
      forward = nm.forward
    elif self.method == "dense":
      forward = _dense_forward
    elif self.method in methods.STRAIGHT_THROUGH:  # masked forward, gradient to every weight
      forward = sparsejax.ste_masked_params
    else:  # the masks decide what the model sees, whatever follows the wrapper
      forward = sparsejax.masked_params
    # best_test_accuracy counts evaluations from this step on: for N:M, those of
    # the hard-masked network (earlier ones are dense, or decayed with beta > 0).
    self.best_from = 0 if nm is None else nm.schedule.finetune_start
    if self.learned is not None:  # and for learned masks, those after dense training
      self.best_from = self.learned.start_step
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.sharded = jax.sharding.NamedSharding(self.mesh,
                                              jax.sharding.PartitionSpec(("data", "fsdp")))
    image_shape, input_dtype = data.image_shape, data.input_dtype

    def fresh_state(key):
      init_key, dropout_key = jax.random.split(key)
      variables = self.model.init(init_key, jnp.zeros((1,) + image_shape, input_dtype), train=False)
      params = variables["params"]
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        batch_stats=variables.get("batch_stats", {}),
                        opt_state=self.tx.init(params), rng=dropout_key)

    # Where each leaf of the state lives: large ones sharded along 'fsdp'.
    self.state_sharding = sparsejax.fsdp_shardings(
        jax.eval_shape(fresh_state, jax.random.PRNGKey(0)), self.mesh, "fsdp", config.mesh.fsdp_min_size)
    step_jit = lambda **kwargs: jax.jit(
        make_train_step(self.model, self.tx, forward, kwargs),
        in_shardings=(self.state_sharding, self.sharded, self.sharded),
        out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
    self.train_step = step_jit()
    # Drop and grow, and gradual pruning: fit() picks one of two programs on
    # the host, so the steps between mask updates carry no branch and hold no
    # selection (see sparsejax.DropAndGrow.wrap and GradualMagnitudePruning.wrap).
    self.regrowing = methods.drop_and_grow(config, self.num_steps)
    self._host_schedule, flag_name = self.regrowing, "regrow"
    if self.regrowing is None:
      self._host_schedule, flag_name = methods.recompute_schedule(config, self.num_steps), "recompute"
    self._flagged_steps = None
    if self._host_schedule is not None:
      self._flagged_steps = {flag: step_jit(**{flag_name: flag}) for flag in (False, True)}
    self.eval_step = jax.jit(make_eval_step(self.model, eval_forward or forward),
                             in_shardings=(self.state_sharding,) + (self.sharded,) * 3,
                             out_shardings=self.replicated)
    self.eval_batch_size = -(-config.eval_batch_size // num_devices) * num_devices
    self._compiled_step = None  # the AOT-compiled train step, shared by every fit
    # Compiled once, for every initial state; each leaf is made where it lives.
    self._fresh_state = jax.jit(fresh_state, out_shardings=self.state_sharding)
    self._prune_at_init = None
    if self.method in methods.AT_INIT:
      self._prune_at_init = jax.jit(
          self._pruned_at_init, in_shardings=(self.state_sharding, self.sharded, self.sharded),
          out_shardings=self.state_sharding)
    self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree),
                         out_shardings=self.state_sharding)

  def compiled_step(self, state: TrainState) -> Callable:
    """`train_step` compiled once for this trainer's shapes (compiling excluded
    from steps/s), as (step, state, images, labels) -> (state, metrics)."""
    if self._compiled_step is None:
      batch = self.batch(0)
      if self._flagged_steps is None:
        program = self.train_step.lower(state, *batch).compile()
        self._compiled_step = lambda step, *args: program(*args)
      else:
        programs = {flag: fn.lower(state, *batch).compile()
                    for flag, fn in self._flagged_steps.items()}
        self._compiled_step = lambda step, *args: programs[
            bool(self._host_schedule.is_update_step(step))](*args)
    return self._compiled_step

  def initial_state(self, seed: int | None = None) -> TrainState:
    """A fresh state from `seed` (default: config.seed): params, BatchNorm
    statistics, optimizer state and dropout key, placed by `state_sharding`."""
    seed = self.config.seed if seed is None else seed
    state = self._fresh_state(jax.random.PRNGKey(seed))
    if self._prune_at_init is not None:
      state = self._prune_at_init(state, *self.batch(0))
    return state

  def _pruned_at_init(self, state: TrainState, images, labels) -> TrainState:
    """`state` with SNIP's masks (|g * w| on the first training batch) or
    SynFlow's (data-free) in its optimizer state.

    Both score the model in evaluation mode (BatchNorm's running statistics,
    no dropout), as their reference code does; `pruning.snip_train_mode`
    scores SNIP in training mode (batch statistics, dropout on) instead.
    """
    pruning = self.config.pruning
    keep = methods.leaf_filter(pruning)
    if self.method == "snip":
      def loss(params):
        variables = _variables(params, state.batch_stats)
        if pruning.snip_train_mode:
          logits, _ = self.model.apply(variables, images, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.fold_in(state.rng, 0)})
        else:
          logits = self.model.apply(variables, images, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      masks = sparsejax.snip_masks(state.params, jax.grad(loss)(state.params), pruning.sparsity,
                                   allocation=pruning.allocation, leaf_filter=keep)
    else:
      apply = lambda params, x: self.model.apply(_variables(params, state.batch_stats), x,
                                                 train=False)
      masks = sparsejax.synflow_masks(apply, state.params, pruning.sparsity,
                                      (1,) + self.data.image_shape,
                                      iterations=pruning.synflow_iterations,
                                      allocation=pruning.allocation, leaf_filter=keep)
    return state._replace(opt_state=sparsejax.with_masks(state.opt_state, masks, state.params))

  def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
    """The sharded training batch of `step` (read directly, not through the iterator)."""
    batch = input_pipeline.TrainBatch(self.data, self.config.batch_size, self.config.seed,
                                      jax.process_index(), jax.process_count())
    return self.global_batch(batch(step))

  def global_batch(self, local: tuple[np.ndarray, ...]) -> tuple[jax.Array, ...]:
    """One global batch, sharded over the mesh, from this process's slice of it."""
    return tuple(jax.make_array_from_process_local_data(self.sharded, x) for x in local)

  def batches(self, start_step: int) -> input_pipeline.Batches:
    """The host training batches from `start_step` to the end, read ahead by Grain
    (which starts now: its workers start while the step compiles)."""
    cfg = self.config.input
    return input_pipeline.train_batches(
        self.data, self.config.batch_size, self.config.seed, start_step, self.num_steps,
        worker_count=cfg.worker_count, prefetch=cfg.prefetch,
        process_index=jax.process_index(), process_count=jax.process_count())

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Mean loss and accuracy over the whole evaluation split."""
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    # Read-ahead threads, not worker processes: workers would be spawned anew
    # (each importing JAX) at every evaluation.
    with input_pipeline.eval_batches(self.data, self.eval_batch_size,
                                     prefetch=self.config.input.prefetch,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()) as batches:
      for batch in batches:
        out = self.eval_step(state, *self.global_batch(batch))
        for name in totals:
          totals[name] += float(out[name])
    return {"loss": totals["loss"] / totals["count"],
            "accuracy": totals["correct"] / totals["count"]}

  def save(self, manager: SparseCheckpointManager, state: TrainState,
           level: int | None = None, results: dict | None = None) -> None:
    """Checkpoints `state` at its step: params, packed masks, optimizer, BN and RNG.

    `results` (the run's results so far, see `fit`) go into the step's meta,
    which the checkpoint checksums: a resumed run's final results never
    depend on metrics.jsonl being whole.
    """
    meta = {"config": json.loads(self.config.to_json())}
    if results is not None:
      meta[RESULTS_META] = results
    manager.save(int(state.step), params=state.params, masks=masks_of(state),
                 opt_state=state.opt_state, train_state=_train_extras(state),
                 meta=meta, level=level, scores=scores_of(state))

  def restore(self, manager: SparseCheckpointManager,
              log: Callable[[str], None] | None = None) -> TrainState:
    """The state of the latest checkpoint, placed like a fresh one (`state_sharding`).

    Without `log`, the latest step must be intact (a damaged one is a
    CheckpointDamaged error). With `log` (a resumed run), damaged newer
    steps are set aside and reported there, and the newest intact step is
    restored.
    """
    return self._restore(manager, log)[0]

  def _restore(self, manager: SparseCheckpointManager,
               log: Callable[[str], None] | None = None) -> tuple[TrainState, dict]:
    """`restore`, and the checkpoint's meta."""
    like = self.initial_state()
    targets = {"params_like": like.params, "opt_state_like": like.opt_state,
               "train_state_like": _train_extras(like)}
    restored = (manager.restore(**targets) if log is None
                else manager.restore_latest_intact(log=log, **targets))
    extras = restored.train_state
    state = TrainState(step=np.int32(restored.step), params=restored.params,
                       batch_stats=extras.get("batch_stats", {}), opt_state=restored.opt_state,
                       rng=extras["rng"])
    return self._copy(state), restored.meta or {}

  def _check_finite(self, window: list[dict], done: int,
                    manager: SparseCheckpointManager) -> None:
    """Raises TrainingDiverged at the first step of `window` (ending at step
    `done`) whose training loss is not finite."""
    losses = [float(m["loss"]) for m in window]
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is None:
      return
    step = done - len(window) + bad + 1
    manager.wait_until_finished()
    kept = manager.latest_step()
    kept = (f"the last checkpoint, step {kept}, is kept" if kept is not None
            else "no checkpoint was written")
    raise TrainingDiverged(
        f"training diverged: the loss is {losses[bad]} at step {step} "
        f"(config.learning_rate={self.config.learning_rate!r}); {kept} in "
        f"{manager.directory}. Rerun with a lower --config.learning_rate (or warmup) and "
        "--overwrite.")

  def fit(self, workdir: str, log: Callable[[str], None] = print, label: str = "",
          resume: bool = False, start: TrainState | None = None,
          callbacks: dict[int, Callable[[TrainState], None]] | None = None,
          level: int | None = None) -> Run:
    """Trains in `workdir`; returns final state and summary.

    Evaluates on the eval split every epoch and at the end, logs a progress
    line every `log_every` steps, writes metrics.jsonl and TensorBoard events,
    and checkpoints every `checkpoint_every` steps and at the end to
    `workdir/checkpoints`. With `resume`, continues from the latest
    checkpoint there (or from scratch if there is none), so a killed run
    ends where an uninterrupted one would: the batches are a function of the
    step, the RNG is in the state. The summary holds the final train and test
    metrics, the achieved sparsity and its per-layer split.

    `start` is the state to train from when there is no checkpoint to
    resume (default: a fresh initialisation); training runs from its step to
    the config's last step. `callbacks[t](state)` is called with the state
    after t steps (t = the start step: before the first step), before the
    next step reuses its buffers. `level` (an IMP level) goes into each
    checkpoint's meta.
    """
    callbacks = callbacks or {}
    config = self.config
    num_steps, per_epoch = self.num_steps, self.steps_per_epoch
    prefix = f"[{label}] " if label else ""
    log(f"{prefix}{config.model.name} on {config.dataset}: {len(self.data.train)} train / "
        f"{len(self.data.eval)} {config.eval_split} {'sequences' if self.data.text else 'images'} "
        f"of shape {self.data.image_shape}"
        f"{'' if self.data.augment == 'none' else ' (' + self.data.augment + ' augmentation)'}, "
        f"{num_steps} steps ({per_epoch} per epoch), method {self.method}, "
        f"{self.mesh.devices.size} device(s)"
        f"{'' if config.mesh.fsdp == 1 else f' (fsdp {config.mesh.fsdp})'}")
    manager = SparseCheckpointManager(os.path.join(workdir, CHECKPOINT_DIR),
                                      max_to_keep=config.keep_checkpoints or None)
    batches = None
    saved_results = None  # the results recorded in the checkpoint resumed from
    try:
      if resume and manager.latest_step() is not None:
        state, meta = self._restore(manager, log=lambda line: log(f"{prefix}{line}"))
        saved_results = meta.get(RESULTS_META)
        log(f"{prefix}resuming from the checkpoint at step {int(state.step)}")
        if (distributed.is_primary() and
            not os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE))):
          log(f"{prefix}{os.path.join(workdir, metrics_lib.METRICS_FILE)} is missing: the "
              f"records up to step {int(state.step)} are lost; the results come from the "
              "checkpoint.")
      else:
        # A copy: the step donates its input buffers, and `start` stays the caller's.
        state = self.initial_state() if start is None else self._copy(start)
      resume_step = int(state.step) if resume else None  # metrics after it are dropped
      batches = self.batches(int(state.step))
      compile_start = time.perf_counter()
      step_fn = self.compiled_step(state)
      compile_s = time.perf_counter() - compile_start  # ~0 when an earlier fit compiled it
      if int(state.step) in callbacks:
        callbacks[int(state.step)](state)
      train_start = time.perf_counter()
      window, window_time = [], 0.0  # steps since the last progress line, their time
      # The results so far: last eval and its step, best eval from best_from on
      # and its step, last train window's means. Checkpointed with the state.
      results = {"test": None, "test_step": None, "best_test_accuracy": 0.0, "best_step": None,
                 "train": {}}
      # Only the primary process writes metrics (every process computes them).
      writer = (metrics_lib.MetricWriter(workdir, resume_step,
                                         log=lambda line: log(f"{prefix}{line}"))
                if distributed.is_primary() else metrics_lib.NullWriter())
      with writer:
        if saved_results is not None:
          results = saved_results
        else:  # a checkpoint written before results were kept in it: from the metrics
          for record in writer.history():
            if record["split"] == "test":
              results["test"] = {"loss": record["loss"], "accuracy": record["accuracy"]}
              results["test_step"] = record["step"]
              if (record["step"] >= self.best_from and
                  record["accuracy"] > results["best_test_accuracy"]):
                results["best_test_accuracy"] = record["accuracy"]
                results["best_step"] = record["step"]
            else:
              results["train"] = {"loss": record["loss"], "accuracy": record["accuracy"]}
        for step in range(int(state.step), num_steps):
          tick = time.perf_counter()
          state, step_metrics = step_fn(step, state, *self.global_batch(next(batches)))
          window.append(step_metrics)
          done = step + 1
          if done in callbacks:
            callbacks[done](state)
          log_now = done % config.log_every == 0 or done == num_steps
          eval_now = done % per_epoch == 0 or done == num_steps
          if log_now or eval_now:
            jax.block_until_ready(state)  # so the time below is the steps', not the eval's
            # Before any eval, record or checkpoint of a state trained past a NaN loss.
            self._check_finite(window, done, manager)
          elif jax.process_count() > 1 and done % MAX_STEPS_IN_FLIGHT == 0:
            # Several CPU processes (gloo) hang with ~30 steps dispatched ahead
            # (README, "Your own loop under the launcher"): keep fewer in flight.
            jax.block_until_ready(step_metrics)
          window_time += time.perf_counter() - tick
          if eval_now:
            test = self.evaluate(state)
            results["test"], results["test_step"] = test, done
            if done >= self.best_from and test["accuracy"] > results["best_test_accuracy"]:
              results["best_test_accuracy"], results["best_step"] = test["accuracy"], done
            writer.write(done, "test", {**test, "sparsity": sparsity_of(state)})
          if log_now:
            train_means = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
            results["train"] = train_means
            rate = len(window) / window_time  # training only: evals and compilation excluded
            sparsity = sparsity_of(state)
            writer.write(done, "train",
                         {**train_means, "sparsity": sparsity, "steps_per_second": rate})
            writer.flush()
            test_accuracy = (results["test"] or {"accuracy": float("nan")})["accuracy"]
            log(f"{prefix}step {done:6d}/{num_steps} | loss {train_means['loss']:.4f} | "
                f"train acc {train_means['accuracy']:.4f} | test acc {test_accuracy:.4f} | "
                f"sparsity {sparsity:.4f} | {rate:.1f} steps/s")
            window, window_time = [], 0.0
          if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == num_steps:
            writer.flush()  # metrics up to this step are on disk before its checkpoint
            self.save(manager, state, level, results)
    finally:
      if batches is not None:
        batches.close()  # stops Grain's workers
      manager.close()  # waits for the last save, also when training fails
    test = results["test"] or {"loss": float("nan"), "accuracy": float("nan")}
    if self.data.text:  # a language model's loss, in the unit papers report
      test = {**test, "bits_per_byte": test["loss"] / math.log(2)}
    summary = {
        "config": json.loads(config.to_json()),
        "method": self.method,
        "steps": num_steps,
        "devices": int(self.mesh.devices.size),
        "compile_time_s": compile_s,
        "wall_time_s": time.perf_counter() - train_start,
        "train": results["train"],
        "test": test,
        "test_step": results["test_step"],
        "best_test_accuracy": results["best_test_accuracy"],
        "best_step": results["best_step"],
        "target_sparsity": methods.target_sparsity(config, sparsity_of(state)),
        "sparsity": sparsity_of(state),
        "layers": layer_sparsity(state),
    }
    return Run(state, summary)


def _train_extras(state: TrainState) -> dict:
  """What a resumed run needs besides params and optimizer: RNG, BatchNorm stats."""
  extras = {"rng": state.rng}
  if state.batch_stats:
    extras["batch_stats"] = state.batch_stats
  return extras


def scores_of(state: TrainState):
  """A learned-mask method's scores (MaskLLM logits), or None for other methods."""
  try:
    return sparsejax.find_learned_state(state.opt_state).scores
  except ValueError:
    return None


def masks_of(state: TrainState):
  """The pruning masks in the optimizer state, or None for dense training."""
  try:
    return sparsejax.find_learned_state(state.opt_state).masks
  except ValueError:
    pass
  try:
    sparsejax.find_pruning_state(state.opt_state)
  except ValueError:
    return None
  return sparsejax.state_masks(state.opt_state, state.params)  # bool, also when bit-packed


def sparsity_of(state: TrainState) -> float:
  masks = masks_of(state)
  return 0.0 if masks is None else sparsejax.sparsity_report(masks).sparsity


def layer_sparsity(state: TrainState) -> dict[str, dict]:
  """Per pruned leaf (all kernels when dense): size, kept, mask sparsity, zero fraction."""
  masks = masks_of(state)
  if masks is None:
    report = sparsejax.sparsity_report(state.params)
    chosen = [path for path in report.leaves if path.endswith("kernel")]
  else:
    report = sparsejax.sparsity_report(state.params, masks)
    chosen = [leaf.path for leaf in sparsejax.leaves_with_masks(state.params, masks)
              if leaf.mask is not None]
  return {path: {"size": report.leaves[path].size,
                 "kept": report.leaves[path].kept if masks is not None else report.leaves[path].size,
                 "sparsity": report.leaves[path].sparsity if masks is not None else 0.0,
                 "zero_fraction": report.leaves[path].zero_fraction} for path in chosen}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Sequence[jax.Device] | None = None,
                       log: Callable[[str], None] = print, label: str = "") -> Run:
  """`Trainer(config, devices).fit(workdir, log, label)`: one call for scripts and tests."""
  return Trainer(config, devices).fit(workdir, log, label)
