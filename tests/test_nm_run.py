"""N:M training through the training binary: checkpoint and export hold the pattern."""

import json
import os

import jax
import numpy as np
import pytest

from sparsejax.checkpoint import SparseCheckpointManager
from sparsejax.checkpoint import load_sparse
from experiments import metrics as metrics_lib
from experiments import train
from experiments import workdir as workdir_lib
from experiments import trainer
from experiments.configs import nm_mlp
from experiments.configs import nm_vit


def _nm_config(digits_dir, method="srste", n=2, m=4):
  config = nm_mlp.get_config()
  config.data_dir = digits_dir
  config.model.features = (64, 64)  # every input axis a multiple of 64 (geometric 1:8)
  config.num_train_steps = 40
  config.log_every = 10
  config.checkpoint_every = 20
  config.dense_baseline = False
  config.pruning.nm.method = method
  config.pruning.nm.n, config.pruning.nm.m = n, m
  config.pruning.nm.dense_fraction = 0.1   # steps 0-3 dense
  config.pruning.nm.finetune_fraction = 0.25  # steps 30-39 hard mask
  config.pruning.nm.update_every = 3
  return config


def _max_per_group(w, m):
  """Most nonzeros in a group of m consecutive inputs (axis 0) of a Dense kernel."""
  w = np.asarray(w)
  return int((w != 0).reshape(w.shape[0] // m, m, w.shape[1]).sum(axis=1).max())


@pytest.mark.parametrize("method,n,m", [("srste", 2, 4), ("mdgf_exp", 1, 8),
                                        ("sdgf_geometric", 1, 8)])
def test_final_checkpoint_and_export_keep_at_most_n_of_every_m(digits_dir, tmp_path, method, n, m):
  workdir = str(tmp_path / "run")
  summary = train.run(_nm_config(digits_dir, method, n, m), workdir)
  assert summary["method"] == "nm" and summary["target_sparsity"] == 1 - n / m
  assert abs(summary["sparsity"] - (1 - n / m)) < 1e-9
  with SparseCheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    assert manager.latest_step() == 40
    like = jax.tree.map(np.zeros_like,
                        trainer.Trainer(_nm_config(digits_dir, method, n, m)).initial_state().params)
    restored = manager.restore(params_like=like, masks_like=like)
  exported, exported_masks = load_sparse(os.path.join(workdir, "nm_export.npz"))
  for layer in ("hidden_0", "hidden_1", "head"):
    kernel = np.asarray(restored.params[layer]["kernel"])
    assert _max_per_group(kernel, m) <= n, layer
    mask = np.asarray(restored.masks[layer]["kernel"])
    assert np.all(mask.reshape(kernel.shape[0] // m, m, -1).sum(axis=1) == n), layer
    assert np.all(kernel[~mask] == 0.0), layer
    np.testing.assert_array_equal(np.asarray(exported[layer]["kernel"]), kernel)
    np.testing.assert_array_equal(np.asarray(exported_masks[layer]["kernel"]), mask)
    assert summary["nm"]["max_nonzeros_per_group"][f"{layer}/kernel"] <= n
  with open(os.path.join(workdir, "final.json")) as f:
    assert json.load(f)["nm"]["pattern"] == f"{n}:{m}"
  # Evaluations at 11, 22, 33 and 40; only those of the hard-masked net (from step 30) count.
  tests = {r["step"]: r["accuracy"] for r in metrics_lib.read_metrics(workdir, "test")}
  assert sorted(tests) == [11, 22, 33, 40]
  assert summary["best_test_accuracy"] == max(tests[33], tests[40])
  assert workdir_lib.undeclared(workdir, train.RUN_FILES) == []  # --overwrite removes it all


def test_mid_training_checkpoint_keeps_dense_weights_and_resume_matches(digits_dir, tmp_path):
  config = _nm_config(digits_dir)
  whole = trainer.Trainer(config).fit(str(tmp_path / "whole"), log=lambda _: None)
  cut = trainer.Trainer(config)
  cut.num_steps = 20  # stop at the checkpoint of step 20, inside the sparse phase
  halfway = cut.fit(str(tmp_path / "cut"), log=lambda _: None)
  kernel = np.asarray(halfway.state.params["hidden_0"]["kernel"])
  assert np.count_nonzero(kernel) == kernel.size  # STE: pruned weights still train, dense
  resumed = trainer.Trainer(config).fit(str(tmp_path / "cut"), log=lambda _: None, resume=True)
  for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("field, value, message", [
    ("method", "sdgf", r"config.pruning.nm.method='sdgf' is not one of \['step', 'srste'"),
    ("n", 5, r"config.pruning.nm.n=5 exceeds config.pruning.nm.m=4"),
    ("m", 0, r"config.pruning.nm.m=0 must be an integer >= 1"),
    ("dense_fraction", 1.0, r"config.pruning.nm.dense_fraction=1.0 must be a fraction in \[0, 1\)"),
    ("finetune_fraction", 0.95, r"config.pruning.nm \(dense_fraction=0.1, finetune_fraction=0.95\):"
                                r" the sparse phase has -2 steps"),
    ("non_divisible", "skip", r"config.pruning.nm.non_divisible='skip' is not one of"),
    ("decay_coef", -1.0, r"config.pruning.nm.decay_coef=-1.0 must be > 0 \(or None"),
    ("finetune_mask", "ste", r"config.pruning.nm.finetune_mask='ste' is not one of"),
    ("srste_lambda", -1e-3, r"config.pruning.nm.srste_lambda=-0.001 must be >= 0"),
])
def test_bad_nm_config_fails_before_the_workdir_is_claimed(digits_dir, tmp_path, field, value,
                                                            message):
  config = _nm_config(digits_dir)
  config.pruning.nm[field] = value
  with pytest.raises(trainer.config_checks.ConfigError, match=message):
    train.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_kernel_that_m_does_not_divide_is_named_unless_left_dense(digits_dir, tmp_path):
  config = _nm_config(digits_dir, n=1, m=8)
  config.model.features = (60, 32)  # hidden_1's input axis has 60 entries
  with pytest.raises(trainer.config_checks.ConfigError,
                     match=r"config.pruning.nm: 'hidden_1/kernel' of shape \(60, 32\): its contraction "
                           r"axes \(0,\) hold 60 entries, not divisible by M=8.*"
                           r"pruning.nm.non_divisible='dense'"):
    train.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config.pruning.nm.non_divisible = "dense"
  summary = train.run(config, str(tmp_path / "run"))
  assert set(summary["nm"]["max_nonzeros_per_group"]) == {"hidden_0/kernel", "head/kernel"}
  assert summary["layers"].keys() == {"hidden_0/kernel", "head/kernel"}


def test_vit_config_puts_n_m_on_attention_and_mlp_kernels_only(digits_dir):
  config = nm_vit.get_config()
  config.data_dir = digits_dir
  config.model.depth = 1
  run = trainer.Trainer(config)
  masks = trainer.masks_of(run.initial_state())
  from sparsejax import trees
  masked = sorted(leaf.path for leaf in trees.named_leaves(masks))
  assert masked == [f"block_0/{p}/kernel" for p in (
      "attention/key", "attention/out", "attention/query", "attention/value", "mlp/fc_0",
      "mlp/fc_1")]
