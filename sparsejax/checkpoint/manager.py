"""Orbax checkpoints of sparse training, with masks and weights as separate items.

One `orbax.checkpoint.CheckpointManager` per directory; each step holds the
items that were given to `save`:

  params       the weights (pruned entries are 0.0), a plain Orbax pytree;
  masks        {'/'-joined path: uint8 array}, each mask packed to 1 bit per
               weight with `sparsejax.pack_masks` (unpruned leaves absent);
  opt_state    the optimizer state (it holds a `PruningState`);
  train_state  whatever else a resumed run needs (BatchNorm statistics, RNG);
  rewind       weights and optimizer state at a rewind point (lottery runs);
  meta         JSON: step, level, mask shapes, per-leaf sparsity, versions
               and any caller fields (the config, ...).

Every item is readable with plain Orbax, for example
`ocp.StandardCheckpointer().restore(f"{directory}/{step}/params")`. Steps are
written to a temporary directory and renamed when complete, so a killed save
never becomes the latest step.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sparsejax import masks as masks_lib
from sparsejax import trees

PyTree = Any
ARRAY_ITEMS = ("params", "masks", "opt_state", "train_state", "rewind")
ITEMS = ARRAY_ITEMS + ("meta",)
_VERSIONED = ("sparsejax", "jax", "flax", "optax", "orbax-checkpoint")


class CheckpointError(ValueError):
  """A checkpoint item is missing, unreadable or does not fit its target."""


class Restored(NamedTuple):
  """Items restored from one step; None for each item not asked for."""
  step: int
  params: PyTree = None
  masks: PyTree = None
  opt_state: PyTree = None
  train_state: PyTree = None
  rewind: PyTree = None
  meta: dict | None = None


def package_versions() -> dict[str, str]:
  """Installed versions of sparsejax and the JAX stack, recorded in `meta`."""
  out = {}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def _pack(masks: PyTree) -> dict[str, np.ndarray]:
  return {leaf.path: leaf.value for leaf in trees.named_leaves(masks_lib.pack_masks(masks))}


def _check_fits(item: str, stored: PyTree, target: PyTree) -> None:
  """Raises CheckpointError naming the first leaf of `target` that `stored` lacks or sizes differently."""
  stored_leaves = {leaf.path: leaf.value for leaf in trees.named_leaves(stored)}
  target_leaves = trees.named_leaves(target)
  for leaf in target_leaves:
    if leaf.path not in stored_leaves:
      raise CheckpointError(
          f"Item {item!r}: leaf {leaf.path!r} of the target is not in the checkpoint "
          f"(which has {sorted(stored_leaves)[:8]}...): a checkpoint of another model?")
    have, want = stored_leaves[leaf.path], leaf.value
    if tuple(have.shape) != tuple(np.shape(want)):
      raise CheckpointError(
          f"Item {item!r}: leaf {leaf.path!r} has shape {tuple(have.shape)} in the checkpoint "
          f"but {tuple(np.shape(want))} in the target.")
    have_dtype, want_dtype = getattr(have, "dtype", None), getattr(want, "dtype", None)
    if have_dtype is not None and want_dtype is not None and \
        np.dtype(have_dtype) != np.dtype(want_dtype):
      raise CheckpointError(
          f"Item {item!r}: leaf {leaf.path!r} is {np.dtype(have_dtype)} in the checkpoint but "
          f"{np.dtype(want_dtype)} in the target (restoring would cast it).")
  extra = sorted(set(stored_leaves) - {leaf.path for leaf in target_leaves})
  if extra:
    raise CheckpointError(
        f"Item {item!r}: the checkpoint has leaf {extra[0]!r} that the target lacks: "
        "a checkpoint of another model?")


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

  Args:
    directory: where the steps live (created if absent).
    max_to_keep: keep only the newest N steps (None keeps all).
    best_metric: with `max_to_keep`, keep the best N steps by this key of the
      `metrics` passed to `save` instead of the newest.
    best_mode: 'max' or 'min' for `best_metric`.
    async_save: write in a background thread (call `wait_until_finished`
      before reading; closing the manager waits).
  """

  def __init__(self, directory: str, max_to_keep: int | None = None,
               best_metric: str | None = None, best_mode: str = "max", async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        best_fn=(lambda metrics: float(metrics[best_metric])) if best_metric else None,
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.directory = os.path.abspath(directory)  # Orbax refuses relative paths
    # Handlers named up front, so a new manager can read metadata of old steps.
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def save(self, step: int, *, params: PyTree = None, masks: PyTree = None, opt_state: PyTree = None,
           train_state: PyTree = None, rewind: PyTree = None, meta: dict | None = None,
           metrics: dict | None = None, level: int | None = None) -> bool:
    """Saves the given items at `step` (asynchronously unless disabled).

    Args:
      step: the step number; a step already saved is an Orbax error.
      params, opt_state, train_state, rewind: pytrees saved as they are.
      masks: bool masks (None for unpruned leaves), packed to 1 bit per weight.
      meta: JSON-serialisable fields (the config, ...), completed with the
        step, level, mask shapes, per-leaf sparsity and package versions.
      metrics: {name: value}, used by `best_metric`.
      level: the pruning level (lottery runs).

    Returns:
      Whether a save was started (Orbax may skip one by its save policy).
    """
    items = {"params": params, "opt_state": opt_state, "train_state": train_state,
             "rewind": rewind}
    args = {name: ocp.args.StandardSave(value) for name, value in items.items() if value is not None}
    meta = dict(meta or {})
    meta.update(step=int(step), level=level, versions=package_versions())
    if masks is not None:
      if params is not None:
        trees.check_same_structure(params, masks)
      args["masks"] = ocp.args.StandardSave(_pack(masks))
      meta["mask_shapes"] = {leaf.path: list(np.shape(leaf.value))
                             for leaf in trees.named_leaves(masks)}
      # Every leaf of the model, pruned or not: a masks-only restore into
      # another architecture must fail, not leave its extra layers dense.
      meta["mask_tree_paths"] = [leaf.path for leaf in trees.named_leaves(masks, keep_none=True)]
      meta["sparsity"] = {path: leaf.sparsity
                          for path, leaf in masks_lib.sparsity_report(masks).leaves.items()}
    args["meta"] = ocp.args.JsonSave(meta)
    return self._manager.save(int(step), args=ocp.args.Composite(**args), metrics=metrics)

  def restore(self, step: int | None = None, *, params_like: PyTree = None, masks_like: PyTree = None,
              opt_state_like: PyTree = None, train_state_like: PyTree = None,
              rewind_like: PyTree = None) -> Restored:
    """Restores the items whose targets are given (and always `meta`).

    Each `*_like` is a target pytree (arrays or `jax.ShapeDtypeStruct`s, with
    shardings where wanted) whose structure and shapes the stored item must
    match; `masks_like` is a params tree whose shapes the packed masks unpack
    to, so masks transfer into a freshly initialised model.

    Args:
      step: the step to read; None for the latest.

    Raises:
      CheckpointError: no checkpoint, an item missing or unreadable, or a
        stored tree that differs from the target (naming the item, the first
        differing leaf and both shapes).
    """
    self.wait_until_finished()  # a save in flight is read whole, never half
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"No checkpoint in {self.directory}.")
    targets = {"params": params_like, "opt_state": opt_state_like,
               "train_state": train_state_like, "rewind": rewind_like}
    targets = {name: target for name, target in targets.items() if target is not None}
    try:
      meta = self._read(step, {"meta": ocp.args.JsonRestore()}).meta
    except CheckpointError as e:  # the other items are still worth restoring
      warnings.warn(f"{e}; restoring without it.")
      meta = None
    args = {}
    for name, target in targets.items():
      _check_fits(name, self._stored_tree(step, name), target)
      args[name] = ocp.args.StandardRestore(target)
    if masks_like is not None:
      packed_target = self._packed_target(step, meta, masks_like)
      args["masks"] = ocp.args.StandardRestore(packed_target)
    restored = self._read(step, args) if args else None
    out = {name: restored[name] for name in args} if restored is not None else {}
    if "masks" in out:
      out["masks"] = self._unpack(out["masks"], masks_like)
    return Restored(step=int(step), meta=meta, **out)

  def _stored_tree(self, step: int, name: str) -> PyTree:
    """Shapes and dtypes of one stored item, read from its own metadata."""
    path = os.path.join(self.directory, str(step), name)
    if not os.path.isdir(path):
      raise CheckpointError(f"Step {step} in {self.directory} has no item {name!r}.")
    try:
      return ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
    except Exception as e:  # Orbax raises several types for damaged metadata
      raise CheckpointError(
          f"Item {name!r} of step {step} in {self.directory} cannot be read (truncated or "
          f"corrupted?): {type(e).__name__}: {e}") from e

  def _read(self, step: int, args: dict):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**args))
    except CheckpointError:
      raise
    except Exception as e:  # truncated or corrupted files surface as many types
      raise CheckpointError(
          f"Item(s) {sorted(args)} of step {step} in {self.directory} cannot be read "
          f"(truncated or corrupted?): {type(e).__name__}: {e}") from e

  def _packed_target(self, step: int, meta: dict, masks_like: PyTree) -> dict:
    """The packed uint8 arrays to expect, checked against the target's shapes."""
    stored = {leaf.path: leaf.value for leaf in trees.named_leaves(self._stored_tree(step, "masks"))}
    meta = meta or {}
    stored_shapes = meta.get("mask_shapes", {})
    wanted = {leaf.path: leaf.value for leaf in trees.named_leaves(masks_like)}
    if "mask_tree_paths" in meta:
      stored_paths = set(meta["mask_tree_paths"])
      missing = [path for path in wanted if path not in stored_paths]
      if missing:
        raise CheckpointError(
            f"Item 'masks': leaf {missing[0]!r} of the target is not in the checkpoint's model: "
            "a checkpoint of another model?")
    target = {}
    for path, packed in stored.items():
      if path not in wanted:
        raise CheckpointError(
            f"Item 'masks': leaf {path!r} (shape {tuple(stored_shapes.get(path, ()))}) is not in "
            "the target params: a checkpoint of another model?")
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
    leaves = [packed.get(leaf.path) for leaf in trees.named_leaves(masks_like)]
    return masks_lib.unpack_masks(jax.tree.unflatten(jax.tree.structure(masks_like), leaves),
                                  masks_like)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "SparseCheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
