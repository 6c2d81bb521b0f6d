"""Recipe configs that cannot run here (no ImageNet): their fields, checked without data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from experiments import config_checks
from experiments import input_pipeline
from experiments import methods
from experiments import models
from experiments.configs import default
from experiments.configs import resnet50_imagenet

IMAGENET_TRAIN = 1_281_167
IMAGENET_CLASSES = 1000


def _flat_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    if hasattr(value, "items"):
      keys |= _flat_keys(value, f"{prefix}{key}.")
    else:
      keys.add(f"{prefix}{key}")
  return keys


@pytest.fixture(scope="module")
def config():
  return resnet50_imagenet.get_config()


@pytest.fixture(scope="module")
def num_steps(config):
  return config.num_epochs * input_pipeline.steps_per_epoch(IMAGENET_TRAIN, config.batch_size)


@pytest.fixture(scope="module")
def params(config):
  """Shapes of the params the trainer builds: create_model, then init at 224x224x3."""
  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  model = models.create_model(config.model.name, IMAGENET_CLASSES, **kwargs)
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert jax.eval_shape(model.apply, variables, x).shape == (1, IMAGENET_CLASSES)
  return variables["params"]


def test_resnet50_imagenet_passes_the_trainers_field_checks(config):
  config_checks.check_training_fields(config)  # e.g. checkpoint_every a multiple of log_every
  assert config.checkpoint_every > 0 and config.checkpoint_every % config.log_every == 0


def test_resnet50_imagenet_sets_no_key_the_default_config_lacks(config):
  # An unknown key would be ignored by the trainer, a misspelt override silently lost.
  extra = _flat_keys(config) - _flat_keys(default.get_config())
  assert extra == {"model.width"}  # the model section is the model's own


def test_resnet50_imagenet_is_the_goyal_et_al_recipe_on_imagenet2012(config):
  assert (config.dataset, config.train_split, config.eval_split) == (
      "imagenet2012", "train", "validation")
  assert (config.image_size, config.channels) == (224, 0)
  assert config.input.augment == "imagenet" and config.input.worker_count == 8
  np.testing.assert_allclose(config.input.mean, (0.485, 0.456, 0.406))
  np.testing.assert_allclose(config.input.std, (0.229, 0.224, 0.225))
  assert (config.model.name, config.model.width) == ("resnet50", 64)
  assert (config.optimizer, config.momentum, config.nesterov) == ("sgd", 0.9, False)
  assert config.weight_decay == 1e-4
  assert config.batch_size == 256 and config.num_epochs == 90 and config.num_train_steps <= 0
  assert config.learning_rate == pytest.approx(0.1 * config.batch_size / 256)
  # Five of the trainer's epochs (it drops the last partial batch of each).
  assert config.warmup_steps == 5 * input_pipeline.steps_per_epoch(IMAGENET_TRAIN, 256) == 25_020


def test_resnet50_imagenet_lr_warms_up_linearly_for_5_epochs_then_decays_to_zero(
    config, num_steps):
  assert num_steps == 90 * 5004
  lr = methods.learning_rate(config, num_steps)
  warmup = config.warmup_steps
  np.testing.assert_allclose([lr(0), lr(warmup // 2), lr(warmup)], [0.0, 0.05, 0.1], rtol=1e-4)
  steps = np.linspace(warmup, num_steps, 50).astype(int)
  rates = np.array([lr(s) for s in steps])
  assert np.all(np.diff(rates) <= 0) and rates[-1] < 1e-6


def test_resnet50_imagenet_prunes_gradually_to_80_percent_with_erk(config, num_steps, params):
  schedule = methods.pruning_schedule(config.pruning, num_steps)
  assert isinstance(schedule, sparsejax.PolynomialSchedule)
  assert (schedule.begin_step, schedule.end_step) == (45_036, 270_216)
  assert schedule.final_sparsity == 0.8 and config.pruning.allocation == "erk"
  keep = methods.leaf_filter(config.pruning)
  leaves = [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)]
  prunable = [(p, leaf.shape) for p, leaf in leaves if keep(p, leaf)]
  assert len(prunable) == 54  # 53 convolutions and the head
  sparsities = sparsejax.allocation.allocate(
      "erk", 0.8, [p for p, _ in prunable], [s for _, s in prunable])
  sizes = [math.prod(s) for _, s in prunable]
  assert sum(n * q for n, q in zip(sizes, sparsities)) / sum(sizes) == pytest.approx(0.8)
  assert all(0.0 <= q < 1.0 for q in sparsities)  # no layer pruned away


def test_resnet50_imagenet_optimizer_initialises_on_the_models_params(config, num_steps, params):
  tx = methods.make_optimizer(config, num_steps)
  state = jax.eval_shape(tx.init, params)  # what the trainer checks before claiming a workdir
  assert jax.tree.leaves(state)
