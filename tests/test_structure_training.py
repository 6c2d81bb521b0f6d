"""Gradual structured pruning: whole units through the pruning wrapper and the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from experiments import config_checks
from experiments import trainer
from experiments.models import create_model
from experiments.models import structure as model_structure


def _units_kept(masks, group):
  first = group.members[0]
  leaves = {l.path: l.value for l in sparsejax.trees.named_leaves(masks)}
  return np.asarray(sparsejax.structure.groups.unit_major(leaves[first.path], first,
                                                          group.units).any(1))


def test_gradual_structured_pruning_removes_whole_units_on_schedule_and_shrinks():
  model = create_model("mlp", num_classes=4, features=(16, 8))
  x = jax.random.normal(jax.random.key(1), (32, 6))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 4)
  params = model.init(jax.random.key(0), x)["params"]
  rules = model_structure.spec(model)
  schedule = sparsejax.PolynomialSchedule(0.0, 0.5, begin_step=0, end_step=4, update_frequency=2)
  tx = sparsejax.GradualMagnitudePruning(schedule, structure=rules).wrap(optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y).mean()
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  groups = sparsejax.build_groups(params, rules)
  history = []
  for _ in range(6):
    params, state = step(params, state)
    masks = sparsejax.state_masks(state)
    history.append([int(_units_kept(masks, g).sum()) for g in groups])
  # s(0) = 0, s(2) = 0.4375, s(4) on = 0.5: round((1 - s) * units) units per group.
  assert history[0] == [16, 8] and history[2] == [9, 4] and history[-1] == [8, 4]
  masks = sparsejax.state_masks(state)
  assert masks["hidden_0"]["bias"] is not None and masks["head"]["bias"] is None
  keep = {g.name: _units_kept(masks, g) for g in groups}
  for g, before in zip(groups, history[2]):   # units pruned earlier stay pruned
    assert keep[g.name].sum() <= before
  small, small_model = model_structure.shrink_model(model, {"params": params}, groups, keep)
  assert small_model.features == (8, 4)
  np.testing.assert_allclose(small_model.apply(small, x), model.apply({"params": params}, x),
                             atol=1e-5)


def test_the_trainer_prunes_channels_of_the_mlp_with_pruning_structure(tiny_config):
  tiny_config.pruning.structure = "channel"
  tiny_config.pruning.sparsity = 0.5
  tiny_config.num_train_steps = 20
  run = trainer.Trainer(tiny_config, jax.devices()[:1])
  state = run.initial_state()
  step = run.compiled_step(state)
  for t in range(20):
    images, labels = run.batch(t)
    state, _ = step(t, state, images, labels)
  masks = trainer.masks_of(state)
  groups = sparsejax.build_groups(state.params, model_structure.spec(run.model))
  assert [int(_units_kept(masks, g).sum()) for g in groups] == [16, 8]   # of (32, 16)
  kernel = np.asarray(state.params["hidden_0"]["kernel"])
  assert ((kernel == 0).all(0)).sum() == 16                               # whole columns are zero


@pytest.mark.parametrize("key,value,message", [
    ("structure", "filter", r"config.pruning.structure='filter' is not one of"),
    ("allocation", "erk", r"pruning.allocation must be 'uniform', not 'erk'"),
    ("method", "rigl", r"works with pruning.method 'gradual' or 'one_shot', not 'rigl'"),
])
def test_bad_structure_configs_are_one_line_errors(tiny_config, key, value, message):
  tiny_config.pruning.structure = "channel"
  tiny_config.pruning[key] = value
  with pytest.raises(config_checks.ConfigError, match=message) as raised:
    trainer.Trainer(tiny_config, jax.devices()[:1])
  assert "\n" not in str(raised.value)


def test_head_structure_on_a_model_without_heads_is_a_config_error(tiny_config):
  tiny_config.pruning.structure = "head"
  with pytest.raises(config_checks.ConfigError, match="model MLP has no head groups"):
    trainer.Trainer(tiny_config, jax.devices()[:1])
