"""The sparse training methods through the training binary (tiny configs, bundled digits)."""

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax.checkpoint import SparseCheckpointManager
from experiments import config_checks
from experiments import metrics as metrics_lib
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


@pytest.mark.parametrize("key, value, message", [
    ("dst.drop_fraction", 1.0, r"config.pruning.dst.drop_fraction=1.0 must be in \[0, 1\)"),
    ("dst.decay", "linear", "config.pruning.dst.decay='linear'"),
    ("dst.end_fraction", 1.0, "config.pruning.dst.end_fraction=1.0 of 40 steps"),
    ("synflow_iterations", 0, "config.pruning.synflow_iterations=0 must be an integer >= 1"),
    ("packed_masks", True, "drop-and-grow training keep bool masks"),
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
