"""The training binary end to end, on the bundled digits (in-process, tiny configs)."""

import json
import os

import chex
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import sparsejax
from sparsejax.checkpoint import SparseCheckpointManager
from tests import reference
from experiments import input_pipeline
from experiments import metrics as metrics_lib
from experiments import train
from experiments import trainer


def test_binary_writes_metrics_final_json_and_curves_and_reaches_target(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  summary = train.run(tiny_config, workdir)

  assert sorted(os.listdir(workdir)) == [".lock", "checkpoints", "config.json", "curves.png",
                                         "dense_baseline", "final.json", "metrics.jsonl",
                                         "tensorboard"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["40"]  # only the final one
  with SparseCheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    like = jax.tree.map(np.zeros_like, trainer.Trainer(tiny_config).initial_state().params)
    restored = manager.restore(params_like=like, masks_like=like)
  for path, kernel in [("hidden_0", 64 * 32), ("hidden_1", 32 * 16), ("head", 16 * 10)]:
    mask = np.asarray(restored.masks[path]["kernel"])
    assert mask.sum() == round(0.2 * kernel)
    assert np.all(np.asarray(restored.params[path]["kernel"])[~mask] == 0)
  with open(os.path.join(workdir, "final.json")) as f:
    final = json.load(f)
  assert final == json.loads(json.dumps(summary))
  assert final["steps"] == 40 and final["method"] == "gradual"
  with open(os.path.join(workdir, "config.json")) as f:
    assert final["config"] == json.load(f)
  assert final["config"]["pruning"]["sparsity"] == 0.8 and final["config"]["model"]["features"] == [32, 16]
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


def train_steps(config, devices, steps):
  """Losses of `steps` train steps from a fresh state, the final state and its Trainer."""
  run = trainer.Trainer(config, devices)
  state = run.initial_state()
  losses = []
  for step in range(steps):
    state, metrics = run.train_step(state, *run.batch(step))
    losses.append(float(metrics["loss"]))
  return np.array(losses), state, run


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
    # BatchNorm's statistics over 4 shards agree with one device's only to
    # float rounding; a mask recomputed later from such weights can flip a
    # near-tied weight (seen at step 5 with jax 0.10.2), so prune once, at
    # step 0, from the identical initial weights.
    tiny_config.pruning.method = "one_shot"
  one, state_one, _ = train_steps(tiny_config, jax.devices()[:1], steps=8)
  four, state_four, _ = train_steps(tiny_config, jax.devices()[:4], steps=8)
  assert one[1] > one[-1]  # it trains (step 0 may prune, and the loss jump)
  np.testing.assert_allclose(four, one, rtol=2e-5, atol=1e-6)
  # Adam turns a near-zero gradient's rounding into a step of up to the learning
  # rate: a BatchNorm bias of ~1e-3 was seen 2e-5 apart after 8 steps.
  chex.assert_trees_all_close(state_four.params, state_one.params, rtol=1e-4, atol=5e-5)
  chex.assert_trees_all_close(state_four.batch_stats, state_one.batch_stats, rtol=1e-4, atol=1e-5)
  assert len(state_four.params[next(iter(state_four.params))]["kernel"].sharding.device_set) == 4
  # Pruned (masks updated at steps 0 and 5) on kernels only; BatchNorm scales,
  # biases and running statistics stay dense.
  masks = sparsejax.find_pruning_state(state_four.opt_state).masks
  pruned = sparsejax.sparsity_report(masks).leaves
  assert pruned and all(path.endswith("kernel") for path in pruned)
  kernels = sparsejax.sparsity_report(state_four.params).leaves  # zeros only: pruned ones are 0
  assert all(kernels[path].zero_fraction == leaf.sparsity for path, leaf in pruned.items())
  assert sparsejax.sparsity_report(masks).sparsity > 0.1


def test_batch_size_not_divisible_by_devices_is_an_error(tiny_config, tmp_path):
  tiny_config.batch_size = 30
  with pytest.raises(ValueError, match="batch_size=30 is not divisible by the 4 devices"):
    train.run(tiny_config, str(tmp_path / "run"), devices=jax.devices()[:4])
  assert not (tmp_path / "run").exists()


def test_absent_dataset_in_config_is_an_error_before_training(tiny_config, tmp_path):
  tiny_config.dataset, tiny_config.data_dir = "cifar10", str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared in .*empty"):
    train.run(tiny_config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_one_shot_prunes_at_its_step_then_keeps_the_mask(tiny_config, tmp_path):
  tiny_config.pruning.method = "one_shot"
  tiny_config.pruning.start_fraction = 0.5  # step 20 of 40
  run = trainer.train_and_evaluate(tiny_config, str(tmp_path), log=lambda _: None)
  records = metrics_lib.read_metrics(str(tmp_path), "test")
  # After `step` steps the last step index is step - 1: pruned once it reaches 20.
  assert [(r["step"], round(r["sparsity"], 4)) for r in records] == [
      (11, 0.0), (22, 0.8), (33, 0.8), (40, 0.8)]
  masks = sparsejax.find_pruning_state(run.state.opt_state).masks
  kernel = np.asarray(run.state.params["hidden_0"]["kernel"])
  assert np.all(kernel[~np.asarray(masks["hidden_0"]["kernel"])] == 0)


def _numpy_mlp_accuracy(params, images, labels):
  """Independent forward pass of the MLP (Dense -> relu -> ... -> head) in numpy."""
  x = images.reshape(len(labels), -1).astype(np.float64)
  for layer in ("hidden_0", "hidden_1"):
    x = np.maximum(x @ np.asarray(params[layer]["kernel"]) + np.asarray(params[layer]["bias"]), 0)
  logits = x @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  return float(np.mean(np.argmax(logits, -1) == labels))


def test_reported_test_accuracy_matches_a_numpy_forward_pass_on_the_eval_split(tiny_config, tmp_path):
  run = trainer.Trainer(tiny_config, jax.devices()[:4])  # eval batch padded across 4 devices
  result = run.fit(str(tmp_path), log=lambda _: None)
  images, labels = input_pipeline.read_split(run.data, "eval")
  assert len(labels) == 360
  expected = _numpy_mlp_accuracy(result.state.params, images, labels)
  assert result.summary["test"]["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_train_step_gives_same_numbers_with_and_without_jit(tiny_config):
  run = trainer.Trainer(tiny_config, jax.devices()[:1])
  step = trainer.make_train_step(run.model, run.tx)
  state = run.initial_state()
  for t in range(6):  # through the first mask update at step 4
    images, labels = run.batch(t)
    eager_state, eager_metrics = step(state, images, labels)
    jit_state, jit_metrics = jax.jit(step)(state, images, labels)
    chex.assert_trees_all_close(eager_metrics, jit_metrics, rtol=1e-5)
    chex.assert_trees_all_close(eager_state.params, jit_state.params, rtol=1e-5, atol=1e-6)
    state = jit_state


def test_gradual_steps_picked_on_the_host_equal_the_step_that_decides_inside(tiny_config):
  """The trainer compiles gradual pruning's step with and without the mask
  recompute and picks one per step on the host; the numbers are those of the
  one program whose lax.cond decides (masks recomputed at steps 4, 9, ...)."""
  run = trainer.Trainer(tiny_config, jax.devices()[:1])
  picked = run.compiled_step(run.initial_state())
  in_step = jax.jit(trainer.make_train_step(run.model, run.tx))
  host, inside = run.initial_state(), run.initial_state()
  recomputes = []
  for t in range(12):
    images, labels = run.batch(t)
    before = sparsejax.state_masks(inside.opt_state)
    host, _ = picked(t, host, images, labels)
    inside, _ = in_step(inside, images, labels)
    recomputes.append(any(bool((a != b).any()) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(sparsejax.state_masks(inside.opt_state)))))
    chex.assert_trees_all_equal(host.params, inside.params)
    chex.assert_trees_all_equal(host.opt_state, inside.opt_state)
  assert any(recomputes)   # the masks changed inside the compared steps
  # The program between recomputes has no conditional (no selection); the other one has.
  texts = {flag: fn.lower(host, images, labels).as_text()
           for flag, fn in run._flagged_steps.items()}  # pylint: disable=protected-access
  assert "stablehlo.case" not in texts[False] and "stablehlo.case" in texts[True]


@pytest.mark.parametrize("field, value, message", [
    ("log_every", 0, r"config.log_every=0 must be an integer >= 1"),
    ("eval_batch_size", 0, r"config.eval_batch_size=0 must be an integer >= 1"),
    ("checkpoint_every", 15, r"config.checkpoint_every=15 must be a multiple of config.log_every=10"),
    ("batch_size", 5000, r"config.batch_size=5000 exceeds the 1437 training examples"),
    ("eval_split", "train", r"config.train_split and config.eval_split are both 'train'"),
    ("model", {"name": "mlp", "width": 3}, r"config.model: unknown argument\(s\) for model 'mlp': width"),
    ("model", {"name": "vit", "patch_size": 3}, r"config.model: image size 8x8 is not divisible"),
])
def test_bad_config_fails_before_the_workdir_is_claimed(tiny_config, tmp_path, field, value, message):
  tiny_config[field] = value
  with pytest.raises(trainer.config_checks.ConfigError, match=message):
    train.run(tiny_config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_metrics_of_two_runs_are_never_mixed_in_one_workdir(tiny_config, tmp_path):
  tiny_config.num_train_steps = 2
  trainer.train_and_evaluate(tiny_config, str(tmp_path), log=lambda _: None)
  with open(tmp_path / "metrics.jsonl") as f:
    before = f.read()
  with pytest.raises(FileExistsError, match="already holds a run's metrics"):
    trainer.train_and_evaluate(tiny_config, str(tmp_path), log=lambda _: None)
  with open(tmp_path / "metrics.jsonl") as f:
    assert f.read() == before


@pytest.mark.slow
def test_lamp_allocation_prunes_the_trainers_kernels_like_the_authors_rule(tiny_config):
  # One-shot at step 0: the masks are LAMP's (Lee et al.) on the initial kernels.
  tiny_config.pruning.method = "one_shot"
  tiny_config.pruning.allocation = "lamp"
  tiny_config.pruning.start_fraction = 0.0
  run = trainer.Trainer(tiny_config, jax.devices()[:1])
  state = run.initial_state()
  kernels = {name: np.asarray(layer["kernel"]) for name, layer in state.params.items()}
  state, _ = run.train_step(state, *run.batch(0))
  masks = sparsejax.find_pruning_state(state.opt_state).masks
  names = sorted(name for name in masks if masks[name]["kernel"] is not None)
  assert names == sorted(kernels)
  want = reference.lamp_masks([kernels[name] for name in names], tiny_config.pruning.sparsity)
  for name, expected in zip(names, want):
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), expected, err_msg=name)
