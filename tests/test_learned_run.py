"""Learned masks in the binaries: config keys, the `scores` checkpoint item, a run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from experiments import config_checks
from experiments import methods
from experiments import trainer
from experiments.configs import default
from sparsejax.checkpoint import SparseCheckpointManager


def _config(method, **learned):
  config = default.get_config()
  config.pruning.method = method
  for key, value in learned.items():
    config.pruning.learned[key] = value
  return config


def test_each_method_name_builds_its_class_with_the_papers_hyperparameters():
  assert isinstance(methods.learned_method(_config("maskllm"), 100), sparsejax.MaskLLM)
  for name in ("jackpots", "jackpot"):  # the spelling too
    jackpots = methods.learned_method(_config(name, swap_end_fraction=0.75), 100)
    assert isinstance(jackpots, sparsejax.LotteryJackpots)
    assert (jackpots.start_step, jackpots.swap_end_step) == (50, 75)
  bip = methods.learned_method(_config("bip", lr2=0.5), 100)
  assert isinstance(bip, sparsejax.BiP) and bip.lr2 == 0.5
  maskllm = methods.learned_method(_config("maskllm", temperature=(3.0, 0.1), n=1, m=4), 100)
  assert maskllm.temperature == (3.0, 0.1) and maskllm.candidates.shape == (4, 4)
  assert methods.learned_method(_config("gradual"), 100) is None


@pytest.mark.parametrize("method, key, value, says", [
    ("maskllm", "n", 5, "pruning.learned.n=5"),
    ("maskllm", "temperature", (4.0, -1.0), "pruning.learned.temperature"),
    ("maskllm", "prior", "wanda", "pruning.learned.prior='wanda'"),
    ("jackpots", "swap_rate", 0.0, "pruning.learned.swap_rate=0.0"),
    ("bip", "lr2", -1.0, "pruning.learned.lr2=-1.0"),
    ("bip", "start_fraction", 1.0, "pruning.learned.start_fraction=1.0"),
    ("bip", "score_optimizer", "rmsprop", "pruning.learned.score_optimizer='rmsprop'"),
])
def test_bad_values_are_one_line_errors_naming_the_key(method, key, value, says):
  with pytest.raises(config_checks.ConfigError) as e:
    methods.make_optimizer(_config(method, **{key: value}), 100)
  assert says in str(e.value) and "\n" not in str(e.value)


def test_scores_are_their_own_checkpoint_item_and_old_steps_restore_without_them(tmp_path):
  params = {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
  scores = {"Dense_0": {"kernel": jnp.arange(32.).reshape(8, 4), "bias": None}}
  with SparseCheckpointManager(str(tmp_path), async_save=False) as manager:
    manager.save(1, params=params)                  # as before the item existed
    manager.save(2, params=params, scores=scores)
    old = manager.restore(1, params_like=params, scores_like=scores)
    new = manager.restore(2, params_like=params, scores_like=scores)
    alone = manager.restore(2, scores_like=scores)  # the scores without the weights
  assert old.scores is None
  np.testing.assert_array_equal(new.scores["Dense_0"]["kernel"], scores["Dense_0"]["kernel"])
  np.testing.assert_array_equal(alone.scores["Dense_0"]["kernel"], scores["Dense_0"]["kernel"])
  assert alone.params is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["maskllm", "jackpots", "bip"])
def test_a_learned_run_ends_at_its_exact_sparsity_and_checkpoints_its_scores(method, tiny_config,
                                                                            tmp_path):
  config = tiny_config
  config.pruning.method = method
  config.dense_baseline = False
  run = trainer.train_and_evaluate(config, str(tmp_path), log=lambda line: None)
  masks = trainer.masks_of(run.state)
  for leaf in sparsejax.leaves_with_masks(run.state.params, masks):
    if leaf.mask is None:
      continue
    if method == "maskllm":  # 2 of every 4 along the input axis
      assert (np.asarray(leaf.mask).reshape(-1, 4, leaf.mask.shape[-1]).sum(1) == 2).all()
    else:
      assert int(leaf.mask.sum()) == round(0.2 * leaf.mask.size)
  want = 0.5 if method == "maskllm" else 0.8
  assert run.summary["sparsity"] == pytest.approx(want, abs=1e-6)
  scores = trainer.scores_of(run.state)
  with SparseCheckpointManager(str(tmp_path / "checkpoints"), read_only=True) as manager:
    restored = manager.restore(scores_like=scores)
  for a, b in zip(jax.tree.leaves(restored.scores), jax.tree.leaves(scores)):
    np.testing.assert_array_equal(a, b)
