"""Library defaults and options of the wrappers: decay coefficient, fine-tune mask, chains."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from tests import reference


def test_mask_decay_defaults_to_four_over_the_sparse_phase():
  # 100 steps, 10 dense, 30 fine-tune: a sparse phase of 60 steps, alpha = 4/60.
  schedule = sparsejax.NMSchedule(2, 4, num_steps=100, dense_steps=10, finetune_steps=30)
  linear = sparsejax.NMSparsity(schedule, decay="linear")
  exponential = sparsejax.NMSparsity(schedule, decay="exponential")
  assert linear.alpha == pytest.approx(4 / 60)
  assert float(linear.beta(10 + 15)) == 0.0                  # 1 - (4/60) * 15 = 0
  assert float(linear.beta(10 + 6)) == pytest.approx(0.6, abs=1e-6)
  assert float(exponential.beta(10 + 15)) == pytest.approx(math.exp(-1), abs=1e-6)
  assert float(exponential.beta(10 + 60 - 1)) == pytest.approx(math.exp(-4 * 59 / 60), abs=1e-6)
  assert sparsejax.NMSparsity(schedule, decay="linear", decay_coef=0.5).alpha == 0.5


def test_the_binary_takes_the_librarys_decay_default():
  from experiments import methods
  from experiments.configs import default
  config = default.get_config()
  config.pruning.method = "nm"
  config.pruning.nm.method = "mdgf_linear"
  nm = methods.nm_sparsity(config, 100)
  assert config.pruning.nm.decay_coef is None
  assert nm.alpha == pytest.approx(4 / nm.schedule.sparse_steps)


def _train(finetune_mask, steps=8):
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
  schedule = sparsejax.NMSchedule(2, 4, num_steps=steps, dense_steps=1, finetune_steps=4,
                                  finetune_mask=finetune_mask)
  nm = sparsejax.NMSparsity.from_method("step", schedule)
  tx = nm.wrap(optax.sgd(0.1))
  state = tx.init(params)
  targets = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  step = jax.jit(lambda p, s: tx.update(
      jax.grad(lambda q: jnp.sum((nm.forward(q, s)["dense"]["kernel"] - targets) ** 2))(p), s, p))
  history = []
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    history.append((params, sparsejax.find_pruning_state(state).masks))
  return history


def test_recompute_finetune_follows_the_dense_weights_every_step_and_ends_nm():
  history = _train("recompute")
  for count, (params, masks) in enumerate(history, start=1):
    w = np.asarray(params["dense"]["kernel"])
    if count >= 4:  # fine-tune and end: the mask is the current weights' 2:4
      np.testing.assert_array_equal(masks["dense"]["kernel"],
                                    reference.nm_mask(np.abs(w), 2, 4, axis=0), err_msg=str(count))
    if 4 <= count < 8:  # pruned weights keep training (STE), not held at 0
      assert np.count_nonzero(w) == w.size
  final = np.asarray(history[-1][0]["dense"]["kernel"])
  assert np.count_nonzero(final) == 16  # the last update applies the hard mask


def test_fixed_finetune_holds_the_mask_and_zeros():
  history = _train("fixed")
  start_mask = np.asarray(history[3][1]["dense"]["kernel"])  # step 4: fine-tune starts
  for params, masks in history[3:]:
    np.testing.assert_array_equal(masks["dense"]["kernel"], start_mask)
    np.testing.assert_array_equal(np.asarray(params["dense"]["kernel"]) != 0, start_mask)


def test_bad_finetune_mask_is_rejected():
  with pytest.raises(ValueError, match="finetune_mask must be one of"):
    sparsejax.NMSchedule(2, 4, 10, finetune_mask="ste")


def test_a_transform_chained_after_the_wrapper_cannot_leak_through_masked_params():
  # add_decayed_weights after the wrapper adds 1e-1 * w to the -w that zeroes
  # pruned weights, so they drift away from 0; the forward pass on
  # masked_params still sees exactly the pruned model.
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  pruner = sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5))
  tx = optax.chain(pruner.wrap(optax.sgd(0.1)), optax.add_decayed_weights(1e-1))
  state = tx.init(params)
  loss = lambda p: jnp.sum((x @ p["w"]) ** 2)
  for _ in range(3):
    updates, state = tx.update(jax.grad(lambda p: loss(sparsejax.masked_params(p, state)))(params),
                               state, params)
    params = optax.apply_updates(params, updates)
  mask = np.asarray(sparsejax.find_pruning_state(state).masks["w"])
  w = np.asarray(params["w"])
  assert np.any(w[~mask] != 0)  # the leak the README warns about
  seen = np.asarray(sparsejax.masked_params(params, state)["w"])
  np.testing.assert_array_equal(seen, np.where(mask, w, 0))
  assert float(loss(sparsejax.masked_params(params, state))) == pytest.approx(
      float(np.sum((np.asarray(x) @ np.where(mask, w, 0)) ** 2)), rel=1e-5)
