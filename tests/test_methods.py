"""From config to optimizer: schedules, leaf filters and config errors."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from experiments import methods
from experiments.configs import default


def _config(**pruning):
  config = default.get_config()
  config.pruning.update(pruning)
  return config


def test_gradual_schedule_spans_the_configured_fractions_of_training():
  schedule = methods.pruning_schedule(_config().pruning, num_steps=1650).__dict__
  assert schedule == dict(initial_sparsity=0.0, final_sparsity=0.9, begin_step=165,
                          end_step=1089, update_frequency=30, power=3.0)  # 0.66 * 1650 = 1089


def test_one_shot_prunes_once_at_start_fraction():
  schedule = methods.pruning_schedule(_config(method="one_shot", start_fraction=0.5).pruning, 200)
  assert isinstance(schedule, sparsejax.OneShotSchedule)
  assert (schedule.sparsity, schedule.step) == (0.9, 100)


def test_dense_method_has_no_schedule_and_plain_optimizer():
  config = _config(method="dense")
  assert methods.pruning_schedule(config.pruning, 100) is None
  params = {"w": jnp.ones((3, 3))}
  state = methods.make_optimizer(config, 100).init(params)
  with pytest.raises(ValueError):
    sparsejax.find_pruning_state(state)


@pytest.mark.parametrize("pruning, message", [
    (dict(method="magnitude"), r"config.pruning.method='magnitude' is not one of \['dense'"),
    (dict(start_fraction=1.5), r"config.pruning.start_fraction=1.5 must be a fraction"),
    (dict(start_fraction=0.5, end_fraction=0.5), r"end step > start step.*give 50 and 50"),
    (dict(include="kernel("), r"config.pruning.include='kernel\(' is not a valid regex"),
    (dict(sparsity=1.0), r"config.pruning.sparsity=1.0 must be in \[0, 1\)"),
    (dict(method="one_shot", start_fraction=1.0), r"start_fraction=1.0 of 100 steps gives step 100, "
     r"but the last training step is 99"),
    (dict(end_fraction=1.0), r"config.pruning.end_fraction=1.0 of 100 steps gives step 100"),
    (dict(initial_sparsity=0.5, sparsity=0.4), r"initial_sparsity=0.5 exceeds config.pruning.sparsity"),
    (dict(update_every=0), r"config.pruning.update_every=0 must be an integer >= 1"),
    (dict(power=0.0), r"config.pruning.power=0.0 must be > 0"),
    (dict(allocation="random"), r"config.pruning.allocation='random' is not one of"),
    (dict(initial_sparsity=-0.1), r"config.pruning.initial_sparsity=-0.1 must be in"),
])
def test_bad_pruning_config_names_the_key(pruning, message):
  with pytest.raises(ValueError, match=message):
    methods.make_optimizer(_config(**pruning), 100)


@pytest.mark.parametrize("fields, message", [
    (dict(optimizer="lamb"), r"config.optimizer='lamb' is not one of"),
    (dict(weight_decay=1e-4), r"weight_decay with optimizer 'adam' would be ignored; use .*adamw"),
    (dict(momentum=0.9), r"config.momentum / config.nesterov apply to sgd only, not 'adam'"),
    (dict(optimizer="sgd", nesterov=True), r"nesterov=True needs config.momentum > 0"),
    (dict(warmup_steps=10), r"warmup_steps > 0 needs config.lr_schedule='cosine'"),
    (dict(lr_schedule="cosine", warmup_steps=100), r"warmup_steps=100 must be below the 100 steps"),
])
def test_optimizer_settings_that_would_be_ignored_or_cannot_work_are_errors(fields, message):
  config = default.get_config()
  config.update(fields)
  with pytest.raises(methods.ConfigError, match=message):
    methods.make_optimizer(config, 100)


def test_sgd_with_nesterov_momentum_and_l2_matches_the_update_rule():
  config = default.get_config()
  config.update(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=0.1, learning_rate=0.5)
  config.pruning.method = "dense"
  tx = methods.make_optimizer(config, 10)
  w, g = jnp.array([2.0]), jnp.array([1.0])
  state = tx.init(w)
  updates, state = tx.update(g, state, w)
  # d = g + 0.1 w = 1.2; trace = d; nesterov step: -lr (d + 0.9 trace) = -0.5 * 2.28
  np.testing.assert_allclose(np.asarray(updates), [-1.14], rtol=1e-6)


def test_leaf_filter_keeps_kernels_matching_include_and_not_exclude():
  params = {"a": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
            "b": {"kernel": np.ones((2, 2))}, "head": {"kernel": np.ones((2, 2))}}
  config = _config(include="kernel", exclude="^head/")
  keep = methods.leaf_filter(config.pruning)
  chosen = [path for path, leaf in [("a/kernel", params["a"]["kernel"]), ("a/bias", params["a"]["bias"]),
                                    ("b/kernel", params["b"]["kernel"]),
                                    ("head/kernel", params["head"]["kernel"])] if keep(path, leaf)]
  assert chosen == ["a/kernel", "b/kernel"]
  masks = sparsejax.magnitude_masks(params, 0.5, leaf_filter=keep)
  assert masks["head"]["kernel"] is None and masks["a"]["kernel"].sum() == 2


def test_cosine_learning_rate_warms_up_then_decays_to_zero():
  config = default.get_config()
  config.lr_schedule, config.warmup_steps, config.learning_rate = "cosine", 10, 0.1
  lr = methods.learning_rate(config, 110)
  assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 0.1) < 1e-7
  assert abs(float(lr(60)) - 0.05) < 1e-6 and float(lr(110)) < 1e-7  # half-way: cos(pi/2)


def test_pruning_optimizer_zeroes_pruned_weights_under_the_configured_schedule():
  config = _config(method="one_shot", start_fraction=0.0, sparsity=0.5)
  tx = methods.make_optimizer(config, 10)
  params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
  state = tx.init(params)
  updates, state = tx.update(jax_zeros(params), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(new["w"]), [[0, 0, 0, 0], [5, 6, 7, 8]])


def jax_zeros(tree):
  return {k: jnp.zeros_like(v) for k, v in tree.items()}
