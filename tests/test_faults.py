"""Fault injection on checkpoints: every damaged step ends in a one-line report
and an exact fallback to the step before it, never in a silent wrong result.

Each file of the newest step is in turn flipped (one byte), truncated to half
or deleted; a fresh manager then resumes with `restore_latest_intact`, as a
restarted run does. The outcome must be the newest step bitwise (the damage
did not touch data: a lock file, a commit marker) or the older step bitwise
with one line naming the damaged step and item.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax.checkpoint import CheckpointDamaged
from sparsejax.checkpoint import CheckpointError
from sparsejax.checkpoint import CheckpointWriteError
from sparsejax.checkpoint import SparseCheckpointManager
from sparsejax.checkpoint import manager as manager_lib
from tests import reference
from tests import one_device_env

ITEMS = ("params", "masks", "opt_state", "train_state", "meta")


def _state(seed: int) -> dict:
  """A small sparse-training state whose every value depends on `seed`."""
  keys = jax.random.split(jax.random.key(seed), 4)
  # 'dense' is big enough that Orbax stores it raw: a flipped byte there reads
  # back without error as a wrong weight (what checksums are for).
  params = {"conv": {"kernel": jax.random.normal(keys[0], (3, 3, 4, 8)), "bias": jnp.zeros(8)},
            "dense": {"kernel": jax.random.normal(keys[3], (300, 64))},
            "head": {"kernel": jax.random.normal(keys[1], (72, 10)), "bias": jnp.ones(10)}}
  masks = sparsejax.magnitude_masks(params, 0.7)
  params = sparsejax.apply_masks(params, masks)
  opt_state = optax.adam(1e-3).init(params)
  train_state = {"rng": jax.random.key_data(keys[2])}
  return {"params": params, "masks": masks, "opt_state": opt_state, "train_state": train_state}


def _save(manager: SparseCheckpointManager, step: int, state: dict) -> None:
  manager.save(step, params=state["params"], masks=state["masks"],
               opt_state=state["opt_state"], train_state=state["train_state"])


def _targets(like: dict) -> dict:
  return {"params_like": like["params"], "masks_like": like["params"],
          "opt_state_like": like["opt_state"], "train_state_like": like["train_state"]}


def _assert_restored(restored, state: dict) -> None:
  for name in ("params", "masks", "opt_state", "train_state"):
    chex.assert_trees_all_equal(getattr(restored, name), state[name])


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A checkpoint directory with step 1 and step 2 (different states), and the states."""
  directory = str(tmp_path_factory.mktemp("faults") / "checkpoints")
  states = {1: _state(1), 2: _state(2)}
  with SparseCheckpointManager(directory) as manager:
    for step, state in states.items():
      _save(manager, step, state)
  return directory, states


def _flip(path: str) -> None:
  with open(path, "r+b") as f:
    size = os.path.getsize(path)
    f.seek(size // 2)
    byte = f.read(1)
    f.seek(size // 2)
    f.write(bytes([byte[0] ^ 0xFF]) if byte else b"\xff")


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


FAULTS = {"flip": _flip, "truncate": _truncate, "delete": os.remove}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_damaged_file_of_the_newest_step_falls_back_exactly_or_is_harmless(
    two_steps, fault, tmp_path):
  source, states = two_steps
  files = sorted(os.path.relpath(os.path.join(root, name), source)
                 for root, _, names in os.walk(os.path.join(source, "2")) for name in names)
  assert len(files) > 20
  outcomes = {}
  for i, name in enumerate(files):
    directory = str(tmp_path / str(i))
    shutil.copytree(source, directory)
    FAULTS[fault](os.path.join(directory, name))
    lines = []
    with SparseCheckpointManager(directory) as manager:
      restored = manager.restore_latest_intact(log=lines.append, **_targets(states[1]))
      steps_left = manager.all_steps()
    if restored.step == 2:  # the damage did not reach the data
      assert not lines, (name, lines)
      _assert_restored(restored, states[2])
      outcomes[name] = "harmless"
      continue
    _assert_restored(restored, states[1])
    assert steps_left == [1] and os.path.isdir(os.path.join(directory, "damaged", "2"))
    assert len(lines) == 1 and "\n" not in lines[0], (name, lines)
    assert lines[0].startswith("Step 2 in "), lines[0]
    item = name.split(os.sep)[1]
    if item in ITEMS:  # the report names the item whose file was damaged
      assert f"'{item}'" in lines[0], (name, lines[0])
    outcomes[name] = lines[0]
  reported = [line for line in outcomes.values() if line != "harmless"]
  # Every data item's loss is caught, and flipped bytes inside array data
  # (which read back without error) are caught by the checksums.
  for item in ITEMS:
    assert any(f"'{item}'" in line for line in reported), (item, outcomes)
  if fault == "flip":
    for item in ("params", "masks"):  # opt_state is zeros here: compressed, so unreadable
      assert any(f"'{item}', leaf" in line and "fails its checksum" in line
                 for line in reported), (item, outcomes)


def test_a_changed_weight_is_named_by_item_and_leaf(two_steps, tmp_path):
  source, states = two_steps
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(source, directory)
  # Step 2 rewritten with one weight changed under its old meta: what a flipped
  # bit inside array data does, whatever the file layout.
  changed = jax.tree.map(np.array, states[2]["params"])
  changed["head"]["kernel"][3, 4] = -2.3e33
  with SparseCheckpointManager(directory) as manager:
    meta = manager.restore(2).meta
    manager.save(2, params=changed, masks=states[2]["masks"], opt_state=states[2]["opt_state"],
                 train_state=states[2]["train_state"], overwrite=True)
  _rewrite_meta(directory, 2, meta)
  with SparseCheckpointManager(directory) as manager:
    with pytest.raises(CheckpointDamaged, match=r"^Step 2 in .*: item 'params', leaf "
                                                r"'head/kernel' fails its checksum"):
      manager.restore(2, params_like=states[2]["params"])
    # The other items are intact and restore.
    np.testing.assert_array_equal(manager.restore(2, masks_like=states[2]["params"]).masks[
        "head"]["kernel"], states[2]["masks"]["head"]["kernel"])


def _rewrite_meta(directory: str, step: int, meta: dict) -> None:
  with open(os.path.join(directory, str(step), "meta", "metadata"), "w") as f:
    json.dump(meta, f)


def test_all_steps_damaged_is_one_error_and_every_step_is_kept(two_steps, tmp_path):
  source, states = two_steps
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(source, directory)
  for step in (1, 2):
    os.remove(os.path.join(directory, str(step), "params", "_METADATA"))
  with SparseCheckpointManager(directory) as manager:
    with pytest.warns(UserWarning, match="Step 2 in .*'params'"), \
        pytest.raises(CheckpointDamaged, match=r"Every checkpoint in .* is damaged \(steps \[2, 1\]"):
      manager.restore_latest_intact(**_targets(states[1]))
  assert sorted(os.listdir(os.path.join(directory, "damaged"))) == ["1", "2"]


def test_a_structure_mismatch_does_not_fall_back(two_steps, tmp_path):
  source, states = two_steps
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(source, directory)
  other = {"head": states[1]["params"]["head"]}
  with SparseCheckpointManager(directory) as manager:
    with pytest.raises(CheckpointError, match="structure mismatch") as raised:
      manager.restore_latest_intact(params_like=other)
    assert not isinstance(raised.value, CheckpointDamaged)
    assert manager.all_steps() == [1, 2]


def test_an_unverified_new_step_never_costs_an_older_intact_one(two_steps, tmp_path):
  _, states = two_steps
  directory = str(tmp_path / "checkpoints")
  manager = SparseCheckpointManager(directory, max_to_keep=1, async_save=False)
  _save(manager, 1, states[1])
  _save(manager, 2, states[2])  # verifies step 1 first; step 2 is not verified yet
  assert manager.all_steps() == [1, 2]
  _flip_data_of(directory, 2, "params")
  with pytest.warns(UserWarning, match=r"Step 2 in .*: item 'params'.*just written"):
    manager.wait_until_finished()  # verifies step 2: damaged, so step 1 stays
  assert manager.all_steps() == [1]
  _save(manager, 3, states[2])
  manager.close()  # verifies step 3, which makes step 1 surplus
  with SparseCheckpointManager(directory) as reopened:
    assert reopened.all_steps() == [3]
    _assert_restored(reopened.restore(**_targets(states[1])), states[2])


def test_after_a_resume_the_steps_from_before_it_count_for_max_to_keep(two_steps, tmp_path):
  _, states = two_steps
  directory = str(tmp_path / "checkpoints")
  killed = SparseCheckpointManager(directory, max_to_keep=3, async_save=False)
  for step in (1, 2, 3, 4):  # step 4 is written, then the run is killed before verifying it
    _save(killed, step, states[1 + step % 2])
  assert killed.all_steps() == [1, 2, 3, 4]
  with SparseCheckpointManager(directory, max_to_keep=3) as resumed:
    restored = resumed.restore_latest_intact(**_targets(states[1]))
  assert restored.step == 4
  _assert_restored(restored, states[1])  # step 4 holds states[1 + 4 % 2]
  with SparseCheckpointManager(directory) as reopened:
    assert reopened.all_steps() == [2, 3, 4]  # 4 verified at the resume: step 1 is surplus


def _flip_data_of(directory: str, step: int, item: str) -> None:
  """Flips a byte in every chunk file of one item's array data.

  `item` may be 'params' or, for a run's workdir, 'checkpoints/params'.
  """
  parent, _, name = item.rpartition("/")
  root = os.path.join(directory, parent, str(step), name)
  for base, _, names in os.walk(root):
    if os.path.basename(base) == "d":
      for name in names:
        _flip(os.path.join(base, name))


def test_saving_a_step_twice_is_an_error_unless_overwrite(two_steps, tmp_path):
  _, states = two_steps
  with SparseCheckpointManager(str(tmp_path)) as manager:
    _save(manager, 5, states[1])
    with pytest.raises(CheckpointError, match=r"Step 5 is already saved in .*overwrite=True"):
      _save(manager, 5, states[2])
    _assert_restored(manager.restore(**_targets(states[1])), states[1])  # nothing lost
    manager.save(5, params=states[2]["params"], masks=states[2]["masks"],
                 opt_state=states[2]["opt_state"], train_state=states[2]["train_state"],
                 overwrite=True)
    _assert_restored(manager.restore(**_targets(states[1])), states[2])


def test_a_failed_overwrite_keeps_the_old_step(two_steps, tmp_path, monkeypatch):
  _, states = two_steps
  directory = str(tmp_path / "checkpoints")
  with SparseCheckpointManager(directory) as manager:
    _save(manager, 5, states[1])
    saves = manager_lib.ocp.CheckpointManager.save

    def half_written(self, step, *args, **kwargs):  # the write dies after it began
      saves(self, step, *args, **kwargs)
      if manager_lib.OVERWRITE_DIR in str(self.directory):
        raise OSError(errno.ENOSPC, "No space left on device")
      return True

    monkeypatch.setattr(manager_lib.ocp.CheckpointManager, "save", half_written)
    with pytest.raises(CheckpointWriteError, match=r"^Replacing step 5 in .* failed: .*No space "
                                                   r"left on device.*; the step saved before "
                                                   r"stays\.$"):
      _save_overwriting(manager, 5, states[2])
    monkeypatch.undo()
    assert manager.all_steps() == [5]
    _assert_restored(manager.restore(**_targets(states[1])), states[1])
  assert sorted(os.listdir(directory)) == ["5"]  # the half-written step is gone


def _save_overwriting(manager, step, state):
  manager.save(step, params=state["params"], masks=state["masks"], opt_state=state["opt_state"],
               train_state=state["train_state"], overwrite=True)


@pytest.mark.parametrize("killed", ["before_the_swap", "between_the_renames", "after_the_swap"])
def test_an_overwrite_killed_at_any_point_leaves_one_whole_step(two_steps, killed, tmp_path):
  """The directory as a kill leaves it at each point of `save(2, overwrite=True)`
  (the new step holds states[1], the old one states[2])."""
  source, states = two_steps
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(source, directory)
  work = os.path.join(directory, manager_lib.OVERWRITE_DIR)
  os.makedirs(os.path.join(work, "new"))
  new = os.path.join(work, "new", "2")
  shutil.copytree(os.path.join(directory, "2"), new)  # a whole new step 2...
  with SparseCheckpointManager(os.path.join(work, "new")) as writer:  # ...holding states[1]
    _save_overwriting(writer, 2, states[1])
  if killed != "before_the_swap":
    os.rename(os.path.join(directory, "2"), os.path.join(work, "2.replaced"))
  if killed == "after_the_swap":
    os.rename(new, os.path.join(directory, "2"))
  with SparseCheckpointManager(directory) as manager:
    assert manager.all_steps() == [1, 2]
    manager.verify(2)
    restored = manager.restore(2, **_targets(states[1]))
  _assert_restored(restored, states[1] if killed == "after_the_swap" else states[2])
  assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing left over


def _mount_small_tmpfs(path: str, size: str) -> bool:
  """Mounts a size-limited tmpfs at `path` (needs root); False where not allowed."""
  if os.geteuid() != 0 or shutil.which("mount") is None:
    return False
  os.makedirs(path, exist_ok=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                        capture_output=True)
  return done.returncode == 0


def test_a_full_disk_is_one_error_and_the_earlier_steps_stay_intact(two_steps, tmp_path,
                                                                    monkeypatch):
  _, states = two_steps
  mount = str(tmp_path / "small")
  real = _mount_small_tmpfs(mount, "800k")  # two steps fit
  try:
    manager = SparseCheckpointManager(os.path.join(mount, "checkpoints"))
    if not real:  # no tmpfs here: the disk fills at the third save
      saves = manager._manager.save

      def filling(step, *args, **kwargs):
        if step >= 3:
          raise OSError(errno.ENOSPC, "No space left on device")
        return saves(step, *args, **kwargs)

      monkeypatch.setattr(manager._manager, "save", filling)
    with pytest.raises(CheckpointWriteError, match=r"Writing step \d+ to .* failed: .*"
                                                   r"(No space left|RESOURCE_EXHAUSTED)"):
      for step in range(1, 40):
        _save(manager, step, states[1 + step % 2])
      manager.wait_until_finished()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      try:
        manager.close()
      except CheckpointWriteError:
        pass
    saved = SparseCheckpointManager(os.path.join(mount, "checkpoints"))
    assert len(saved.all_steps()) >= 1
    for step in saved.all_steps():  # every step that counts as saved is whole
      saved.verify(step)
      _assert_restored(saved.restore(step, **_targets(states[1])), states[1 + step % 2])
    saved.close()
  finally:
    if real:
      subprocess.run(["umount", mount], check=False)


def _strip_format_record(directory: str, step: int) -> None:
  """Removes the format record from Orbax's metadata of a step (as steps saved
  before checksums have none)."""
  path = os.path.join(directory, str(step), manager_lib.STEP_METADATA)
  with open(path) as f:
    record = json.load(f)
  record["custom_metadata"] = {}
  with open(path, "w") as f:
    json.dump(record, f)


def _as_before_checksums(meta: dict) -> dict:
  """`meta` as a version before checksums wrote it (step, level, versions, fields)."""
  return {key: value for key, value in meta.items()
          if key not in ("checksums", "meta_checksum", "format")}


def test_restore_without_checksums_reads_steps_saved_before_them(two_steps, tmp_path):
  """Steps written before checksums existed restore (unchecked, with a warning), as before."""
  source, states = two_steps
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(source, directory)
  with SparseCheckpointManager(directory) as manager:
    meta = manager.restore(1).meta
  assert meta["format"] == 2
  _rewrite_meta(directory, 1, _as_before_checksums(meta))
  _strip_format_record(directory, 1)
  with SparseCheckpointManager(directory) as manager:
    with pytest.warns(UserWarning, match=r"^Step 1 in .* was saved before checkpoints had "
                                         r"checksums: it is read unchecked\.$"):
      manager.verify(1)
    with pytest.warns(UserWarning, match="read unchecked"):
      _assert_restored(manager.restore(1, **_targets(states[1])), states[1])


STRIPPED_METAS = {
    # What is left of step 2's meta, and whether Orbax's record of its format is kept.
    "checksum_keys_removed": (lambda meta: {k: v for k, v in meta.items()
                                            if k not in ("checksums", "meta_checksum")}, True),
    "old_looking_meta": (_as_before_checksums, True),
    "empty_meta": (lambda meta: {}, True),
    "empty_meta_and_no_orbax_record": (lambda meta: {}, False),
    "old_looking_meta_and_no_orbax_metadata_file": (_as_before_checksums, None),
}


@pytest.mark.parametrize("case", sorted(STRIPPED_METAS))
def test_a_meta_stripped_of_its_checksums_is_damage_and_falls_back(two_steps, case, tmp_path):
  source, states = two_steps
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(source, directory)
  strip, keep_record = STRIPPED_METAS[case]
  with SparseCheckpointManager(directory) as manager:
    meta = manager.restore(2).meta
  _rewrite_meta(directory, 2, strip(meta))  # valid JSON, no checksums
  if keep_record is False:
    _strip_format_record(directory, 2)
  elif keep_record is None:
    os.remove(os.path.join(directory, "2", manager_lib.STEP_METADATA))
  # Weights that read back without error but are wrong (step 1's): restoring
  # step 2 unchecked would resume from them.
  shutil.rmtree(os.path.join(directory, "2", "params"))
  shutil.copytree(os.path.join(directory, "1", "params"), os.path.join(directory, "2", "params"))
  lines = []
  with SparseCheckpointManager(directory) as manager:
    restored = manager.restore_latest_intact(log=lines.append, **_targets(states[1]))
  _assert_restored(restored, states[1])
  assert len(lines) == 1 and re.match(
      r"Step 2 in .*: item 'meta' has no checksums, but .*\(damaged meta\)\. Moved it to "
      r".*damaged/2; trying step 1\.$", lines[0]), lines


def test_a_step_copied_to_another_number_is_damage_and_not_resumed_as_that_step(two_steps,
                                                                               tmp_path):
  source, states = two_steps
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(source, directory)
  shutil.copytree(os.path.join(directory, "1"), os.path.join(directory, "7"))
  lines = []
  with SparseCheckpointManager(directory) as manager:
    with pytest.raises(CheckpointDamaged, match=r"^Step 7 in .*: item 'meta' records step 1: "
                                                r"a step copied or renamed to another number\.$"):
      manager.restore(7, params_like=states[1]["params"])
    restored = manager.restore_latest_intact(log=lines.append, **_targets(states[1]))
  assert restored.step == 2
  _assert_restored(restored, states[2])
  assert len(lines) == 1 and "Step 7 in" in lines[0] and "trying step 2" in lines[0], lines


def test_checksums_are_crc32_of_the_array_bytes():
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  assert manager_lib.integrity.leaf_checksum(jnp.asarray(x)) == f"{zlib.crc32(x.tobytes()):08x}"
  assert manager_lib.integrity.leaf_checksum(x.T) == f"{zlib.crc32(x.T.copy().tobytes()):08x}"


@pytest.mark.parametrize("array", [
    np.arange(-6, 6, dtype=np.float32).reshape(3, 4) / 7,
    np.array([[True, False, True], [False, False, True]]),
    np.arange(7, dtype=np.uint8) * 37,
    np.float32(-2.5),
    np.arange(24, dtype=np.int32).reshape(2, 3, 4) * 7919,
], ids=["float32", "bool", "uint8", "scalar", "int32"])
def test_mix32_sums_equal_numpy_whatever_the_layout_and_see_every_flipped_byte(array):
  integrity = manager_lib.integrity
  want = reference.mix32(array)
  assert integrity.mix32(array) == want
  if np.ndim(array) and np.shape(array)[0] % 2 == 0:  # the same sum from the shards of 2 devices
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    sharded = jax.device_put(array, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("fsdp")))
    assert integrity.mix32(sharded) == want
  raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
  for index in range(raw.size):
    for bit in (0, 7):
      damaged = raw.copy()
      damaged[index] ^= 1 << bit
      damaged = damaged.view(np.asarray(array).dtype).reshape(np.shape(array))
      assert integrity.first_mismatch({"w": damaged}, {"w": want}) == (
          f"leaf 'w' fails its checksum ({integrity.mix32(damaged)}, saved as {want})")
  assert integrity.first_mismatch({"w": array}, {"w": want}) is None


class _Stop(Exception):
  """Raised from a training callback: the run ends there, as if killed."""


def _stop(state):
  raise _Stop()


def test_a_resumed_run_falls_back_past_a_damaged_step_and_ends_bitwise_equal(tiny_config, tmp_path):
  from experiments import metrics as metrics_lib
  from experiments import trainer as trainer_lib
  tiny_config.checkpoint_every = 10
  tiny_config.keep_checkpoints = 2
  trainer = trainer_lib.Trainer(tiny_config)
  whole = trainer.fit(str(tmp_path / "whole"), log=lambda line: None)
  cut = str(tmp_path / "cut")
  with pytest.raises(_Stop):
    trainer.fit(cut, log=lambda line: None, callbacks={35: _stop})
  checkpoints = os.path.join(cut, trainer_lib.CHECKPOINT_DIR)
  assert sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit()) == [20, 30]
  _flip_data_of(os.path.dirname(checkpoints), 30, "checkpoints/params")  # damage step 30
  lines = []
  resumed = trainer.fit(cut, log=lines.append, resume=True)
  damaged = [line for line in lines if "Step 30 in" in line]
  assert len(damaged) == 1 and "item 'params'" in damaged[0] and "trying step 20" in damaged[0]
  assert "resuming from the checkpoint at step 20" in lines
  chex.assert_trees_all_equal(resumed.state, whole.state)

  def metrics(workdir):
    return [{k: v for k, v in r.items() if k != "steps_per_second"}
            for r in metrics_lib.read_metrics(workdir)]

  assert metrics(cut) == metrics(str(tmp_path / "whole"))
  assert os.listdir(os.path.join(checkpoints, "damaged")) == ["30"]  # kept, out of the way


@pytest.mark.slow
def test_cli_on_a_full_disk_ends_in_one_line_and_keeps_its_earlier_steps(digits_dir, tmp_path):
  mount = str(tmp_path / "small")
  if not _mount_small_tmpfs(mount, "1500k"):
    pytest.skip("mounting a small tmpfs needs root; the manager test above covers ENOSPC")
  try:
    workdir = os.path.join(mount, "run")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=experiments/configs/default.py",
         f"--workdir={workdir}", f"--config.data_dir={digits_dir}",
         "--config.num_train_steps=600", "--config.checkpoint_every=100",
         "--config.log_every=50", "--config.dense_baseline=False"],
        cwd=root, env=one_device_env(), capture_output=True,
        text=True, timeout=600)
    assert out.returncode != 0
    errors = out.stderr.strip().splitlines()
    assert len(errors) <= 3, out.stderr  # no tracebacks from Orbax's writer threads
    assert re.fullmatch(r"error: Writing step \d+ to \S+ failed: .*(No space left|"
                        r"RESOURCE_EXHAUSTED).*; the steps saved before it are intact\.",
                        errors[-1]), errors[-1]
    with SparseCheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
      assert manager.all_steps()
      for step in manager.all_steps():
        manager.verify(step)
  finally:
    subprocess.run(["umount", mount], check=False)


def test_a_pending_step_set_aside_before_it_is_verified_is_forgotten(two_steps, tmp_path):
  _, states = two_steps
  directory = str(tmp_path / "checkpoints")
  manager = SparseCheckpointManager(directory, max_to_keep=2, async_save=False)
  _save(manager, 1, states[1])
  _save(manager, 2, states[2])  # two steps, nothing to delete: neither verified yet
  _flip_data_of(directory, 2, "params")
  with pytest.warns(UserWarning, match="Step 2 in"):
    restored = manager.restore_latest_intact(**_targets(states[1]))  # sets step 2 aside
  _assert_restored(restored, states[1])
  _save(manager, 3, states[2])
  _save(manager, 4, states[2])
  manager.close()  # verifies 1, 3 and 4 (step 2 is gone), then deletes step 1
  with SparseCheckpointManager(directory) as reopened:
    assert reopened.all_steps() == [3, 4]
