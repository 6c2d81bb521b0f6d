"""The per-layer sensitivity sweep and its rates, on a hand-worked example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import sensitivity
import tests

# Two 2x2 kernels and a bias; loss = sum(a) + 10 sum(b) (any function of the params will do).
PARAMS = {"a": {"kernel": jnp.array([[1.0, -2.0], [3.0, 4.0]]), "bias": jnp.array([5.0, 5.0])},
          "b": {"kernel": jnp.array([[0.5, -1.0], [2.0, -3.0]])}}


def loss_fn(params):
  return jnp.sum(params["a"]["kernel"]) + 10 * jnp.sum(params["b"]["kernel"])


def test_sweep_prunes_each_layer_alone_as_worked_by_hand():
  lines = []
  table = sensitivity.sweep(PARAMS, loss_fn, (0.25, 0.5), log=lines.append)
  # Dense: 6 + 10 * (-1.5) = -9.
  # a at 25% keeps -2, 3, 4 (sum 5): 5 - 15 = -10; at 50% keeps 3, 4 (7): 7 - 15 = -8.
  # b at 25% keeps -1, 2, -3 (-2): 6 - 20 = -14; at 50% keeps 2, -3 (-1): 6 - 10 = -4.
  assert table.dense_loss == -9.0
  assert table.groups == ("a/kernel", "b/kernel")
  assert table.paths == (("a/kernel",), ("b/kernel",))
  assert table.sizes == (4, 4) and table.sparsities == (0.25, 0.5)
  np.testing.assert_array_equal(table.losses, [[-10.0, -8.0], [-14.0, -4.0]])
  assert lines[1] == "[sensitivity] b/kernel: 0.25: -14.0000, 0.5: -4.0000 (dense -9.0000)"
  # Within 1.5 of dense (<= -7.5): a up to 50%, b only 25%.
  rates = sensitivity.rates(table, 1.5)
  assert rates == {"^a/kernel$": 0.5, "^b/kernel$": 0.25}
  assert sensitivity.overall_sparsity(table, rates) == 0.375
  # The rates are an allocation as they are: a keeps 2 of 4, b 3 of 4, the bias untouched.
  masks = sparsejax.compute_masks(PARAMS, 0.0, allocation=rates)
  np.testing.assert_array_equal(masks["a"]["kernel"], [[False, False], [True, True]])
  np.testing.assert_array_equal(masks["b"]["kernel"], [[False, True], [True, True]])
  assert masks["a"]["bias"] is None
  # A loss below dense is within any tolerance: at 0 both take 25% (-10, -14 <= -9).
  assert sensitivity.rates(table, 0.0) == {"^a/kernel$": 0.25, "^b/kernel$": 0.25}


def test_regex_groups_prune_their_leaves_together_first_match_wins():
  table = sensitivity.sweep(PARAMS, loss_fn, (0.5,), groups=("b/", "kernel"))
  assert table.groups == table.patterns == ("b/", "kernel")
  assert table.paths == (("b/kernel",), ("a/kernel",))   # 'kernel' gets what 'b/' left
  np.testing.assert_array_equal(table.losses, [[-4.0], [-8.0]])
  # One group of both kernels at 50%: 7 + 10 * (-1) = -3.
  both = sensitivity.sweep(PARAMS, loss_fn, (0.5,), groups=("kernel",))
  assert both.sizes == (8,) and both.losses.tolist() == [[-3.0]]


def test_rates_stop_at_the_first_sparsity_past_the_tolerance():
  table = sensitivity.Sensitivity(("x",), ("x",), (("x",),), (8,), (0.9, 0.5, 0.7), 1.0,
                                  np.array([[1.05, 1.0, 2.0]]))
  # Sorted: 0.5 -> 1.0 ok, 0.7 -> 2.0 too much; 0.9's 1.05 past it is not taken.
  assert sensitivity.rates(table, 0.1) == {"x": 0.5}


def test_bad_input_is_a_one_line_error_naming_it():
  with pytest.raises(ValueError, match=r"sparsities: .*1.5"):
    sensitivity.sweep(PARAMS, loss_fn, (0.5, 1.5))
  with pytest.raises(ValueError, match="sparsities is empty"):
    sensitivity.sweep(PARAMS, loss_fn, ())
  with pytest.raises(ValueError, match=r"group regex 'c' matches no prunable leaf"):
    sensitivity.sweep(PARAMS, loss_fn, (0.5,), groups=("a", "c"))
  with pytest.raises(ValueError, match=r"group regex 'a\(' is invalid"):
    sensitivity.sweep(PARAMS, loss_fn, (0.5,), groups=("a(",))
  with pytest.raises(ValueError, match=r"group 'a/kernel' at sparsity 0.5: loss_fn returned .*inf"):
    sensitivity.sweep(PARAMS, lambda p: 1 / (jnp.sum(p["a"]["kernel"]) - 7.0), (0.5,))
  with pytest.raises(ValueError, match=r"max_increase=-1 must be a finite number >= 0"):
    sensitivity.rates(sensitivity.sweep(PARAMS, loss_fn, (0.5,)), -1)


def test_binary_writes_csv_heatmap_rates_and_table(tiny_config, tmp_path):
  import csv  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from experiments import sensitivity as binary  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  from experiments import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import sensitivity_lm  # pylint: disable=g-import-not-at-top
  from tests.test_oneshot_run import _fake_training_workdir  # pylint: disable=g-import-not-at-top
  tiny_config.pruning.method = "dense"
  _fake_training_workdir(tiny_config, tmp_path / "mlp", steps=(2,))
  config = sensitivity_lm.get_config()
  config.train_workdir = str(tmp_path / "mlp")
  config.groups, config.exclude, config.sparsities = (), "head", (0.5, 0.9)
  config.eval_examples, config.max_increase = 100, 0.01
  workdir = tmp_path / "w"
  result = binary.run(config, str(workdir), log=lambda line: None)
  assert result["groups"] == ["hidden_0/kernel", "hidden_1/kernel"]
  assert result["sizes"] == [64 * 32, 32 * 16]
  # Against the loss computed here: hidden_1 at 90% by hand-made NumPy magnitude pruning,
  # on the same first 100 test examples.
  lm_trainer = trainer.Trainer(tiny_config)
  params = jax.tree.map(np.asarray, lm_trainer.initial_state(seed=2).params)
  w = params["hidden_1"]["kernel"]
  keep = round(0.1 * w.size)
  order = np.argsort(-np.abs(w).ravel(), kind="stable")[:keep]
  pruned = np.zeros(w.size, w.dtype)
  pruned[order] = w.ravel()[order]
  params["hidden_1"]["kernel"] = pruned.reshape(w.shape)
  inputs, labels = lm_trainer.data.eval.examples(range(100))
  x = lm_trainer.data.preprocess(np.stack(inputs)).reshape(100, -1).astype(np.float64)
  for name in ("hidden_0", "hidden_1"):
    x = np.maximum(x @ params[name]["kernel"] + params[name]["bias"], 0)
  logits = x @ params["head"]["kernel"] + params["head"]["bias"]
  logits -= logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  loss = -log_p[np.arange(100), np.asarray(labels)].mean()
  assert result["losses"][1][1] == pytest.approx(loss, rel=1e-5)
  with open(workdir / "sensitivity.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4 and rows[3]["group"] == "hidden_1/kernel" and rows[3]["sparsity"] == "0.9"
  assert float(rows[3]["increase"]) == pytest.approx(result["losses"][1][1] - result["dense_loss"])
  assert os.path.getsize(workdir / "sensitivity.png") > 0
  with open(workdir / "rates.json") as f:
    assert json.load(f) == result["rates"]
  assert result["markdown"].splitlines()[0] == "| group | weights | 50% | 90% |"
  assert workdir_lib.undeclared(str(workdir), binary.RUN_FILES) == []
  assert binary.run(config, str(workdir), log=lambda line: None) == result   # finished: read back


@pytest.mark.parametrize("key, value, message", [
    ("sparsities", (0.5, 1.5), r"^config.sparsities\[1\]=1.5 must be a finite number in \[0, 1\]"),
    ("sparsities", (), r"^config.sparsities is empty"),
    ("max_increase", -0.1, r"^config.max_increase=-0.1 must be"),
    ("eval_examples", -1, r"^config.eval_examples=-1 must be an integer >= 0"),
    ("train_workdir", "", r"^config.train_workdir is empty"),
])
def test_binary_bad_values_name_the_key(key, value, message, tmp_path):
  from experiments import config_checks  # pylint: disable=g-import-not-at-top
  from experiments import sensitivity as binary  # pylint: disable=g-import-not-at-top
  from experiments.configs import sensitivity_lm  # pylint: disable=g-import-not-at-top
  config = sensitivity_lm.get_config()
  config[key] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    binary.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def _numpy_keep_largest(w, sparsity):
  """w with its round((1 - s) n) largest |w| kept (no ties in random floats), in NumPy."""
  flat = np.abs(w).ravel()
  keep = int(round((1 - sparsity) * flat.size))
  mask = np.zeros(flat.size, bool)
  mask[np.argsort(-flat, kind="stable")[:keep]] = True
  return np.where(mask.reshape(w.shape), w, 0.0)


def test_guide_sensitivity_example_runs_and_matches_numpy():
  block = tests.doc_code_block("sensitivity.sweep(params, loss_fn")
  namespace = {}
  exec(block, namespace)  # pylint: disable=exec-used
  table, allocation, masks = namespace["table"], namespace["allocation"], namespace["masks"]
  weights = {name: np.asarray(namespace["params"][name]["kernel"], np.float64)
             for name in ("hidden", "out")}
  x = np.asarray(namespace["x"], np.float64)

  def relative_error(w):
    out = np.maximum(x @ w["hidden"], 0.0) @ w["out"]
    dense = np.maximum(x @ weights["hidden"], 0.0) @ weights["out"]
    return np.mean((out - dense) ** 2) / np.mean(dense ** 2)

  assert table.groups == ("hidden/kernel", "out/kernel")
  assert table.sizes == (32 * 64, 64 * 8) and table.dense_loss == 0.0
  expected = np.array([[relative_error({**weights, name: _numpy_keep_largest(weights[name], s)})
                        for s in (0.5, 0.7, 0.9)] for name in ("hidden", "out")])
  np.testing.assert_allclose(table.losses, expected, rtol=1e-4, atol=1e-7)
  # rates by hand from the NumPy losses: the largest sparsity whose loss (and every lower one's)
  # stays within 0.1 of dense.
  by_hand = {}
  for name, row in zip(("hidden", "out"), expected):
    ok = [s for s, l in zip((0.5, 0.7, 0.9), row) if l <= 0.1]
    by_hand[f"^{name}/kernel$"] = max(ok) if ok == [0.5, 0.7, 0.9][:len(ok)] and ok else 0.0
  assert allocation == by_hand == {"^hidden/kernel$": 0.9, "^out/kernel$": 0.5}
  assert int(np.asarray(masks["hidden"]["kernel"]).sum()) == round(0.1 * 32 * 64)
  assert int(np.asarray(masks["out"]["kernel"]).sum()) == round(0.5 * 64 * 8)
  assert sensitivity.overall_sparsity(table, allocation) == pytest.approx(
      (0.9 * 2048 + 0.5 * 512) / 2560)
  assert "0.82" in block and "{'^hidden/kernel$': 0.9, '^out/kernel$': 0.5}" in block
