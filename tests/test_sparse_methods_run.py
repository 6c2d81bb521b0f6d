"""The sparse training methods through the training binary (tiny configs, bundled digits)."""

import os
import shutil

import chex
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax.checkpoint import SparseCheckpointManager
from experiments import config_checks
from experiments import methods
from experiments import metrics as metrics_lib
from experiments import models
from experiments import train
from experiments import trainer
from tests import reference

NEW_METHODS = ("static", "snip", "synflow", "ste", "set", "rigl", "granet")


def _configure(config, method):
  config.pruning.method = method
  config.pruning.start_fraction = 0.0
  config.pruning.end_fraction = 0.5
  config.pruning.dst.update_every = 5
  config.pruning.synflow_iterations = 10
  config.dense_baseline = False
  return config


@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_method_trains_to_its_exact_sparsity(tiny_config, tmp_path, method):
  config = _configure(tiny_config, method)
  summary = train.run(config, str(tmp_path / method))
  assert summary["method"] == method
  # Every kernel at 80% (uniform allocation): round(0.2 * size) weights kept.
  sizes = {"hidden_0/kernel": 64 * 32, "hidden_1/kernel": 32 * 16, "head/kernel": 16 * 10}
  for path, size in sizes.items():
    assert summary["layers"][path]["kept"] == round(0.2 * size), path
  losses = [r["loss"] for r in metrics_lib.read_metrics(str(tmp_path / method))
            if r["split"] == "train"]
  assert losses[-1] < losses[0]  # it learns
  state = _final_state(config, str(tmp_path / method))
  masks = trainer.masks_of(state)
  zero = [np.asarray(state.params[n]["kernel"])[~np.asarray(masks[n]["kernel"])]
          for n in ("hidden_0", "hidden_1", "head")]
  if method == "ste":  # pruned weights keep training; the forward masks them
    assert all(np.mean(z != 0) > 0.9 for z in zero)
  else:
    assert all(np.all(z == 0) for z in zero)


def _final_state(config, workdir):
  run = trainer.Trainer(config)
  with SparseCheckpointManager(os.path.join(workdir, trainer.CHECKPOINT_DIR)) as manager:
    return run.restore(manager)


def test_snip_in_the_trainer_keeps_numpy_top_k_of_g_times_w_on_the_first_batch(tiny_config):
  config = _configure(tiny_config, "snip")
  config.pruning.allocation = "global"
  run = trainer.Trainer(config, jax.devices()[:1])
  state = run.initial_state()
  fresh = run._fresh_state(jax.random.PRNGKey(config.seed))  # pylint: disable=protected-access
  images, labels = run.batch(0)

  def loss(params):
    logits, _ = run.model.apply({"params": params}, images, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.grad(loss)(fresh.params)
  names = ("head", "hidden_0", "hidden_1")
  scores = [np.abs(np.asarray(grads[n]["kernel"]) * np.asarray(fresh.params[n]["kernel"]))
            for n in names]
  masks = trainer.masks_of(state)
  for name, want in zip(names, reference.global_topk_masks(scores, 0.8)):
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), want, err_msg=name)


class _BatchNormNet(nn.Module):
  """A convolution and a hidden layer, each followed by BatchNorm (as ResNet-20's)."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    x = nn.relu(norm("bn_0")(nn.Conv(8, (3, 3), name="conv")(x))).mean(axis=(1, 2))
    x = nn.relu(norm("bn_1")(nn.Dense(16, name="hidden")(x)))
    return nn.Dense(self.num_classes, name="head")(x)


def test_snip_on_a_batchnorm_model_scores_in_evaluation_mode_unless_asked(tiny_config,
                                                                          monkeypatch):
  monkeypatch.setitem(models.MODELS, "batchnorm_net", _BatchNormNet)
  config = _configure(tiny_config, "snip")
  config.model = ml_collections.ConfigDict({"name": "batchnorm_net"})
  config.pruning.allocation = "global"
  run = trainer.Trainer(config, jax.devices()[:1])
  fresh = run._fresh_state(jax.random.PRNGKey(config.seed))  # pylint: disable=protected-access
  images, labels = run.batch(0)
  variables = lambda p: {"params": p, "batch_stats": fresh.batch_stats}

  def top_k(train):
    def loss(params):
      if train:  # BatchNorm on the batch's statistics
        logits, _ = run.model.apply(variables(params), images, train=True,
                                    mutable=["batch_stats"])
      else:  # BatchNorm on its running statistics (mean 0, variance 1 at init)
        logits = run.model.apply(variables(params), images, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.jit(jax.grad(loss))(fresh.params)
    names = ("conv", "hidden", "head")
    scores = [np.abs(np.asarray(grads[n]["kernel"]) * np.asarray(fresh.params[n]["kernel"]))
              for n in names]
    return dict(zip(names, reference.global_topk_masks(scores, 0.8)))

  def masks_of(state):
    return {n: np.asarray(m["kernel"]) for n, m in trainer.masks_of(state).items()
            if m.get("kernel") is not None}

  eval_mode, train_mode = top_k(False), top_k(True)
  got = masks_of(run.initial_state())
  for path, want in eval_mode.items():
    np.testing.assert_array_equal(got[path], want, err_msg=path)
  differ = sum(int(np.sum(eval_mode[p] != train_mode[p])) for p in eval_mode)
  assert differ > 0.1 * sum(int(m.sum()) for m in eval_mode.values())
  config.pruning.snip_train_mode = True
  got = masks_of(trainer.Trainer(config, jax.devices()[:1]).initial_state())
  for path, want in train_mode.items():
    np.testing.assert_array_equal(got[path], want, err_msg=path)


def test_a_resumed_rigl_run_ends_bitwise_where_an_uninterrupted_one_does(tiny_config, tmp_path):
  config = _configure(tiny_config, "rigl")
  config.checkpoint_every = 20
  config.keep_checkpoints = 0
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  train.run(config, whole)
  shutil.copytree(whole, cut)  # as if killed after the checkpoint at step 20
  shutil.rmtree(os.path.join(cut, trainer.CHECKPOINT_DIR, "40"))
  os.remove(os.path.join(cut, "final.json"))
  train.run(config, cut)
  chex.assert_trees_all_equal(_final_state(config, cut), _final_state(config, whole))


def test_granet_and_rigl_configs_get_their_codes_drop_and_grow_settings(tiny_config):
  config = _configure(tiny_config, "granet")
  config.pruning.allocation = "global"
  granet = methods.drop_and_grow(config, 40)
  assert (granet.drop_fraction, granet.min_drop_fraction, granet.end_step, granet.rounding,
          granet.regrow_scope, granet.gradient_on_update) == (0.5, 0.005, 40, "ceil", "leaf",
                                                              True)
  assert [t for t in range(40) if granet.is_update_step(t)] == [5, 10, 15, 20, 25, 30, 35]
  config.pruning.dst.rounding = "floor"  # a field set overrides the method's value
  config.pruning.dst.end_fraction = 0.5
  assert (methods.drop_and_grow(config, 40).rounding,
          methods.drop_and_grow(config, 40).end_step) == ("floor", 20)
  config.pruning.dst.rounding = config.pruning.dst.end_fraction = None
  rigl = methods.drop_and_grow(_configure(config, "rigl"), 40)
  assert (rigl.drop_fraction, rigl.min_drop_fraction, rigl.end_step, rigl.rounding,
          rigl.regrow_scope, rigl.steps_on_update()) == (0.3, 0.0, 30, "floor", None, False)
  # SET as rigl's SparseSETOptimizer: the optimizer step on update steps too.
  set_ = methods.drop_and_grow(_configure(config, "set"), 40)
  assert (set_.grow, set_.drop_fraction, set_.steps_on_update()) == ("random", 0.3, True)
  config.pruning.dst.gradient_on_update = False
  assert not methods.drop_and_grow(_configure(config, "set"), 40).steps_on_update()


@pytest.mark.parametrize("key, value, message", [
    ("dst.drop_fraction", 1.0, r"config.pruning.dst.drop_fraction=1.0 must be in \[0, 1\)"),
    ("dst.decay", "linear", "config.pruning.dst.decay='linear'"),
    ("dst.end_fraction", 1.5, r"config.pruning.dst.end_fraction=1.5 must be a fraction"),
    ("dst.end_fraction", 0.01, "config.pruning.dst.end_fraction=0.01 of 40 steps leaves no"),
    ("dst.rounding", "round", "config.pruning.dst.rounding='round' is not one of"),
    ("dst.regrow_scope", "global", "config.pruning.dst.regrow_scope='global' needs config"),
    ("dst.min_drop_fraction", 0.5, r"config.pruning.dst.min_drop_fraction=0.5 must be in \[0, "),
    ("synflow_iterations", 0, "config.pruning.synflow_iterations=0 must be an integer >= 1"),
    ("packed_masks", True, "drop-and-grow and learned-mask training keep bool masks"),
])
def test_bad_sparse_training_options_are_config_errors_naming_the_key(tiny_config, key, value,
                                                                      message):
  config = _configure(tiny_config, "synflow" if key == "synflow_iterations" else "rigl")
  section = config.pruning
  for part in key.split(".")[:-1]:
    section = section[part]
  section[key.split(".")[-1]] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    trainer.Trainer(config, jax.devices()[:1])


def test_rigl_masks_change_and_keep_their_counts_in_the_trainer(tiny_config):
  config = _configure(tiny_config, "rigl")
  run = trainer.Trainer(config, jax.devices()[:1])
  state = run.initial_state()
  host = lambda masks: jax.tree.map(np.asarray, masks)  # the step donates its input buffers
  first = host(trainer.masks_of(state))
  counts = sparsejax.dst.active_counts(first)
  history = [first]
  for step in range(12):
    state, _ = run.train_step(state, *run.batch(step))
    history.append(host(trainer.masks_of(state)))
    assert sparsejax.dst.active_counts(history[-1]) == counts
  changed = [i for i in range(1, len(history))
             if any(bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(history[i]),
                                                          jax.tree.leaves(history[i - 1])))]
  assert changed == [6, 11]  # the updates at counts 5 and 10
  assert sparsejax.dst.ever_active(history) > 0.2
