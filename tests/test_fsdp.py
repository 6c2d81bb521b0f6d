"""FSDP: params, optimizer state and masks sharded along a mesh axis (4 CPU devices).

Mask updates must run on the shards (only counts cross devices: no
all-gather of a kernel in the compiled update) and give the masks a NumPy
top-k gives; training with fsdp = 2 must give what fsdp = 1 gives.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparsejax
from sparsejax.checkpoint import SparseCheckpointManager
from sparsejax.sharding import fsdp_axis
from experiments import config_checks
from experiments import trainer
from tests import reference
from tests.test_train import train_steps


def _mesh(data=2, fsdp=2):
  assert jax.device_count() >= data * fsdp
  return Mesh(np.array(jax.devices()[:data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"dense_0": {"kernel": rng.normal(size=(64, 300)).astype(np.float32),
                      "bias": rng.normal(size=(300,)).astype(np.float32)},
          "dense_1": {"kernel": rng.normal(size=(300, 100)).astype(np.float32)},
          "conv": {"kernel": rng.normal(size=(3, 3, 8, 16)).astype(np.float32)},
          "head": {"kernel": rng.normal(size=(100, 10)).astype(np.float32)}}


def _collectives(compiled_text: str) -> set[str]:
  return set(re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                        r"(?:-start)?\(", compiled_text))


@pytest.mark.parametrize("shape, shards, min_size, axis", [
    ((64, 300), 2, 0, 1),          # the largest divisible axis
    ((300, 100), 4, 0, 0),
    ((100, 10), 4, 0, 0),          # 10 is not divisible: 100 is
    ((3, 3, 16, 16), 4, 0, 3),     # equals: the last
    ((10,), 4, 0, None),           # nothing divisible
    ((64, 300), 2, 64 * 300 + 1, None),  # below min_size
    ((), 2, 0, None),
    ((64, 300), 1, 0, None),
])
def test_fsdp_axis_is_the_largest_divisible_axis_of_a_large_enough_leaf(shape, shards, min_size,
                                                                        axis):
  assert fsdp_axis(shape, shards, min_size) == axis


def test_fsdp_shardings_shard_same_shapes_alike_and_name_a_missing_axis():
  mesh = _mesh()
  params = _params()
  shapes = jax.eval_shape(lambda p: optax.adam(1e-3).init(p), params)
  shardings = sparsejax.fsdp_shardings(shapes, mesh, min_size=1001)
  mu = shardings[0].mu
  assert mu["dense_0"]["kernel"].spec == P(None, "fsdp")
  assert mu["dense_1"]["kernel"].spec == P("fsdp", None)
  assert mu["dense_0"]["bias"].is_fully_replicated   # 300 entries, and head 1000, < min_size
  assert mu["head"]["kernel"].is_fully_replicated
  assert shardings[0].count.is_fully_replicated
  with pytest.raises(ValueError, match="mesh axis 'model' is not one of the mesh's axes"):
    sparsejax.fsdp_shardings(shapes, mesh, axis="model")


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk", "lamp"])
def test_magnitude_masks_on_fsdp_shards_gather_no_kernel_and_equal_numpy(allocation):
  mesh = _mesh()
  params = _params()
  shardings = sparsejax.fsdp_shardings(params, mesh)
  sharded = jax.device_put(params, shardings)
  assert not sharded["dense_1"]["kernel"].sharding.is_fully_replicated
  update = jax.jit(lambda p: sparsejax.magnitude_masks(p, 0.9, allocation),
                   in_shardings=(shardings,), out_shardings=shardings)
  text = update.lower(sharded).compile().as_text()
  assert "all-gather" not in _collectives(text), _collectives(text)
  masks = update(sharded)
  kernels = ["conv", "dense_0", "dense_1", "head"]
  scores = [np.abs(params[name]["kernel"]) for name in kernels]
  if allocation == "global":
    want = reference.global_topk_masks(scores, 0.9)
  elif allocation == "uniform":
    want = [reference.topk_mask(s, 0.9) for s in scores]
  elif allocation == "lamp":   # 'auto' bisects on several devices: no kernel is sorted
    want = reference.lamp_masks(scores, 0.9)
  else:  # ERK's per-layer counts are checked in test_allocation; here: the same as one device
    one = jax.jit(lambda p: sparsejax.magnitude_masks(p, 0.9, "erk"))(params)
    want = [np.asarray(one[name]["kernel"]) for name in kernels]
  for name, expected in zip(kernels, want):
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), expected, err_msg=name)
    assert masks[name]["kernel"].sharding == shardings[name]["kernel"]
  assert masks["dense_0"]["bias"] is None


def test_nm_masks_on_fsdp_shards_gather_no_kernel_and_equal_numpy():
  mesh = _mesh()
  params = {"dense": {"kernel": np.random.default_rng(1).normal(size=(64, 96)).astype(np.float32)}}
  shardings = sparsejax.fsdp_shardings(params, mesh)
  assert shardings["dense"]["kernel"].spec == P(None, "fsdp")  # groups run along axis 0
  update = jax.jit(lambda p: sparsejax.nm_masks(p, 2, 4), in_shardings=(shardings,))
  sharded = jax.device_put(params, shardings)
  text = update.lower(sharded).compile().as_text()
  assert "all-gather" not in _collectives(text)
  want = reference.nm_mask(np.abs(params["dense"]["kernel"]), 2, 4, axis=0)
  np.testing.assert_array_equal(np.asarray(update(sharded)["dense"]["kernel"]), want)


def test_a_gradual_pruning_update_step_runs_on_the_shards_with_the_single_device_masks():
  mesh = _mesh(data=1, fsdp=4)
  params = _params()
  schedule = sparsejax.PolynomialSchedule(0.0, 0.8, begin_step=0, end_step=10,
                                          update_frequency=5)
  tx = sparsejax.GradualMagnitudePruning(schedule, allocation="global").wrap(optax.adam(1e-2))
  grads = jax.tree.map(lambda p: np.full_like(p, 0.01), params)
  state = tx.init(params)
  shardings = sparsejax.fsdp_shardings((params, state), mesh)

  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  sharded_step = jax.jit(step, in_shardings=shardings, out_shardings=shardings)
  text = sharded_step.lower(*jax.device_put((params, state), shardings)).compile().as_text()
  assert "all-gather" not in _collectives(text)
  one = jax.jit(step)(params, state)
  many = sharded_step(*jax.device_put((params, state), shardings))
  chex.assert_trees_all_equal(sparsejax.find_pruning_state(many[1]).masks,
                              sparsejax.find_pruning_state(one[1]).masks)
  chex.assert_trees_all_equal(many[0], one[0])
  # The schedule's first update prunes nothing at step 0; run to step 5 to see masks.
  for _ in range(5):
    one = jax.jit(step)(*one)
    many = sharded_step(*many)
  masks = sparsejax.find_pruning_state(many[1]).masks
  assert sparsejax.sparsity_report(masks).sparsity > 0.5
  chex.assert_trees_all_equal(masks, sparsejax.find_pruning_state(one[1]).masks)
  assert masks["dense_1"]["kernel"].sharding.spec == P("fsdp", None)


@pytest.mark.parametrize("method", ["gradual", "nm"])
def test_training_with_fsdp_2_equals_fsdp_1_and_fsdp_4_bitwise(tiny_config, method):
  tiny_config.model.features = (64, 32)
  tiny_config.pruning.method = method
  tiny_config.pruning.start_fraction = 0.0
  tiny_config.mesh.fsdp_min_size = 0
  devices = jax.devices()[:4]
  results = {}
  for fsdp in (1, 2, 4):
    tiny_config.mesh.fsdp = fsdp
    results[fsdp] = train_steps(tiny_config, devices, steps=12)
  losses_one, state_one, _ = results[1]
  assert losses_one[1] > losses_one[-1]
  _, state_two, run_two = results[2]
  kernel = state_two.params["hidden_0"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp") and kernel.addressable_shards[0].data.shape == (
      64, 32)
  opt_masks = sparsejax.find_pruning_state(state_two.opt_state).masks
  assert opt_masks["hidden_0"]["kernel"].sharding.spec == P(None, "fsdp")
  # fsdp=2 splits the batch over data=2 x fsdp=2: the gradient's partial sums
  # meet in another order, which moves the last bit of some weights.
  np.testing.assert_allclose(results[2][0], losses_one, rtol=1e-5)
  chex.assert_trees_all_close(state_two.params, state_one.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(sparsejax.find_pruning_state(state_two.opt_state).masks,
                              sparsejax.find_pruning_state(state_one.opt_state).masks)
  # fsdp=4 (data=1) sums the batch as data=4 does: bitwise equal.
  np.testing.assert_array_equal(results[4][0], losses_one)
  chex.assert_trees_all_equal(results[4][1].params, state_one.params)
  chex.assert_trees_all_equal(results[4][1].opt_state, state_one.opt_state)
  assert run_two.evaluate(state_two)["accuracy"] == pytest.approx(
      results[1][2].evaluate(state_one)["accuracy"], abs=1e-6)


def test_an_fsdp_checkpoint_restores_sharded_and_into_a_replicated_run(tiny_config, tmp_path):
  tiny_config.mesh.fsdp_min_size = 0
  tiny_config.mesh.fsdp = 2
  devices = jax.devices()[:4]
  _, state, run = train_steps(tiny_config, devices, steps=6)
  with SparseCheckpointManager(str(tmp_path / trainer.CHECKPOINT_DIR)) as manager:
    run.save(manager, state)
  with SparseCheckpointManager(str(tmp_path / trainer.CHECKPOINT_DIR)) as manager:
    again = run.restore(manager)
  chex.assert_trees_all_equal(again, state)
  for restored, saved in zip(jax.tree.leaves(again), jax.tree.leaves(state)):
    assert restored.sharding == saved.sharding
  assert again.params["hidden_0"]["kernel"].sharding.spec == P("fsdp", None)  # (64, 32)
  tiny_config.mesh.fsdp = 1
  replicated = trainer.Trainer(tiny_config, devices[:1])
  with SparseCheckpointManager(str(tmp_path / trainer.CHECKPOINT_DIR)) as manager:
    one = replicated.restore(manager)
  chex.assert_trees_all_equal(one, state)
  assert one.params["hidden_0"]["kernel"].sharding.is_fully_replicated


@pytest.mark.parametrize("fsdp, message", [
    (3, r"config.mesh.fsdp=3 does not divide the 4 devices"),
    (0, r"config.mesh.fsdp=0 must be an integer >= 1"),
])
def test_an_fsdp_size_that_cannot_work_is_a_config_error(tiny_config, fsdp, message):
  tiny_config.mesh.fsdp = fsdp
  with pytest.raises(config_checks.ConfigError, match=message):
    trainer.Trainer(tiny_config, jax.devices()[:4])
