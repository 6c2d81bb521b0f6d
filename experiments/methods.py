"""From a config to the optimizer: base optax optimizer plus pruning method.

Methods, chosen by `config.pruning.method`:
  dense:    no pruning.
  one_shot: magnitude pruning to `sparsity` once, at
            start_fraction * num_steps, then fine-tuning with the mask fixed.
  gradual:  Zhu & Gupta polynomial schedule from `initial_sparsity` at
            start_fraction to `sparsity` at end_fraction of training, masks
            recomputed every `update_every` steps.
  nm:       N:M structured sparsity (`config.pruning.nm`): one of
            `sparsejax.nm.METHODS` with a dense phase first and a hard-mask
            fine-tune last, through `sparsejax.NMSparsity`.
  static:   random masks at `sparsity` (uniform or ERK) from step 0, fixed.
  snip:     SNIP (Lee et al. 2019): masks from |g * w| on the first batch at
            initialisation (the model in evaluation mode unless
            `snip_train_mode`), fixed.
  synflow:  SynFlow (Tanaka et al. 2020): data-free, `synflow_iterations`
            rounds at initialisation, fixed.
  ste:      the gradual schedule with straight-through training: the
            forward sees the masked weights, every weight keeps training,
            pruned ones can come back (JaxPruner's STE).
  set, rigl: drop and grow (`config.pruning.dst`) at constant `sparsity`
            from a random sparse start: SET grows at random, RigL by
            |dense gradient|; RigL's settings (`DST_DEFAULTS`).
  granet:   GraNet (Liu et al. 2021): the gradual schedule from
            `initial_sparsity` (0: from dense) plus regeneration, both
            every `dst.update_every` steps, with its code's settings
            (`DST_DEFAULTS`: death rate 0.5 to 0.005 by a cosine over the
            whole run, ceil counts, per-layer regrowth).
  maskllm, jackpots (also spelled 'jackpot'), bip: learned masks
            (`config.pruning.learned`, see `learned_method`): dense training
            for start_fraction of the run, then MaskLLM's n:m logits or
            Lottery Jackpots' scores over the frozen weights, or BiP's
            alternating weight and score updates.
dense/one_shot/gradual/static/snip/synflow go through
`sparsejax.GradualMagnitudePruning`, set/rigl/granet through
`sparsejax.DropAndGrow`: the pruned weights are exactly zero in the params
after every step. ste keeps every weight; nm keeps them dense until
fine-tuning (the forward pass sees `nm_sparsity(config,
num_steps).forward`), and the last update leaves the weights N:M.
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import ml_collections
import optax

import sparsejax
from experiments.config_checks import ConfigError
from experiments.config_checks import at_least
from experiments.config_checks import choice
from experiments.config_checks import number

METHODS = ("dense", "one_shot", "gradual", "nm", "static", "snip", "synflow", "ste", "set",
           "rigl", "granet", "maskllm", "jackpots", "jackpot", "bip")
LEARNED = ("maskllm", "jackpots", "jackpot", "bip")  # sparsejax.learned: scores in the state
AT_INIT = ("snip", "synflow")              # masks computed by the trainer at initialisation
DROP_AND_GROW = ("set", "rigl", "granet")  # sparsejax.DropAndGrow
STRAIGHT_THROUGH = ("ste", "set", "rigl", "granet")  # forward: sparsejax.ste_masked_params
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
ALLOCATIONS = ("uniform", "erk", "global", "lamp")
# The values a `config.pruning.dst` field left None takes, per method.
DST_DEFAULTS = {
    # RigL (Evci et al. 2020, google-research/rigl); SET runs with them too, but, as
    # rigl's SparseSETOptimizer, takes the optimizer step on an update step before it
    # drops and grows (SparseRigLOptimizer's mask update replaces the step).
    "rigl": {"drop_fraction": 0.3, "end_fraction": 0.75, "min_drop_fraction": 0.0,
             "rounding": "floor", "regrow_scope": None, "gradient_on_update": False},
    # GraNet's code (VITA-Group/GraNet, sparselearning/core.py): `--prune-rate` 0.5
    # decayed by CosineDecay(eta_min=0.005) over all steps, with drop and grow to
    # the end; ceil counts; global pruning (method 'GraNet') regrows per layer;
    # `Masking.step` takes the optimizer step, then prunes and regrows.
    "granet": {"drop_fraction": 0.5, "end_fraction": 1.0, "min_drop_fraction": 0.005,
               "rounding": "ceil", "regrow_scope": "leaf", "gradient_on_update": True},
}
DST_DEFAULTS["set"] = {**DST_DEFAULTS["rigl"], "gradient_on_update": True}


def _compile(pattern: str, key: str):
  try:
    return re.compile(pattern) if pattern else None
  except re.error as e:
    raise ConfigError(f"config.{key}={pattern!r} is not a valid regex: {e}") from e


def leaf_filter(pruning: ml_collections.ConfigDict,
                section: str = "pruning") -> Callable[[str, object], bool]:
  """Prunable leaves: ndim >= 2, path matching `include`, not `exclude`.

  `section` is the config section's name, for error messages ('' for keys
  at the top of the config).
  """
  prefix = f"{section}." if section else ""
  include = _compile(pruning.include, f"{prefix}include")
  exclude = _compile(pruning.exclude, f"{prefix}exclude")

  def keep(path: str, leaf) -> bool:
    if not sparsejax.default_filter(path, leaf):
      return False
    if include is not None and not include.search(path):
      return False
    return exclude is None or not exclude.search(path)

  return keep


def step_at(fraction: float, num_steps: int, key: str) -> int:
  """round(fraction * num_steps): a step that training reaches (< num_steps)."""
  if not 0.0 <= fraction <= 1.0:
    raise ConfigError(f"config.{key}={fraction!r} must be a fraction of training in [0, 1].")
  step = int(round(fraction * num_steps))
  if step >= num_steps:
    raise ConfigError(
        f"config.{key}={fraction!r} of {num_steps} steps gives step {step}, but the last "
        f"training step is {num_steps - 1}: a mask update there would never run.")
  return step


def nm_axes(nm: ml_collections.ConfigDict) -> sparsejax.layouts.ContractionRule:
  """The contraction-axes rule of `config.pruning.nm` (`axes` map, `flatten` for convolutions).

  Raises:
    ConfigError: a regex that does not compile, naming the key.
  """
  rules = {pattern: tuple(v) if isinstance(v, (list, tuple)) else v
           for pattern, v in dict(nm.axes).items()}
  try:
    return sparsejax.layouts.ContractionRule(rules, conv_flat=nm.flatten)
  except ValueError as e:
    raise ConfigError(f"config.pruning.nm.axes: {e}") from e


def nm_sparsity(config: ml_collections.ConfigDict, num_steps: int) -> sparsejax.NMSparsity | None:
  """The N:M method of `config.pruning.nm`, or None unless pruning.method is 'nm'.

  decay_coef None takes the library's default (`sparsejax.NMSparsity`):
  alpha = 4 / (sparse-phase steps). The phases' lengths are the fractions of
  num_steps rounded to the nearest step (Python's round).

  Raises:
    ConfigError: a bad value, naming its key under config.pruning.nm.
  """
  if method_name(config) != "nm":
    return None
  nm = config.pruning.nm
  choice(nm.method, tuple(sparsejax.nm.METHODS), "pruning.nm.method")
  choice(nm.non_divisible, ("error", "dense"), "pruning.nm.non_divisible")
  at_least(nm.m, 1, "pruning.nm.m")
  at_least(nm.n, 1, "pruning.nm.n")
  if nm.n > nm.m:
    raise ConfigError(f"config.pruning.nm.n={nm.n} exceeds config.pruning.nm.m={nm.m}: "
                      "N:M keeps N of every M.")
  at_least(nm.update_every, 1, "pruning.nm.update_every")
  for key in ("dense_fraction", "finetune_fraction"):
    if not 0.0 <= nm[key] < 1.0:
      raise ConfigError(f"config.pruning.nm.{key}={nm[key]!r} must be a fraction in [0, 1).")
  if not nm.srste_lambda >= 0:
    raise ConfigError(f"config.pruning.nm.srste_lambda={nm.srste_lambda!r} must be >= 0.")
  if nm.decay_coef is not None and not nm.decay_coef > 0:
    raise ConfigError(f"config.pruning.nm.decay_coef={nm.decay_coef!r} must be > 0 "
                      "(or None: 4 / sparse-phase steps).")
  choice(nm.finetune_mask, sparsejax.nm_schedules.FINETUNE_MASKS, "pruning.nm.finetune_mask")
  dense = int(round(nm.dense_fraction * num_steps))
  finetune = int(round(nm.finetune_fraction * num_steps))
  try:
    schedule = sparsejax.NMSchedule(nm.n, nm.m, num_steps, dense_steps=dense,
                                    finetune_steps=finetune, update_every=nm.update_every,
                                    structure=sparsejax.nm.METHODS[nm.method][0],
                                    finetune_mask=nm.finetune_mask)
  except ValueError as e:
    raise ConfigError(f"config.pruning.nm (dense_fraction={nm.dense_fraction}, "
                      f"finetune_fraction={nm.finetune_fraction}): {e}") from e
  return sparsejax.NMSparsity.from_method(
      nm.method, schedule, decay_coef=nm.decay_coef, srste_lambda=nm.srste_lambda,
      axes=nm_axes(nm), leaf_filter=leaf_filter(config.pruning),
      non_divisible=nm.non_divisible)


def _check_pruning(pruning: ml_collections.ConfigDict) -> None:
  for key in ("sparsity", "initial_sparsity"):
    if not 0.0 <= pruning[key] < 1.0:
      raise ConfigError(f"config.pruning.{key}={pruning[key]!r} must be in [0, 1).")
  choice(pruning.allocation, ALLOCATIONS, "pruning.allocation")
  if pruning.get("structure") is not None:
    choice(pruning.structure, ("channel", "head"), "pruning.structure")
  if pruning.method in DROP_AND_GROW:
    dst_options(pruning)
  if pruning.method == "synflow":
    at_least(pruning.synflow_iterations, 1, "pruning.synflow_iterations")
  if pruning.method == "snip" and not isinstance(pruning.snip_train_mode, bool):
    raise ConfigError(f"config.pruning.snip_train_mode={pruning.snip_train_mode!r} must be "
                      "True or False.")
  if pruning.method in ("gradual", "ste", "granet"):
    at_least(pruning.update_every, 1, "pruning.update_every")
    if not pruning.power > 0:
      raise ConfigError(f"config.pruning.power={pruning.power!r} must be > 0.")
    if pruning.initial_sparsity > pruning.sparsity:
      raise ConfigError(
          f"config.pruning.initial_sparsity={pruning.initial_sparsity} exceeds "
          f"config.pruning.sparsity={pruning.sparsity}: masks only shrink.")


def dst_options(pruning: ml_collections.ConfigDict) -> dict:
  """`config.pruning.dst` of a set / rigl / granet config, checked, with each
  None field set to the method's `DST_DEFAULTS` value.

  Raises:
    ConfigError: a bad value or combination, naming its key.
  """
  dst = pruning.dst
  defaults = DST_DEFAULTS[pruning.method]
  value = lambda key: defaults[key] if dst[key] is None else dst[key]
  options = {key: value(key) for key in defaults}
  at_least(dst.update_every, 1, "pruning.dst.update_every")
  choice(dst.decay, sparsejax.dst.DECAYS, "pruning.dst.decay")
  if dst.decay == "constant" and dst.min_drop_fraction is None:
    options["min_drop_fraction"] = 0.0  # the floor of a cosine; a constant has none
  alpha, low = options["drop_fraction"], options["min_drop_fraction"]
  if not 0.0 <= alpha < 1.0:
    raise ConfigError(f"config.pruning.dst.drop_fraction={alpha!r} must be in [0, 1).")
  if not 0.0 <= low <= alpha:
    raise ConfigError(f"config.pruning.dst.min_drop_fraction={low!r} must be in [0, "
                      f"drop_fraction={alpha!r}].")
  if low and dst.decay != "cosine":
    raise ConfigError(f"config.pruning.dst.min_drop_fraction={low!r} is where the cosine "
                      f"decay ends; config.pruning.dst.decay={dst.decay!r} has none.")
  if not 0.0 < options["end_fraction"] <= 1.0:
    raise ConfigError(f"config.pruning.dst.end_fraction={options['end_fraction']!r} must be "
                      "a fraction of training in (0, 1].")
  choice(options["rounding"], sparsejax.dst.ROUNDINGS, "pruning.dst.rounding")
  scope = options["regrow_scope"]
  if scope is not None:
    choice(scope, sparsejax.dst.REGROW_SCOPES, "pruning.dst.regrow_scope")
    if scope == "global" and pruning.allocation != "global":
      raise ConfigError(
          f"config.pruning.dst.regrow_scope='global' needs config.pruning.allocation="
          f"'global' (not {pruning.allocation!r}): regrowth across layers would undo its "
          "per-layer counts.")
  if not isinstance(options["gradient_on_update"], bool):
    raise ConfigError(f"config.pruning.dst.gradient_on_update={dst.gradient_on_update!r} "
                      "must be True, False or None (the method's).")
  return options


def pruning_schedule(pruning: ml_collections.ConfigDict, num_steps: int):
  """The sparsity schedule of `pruning.method`, or None for 'dense', 'nm' and
  the learned-mask methods."""
  method = choice(pruning.method, METHODS, "pruning.method")
  if method in ("dense", "nm") + LEARNED:
    return None
  _check_pruning(pruning)
  if method in ("static", "set", "rigl"):
    return sparsejax.ConstantSchedule(pruning.sparsity)
  if method in AT_INIT:
    return sparsejax.FixedMaskSchedule()  # the trainer puts the masks in at initialisation
  start = step_at(pruning.start_fraction, num_steps, "pruning.start_fraction")
  if method == "one_shot":
    return sparsejax.OneShotSchedule(pruning.sparsity, step=start)
  end = step_at(pruning.end_fraction, num_steps, "pruning.end_fraction")
  if end <= start:
    raise ConfigError(
        f"Gradual pruning needs end step > start step; config.pruning.start_fraction="
        f"{pruning.start_fraction} and end_fraction={pruning.end_fraction} of {num_steps} "
        f"steps give {start} and {end}.")
  every = pruning.dst.update_every if method == "granet" else pruning.update_every
  return sparsejax.PolynomialSchedule(
      initial_sparsity=pruning.initial_sparsity, final_sparsity=pruning.sparsity,
      begin_step=start, end_step=end, update_frequency=every, power=pruning.power)


def learning_rate(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  kind = choice(config.lr_schedule, LR_SCHEDULES, "lr_schedule")
  warmup = at_least(config.warmup_steps, 0, "warmup_steps")
  if kind == "constant":
    if warmup:
      raise ConfigError("config.warmup_steps > 0 needs config.lr_schedule='cosine'.")
    return optax.constant_schedule(config.learning_rate)
  if warmup >= num_steps:
    raise ConfigError(f"config.warmup_steps={warmup} must be below the {num_steps} steps.")
  return optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, warmup_steps=warmup, decay_steps=num_steps)


def base_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """adam, adamw (decoupled weight decay) or sgd (momentum, nesterov, L2 decay)."""
  kind = choice(config.optimizer, OPTIMIZERS, "optimizer")
  if kind != "sgd" and (config.momentum or config.nesterov):
    raise ConfigError(f"config.momentum / config.nesterov apply to sgd only, not {kind!r}.")
  if kind == "adam" and config.weight_decay:
    raise ConfigError("config.weight_decay with optimizer 'adam' would be ignored; "
                      "use config.optimizer='adamw'.")
  if config.nesterov and not config.momentum:
    raise ConfigError("config.nesterov=True needs config.momentum > 0.")
  lr = learning_rate(config, num_steps)
  if kind == "adam":
    return optax.adam(lr)
  if kind == "adamw":
    return optax.adamw(lr, weight_decay=config.weight_decay)
  tx = optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov)
  if config.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  return tx


def method_name(config: ml_collections.ConfigDict) -> str:
  """'lottery' for a lottery config (it has a `lottery` section), else pruning.method."""
  return "lottery" if "lottery" in config else config.pruning.method


def target_sparsity(config: ml_collections.ConfigDict, achieved: float) -> float:
  """The sparsity a run aims for; a lottery level's is its masks' (`achieved`)."""
  method = method_name(config)
  if method == "lottery":
    return achieved
  if method == "nm":
    return 1.0 - config.pruning.nm.n / config.pruning.nm.m
  if method == "maskllm":
    return 1.0 - config.pruning.learned.n / config.pruning.learned.m
  return 0.0 if method == "dense" else config.pruning.sparsity


def structure_spec(config: ml_collections.ConfigDict, model) -> tuple | None:
  """The structure spec rules of `config.pruning.structure`'s kind for `model`, or None.

  Raises:
    ConfigError: for an unknown kind, a method other than gradual / one_shot,
      an allocation other than uniform, include / exclude set, or a model
      without a spec or without groups of that kind.
  """
  kind = config.pruning.get("structure")
  if kind is None or config.pruning.method == "dense":   # the dense baseline of a run
    return None
  choice(kind, ("channel", "head"), "pruning.structure")
  if config.pruning.method not in ("gradual", "one_shot"):
    raise ConfigError(f"config.pruning.structure={kind!r} works with pruning.method 'gradual' or "
                      f"'one_shot', not {config.pruning.method!r}.")
  if config.pruning.allocation != "uniform":
    raise ConfigError(f"config.pruning.structure={kind!r} removes the same fraction of every "
                      f"group's units: pruning.allocation must be 'uniform', not "
                      f"{config.pruning.allocation!r}.")
  if config.pruning.include or config.pruning.exclude:
    raise ConfigError("config.pruning.include / exclude choose kernels, not structured groups: "
                      f"leave them empty with pruning.structure={kind!r}.")
  if model is None:
    raise ConfigError("config.pruning.structure needs the model to find its groups.")
  from experiments.models import structure as model_structure  # pylint: disable=import-outside-toplevel
  try:
    rules = model_structure.spec(model)
  except ValueError as e:
    raise ConfigError(f"config.pruning.structure: {e}") from None
  rules = tuple(r for r in rules if r.kind == kind)
  if not rules:
    raise ConfigError(f"config.pruning.structure={kind!r}: model {type(model).__name__} has no "
                      f"{kind} groups.")
  return rules


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int,
                   model=None) -> optax.GradientTransformation:
  """The full optimizer: base optimizer, wrapped for pruning unless dense.

  With `config.pruning.structure` ('channel' or 'head'), gradual and
  one_shot prune whole units of `model`'s groups of that kind
  (`structure_spec`, `sparsejax.GradualMagnitudePruning(structure=...)`).

  A lottery config (with a `lottery` section) gets masks that never change
  by themselves (`sparsejax.FixedMaskSchedule`, dense at init): each IMP
  level sets its masks into the state with `sparsejax.with_masks`.

  Raises:
    ConfigError: a value, or a combination of values, that cannot work; the
      message names the config key.
  """
  tx = base_optimizer(config, num_steps)
  structure = structure_spec(config, model) if "lottery" not in config else None
  packed = _packed_masks(config)
  nm = nm_sparsity(config, num_steps)
  if nm is not None:
    return nm.wrap(tx)
  learned = learned_method(config, num_steps)
  if learned is not None:
    return learned.wrap(tx, score_optimizer(config.pruning.learned))
  if method_name(config) == "lottery":
    return sparsejax.GradualMagnitudePruning(
        sparsejax.FixedMaskSchedule(), leaf_filter=leaf_filter(config.lottery, "lottery"),
        packed_masks=packed).wrap(tx)
  schedule = pruning_schedule(config.pruning, num_steps)
  if schedule is None:
    return tx
  method = config.pruning.method
  key = jax.random.key(config.seed)
  regrowing = drop_and_grow(config, num_steps)
  if regrowing is not None:
    return regrowing.wrap(tx)
  pruner = sparsejax.GradualMagnitudePruning(
      schedule, allocation=config.pruning.allocation, leaf_filter=leaf_filter(config.pruning),
      packed_masks=packed, score="random" if method == "static" else "magnitude",
      key=key if method == "static" else None, straight_through=method == "ste",
      structure=structure)
  return pruner.wrap(tx)


def score_optimizer(learned: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The scores' optimizer of `config.pruning.learned`: adam, or sgd with momentum 0.9."""
  kind = choice(learned.score_optimizer, ("adam", "sgd"), "pruning.learned.score_optimizer")
  lr = number(learned.score_lr, "pruning.learned.score_lr", 0.0, low_open=True)
  return optax.adam(lr) if kind == "adam" else optax.sgd(lr, momentum=0.9)


def _pair(value, key: str) -> tuple[float, float]:
  if not isinstance(value, (tuple, list)) or len(value) != 2:
    raise ConfigError(f"config.{key}={value!r} must be a (start, end) pair.")
  return tuple(number(v, key, 0.0, low_open=True) for v in value)


def learned_method(config: ml_collections.ConfigDict,
                   num_steps: int) -> sparsejax.learned.LearnedMask | None:
  """The MaskLLM / LotteryJackpots / BiP of a learned-mask config (None for
  other methods), its hyperparameters from `config.pruning.learned`.

  Raises:
    ConfigError: a bad value, naming its key.
  """
  method = method_name(config)
  if method not in LEARNED:
    return None
  pruning, learned = config.pruning, config.pruning.learned
  fraction = number(learned.start_fraction, "pruning.learned.start_fraction", 0.0, 1.0,
                    high_open=True)
  start = int(round(fraction * num_steps))
  if start >= num_steps:
    raise ConfigError(f"config.pruning.learned.start_fraction={fraction} of {num_steps} steps "
                      "leaves no step to learn the mask.")
  score_optimizer(learned)
  keep = leaf_filter(pruning)
  if method == "maskllm":
    at_least(learned.m, 1, "pruning.learned.m")
    at_least(learned.n, 1, "pruning.learned.n")
    if learned.n > learned.m:
      raise ConfigError(f"config.pruning.learned.n={learned.n} exceeds "
                        f"config.pruning.learned.m={learned.m}.")
    prior = choice(learned.prior, ("magnitude", "none"), "pruning.learned.prior")
    try:
      return sparsejax.MaskLLM(
          learned.n, learned.m, num_steps=num_steps, start_step=start,
          temperature=_pair(learned.temperature, "pruning.learned.temperature"),
          scale=_pair(learned.scale, "pruning.learned.scale"),
          prior=None if prior == "none" else prior,
          prior_strength=number(learned.prior_strength, "pruning.learned.prior_strength", 0.0),
          init_std=number(learned.init_std, "pruning.learned.init_std", 0.0, low_open=True),
          seed=config.seed, axes=nm_axes(pruning.nm), leaf_filter=keep)
    except ValueError as e:
      raise ConfigError(f"config.pruning.learned (n={learned.n}, m={learned.m}): {e}") from e
  if not 0.0 < pruning.sparsity < 1.0:
    raise ConfigError(f"config.pruning.sparsity={pruning.sparsity!r} must be in (0, 1).")
  if method in ("jackpots", "jackpot"):
    end = number(learned.swap_end_fraction, "pruning.learned.swap_end_fraction", fraction, 1.0)
    return sparsejax.LotteryJackpots(
        pruning.sparsity, num_steps=num_steps, start_step=start,
        swap_end_step=int(round(end * num_steps)),
        swap_rate=number(learned.swap_rate, "pruning.learned.swap_rate", 0.0, 1.0, low_open=True),
        leaf_filter=keep)
  return sparsejax.BiP(
      pruning.sparsity, lr2=number(learned.lr2, "pruning.learned.lr2", 0.0),
      num_steps=num_steps, start_step=start,
      score_init_scale=number(learned.score_init_scale, "pruning.learned.score_init_scale", 0.0,
                              low_open=True),
      leaf_filter=keep)


def drop_and_grow(config: ml_collections.ConfigDict,
                  num_steps: int) -> sparsejax.DropAndGrow | None:
  """The `DropAndGrow` of a set / rigl / granet config (None for other methods).

  Raises:
    ConfigError: a bad value, naming its key under config.pruning.
  """
  method = method_name(config)
  if method not in DROP_AND_GROW:
    return None
  schedule = pruning_schedule(config.pruning, num_steps)
  dst = config.pruning.dst
  options = dst_options(config.pruning)
  # The cosine's end; 1.0 (GraNet): the end of training, updates to its last step.
  end = int(round(options["end_fraction"] * num_steps))
  if end < 1:
    raise ConfigError(f"config.pruning.dst.end_fraction={options['end_fraction']} of "
                      f"{num_steps} steps leaves no step for drop and grow.")
  sparse_start = method != "granet" or config.pruning.initial_sparsity > 0
  return sparsejax.DropAndGrow(
      schedule, end_step=end, grow="random" if method == "set" else "gradient",
      update_every=dst.update_every, drop_fraction=options["drop_fraction"], decay=dst.decay,
      allocation=config.pruning.allocation, initial_masks="random" if sparse_start else "dense",
      leaf_filter=leaf_filter(config.pruning), key=jax.random.key(config.seed),
      gradient_on_update=options["gradient_on_update"],
      min_drop_fraction=options["min_drop_fraction"], rounding=options["rounding"],
      regrow_scope=options["regrow_scope"])


def recompute_schedule(config: ml_collections.ConfigDict, num_steps: int):
  """The schedule of `make_optimizer`'s `GradualMagnitudePruning` (gradual,
  one-shot, static, STE, SNIP, SynFlow), or None for other methods.

  The trainer compiles its step with and without the mask recompute
  (`update(..., recompute=)`) and picks one on the host from this schedule's
  `is_update_step`, so the steps between recomputes hold no selection.
  """
  if method_name(config) == "lottery" or config.pruning.method in DROP_AND_GROW:
    return None
  return pruning_schedule(config.pruning, num_steps)


def _packed_masks(config: ml_collections.ConfigDict) -> bool:
  """config.pruning.packed_masks (config.lottery's in a lottery config), checked."""
  if "lottery" in config:
    return config.lottery.packed_masks
  packed = config.pruning.packed_masks  # a bool: ConfigDict refuses other types
  if packed and method_name(config) in ("nm",) + DROP_AND_GROW + LEARNED:
    raise ConfigError(
        "config.pruning.packed_masks=True is for magnitude pruning and lottery runs; N:M, "
        "drop-and-grow and learned-mask training keep bool masks (set it to False).")
  return packed
