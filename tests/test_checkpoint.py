"""Orbax checkpoints: separate items, subset restores, clear mismatch errors."""

import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import sparsejax
from sparsejax.checkpoint import CheckpointDamaged
from sparsejax.checkpoint import CheckpointError
from sparsejax.checkpoint import SparseCheckpointManager


class _MLP(nn.Module):
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(10, name="head")(x)


def _params(seed=0, hidden=32):
  return _MLP(hidden).init(jax.random.key(seed), jnp.ones((1, 20)))["params"]


def _trained_state(steps=3):
  """Params, masks and a GMP optimizer state after a few steps (masks set at step 0)."""
  params = _params()
  tx = sparsejax.GradualMagnitudePruning(sparsejax.OneShotSchedule(0.75, 0)).wrap(optax.adam(1e-2))
  opt_state = tx.init(params)
  x = jax.random.normal(jax.random.key(1), (8, 20))
  for _ in range(steps):
    grads = jax.grad(lambda p: jnp.sum(_MLP().apply({"params": p}, x) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, sparsejax.find_pruning_state(opt_state).masks, opt_state


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def test_every_item_round_trips_bitwise(tmp_path):
  params, masks, opt_state = _trained_state()
  train_state = {"batch_stats": {"bn": {"mean": jnp.arange(4.0)}}, "rng": jax.random.PRNGKey(7)}
  rewind = {"params": _params(seed=3), "opt_state": opt_state}
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(5, params=params, masks=masks, opt_state=opt_state, train_state=train_state,
                 rewind=rewind, meta={"config": {"lr": 0.1}}, level=2)
    restored = manager.restore(params_like=params, masks_like=params, opt_state_like=opt_state,
                               train_state_like=train_state, rewind_like=rewind)
  assert restored.step == 5
  chex.assert_trees_all_equal(restored.params, params)
  chex.assert_trees_all_equal(restored.opt_state, opt_state)
  assert type(restored.opt_state) is type(opt_state)
  chex.assert_trees_all_equal(restored.train_state, train_state)
  chex.assert_trees_all_equal(restored.rewind, rewind)
  for path in ("hidden", "head"):
    np.testing.assert_array_equal(restored.masks[path]["kernel"], masks[path]["kernel"])
    assert restored.masks[path]["bias"] is None
  meta = restored.meta
  assert meta["step"] == 5 and meta["level"] == 2 and meta["config"] == {"lr": 0.1}
  assert meta["mask_shapes"] == {"hidden/kernel": [20, 32], "head/kernel": [32, 10]}
  assert meta["sparsity"] == {"hidden/kernel": 0.75, "head/kernel": 0.75}
  assert set(meta["versions"]) >= {"sparsejax", "jax", "flax", "optax", "orbax-checkpoint"}


def test_masks_alone_transfer_into_a_freshly_initialised_model(tmp_path):
  params, masks, _ = _trained_state()
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(1, params=params, masks=masks)
  fresh = _params(seed=42)
  with SparseCheckpointManager(str(tmp_path)) as manager:
    restored = manager.restore(masks_like=fresh)
  assert restored.params is None and restored.opt_state is None
  ticket = sparsejax.apply_masks(fresh, restored.masks)
  kept = np.asarray(masks["hidden"]["kernel"])
  np.testing.assert_array_equal(np.asarray(ticket["hidden"]["kernel"]) != 0, kept)
  np.testing.assert_array_equal(np.asarray(ticket["hidden"]["kernel"])[kept],
                                np.asarray(fresh["hidden"]["kernel"])[kept])


def test_items_are_readable_with_plain_orbax(tmp_path):
  params, masks, _ = _trained_state()
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(3, params=params, masks=masks, meta={"note": "x"})
  plain_params = ocp.StandardCheckpointer().restore(str(tmp_path / "3" / "params"))
  chex.assert_trees_all_equal(plain_params, jax.tree.map(np.asarray, params))
  packed = ocp.StandardCheckpointer().restore(str(tmp_path / "3" / "masks"))
  bits = np.unpackbits(np.asarray(packed["head/kernel"]), count=320).reshape(32, 10)
  np.testing.assert_array_equal(bits.astype(bool), np.asarray(masks["head"]["kernel"]))
  with open(tmp_path / "3" / "meta" / "metadata") as f:
    assert json.load(f)["note"] == "x"


def test_masks_take_one_bit_per_weight_on_disk(tmp_path):
  n = 1 << 20  # a random 50% mask: no compression gets below 1 bit per weight
  weights = {"w": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(1024, 1024)),
                                         jnp.float32)}}
  masks = sparsejax.magnitude_masks(weights, 0.5)
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(0, params=weights, masks=masks)
  mask_bytes = _dir_bytes(tmp_path / "0" / "masks")
  param_bytes = _dir_bytes(tmp_path / "0" / "params")
  assert 0.95 * n / 8 <= mask_bytes <= 1.05 * n / 8 + 16384, mask_bytes
  assert param_bytes >= 0.8 * 4 * n  # float32 weights (Orbax compresses a little): ~30x more


def test_restore_into_another_model_names_the_leaf_and_both_shapes(tmp_path):
  params, masks, opt_state = _trained_state()
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(1, params=params, masks=masks, opt_state=opt_state)
  other = _params(hidden=16)
  with SparseCheckpointManager(str(tmp_path)) as manager:
    with pytest.raises(CheckpointError, match=r"Item 'params': leaf 'head/kernel' has shape "
                                              r"\(32, 10\) in the checkpoint but \(16, 10\)"):
      manager.restore(params_like=other)
    with pytest.raises(CheckpointError, match=r"Item 'masks': leaf 'head/kernel' has shape "
                                              r"\(32, 10\) in the checkpoint but \(16, 10\)"):
      manager.restore(masks_like=other)
    renamed = {"encoder": params["hidden"], "head": params["head"]}
    with pytest.raises(CheckpointError, match=r"leaf 'encoder/bias' of the target is not in the "
                                              r"checkpoint"):
      manager.restore(params_like=renamed)
    as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    with pytest.raises(CheckpointError, match=r"Item 'params': leaf 'head/bias' is float32 in the "
                                              r"checkpoint but bfloat16 in the target"):
      manager.restore(params_like=as_bf16)
    # Nothing was harmed: the right target still restores.
    chex.assert_trees_all_equal(manager.restore(params_like=params).params, params)


def test_packed_length_that_does_not_fit_the_params_names_the_leaf(tmp_path):
  with SparseCheckpointManager(str(tmp_path)) as manager:
    # A masks item written by other code (as before checksums): 3 bytes cannot
    # hold a 20x32 mask.
    manager._manager.save(0, args=ocp.args.Composite(
        masks=ocp.args.StandardSave({"hidden/kernel": np.zeros(3, np.uint8)}),
        meta=ocp.args.JsonSave({"step": 0, "level": None, "versions": {}})))
  with SparseCheckpointManager(str(tmp_path)) as manager:
    with pytest.raises(CheckpointError, match=r"'hidden/kernel' holds 3 packed bytes but a "
                                              r"\(20, 32\) weight needs 80"):
      manager.restore(masks_like=_params())


def test_corrupted_item_is_an_error_naming_it_and_other_steps_stay_readable(tmp_path):
  params, masks, _ = _trained_state()
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(1, params=params, masks=masks)
    manager.save(2, params=params, masks=masks)
  for root, _, files in os.walk(tmp_path / "2" / "params"):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:  # truncate every file of the item to half
        f.truncate(os.path.getsize(path) // 2)
  with SparseCheckpointManager(str(tmp_path)) as manager:
    with pytest.raises(CheckpointDamaged, match=r"Step 2 in .*: item 'params' cannot be read"):
      manager.restore(2, params_like=params)
    chex.assert_trees_all_equal(manager.restore(1, params_like=params).params, params)
    np.testing.assert_array_equal(manager.restore(2, masks_like=params).masks["head"]["kernel"],
                                  masks["head"]["kernel"])


def test_keep_last_n_and_keep_best(tmp_path):
  params = _params()
  with SparseCheckpointManager(str(tmp_path / "last"), max_to_keep=2) as manager:
    for step in range(5):
      manager.save(step, params=params)
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 4]
  accuracy = {0: 0.5, 1: 0.9, 2: 0.7, 3: 0.8, 4: 0.6}
  with SparseCheckpointManager(str(tmp_path / "best"), max_to_keep=2,
                               best_metric="accuracy") as manager:
    for step, value in accuracy.items():
      manager.save(step, params=params, metrics={"accuracy": value})
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [1, 3] and manager.best_step() == 1


def test_masks_into_a_model_with_an_extra_layer_is_an_error(tmp_path):
  params, masks, _ = _trained_state()
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(1, params=params, masks=masks)
    deeper = {**_params(), "extra": {"kernel": jnp.ones((10, 10)), "bias": jnp.ones(10)}}
    with pytest.raises(CheckpointError, match=r"leaf 'extra/bias' of the target is not in the "
                                              r"checkpoint's model"):
      manager.restore(masks_like=deeper)


def test_a_damaged_meta_is_an_error_and_unverified_salvage_restores_the_rest(tmp_path):
  params, masks, _ = _trained_state()
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(1, params=params, masks=masks)
  with open(tmp_path / "1" / "meta" / "metadata", "w") as f:
    f.write('{"step": 1, "mask_sh')  # truncated JSON
  with SparseCheckpointManager(str(tmp_path)) as manager:
    with pytest.raises(CheckpointDamaged, match=r"Step 1 in .*: item\(s\) \['meta'\] cannot be read"):
      manager.restore(params_like=params)  # its checksums are lost: nothing can be verified
    with pytest.warns(UserWarning, match=r"Step 1 in .*: item\(s\) \['meta'\] cannot be read"):
      restored = manager.restore(params_like=params, masks_like=params, verify=False)
  assert restored.meta is None
  chex.assert_trees_all_equal(restored.params, params)
  np.testing.assert_array_equal(restored.masks["head"]["kernel"], masks["head"]["kernel"])


def test_relative_directory_works(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  params, masks, _ = _trained_state()
  with SparseCheckpointManager("runs/ckpt") as manager:
    manager.save(2, params=params, masks=masks)
    chex.assert_trees_all_equal(manager.restore(params_like=params).params, params)
  assert (tmp_path / "runs" / "ckpt" / "2" / "masks").is_dir()


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  with SparseCheckpointManager(str(tmp_path)) as manager:
    with pytest.raises(CheckpointError, match="No checkpoint in"):
      manager.restore(params_like=_params())


def test_a_zero_size_leaf_is_a_one_line_error_naming_it(tmp_path):
  params = {"dense": {"kernel": jnp.ones((2, 3)), "empty": jnp.zeros((0, 3))}}
  with SparseCheckpointManager(str(tmp_path)) as manager:
    with pytest.raises(CheckpointError, match=r"^Item 'params': leaf 'dense/empty' has no elements "
                                              r"\(shape \(0, 3\)\); Orbax cannot store an empty "
                                              r"array: leave it out of the tree\.$"):
      manager.save(1, params=params)
    assert manager.all_steps() == []


def test_items_without_leaves_are_recorded_and_restore_as_their_empty_targets(tmp_path):
  params = _params()
  dense_masks = jax.tree.map(lambda _: None, params)  # nothing pruned: no packed leaf
  sgd_state = optax.sgd(0.1).init(params)  # (EmptyState(), EmptyState()): no leaves
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(1, params=params, masks=dense_masks, opt_state=sgd_state)
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.verify(1)
    restored = manager.restore(params_like=params, masks_like=params, opt_state_like=sgd_state)
    assert restored.meta["empty_items"] == ["masks", "opt_state"]
    chex.assert_trees_all_equal(restored.params, params)
    assert jax.tree.leaves(restored.masks) == [] and restored.masks.keys() == params.keys()
    assert restored.opt_state == sgd_state
    with pytest.raises(CheckpointError, match=r"^Item 'opt_state': structure mismatch: leaf "
                                              r"'0/count' of the target is not in the checkpoint"):
      manager.restore(opt_state_like=optax.adam(0.1).init(params))
  assert {"masks", "opt_state"}.isdisjoint(os.listdir(tmp_path / "1"))  # not written


def test_typed_prng_keys_are_stored_as_their_data_and_restore_as_keys(tmp_path):
  train_state = {"rng": jax.random.key(7), "rbg": jax.random.split(jax.random.key(3, impl="rbg"))}
  with SparseCheckpointManager(str(tmp_path)) as manager:
    manager.save(1, train_state=train_state)
  stored = ocp.StandardCheckpointer().restore(str(tmp_path / "1" / "train_state"))
  np.testing.assert_array_equal(stored["rng"], np.asarray(jax.random.key_data(train_state["rng"])))
  assert stored["rbg"].shape == (2, 4) and stored["rbg"].dtype == np.uint32
  with SparseCheckpointManager(str(tmp_path)) as manager:
    assert manager.restore(1).meta["prng_keys"] == {
        "train_state": {"rbg": "rbg", "rng": "threefry2x32"}}
    for like in (train_state, jax.eval_shape(lambda: train_state)):
      restored = manager.restore(train_state_like=like).train_state
      for name, key in train_state.items():
        assert restored[name].dtype == key.dtype, name
        np.testing.assert_array_equal(jax.random.key_data(restored[name]),
                                      jax.random.key_data(key))
    # Usable as a key: the same draw as the saved one.
    np.testing.assert_array_equal(jax.random.normal(restored["rng"], (3,)),
                                  jax.random.normal(train_state["rng"], (3,)))
    other = {"rng": train_state["rng"],
             "rbg": jax.random.split(jax.random.key(3, impl="unsafe_rbg"))}  # same data shape
    with pytest.raises(CheckpointError, match=r"^Item 'train_state': leaf 'rbg' is a rbg PRNG key "
                                              r"in the checkpoint but a unsafe_rbg key in the "
                                              r"target\.$"):
      manager.restore(train_state_like=other)
