"""Masks kept at 1 bit per weight in the optimizer state (`packed_masks=True`)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax.checkpoint import SparseCheckpointManager
from experiments import config_checks
from experiments import trainer
from tests.test_train import train_steps


@pytest.mark.parametrize("shape", [(3, 9), (2, 3, 16), (5,), (4, 1)])
def test_pack_bits_packs_the_last_axis_like_numpy_and_unpacks_exactly(shape):
  mask = np.random.default_rng(0).random(shape) < 0.3
  packed = sparsejax.pack_bits(mask)
  np.testing.assert_array_equal(np.asarray(packed), np.packbits(mask, axis=-1))
  assert packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(sparsejax.unpack_bits(packed, shape)), mask)


def test_bool_masks_unpacks_packed_leaves_and_names_a_leaf_of_the_wrong_shape():
  params = {"a": np.zeros((4, 10)), "b": np.zeros((3,)), "c": np.zeros((2, 8))}
  mask_a = np.arange(40).reshape(4, 10) % 3 == 0
  mask_c = np.ones((2, 8), bool)
  masks = {"a": np.packbits(mask_a, axis=-1), "b": None, "c": mask_c}
  out = sparsejax.bool_masks(masks, params)
  np.testing.assert_array_equal(np.asarray(out["a"]), mask_a)
  assert out["b"] is None and out["c"] is mask_c
  with pytest.raises(ValueError, match=r"bit-packed mask 'a' is uint8\[4, 1\], but its parameter "
                                       r"of shape \(4, 10\) packs to uint8\[4, 2\]"):
    sparsejax.bool_masks({"a": np.zeros((4, 1), np.uint8), "b": None, "c": mask_c}, params)


def _run(packed, steps=12):
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.normal(size=(20, 13)).astype(np.float32),
                      "bias": np.zeros(13, np.float32)},
            "out": {"kernel": rng.normal(size=(13, 8)).astype(np.float32)}}
  schedule = sparsejax.PolynomialSchedule(0.0, 0.75, begin_step=0, end_step=8, update_frequency=2)
  tx = sparsejax.GradualMagnitudePruning(schedule, allocation="global",
                                         packed_masks=packed).wrap(optax.adam(0.05))
  x = rng.normal(size=(32, 20)).astype(np.float32)

  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
                     @ p["out"]["kernel"]) ** 2)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(sparsejax.masked_params(params, state))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_packed_masks_train_bitwise_like_bool_masks_at_an_eighth_of_the_bytes():
  params_bool, state_bool = _run(packed=False)
  params_packed, state_packed = _run(packed=True)
  chex.assert_trees_all_equal(params_packed, params_bool)
  stored = sparsejax.find_pruning_state(state_packed).masks
  assert stored["dense"]["kernel"].dtype == jnp.uint8
  assert stored["dense"]["kernel"].shape == (20, 2) and stored["out"]["kernel"].shape == (13, 1)
  masks = sparsejax.state_masks(state_packed, params_packed)
  chex.assert_trees_all_equal(masks, sparsejax.find_pruning_state(state_bool).masks)
  assert sparsejax.sparsity_report(masks).sparsity == pytest.approx(0.75, abs=1e-2)
  # Pruned weights are exactly zero, as with bool masks.
  assert np.all(np.asarray(params_packed["dense"]["kernel"])[~np.asarray(masks["dense"]["kernel"])]
                == 0)
  nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
  assert nbytes(stored) == 20 * 2 + 13 * 1  # vs 20 * 13 + 13 * 8 bytes as bool


def test_with_masks_packs_new_masks_into_a_packed_state():
  params, state = _run(packed=True, steps=1)
  new = {"dense": {"kernel": np.eye(20, 13, dtype=bool), "bias": None},
         "out": {"kernel": np.ones((13, 8), bool)}}
  with pytest.raises(ValueError, match="keeps its masks bit-packed: pass params="):
    sparsejax.with_masks(state, new)
  state = sparsejax.with_masks(state, new, params)
  np.testing.assert_array_equal(np.asarray(sparsejax.find_pruning_state(state).masks["dense"][
      "kernel"]), np.packbits(new["dense"]["kernel"], axis=-1))
  chex.assert_trees_all_equal(sparsejax.state_masks(state, params), new)
  with pytest.raises(ValueError, match="new mask 'dense/kernel' has shape"):
    sparsejax.with_masks(state, {**new, "dense": {"kernel": np.ones((20, 12), bool),
                                                  "bias": None}}, params)


def test_the_trainer_with_packed_masks_trains_bitwise_like_bool_and_checkpoints_them(
    tiny_config, tmp_path):
  tiny_config.pruning.start_fraction = 0.0
  devices = jax.devices()[:4]
  losses_bool, state_bool, _ = train_steps(tiny_config, devices, steps=12)
  tiny_config.pruning.packed_masks = True
  tiny_config.mesh.fsdp = 2
  tiny_config.mesh.fsdp_min_size = 0
  losses, state, run = train_steps(tiny_config, devices, steps=12)
  np.testing.assert_allclose(losses, losses_bool, rtol=1e-5)
  chex.assert_trees_all_equal(trainer.masks_of(state), trainer.masks_of(state_bool))
  stored = sparsejax.find_pruning_state(state.opt_state).masks["hidden_0"]["kernel"]
  assert stored.dtype == jnp.uint8 and stored.shape == (64, 4)
  with SparseCheckpointManager(str(tmp_path / "checkpoints")) as manager:
    run.save(manager, state)
  with SparseCheckpointManager(str(tmp_path / "checkpoints")) as manager:
    chex.assert_trees_all_equal(run.restore(manager), state)


def test_packed_masks_for_nm_training_are_a_config_error(tiny_config):
  tiny_config.pruning.method = "nm"
  tiny_config.pruning.packed_masks = True
  with pytest.raises(config_checks.ConfigError,
                     match="config.pruning.packed_masks=True is for magnitude pruning"):
    trainer.Trainer(tiny_config, jax.devices()[:1])


def test_a_lottery_run_with_packed_masks_equals_one_with_bool_masks(digits_dir, tmp_path):
  from experiments import lottery as lottery_run  # pylint: disable=g-import-not-at-top
  from tests.test_lottery_run import _tiny  # pylint: disable=g-import-not-at-top
  rows = {}
  for packed in (False, True):
    config = _tiny(digits_dir)
    config.lottery.levels = 2
    config.lottery.replicates = 1
    config.lottery.branches = ()
    config.lottery.packed_masks = packed
    result = lottery_run.run(config, str(tmp_path / str(packed)), log=lambda _: None)
    rows[packed] = [{k: v for k, v in row.items() if "time" not in k} for row in result["rows"]]
  assert [row["level"] for row in rows[True]] == [0, 1, 2]
  assert rows[True] == rows[False]
