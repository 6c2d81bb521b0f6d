"""Checks of config values, with errors that name the config key.

Every check runs before a run claims its workdir, so a bad value costs
nothing and leaves nothing behind.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import ml_collections
import numpy as np

import sparsejax


class ConfigError(ValueError):
  """A config value is invalid, or combined with one it does not fit."""


def choice(value: Any, choices: Iterable[Any], key: str) -> Any:
  choices = list(choices)
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r} is not one of {choices}.")
  return value


def at_least(value: Any, minimum: int, key: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"config.{key}={value!r} must be an integer >= {minimum}.")
  return value


def number(value: Any, key: str, low: float, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> float:
  """`value` as a float, or ConfigError unless a finite number in the interval given."""
  ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high))
  if not ok:
    interval = ("" if (low, high) == (-math.inf, math.inf) else " in " +
                ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]"))
    raise ConfigError(f"config.{key}={value!r} must be a finite number{interval}.")
  return float(value)


def check_optimizer_fields(config: ml_collections.ConfigDict) -> None:
  """Learning rate, momentum and weight decay: values that cannot train are errors."""
  number(config.learning_rate, "learning_rate", 0.0, low_open=True)
  number(config.momentum, "momentum", 0.0, 1.0, high_open=True)
  number(config.weight_decay, "weight_decay", 0.0)


def check_input_statistics(input_config: ml_collections.ConfigDict) -> None:
  """Per-channel mean and std: finite, and each std's float32 inverse finite (a
  std that underflows in float32 would divide the images by zero)."""
  for i, mean in enumerate(input_config.mean):
    number(mean, f"input.mean[{i}]", -math.inf)
  for i, std in enumerate(input_config.std):
    number(std, f"input.std[{i}]", 0.0, low_open=True)
    with np.errstate(over="ignore", divide="ignore"):
      inverse = np.float32(1.0) / np.float32(std)
    if not np.isfinite(inverse):
      raise ConfigError(f"config.input.std[{i}]={std!r} underflows in float32 (1/std is "
                        f"{float(inverse)}): images would be divided by zero.")


def check_training_fields(config: ml_collections.ConfigDict) -> None:
  """The fields the training loop reads directly, the optimizer's numbers and the
  input statistics."""
  check_optimizer_fields(config)
  check_input_statistics(config.input)
  at_least(config.batch_size, 1, "batch_size")
  at_least(config.eval_batch_size, 1, "eval_batch_size")
  at_least(config.log_every, 1, "log_every")
  at_least(config.checkpoint_every, 0, "checkpoint_every")
  at_least(config.keep_checkpoints, 0, "keep_checkpoints")
  if config.checkpoint_every % config.log_every:
    raise ConfigError(
        f"config.checkpoint_every={config.checkpoint_every} must be a multiple of "
        f"config.log_every={config.log_every}: a checkpoint then falls where a progress window "
        "ends, so a resumed run logs the same metrics as an uninterrupted one.")
  at_least(config.mesh.fsdp, 1, "mesh.fsdp")
  at_least(config.mesh.fsdp_min_size, 0, "mesh.fsdp_min_size")
  at_least(config.image_size, 0, "image_size")
  at_least(config.channels, 0, "channels")
  if config.num_train_steps <= 0:
    at_least(config.num_epochs, 1, "num_epochs")
  if config.train_split == config.eval_split:
    raise ConfigError(f"config.train_split and config.eval_split are both "
                      f"{config.train_split!r}: evaluate on held-out data.")


def check_leaf_filters(section: ml_collections.ConfigDict, params: Any, prefix: str) -> None:
  """Raises ConfigError when `section.include` or `section.exclude` (regexes,
  '' for none) matches none of the prunable leaves of `params` (arrays or
  shapes): a typo would otherwise prune nothing, or everything, silently.
  `prefix` is the section's key with its dot ('pruning.', '' at the top)."""
  paths = [leaf.path for leaf in sparsejax.trees.named_leaves(params)
           if sparsejax.default_filter(leaf.path, leaf.value)]
  for name in ("include", "exclude"):
    pattern = section[name]
    try:
      found = not pattern or any(re.search(pattern, path) for path in paths)
    except re.error as e:
      raise ConfigError(f"config.{prefix}{name}={pattern!r} is not a valid regex: {e}") from e
    if not found:
      raise ConfigError(f"config.{prefix}{name}={pattern!r} matches none of the prunable "
                        f"leaves {paths}.")
