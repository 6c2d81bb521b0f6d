"""The structured pruning binary: config checks and a tiny LM end to end."""

import json
import os

import pytest

from experiments import config_checks
from experiments import structured
from experiments import train
from experiments import workdir as workdir_lib
from experiments.configs import lm_stdlib
from experiments.configs import structured_lm


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(train_workdir=""), r"config.train_workdir is empty"),
    (lambda c: c.update(methods=("flap", "l0")), r"config.methods='l0' is not one of"),
    (lambda c: c.update(fractions=(0.2, 1.0)), r"config.fractions: 1.0 must be in \[0, 1\)"),
    (lambda c: c.update(latency_repeats=0), r"config.latency_repeats=0"),
])
def test_bad_config_is_an_error_naming_the_key(edit, message, tmp_path):
  config = structured_lm.get_config()
  edit(config)
  with pytest.raises(config_checks.ConfigError, match=message) as raised:
    structured.run(config, str(tmp_path / "run"))
  assert "\n" not in str(raised.value)
  assert not (tmp_path / "run").exists()


def test_flap_on_a_consumer_without_a_bias_is_a_config_error_naming_the_layer():
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.models import create_model  # pylint: disable=g-import-not-at-top
  from experiments.models import structure as model_structure  # pylint: disable=g-import-not-at-top
  model = create_model("mlp", num_classes=10, features=(8, 6))
  params = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 4)))["params"]
  groups = model_structure.groups(model, params)
  config = structured_lm.get_config()
  structured.check_groups(config, model, "mlp", groups)   # the MLP's consumers have biases
  no_bias = tuple(dataclasses.replace(g, bias=None) if g.name == "hidden_1" else g for g in groups)
  with pytest.raises(config_checks.ConfigError, match=r"config.methods: flap adds its "
                     r"compensation to each consumer's bias; model 'mlp' has consumers without "
                     r"one \(head/kernel\): use wanda_sp or magnitude_sp") as raised:
    structured.check_groups(config, model, "mlp", no_bias)
  assert "\n" not in str(raised.value)
  config.methods = ("wanda_sp", "magnitude_sp")
  structured.check_groups(config, model, "mlp", no_bias)


def test_table_lists_dense_then_every_row():
  rows = [{"method": "flap", "fraction": 0.5, "test_bits_per_byte": 3.5, "params": 1000,
           "latency_ratio": 0.6}]
  lines = structured.format_table(rows, {"test_bits_per_byte": 3.0}, 2000, True).splitlines()
  assert lines[2] == "| dense | 0% | 3.000 | 2,000 | 1.00x |"
  assert lines[3] == "| flap | 50% | 3.500 | 1,000 | 0.60x |"


@pytest.mark.slow
def test_tiny_lm_pruned_by_every_method_shrunk_timed_and_resumed(tmp_path):
  lm = lm_stdlib.get_config()
  lm.data_dir = str(tmp_path / "tfds")
  lm.model.update(num_layers=2, width=16, num_heads=4, mlp_dim=32)
  lm.num_train_steps, lm.warmup_steps, lm.batch_size, lm.log_every = 40, 10, 8, 20
  lm.checkpoint_every = 0
  lm.eval_batch_size = 256
  trained = train.run(lm, str(tmp_path / "lm"))
  config = structured_lm.get_config()
  config.train_workdir = str(tmp_path / "lm")
  config.fractions = (0.5,)
  config.calibration_sequences, config.latency_repeats, config.eval_sequences = 16, 2, 0
  workdir = str(tmp_path / "structured")
  result = structured.run(config, workdir, log=lambda line: None)
  assert result["dense"]["test_loss"] == pytest.approx(trained["test"]["loss"], rel=1e-6)
  rows = {r["method"]: r for r in result["rows"]}
  assert set(rows) == {"flap", "wanda_sp", "magnitude_sp"}
  for method, row in rows.items():
    assert row["shrunk_max_abs_diff"] < 1e-4, method       # the shrunk model is the masked one
    assert row["params"] < result["dense"]["params"]
    if method != "flap":                                    # half of every layer's units
      assert row["heads"] == [2, 2] and row["mlp_units"] == [16, 16]
  assert workdir_lib.undeclared(workdir, structured.RUN_FILES) == []
  os.remove(os.path.join(workdir, "rows", "magnitude_sp_50pct.json"))
  os.remove(os.path.join(workdir, "final.json"))
  lines = []
  structured.run(config, workdir, log=lines.append)
  assert [l for l in lines if "/3:" in l] == ["[structured] 3/3: magnitude_sp at 50%"]
  with open(os.path.join(workdir, "final.json")) as f:
    assert len(json.load(f)["rows"]) == 3


@pytest.mark.slow
def test_a_conv_model_takes_magnitude_sp_and_calibrated_methods_are_a_config_error(tmp_path):
  from experiments.configs import lenet5_digits  # pylint: disable=g-import-not-at-top
  lenet = lenet5_digits.get_config()
  lenet.num_train_steps, lenet.log_every, lenet.checkpoint_every = 4, 2, 0
  lenet.dense_baseline, lenet.pruning.method = False, "dense"
  train.run(lenet, str(tmp_path / "lenet"))
  config = structured_lm.get_config()
  config.train_workdir = str(tmp_path / "lenet")
  config.fractions, config.latency_repeats, config.eval_sequences = (0.5,), 1, 0
  config.methods = ("wanda_sp",)   # conv_0's channels feed a convolution: no consumer kernel
  with pytest.raises(config_checks.ConfigError, match=r"config.methods: \['wanda_sp'\] need each "
                     r"group's consumer kernel; model 'lenet5' has groups without one"):
    structured.run(config, str(tmp_path / "wanda"), log=lambda line: None)
  assert not (tmp_path / "wanda").exists()
  config.methods = ("magnitude_sp",)
  result = structured.run(config, str(tmp_path / "magnitude"), log=lambda line: None)
  (row,) = result["rows"]
  assert row["shrunk_max_abs_diff"] < 1e-4 and row["params"] < result["dense"]["params"]
