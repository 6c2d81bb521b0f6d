"""Checks of config values, with errors that name the config key.

Every check runs before a run claims its workdir, so a bad value costs
nothing and leaves nothing behind.
"""

from __future__ import annotations

from typing import Any, Iterable

import ml_collections


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


def check_training_fields(config: ml_collections.ConfigDict) -> None:
  """The fields the training loop reads directly (not the optimizer's)."""
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
