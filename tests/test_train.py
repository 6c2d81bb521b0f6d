"""The training binary end to end, on the bundled digits (in-process, tiny configs)."""

import json
import os

import chex
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import sparsejax
from tests import reference
from experiments import metrics as metrics_lib
from experiments import train
from experiments import trainer


def test_binary_writes_metrics_final_json_and_curves_and_reaches_target(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  summary = train.run(tiny_config, workdir)

  assert sorted(os.listdir(workdir)) == ["config.json", "curves.png", "dense_baseline",
                                         "final.json", "metrics.jsonl", "tensorboard"]
  with open(os.path.join(workdir, "final.json")) as f:
    final = json.load(f)
  assert final == json.loads(json.dumps(summary))
  assert final["steps"] == 40 and final["method"] == "gradual"
  assert abs(final["sparsity"] - 0.8) <= 0.005
  for path, layer in final["layers"].items():  # uniform: every kernel at 80%
    assert abs(layer["sparsity"] - 0.8) <= 0.005, path
    assert layer["zero_fraction"] >= layer["sparsity"], path  # pruned weights are zero
  assert set(final["layers"]) == {"hidden_0/kernel", "hidden_1/kernel", "head/kernel"}
  assert 0.1 < final["dense_baseline"]["test"]["accuracy"] <= 1.0

  train_records = metrics_lib.read_metrics(workdir, "train")
  assert [r["step"] for r in train_records] == [10, 20, 30, 40]
  assert train_records[0]["sparsity"] < train_records[-1]["sparsity"]
  test_records = metrics_lib.read_metrics(workdir, "test")
  assert [r["step"] for r in test_records] == [11, 22, 33, 40]  # every epoch and at the end
  assert test_records[-1]["accuracy"] == final["test"]["accuracy"]
  # Pruning steps are fractions of the 40 steps: 0.1 -> step 4, 0.5 -> step 20, every 5.
  # After `step` steps the last mask update ran at step - 1.
  for record in test_records:
    expected = reference.polynomial_sparsity(record["step"] - 1, 0.0, 0.8, 4, 20, 5)
    assert abs(record["sparsity"] - expected) < 2e-3, record  # per-leaf rounding of counts

  events = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30, 40]
  assert "test/accuracy" in events.Tags()["scalars"]

  line = train.final_line(final, final["dense_baseline"], tiny_config)
  assert line.startswith(f"dense test accuracy {final['dense_baseline']['test']['accuracy']:.4f} "
                         f"| pruned test accuracy {final['test']['accuracy']:.4f} | sparsity 0.80")


def test_pruned_weights_are_exactly_zero_where_masks_are_false(tiny_config, tmp_path):
  state = trainer.train_and_evaluate(tiny_config, str(tmp_path), log=lambda _: None).state
  masks = sparsejax.find_pruning_state(state.opt_state).masks
  for path, kernel in [("hidden_0", 64 * 32), ("hidden_1", 32 * 16), ("head", 16 * 10)]:
    mask = np.asarray(masks[path]["kernel"])
    weights = np.asarray(state.params[path]["kernel"])
    assert mask.sum() == round(0.2 * kernel), path  # exact top-k count
    assert np.all(weights[~mask] == 0.0) and np.all(weights[mask] != 0.0), path


def test_same_seed_gives_bitwise_identical_runs(tiny_config, tmp_path):
  tiny_config.num_train_steps = 15
  first = trainer.train_and_evaluate(tiny_config, str(tmp_path / "a"), log=lambda _: None)
  second = trainer.train_and_evaluate(tiny_config, str(tmp_path / "b"), log=lambda _: None)
  chex.assert_trees_all_equal(first.state.params, second.state.params)
  assert first.summary["test"] == second.summary["test"]


def _losses(config, devices, steps):
  run = trainer.Trainer(config, devices)
  state = run.initial_state()
  losses = []
  for step in range(steps):
    state, metrics = run.train_step(state, *run.batch(step))
    losses.append(float(metrics["loss"]))
  return np.array(losses), state


@pytest.mark.parametrize("model", [
    dict(name="mlp", features=(32, 16)),
    dict(name="resnet20", width=4),  # BatchNorm: statistics must be of the global batch
])
def test_train_step_gives_same_loss_on_4_devices_and_on_1(tiny_config, model):
  assert jax.device_count() >= 4
  tiny_config.model = model
  tiny_config.pruning.start_fraction = 0.0  # 40 steps: sparsity ramps from step 0 to 20
  if model["name"] == "resnet20":
    tiny_config.channels = 3
  one, state_one = _losses(tiny_config, jax.devices()[:1], steps=8)
  four, state_four = _losses(tiny_config, jax.devices()[:4], steps=8)
  assert one[0] > one[-1]  # it trains
  np.testing.assert_allclose(four, one, rtol=2e-5, atol=1e-6)
  chex.assert_trees_all_close(state_four.params, state_one.params, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(state_four.batch_stats, state_one.batch_stats, rtol=1e-4, atol=1e-5)
  assert len(state_four.params[next(iter(state_four.params))]["kernel"].sharding.device_set) == 4
  # Pruned (masks updated at steps 0 and 5) on kernels only; BatchNorm scales,
  # biases and running statistics stay dense.
  masks = sparsejax.find_pruning_state(state_four.opt_state).masks
  pruned = sparsejax.sparsity_report(masks).leaves
  assert pruned and all(path.endswith("kernel") for path in pruned)
  kernels = sparsejax.sparsity_report(state_four.params).leaves
  assert all(kernels[path].kept == leaf.kept for path, leaf in pruned.items())
  assert sparsejax.sparsity_report(masks).sparsity > 0.1


def test_batch_size_not_divisible_by_devices_is_an_error(tiny_config):
  tiny_config.batch_size = 30
  with pytest.raises(ValueError, match="batch_size=30 is not divisible by the 4 devices"):
    trainer.Trainer(tiny_config, jax.devices()[:4])


def test_absent_dataset_in_config_is_an_error_before_training(tiny_config, tmp_path):
  tiny_config.dataset, tiny_config.data_dir = "cifar10", str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared in .*empty"):
    train.run(tiny_config, str(tmp_path / "run"))
