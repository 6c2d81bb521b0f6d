"""Orbax checkpoints of sparse training, with masks and weights as separate items.

One `orbax.checkpoint.CheckpointManager` per directory; each step holds the
items that were given to `save`:

  params       the weights (pruned entries are 0.0);
  masks        {'/'-joined path: uint8 array}, each mask packed to 1 bit per
               weight with `sparsejax.pack_masks` (unpruned leaves absent);
  opt_state    the optimizer state (it holds a `PruningState`);
  train_state  whatever else a resumed run needs (BatchNorm statistics, RNG);
  rewind       weights and optimizer state at a rewind point (lottery runs);
  meta         JSON: step, level, mask shapes, per-leaf sparsity, versions
               and any caller fields (the config, ...).

Array items are stored in one path convention (`plain_tree`): nested dicts
keyed by the parts of each leaf's `sparsejax.trees.path_name`, whatever the
container. A Flax Linen params dict, a Flax NNX `nnx.State` (of a model or
of an `nnx.Optimizer`) and its `nnx.to_pure_dict` are stored alike, NamedTuple
fields and tuple indices as string keys, None entries absent; so each
restores into any of the others, and `restore` returns the type of the
target it was given (an `nnx.State` target gives an `nnx.State`).

Every item is readable with plain Orbax, for example
`ocp.StandardCheckpointer().restore(f"{directory}/{step}/params")` gives
`{'Dense_0': {'kernel': ...}}` for Linen and NNX params alike. Steps are
written to a temporary directory and renamed when complete, so a killed save
never becomes the latest step. A target whose leaf paths differ from the
stored ones is a structure mismatch, reported with the first differing leaf
on both sides (`CheckpointError`). `save(overwrite=True)` writes the new step
in `.overwrite/`, verifies it and only then swaps it for the old one; a
start-up finishes a swap that a crash interrupted.

Damage is detected, not restored: `meta` records a CRC-32 of every leaf of
every item and of itself (`integrity`), and a restore checks what it read
against them. Unreadable, missing or corrupted data is a `CheckpointDamaged`
naming the step, item and leaf. A step records its format (2: with checksums)
in `meta` and in Orbax's metadata of the step; a meta without checksums is
damage unless both show a step saved before checksums existed, which is read
unchecked with a warning. `restore_latest_intact` (what a resumed run
uses) moves damaged steps to `<directory>/damaged/` and restores the newest
step that verifies. With `max_to_keep`, a new step is read back and verified
before any older step is deleted for it, and at most one save is in flight:
each save first waits for the one before.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import warnings
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sparsejax import masks as masks_lib
from sparsejax import trees
from sparsejax.checkpoint import integrity
from sparsejax.checkpoint import plain_tree

PyTree = Any
ARRAY_ITEMS = ("params", "masks", "opt_state", "train_state", "rewind", "scores")
ITEMS = ARRAY_ITEMS + ("meta",)
_VERSIONED = ("sparsejax", "jax", "flax", "optax", "orbax-checkpoint")
DAMAGED_DIR = "damaged"  # where damaged steps are moved, inside the manager's directory
# Key of the checkpoint format in Orbax's own metadata of each step
# (`<step>/_CHECKPOINT_METADATA`): a second record, outside `meta`, that the
# step was written with checksums.
FORMAT_RECORD = "sparsejax_checkpoint_format"
STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's metadata file of a step (JSON)
# `save(overwrite=True)` writes the new step in `<directory>/.overwrite/new/`
# and swaps it in once verified; the old step waits there as `<step>.replaced`.
OVERWRITE_DIR = ".overwrite"
REPLACED = ".replaced"
EMPTY_ITEMS = "empty_items"  # meta key: items given without leaves (not written)
PRNG_KEYS = "prng_keys"      # meta key: {item: {path: PRNG impl}} of typed keys, stored as data


class CheckpointError(ValueError):
  """A checkpoint item is missing, unreadable or does not fit its target."""


class CheckpointDamaged(CheckpointError):
  """A step's data is missing, unreadable or fails its checksum: an older step may be intact."""


class CheckpointWriteError(CheckpointError):
  """Writing a step failed (a full disk, a directory that is not writable); older steps are intact."""


class Restored(NamedTuple):
  """Items restored from one step; None for each item not asked for."""
  step: int
  params: PyTree = None
  masks: PyTree = None
  opt_state: PyTree = None
  train_state: PyTree = None
  rewind: PyTree = None
  meta: dict | None = None
  scores: PyTree = None


def package_versions() -> dict[str, str]:
  """Installed versions of sparsejax and the JAX stack, recorded in `meta`."""
  out = {}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def _plain(item: str, tree: PyTree) -> dict:
  """`plain_tree.to_plain`, its errors as CheckpointErrors naming the item."""
  try:
    return plain_tree.to_plain(tree)
  except ValueError as e:
    raise CheckpointError(f"Item {item!r}: {e}") from e


def _is_key(leaf: Any) -> bool:
  """Whether `leaf` is a typed PRNG key array (`jax.random.key`) or its struct."""
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impls(item: str, tree: PyTree) -> dict[str, str]:
  """{path: PRNG implementation name} of the typed key leaves of `tree`."""
  return {path: str(jax.random.key_impl(leaf))
          for path, leaf in _path_leaves(item, tree).items() if _is_key(leaf)}


def _key_data(tree: PyTree) -> PyTree:
  """`tree` with each typed PRNG key (or its struct) replaced by its uint32 data."""
  def data(leaf):
    if not _is_key(leaf):
      return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.eval_shape(jax.random.key_data, leaf)
    return jax.random.key_data(leaf)
  return jax.tree.map(data, tree)


def _check_no_empty_arrays(item: str, tree: PyTree) -> None:
  """Raises CheckpointError naming the first leaf with no elements (Orbax refuses them)."""
  for path, leaf in _path_leaves(item, tree).items():
    if np.size(leaf) == 0:
      raise CheckpointError(
          f"Item {item!r}: leaf {path!r} has no elements (shape {tuple(np.shape(leaf))}); "
          "Orbax cannot store an empty array: leave it out of the tree.")


def _pack(masks: PyTree) -> dict[str, np.ndarray]:
  return {leaf.path: leaf.value for leaf in trees.named_leaves(masks_lib.pack_masks(masks))}


def _barrier(name: str) -> None:
  """Waits for every process of a multi-process run (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _first_line(error: BaseException) -> str:
  """An exception's message up to its first line break (Orbax appends tracebacks)."""
  return str(error).strip().split("\n", 1)[0]


def _describe(value: Any) -> str:
  """' float32[20, 32]' for an array-like `value`, '' for anything else."""
  shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
  if shape is None or dtype is None:
    return ""
  return f" {np.dtype(dtype).name}{list(shape)}"


def _check_same_paths(item: str, stored: dict[str, Any], target: dict[str, Any],
                      where: str = "checkpoint") -> None:
  """Raises CheckpointError at the first difference of the sorted leaf paths.

  Args:
    item: the item's name, for the message.
    stored, target: {path: leaf} of both sides; leaves with a shape and dtype
      are described by them.
    where: what `stored` is, for the message.
  """
  ours, theirs = sorted(stored), sorted(target)
  i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
  if i == len(ours) == len(theirs):
    return
  have = ours[i] if i < len(ours) else None
  want = theirs[i] if i < len(theirs) else None
  if want is not None and (have is None or want < have):
    what = f"leaf {want!r} of the target is not in the {where}"
  else:
    what = f"the {where} has leaf {have!r} that the target lacks"

  def side(name: str, path: str | None, leaves: dict[str, Any]) -> str:
    if path is None:
      return f"the {name} has no more leaves"
    return f"the {name} has {path!r}{_describe(leaves[path])}"

  raise CheckpointError(
      f"Item {item!r}: structure mismatch: {what}. At the first difference of the sorted leaf "
      f"paths {side(where, have, stored)} and {side('target', want, target)} ({len(ours)} vs "
      f"{len(theirs)} leaves): a checkpoint of another model?")


def _check_fits(item: str, stored: PyTree, target: PyTree) -> None:
  """Raises CheckpointError naming the first leaf where `stored` and `target` differ.

  Paths are compared first (a structure mismatch), then each leaf's shape
  and dtype, in the target's order.
  """
  stored_leaves = _path_leaves(item, stored)
  target_leaves = _path_leaves(item, target)
  _check_same_paths(item, stored_leaves, target_leaves)
  for path, want in target_leaves.items():
    have = stored_leaves[path]
    if tuple(have.shape) != tuple(np.shape(want)):
      raise CheckpointError(
          f"Item {item!r}: leaf {path!r} has shape {tuple(have.shape)} in the checkpoint "
          f"but {tuple(np.shape(want))} in the target.")
    have_dtype, want_dtype = getattr(have, "dtype", None), getattr(want, "dtype", None)
    if have_dtype is not None and want_dtype is not None and \
        np.dtype(have_dtype) != np.dtype(want_dtype):
      raise CheckpointError(
          f"Item {item!r}: leaf {path!r} is {np.dtype(have_dtype)} in the checkpoint but "
          f"{np.dtype(want_dtype)} in the target (restoring would cast it).")


def _path_leaves(item: str, tree: PyTree) -> dict[str, Any]:
  """`plain_tree.path_leaves`, its errors as CheckpointErrors naming the item."""
  try:
    return plain_tree.path_leaves(tree)
  except ValueError as e:
    raise CheckpointError(f"Item {item!r}: {e}") from e


def _restore_target(item: str, stored: PyTree, target: PyTree) -> PyTree:
  """The stored tree's structure with the target's leaves (and shardings) by path.

  Built on what is on disk, so items written before the plain form (a
  NamedTuple stored by field, a tuple as a list) restore too.
  """
  wanted = _path_leaves(item, target)
  flat, treedef = jax.tree_util.tree_flatten_with_path(stored)
  return jax.tree.unflatten(treedef, [wanted[trees.path_name(path)] for path, _ in flat])


class _DropReadOnlyNotice(logging.Filter):
  """Drops Orbax's warnings that a manager opened read-only is read-only."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "Given directory is read only" not in message and "read_only=True" not in message


class SparseCheckpointManager:
  """Saves and restores sparse-training state in one directory.

  Example:
    >>> import tempfile
    >>> params = {'dense': {'kernel': jnp.arange(8.0).reshape(2, 4)}}
    >>> masks = sparsejax.magnitude_masks(params, 0.5)
    >>> with SparseCheckpointManager(tempfile.mkdtemp()) as manager:
    ...   _ = manager.save(10, params=params, masks=masks)
    ...   restored = manager.restore(masks_like=params)
    >>> restored.step, restored.masks['dense']['kernel'].sum().item()
    (10, 4)

    NNX state is saved and restored the same way:
    `save(step, params=nnx.state(model, nnx.Param), opt_state=nnx.state(optimizer))`,
    then `restore(params_like=nnx.state(fresh, nnx.Param), opt_state_like=
    nnx.state(fresh_optimizer))` and `nnx.update` both with the result.

  Args:
    directory: where the steps live (created if absent).
    max_to_keep: keep only the newest N steps (None keeps all). A step is
      deleted only once a newer one has been read back and verified.
    best_metric: with `max_to_keep`, keep the best N steps by this key of the
      `metrics` passed to `save` instead of the newest (steps saved without
      it are kept).
    best_mode: 'max' or 'min' for `best_metric`.
    async_save: write in a background thread (call `wait_until_finished`
      before reading; closing the manager waits).
    read_only: only read: the directory must exist and is never changed (no
      directory created, no temporary one cleaned up, `save` refused, and
      `restore_latest_intact` skips damaged steps instead of moving them).
  """

  def __init__(self, directory: str, max_to_keep: int | None = None,
               best_metric: str | None = None, best_mode: str = "max", async_save: bool = True,
               read_only: bool = False):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be None or at least 1, got {max_to_keep!r}.")
    self.directory = os.path.abspath(directory)  # Orbax refuses relative paths
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f"{self.directory} is a file, not a checkpoint directory.")
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"No checkpoint directory {self.directory} (opened read-only).")
    self.read_only = read_only
    self._max_to_keep = max_to_keep
    self._best_metric = best_metric
    self._best_sign = 1.0 if best_mode == "max" else -1.0
    self._metric_values: dict[int, float | None] = {}  # step -> best_metric value
    self._pending: list[int] = []   # saved by this manager, not yet verified
    self._verified: set[int] = set()
    self._finish_interrupted_overwrite()
    # Handlers named up front, so a new manager can read metadata of old steps.
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    quiet = _DropReadOnlyNotice()  # read-only is asked for here: Orbax's warnings are noise
    logging.getLogger("absl").addFilter(quiet)
    try:
      # Steps are deleted here, not by Orbax: only after a newer one is verified.
      options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=not read_only,
                                             read_only=read_only, create=not read_only)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_handlers=handlers)
    except OSError as e:
      raise CheckpointWriteError(f"Cannot use {self.directory} for checkpoints: {e}") from e
    finally:
      logging.getLogger("absl").removeFilter(quiet)

  def save(self, step: int, *, params: PyTree = None, masks: PyTree = None, opt_state: PyTree = None,
           train_state: PyTree = None, rewind: PyTree = None, meta: dict | None = None,
           metrics: dict | None = None, level: int | None = None, overwrite: bool = False,
           scores: PyTree = None) -> bool:
    """Saves the given items at `step` (asynchronously unless disabled).

    The save in flight before it, if any, is waited for first: at most one
    step is being written at any time.

    Args:
      step: the step number.
      params, opt_state, train_state, rewind, scores: pytrees of arrays (Linen dicts,
        `nnx.State`s, pure dicts, optax states), saved in their plain form.
        Typed PRNG keys are saved as their `key_data`; an item without
        leaves is not written (`meta['empty_items']` records it).
      masks: bool masks (None for unpruned leaves), packed to 1 bit per weight.
        `scores` are a learned-mask method's scores or logits
        (`sparsejax.learned`), kept apart from weights and masks.
      meta: JSON-serialisable fields (the config, ...), completed with the
        step, level, mask shapes, per-leaf sparsity, package versions and
        the checksums of every item.
      metrics: {name: value}, used by `best_metric`.
      level: the pruning level (lottery runs).
      overwrite: replace `step` if it is already saved (otherwise an error).
        The new step is written and verified beside the old one (waiting
        for it, whatever `async_save`) and swapped in only then: if
        anything fails, the old step stays.

    Returns:
      Whether a save was started (Orbax may skip one by its save policy).

    Raises:
      CheckpointError: `step` exists and `overwrite` is False; or, naming the
        item and path, two leaves of an item share a '/'-joined path or one
        lies under another, or a leaf has no elements.
      CheckpointWriteError: this or the previous save could not be written.
    """
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only; step {step} not saved.")
    step = int(step)
    self.wait_until_finished()
    if step in self.all_steps():
      if not overwrite:
        raise CheckpointError(f"Step {step} is already saved in {self.directory}; pass "
                              "overwrite=True to replace it.")
      return self._replace(step, dict(
          params=params, masks=masks, opt_state=opt_state, train_state=train_state,
          rewind=rewind, meta=meta, metrics=metrics, level=level, scores=scores))
    items = {"params": params, "opt_state": opt_state, "train_state": train_state,
             "rewind": rewind, "scores": scores}
    items = {name: value for name, value in items.items() if value is not None}
    meta = dict(meta or {})
    meta.update(step=step, level=level, versions=package_versions())
    meta[integrity.FORMAT] = integrity.FORMAT_VERSION
    # Typed PRNG keys are stored as their data, rewrapped at restore.
    keys = {name: impls for name, value in items.items() if (impls := _key_impls(name, value))}
    if keys:
      meta[PRNG_KEYS] = keys
    plain = {name: _plain(name, _key_data(value)) for name, value in items.items()}
    for name, tree in plain.items():
      _check_no_empty_arrays(name, tree)
    if masks is not None:
      if params is not None:
        try:
          trees.check_same_structure(params, masks)
        except ValueError as e:
          raise CheckpointError(f"Item 'masks': {e}") from e
      plain["masks"] = _pack(masks)
      meta["mask_shapes"] = {leaf.path: list(np.shape(leaf.value))
                             for leaf in trees.named_leaves(masks)}
      # Every leaf of the model, pruned or not: a masks-only restore into
      # another architecture must fail, not leave its extra layers dense.
      meta["mask_tree_paths"] = [leaf.path for leaf in trees.named_leaves(masks, keep_none=True)]
      meta["sparsity"] = {path: leaf.sparsity
                          for path, leaf in masks_lib.sparsity_report(masks).leaves.items()}
    if self._best_metric is not None:
      value = (metrics or {}).get(self._best_metric)
      meta["best_metric"] = None if value is None else float(value)
    # Orbax cannot write an item without leaves (`masks={}`, SGD's optimizer
    # state): it is not written, and restores as its target's empty tree.
    empty = sorted(name for name, tree in plain.items() if not tree)
    plain = {name: tree for name, tree in plain.items() if tree}
    if empty:
      meta[EMPTY_ITEMS] = empty
    meta[integrity.CHECKSUMS] = {name: integrity.tree_checksums(_path_leaves(name, tree))
                                 for name, tree in plain.items()}
    args = {name: ocp.args.StandardSave(tree) for name, tree in plain.items()}
    args["meta"] = ocp.args.JsonSave(integrity.seal_meta(meta))
    try:
      started = self._manager.save(step, args=ocp.args.Composite(**args), metrics=metrics,
                                   custom_metadata={FORMAT_RECORD: integrity.FORMAT_VERSION})
    except OSError as e:
      raise CheckpointWriteError(
          f"Writing step {step} to {self.directory} failed: {e}; the steps saved before it "
          "are intact.") from e
    if started:
      self._pending.append(step)
      self._metric_values[step] = meta.get("best_metric")
    return started

  def _replace(self, step: int, items: dict) -> bool:
    """`save(step, **items)` of a saved step: the new one is written beside it,
    verified, then swapped in; on any failure the old step stays."""
    work = os.path.join(self.directory, OVERWRITE_DIR)
    self._on_primary(f"overwrite {step}", lambda: shutil.rmtree(work, ignore_errors=True))
    try:
      with SparseCheckpointManager(os.path.join(work, "new"), best_metric=self._best_metric,
                                   async_save=False) as writer:
        writer.save(step, **items)
        writer.verify(step)
    except BaseException as e:
      self._on_primary(f"overwrite {step} failed", lambda: shutil.rmtree(work, ignore_errors=True))
      if isinstance(e, (CheckpointWriteError, CheckpointDamaged)):
        raise type(e)(f"Replacing step {step} in {self.directory} failed: {e}; the step saved "
                      "before stays.") from e
      raise

    def swap():
      live = os.path.join(self.directory, str(step))
      os.rename(live, os.path.join(work, f"{step}{REPLACED}"))
      os.rename(os.path.join(work, "new", str(step)), live)
      shutil.rmtree(work)

    self._on_primary(f"swap {step}", swap)
    self._manager.reload()
    self._pending = [s for s in self._pending if s != step]
    self._verified.add(step)
    self._metric_values.pop(step, None)  # read again from the new meta
    return True

  def _finish_interrupted_overwrite(self) -> None:
    """Cleans up after an overwrite that a crash interrupted (`_replace`).

    Killed before its swap, the new step is incomplete or unswapped: it is
    removed and the old one stays. Killed between the two renames of the
    swap, the step is absent: the old one is put back. Killed after them, the
    old one is removed.
    """
    work = os.path.join(self.directory, OVERWRITE_DIR)
    if self.read_only or not os.path.isdir(work):  # read-only: the owner finishes it
      return

    def finish():
      for name in os.listdir(work):
        live = os.path.join(self.directory, name[:-len(REPLACED)])
        if name.endswith(REPLACED) and not os.path.exists(live):
          os.rename(os.path.join(work, name), live)
      shutil.rmtree(work)

    self._on_primary("finish overwrite", finish)

  @staticmethod
  def _on_primary(name: str, change: Callable[[], None]) -> None:
    """Runs `change` (to the directory) in process 0 only, between barriers."""
    _barrier(name)
    if jax.process_index() == 0:
      change()
    _barrier(f"{name} done")

  def restore(self, step: int | None = None, *, params_like: PyTree = None, masks_like: PyTree = None,
              opt_state_like: PyTree = None, train_state_like: PyTree = None,
              rewind_like: PyTree = None, verify: bool = True,
              scores_like: PyTree = None) -> Restored:
    """Restores the items whose targets are given (and always `meta`).

    Each `*_like` is a target pytree (arrays or `jax.ShapeDtypeStruct`s, with
    shardings where wanted) whose leaf paths, shapes and dtypes the stored
    item must match; the restored item has the target's type and structure
    (a Linen dict, an `nnx.State` or a pure dict, whichever form was saved).
    `masks_like` is a params tree whose shapes the packed masks unpack to, so
    masks transfer into a freshly initialised model.

    A step saved without `scores` (older checkpoints; runs without learned
    masks) restores with `scores` None, whatever `scores_like`.

    Args:
      step: the step to read; None for the latest.
      verify: check what is read against the checksums in `meta` (steps
        saved before checksums existed are read unchecked). False salvages
        what can be read from a damaged step.

    Raises:
      CheckpointDamaged: an item missing, unreadable or failing its checksum
        (naming the step, item and leaf).
      CheckpointError: no checkpoint, a structure mismatch (naming the item
        and the first differing leaf path on both sides), or a leaf whose
        shape or dtype differs (naming it and both).
    """
    self.wait_until_finished()  # a save in flight is read whole, never half
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"No checkpoint in {self.directory}.")
    targets = {"params": params_like, "opt_state": opt_state_like,
               "train_state": train_state_like, "rewind": rewind_like, "scores": scores_like}
    targets = {name: target for name, target in targets.items() if target is not None}
    meta = self._read_meta(step, verify)
    if ("scores" in targets and not os.path.isdir(self._item_dir(step, "scores"))
        and "scores" not in (meta or {}).get(integrity.CHECKSUMS, {})
        and "scores" not in (meta or {}).get(EMPTY_ITEMS, ())):
      del targets["scores"]  # saved before the item existed, or by a run without scores
    empty = set((meta or {}).get(EMPTY_ITEMS, ()))
    data_targets = {name: _key_data(target) for name, target in targets.items()}
    args = {}
    for name, target in data_targets.items():
      if name in empty:  # saved without leaves: the target must have none either
        _check_same_paths(name, {}, _path_leaves(name, target))
        continue
      stored = self._stored_tree(step, name)
      _check_fits(name, stored, target)
      args[name] = ocp.args.StandardRestore(_restore_target(name, stored, target))
    if masks_like is not None:
      packed_target = self._packed_target(step, meta, masks_like)
      if packed_target:
        args["masks"] = ocp.args.StandardRestore(packed_target)
    restored = self._read(step, args) if args else {}
    if verify and restored:
      self._check_checksums(step, meta, {name: restored[name] for name in args})
    out = {name: self._rewrap_keys(name, plain_tree.from_plain(restored.get(name, {}), target),
                                   targets[name], meta)
           for name, target in data_targets.items()}
    if masks_like is not None:
      out["masks"] = self._unpack(restored.get("masks", {}), masks_like)
    return Restored(step=int(step), meta=meta, **out)

  @staticmethod
  def _rewrap_keys(item: str, tree: PyTree, target: PyTree, meta: dict | None) -> PyTree:
    """`tree` with the key data at each typed-key leaf of `target` made a key again.

    Raises:
      CheckpointError: naming the leaf, when the checkpoint's PRNG
        implementation of it differs from the target's.
    """
    if not any(_is_key(leaf) for leaf in jax.tree.leaves(target)):
      return tree
    saved = ((meta or {}).get(PRNG_KEYS) or {}).get(item, {})
    paths = list(_path_leaves(item, target))
    leaves, treedef = jax.tree.flatten(tree)
    wanted = jax.tree.leaves(target)
    out = []
    for path, got, want in zip(paths, leaves, wanted):
      if _is_key(want):
        impl = None if isinstance(want, jax.ShapeDtypeStruct) else str(jax.random.key_impl(want))
        if impl is not None and saved.get(path, impl) != impl:
          raise CheckpointError(
              f"Item {item!r}: leaf {path!r} is a {saved[path]} PRNG key in the checkpoint but "
              f"a {impl} key in the target.")
        got = jax.random.wrap_key_data(got, impl=impl or saved.get(path, "threefry2x32"))
        if got.dtype != want.dtype:  # an abstract target of another implementation
          raise CheckpointError(
              f"Item {item!r}: leaf {path!r} restores as a {got.dtype} PRNG key but the target "
              f"is {want.dtype}.")
      out.append(got)
    return jax.tree.unflatten(treedef, out)

  def verify(self, step: int) -> None:
    """Reads every item of `step` to the host and checks it against its checksums.

    A step that verifies counts as verified for `max_to_keep`: once one is,
    the steps beyond `max_to_keep` before it are deleted at the next save or
    `close` (so after a resume, the steps from before it are too).

    Raises:
      CheckpointDamaged: naming the step, item and leaf that is missing,
        unreadable or corrupted.
    """
    meta = self._read_meta(step, verify=True)
    recorded = meta.get(integrity.CHECKSUMS, {})
    on_disk = [name for name in ARRAY_ITEMS if os.path.isdir(self._item_dir(step, name))]
    args = {}
    for name in sorted(set(on_disk) | set(recorded)):
      host = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), self._stored_tree(step, name))
      args[name] = ocp.args.StandardRestore(host)
    if args:
      self._check_checksums(step, meta, self._read(step, args))
    # Counts for `max_to_keep` (a step verified after a resume lets older ones go).
    self._verified.add(step)

  def restore_latest_intact(self, log: Callable[[str], None] | None = None,
                            **targets: PyTree) -> Restored:
    """`restore(**targets)` of the newest step that verifies whole.

    Newer steps that are damaged are moved to `<directory>/damaged/` (kept,
    not deleted) and each is reported through `log` (default: a warning) in
    one line naming the step, item and leaf, and the step restored instead.
    Every item of a step is verified, also those not asked for.

    Raises:
      CheckpointError: no checkpoint; a structure mismatch with the targets
        (not a reason to fall back: an older step holds the same model).
      CheckpointDamaged: every step is damaged (all moved aside).
    """
    log = log or (lambda line: warnings.warn(line, stacklevel=3))
    self.wait_until_finished()
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"No checkpoint in {self.directory}.")
    for step in steps:
      try:
        self.verify(step)
        return self.restore(step, **targets)
      except CheckpointDamaged as e:
        where = ("Left in place (read-only)" if self.read_only
                 else f"Moved it to {self._set_aside(step)}")
        older = [s for s in steps if s < step]
        then = (f"trying step {older[0]}" if older else "no older step is left")
        log(f"{e} {where}; {then}.")
    if self.read_only:
      raise CheckpointDamaged(f"Every checkpoint in {self.directory} is damaged (steps {steps}).")
    raise CheckpointDamaged(
        f"Every checkpoint in {self.directory} is damaged (steps {steps}, now in "
        f"{os.path.join(self.directory, DAMAGED_DIR)}); start the run afresh.")

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step out of Orbax's sight into `damaged/`; returns where."""
    target = os.path.join(self.directory, DAMAGED_DIR, str(step))
    n = 1
    while os.path.exists(target):
      n += 1
      target = os.path.join(self.directory, DAMAGED_DIR, f"{step}.{n}")
    _barrier(f"set aside {step}")  # every process has read the step before it moves
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    _barrier(f"set aside {step} done")
    self._manager.reload()
    self._verified.discard(step)
    self._metric_values.pop(step, None)
    return target

  def _item_dir(self, step: int, name: str) -> str:
    return os.path.join(self.directory, str(step), name)

  def _read_meta(self, step: int, verify: bool) -> dict | None:
    """The step's meta; with `verify`, a missing or damaged one is CheckpointDamaged."""
    try:
      meta = self._read(step, {"meta": ocp.args.JsonRestore()}).meta
      if not isinstance(meta, dict) or not integrity.meta_is_intact(meta):
        raise CheckpointDamaged(
            f"Step {step} in {self.directory}: item 'meta' fails its checksum (corrupted).")
      if integrity.CHECKSUMS not in meta:
        self._check_pre_checksum(step, meta)
      if meta.get("step", step) != step:
        raise CheckpointDamaged(
            f"Step {step} in {self.directory}: item 'meta' records step {meta['step']!r}: "
            "a step copied or renamed to another number.")
    except CheckpointDamaged as e:
      if verify:
        raise
      warnings.warn(f"{e}; restoring without it.")
      return None
    return meta

  def _check_pre_checksum(self, step: int, meta: dict) -> None:
    """Accepts a meta without checksums only from a step saved before they existed.

    Such a step has every key old metas had, no format record in `meta`, and
    Orbax's metadata of the step is readable and holds no format record
    either; anything else is a meta that lost its checksums (stripped,
    rewritten): damage, not an old step.

    Raises:
      CheckpointDamaged: naming the step and what shows it is not old.
    """
    missing = [key for key in integrity.PRE_CHECKSUM_KEYS if key not in meta]
    if integrity.FORMAT in meta:
      why = f"its meta says checkpoint format {meta[integrity.FORMAT]!r}, which records them"
    elif missing:
      why = f"it lacks {missing}, which every meta has"
    else:
      why = self._format_record_says_new(step)
    if why:
      raise CheckpointDamaged(
          f"Step {step} in {self.directory}: item 'meta' has no checksums, but {why} "
          "(damaged meta).")
    warnings.warn(f"Step {step} in {self.directory} was saved before checkpoints had "
                  "checksums: it is read unchecked.", stacklevel=4)

  def _format_record_says_new(self, step: int) -> str | None:
    """Why Orbax's metadata of `step` does not show a step from before checksums
    (it records a format, or is missing or unreadable); None when it shows one."""
    path = os.path.join(self.directory, str(step), STEP_METADATA)
    try:
      with open(path) as f:
        record = json.load(f)
      custom = record.get("custom_metadata") or {}
    except (OSError, ValueError, AttributeError) as e:
      return f"its {STEP_METADATA} cannot show it is older ({type(e).__name__})"
    if FORMAT_RECORD in custom:
      return (f"its {STEP_METADATA} says checkpoint format {custom[FORMAT_RECORD]!r}, which "
              "records them")
    return None

  def _check_checksums(self, step: int, meta: dict | None, restored: dict) -> None:
    """Raises CheckpointDamaged at the first restored leaf that differs from its checksum."""
    recorded = (meta or {}).get(integrity.CHECKSUMS)
    if recorded is None:
      return  # saved before checksums: nothing to compare with
    for name, tree in restored.items():
      if name not in recorded:
        raise CheckpointDamaged(
            f"Step {step} in {self.directory}: item {name!r} is not in the step's checksums "
            "(damaged meta?).")
      problem = integrity.first_mismatch(_path_leaves(name, tree), recorded[name])
      if problem:
        raise CheckpointDamaged(
            f"Step {step} in {self.directory}: item {name!r}, {problem}: the data is corrupted.")

  def _stored_tree(self, step: int, name: str) -> PyTree:
    """Shapes and dtypes of one stored item, read from its own metadata."""
    path = self._item_dir(step, name)
    if not os.path.isdir(path):
      raise CheckpointDamaged(f"Step {step} in {self.directory} has no item {name!r}.")
    try:
      return ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
    except Exception as e:  # Orbax raises several types for damaged metadata
      raise CheckpointDamaged(
          f"Step {step} in {self.directory}: item {name!r} cannot be read (truncated or "
          f"corrupted?): {type(e).__name__}: {_first_line(e)}") from e

  def _read(self, step: int, args: dict):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**args))
    except CheckpointError:
      raise
    except Exception as e:  # truncated or corrupted files surface as many types
      raise CheckpointDamaged(
          f"Step {step} in {self.directory}: item(s) {sorted(args)} cannot be read "
          f"(truncated or corrupted?): {type(e).__name__}: {_first_line(e)}") from e

  def _packed_target(self, step: int, meta: dict, masks_like: PyTree) -> dict:
    """The packed uint8 arrays to expect, checked against the target's shapes."""
    meta = meta or {}
    stored = ({} if "masks" in meta.get(EMPTY_ITEMS, ()) else
              _path_leaves("masks", self._stored_tree(step, "masks")))
    stored_shapes = meta.get("mask_shapes", {})
    wanted = _path_leaves("masks", masks_like)
    if "mask_tree_paths" in meta:  # every leaf of the saved model, pruned or not
      model = {path: jax.ShapeDtypeStruct(tuple(stored_shapes[path]), bool)
               if path in stored_shapes else None for path in meta["mask_tree_paths"]}
      _check_same_paths("masks", model, wanted, where="checkpoint's model")
    target = {}
    for path, packed in stored.items():
      if path not in wanted:
        raise CheckpointError(
            f"Item 'masks': structure mismatch: the checkpoint has leaf {path!r} (shape "
            f"{tuple(stored_shapes.get(path, ()))}) that the target lacks: a checkpoint of "
            "another model?")
      shape = tuple(np.shape(wanted[path]))
      if stored_shapes.get(path) is not None and tuple(stored_shapes[path]) != shape:
        raise CheckpointError(
            f"Item 'masks': leaf {path!r} has shape {tuple(stored_shapes[path])} in the checkpoint "
            f"but {shape} in the target.")
      expected = -(-int(np.prod(shape)) // 8)
      if tuple(packed.shape) != (expected,):
        raise CheckpointError(
            f"Item 'masks': leaf {path!r} holds {packed.shape[0] if packed.shape else 0} packed "
            f"bytes but a {shape} weight needs {expected}.")
      target[path] = jax.ShapeDtypeStruct((expected,), np.uint8)
    return target

  @staticmethod
  def _unpack(packed: dict, masks_like: PyTree) -> PyTree:
    leaves = [packed.get(path) for path in plain_tree.path_leaves(masks_like)]
    return masks_lib.unpack_masks(jax.tree.unflatten(jax.tree.structure(masks_like), leaves),
                                  masks_like)

  def latest_step(self) -> int | None:
    """The newest saved step (None when there is none); it may be damaged: `restore` checks."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step, in increasing order."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the best `best_metric` value (None without one)."""
    scored = [(self._best_sign * value, step) for step in self.all_steps()
              if (value := self._metric(step)) is not None]
    return max(scored)[1] if scored else None

  def _metric(self, step: int) -> float | None:
    if self._best_metric is None:
      return None
    if step not in self._metric_values:
      meta = self._read_meta(step, verify=False) or {}
      self._metric_values[step] = meta.get("best_metric")
    return self._metric_values[step]

  def wait_until_finished(self) -> None:
    """Waits for the save in flight; then, with `max_to_keep` and more steps
    than that on disk, verifies the steps saved since (reading them back) and
    deletes the steps they make surplus.

    Raises:
      CheckpointWriteError: the save in flight failed (naming its step).
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # a full disk surfaces here from the writing thread
      pending, self._pending = self._pending, []
      raise CheckpointWriteError(
          f"Writing step {pending[-1] if pending else '?'} to {self.directory} failed: "
          f"{type(e).__name__}: {_first_line(e)}; the steps saved before it are intact.") from e
    if self._max_to_keep is None:
      self._pending = []
      return
    steps = self.all_steps()
    # Steps replaced or set aside since they were saved are no longer pending.
    self._pending = [step for step in dict.fromkeys(self._pending) if step in steps]
    if len(steps) <= self._max_to_keep:
      return  # nothing to delete yet: the new steps are verified when something is
    for step in self._pending:
      try:
        self.verify(step)
        self._verified.add(step)
      except CheckpointDamaged as e:
        warnings.warn(f"{e} (just written: moved to {self._set_aside(step)}).")
    self._pending = []
    self._collect_garbage()

  def _collect_garbage(self) -> None:
    """Deletes steps beyond `max_to_keep`, never one newer than the newest verified step."""
    if self.read_only or not self._verified:
      return
    newest = max(self._verified)
    candidates = [step for step in self.all_steps() if step <= newest]
    if self._best_metric is None:
      keep = set(candidates[-self._max_to_keep:])
    else:
      scored = sorted(((self._best_sign * value, step) for step in candidates
                       if (value := self._metric(step)) is not None), reverse=True)
      unscored = {step for step in candidates if self._metric(step) is None}
      keep = {step for _, step in scored[:self._max_to_keep]} | unscored
    for step in candidates:
      if step not in keep:
        self._manager.delete(step)
        self._metric_values.pop(step, None)

  def close(self) -> None:
    """Waits for writes in progress, then releases the manager (also on leaving a `with`)."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self) -> "SparseCheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
