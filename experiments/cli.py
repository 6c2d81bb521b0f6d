"""Flags and command-line parsing shared by the experiment binaries.

Every binary takes --config (an ml_collections config file, overridable key
by key as --config.<key>=<value>), --workdir and --overwrite. They are
defined once here, so that the binaries can be imported side by side.
"""

from __future__ import annotations

import runpy
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/configs/default.py.", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics, checkpoints "
                              "and results.")
OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a run already in --workdir (only the files such a run writes).")


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
