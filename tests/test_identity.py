"""Results record what they come from; results that no longer match are redone."""

import json
import os

import pytest

from experiments import oneshot
from experiments import train
from experiments import workdir as workdir_lib
from experiments.configs import oneshot_lm


def test_a_swapped_final_json_is_redone_from_the_checkpoints(tiny_config, tmp_path, capsys):
  tiny_config.num_train_steps = 12
  tiny_config.dense_baseline = False
  workdir = str(tmp_path / "run")
  summary = train.run(tiny_config, workdir)
  identity = summary["identity"]
  assert identity["step"] == 12 and identity["config_digest"] == workdir_lib.config_digest(
      json.loads(tiny_config.to_json()))
  assert workdir_lib.load_json(workdir, "final.json")["identity"] == identity
  # Another run's final.json (same config, other training) copied over this one's.
  forged = {**summary, "test": {"loss": 0.1, "accuracy": 0.99}, "best_test_accuracy": 0.99,
            "identity": {**identity, "step": 40, "checkpoint_checksum": "deadbeef"}}
  workdir_lib.save_json(workdir, "final.json", forged)
  capsys.readouterr()
  again = train.run(tiny_config, workdir)
  for key in ("test", "train", "best_test_accuracy", "sparsity", "layers", "identity"):
    assert again[key] == summary[key], key
  lines = [l for l in capsys.readouterr().out.splitlines() if "does not come from" in l]
  assert lines == [
      f"{workdir}/final.json does not come from this run (step 40 != 12; checkpoint_checksum "
      f"'deadbeef' != {identity['checkpoint_checksum']!r}); redoing the run's results from its "
      "checkpoints."]
  assert workdir_lib.load_json(workdir, "final.json")["test"] == summary["test"]


def test_oneshot_rows_of_a_model_trained_again_are_redone(tiny_config, tmp_path):
  tiny_config.pruning.method = "dense"
  tiny_config.dense_baseline = False
  trained = str(tmp_path / "mlp")
  train.run(tiny_config, trained)
  config = oneshot_lm.get_config()
  config.train_workdir = trained
  config.methods, config.sparsities, config.patterns = ("magnitude",), (0.5, 0.75), ()
  config.exclude, config.include = "", "hidden"
  workdir = str(tmp_path / "oneshot")
  first = oneshot.run(config, workdir, log=lambda line: None)
  os.remove(os.path.join(workdir, "rows", "magnitude_75pct.json"))  # as if killed at row 2
  os.remove(os.path.join(workdir, "final.json"))
  tiny_config.seed = 1  # the training run redone meanwhile: another model
  retrained = train.run(tiny_config, trained, overwrite=True)
  lines = []
  again = oneshot.run(config, workdir, log=lines.append)
  assert [l for l in lines if "another trained model" in l] == [
      f"[oneshot] magnitude_50pct.json comes from another trained model (config_digest "
      f"{first['source']['config_digest']!r} != {retrained['identity']['config_digest']!r}; "
      f"checkpoint_checksum {first['source']['checkpoint_checksum']!r} != "
      f"{retrained['identity']['checkpoint_checksum']!r}); redoing it."]
  assert again["source"] == retrained["identity"]
  assert again["dense"]["test_loss"] == pytest.approx(retrained["test"]["loss"], rel=1e-6)
  assert again["rows"][0]["test_loss"] != first["rows"][0]["test_loss"]  # the new model's
  for name in ("magnitude_50pct", "magnitude_75pct"):  # both rows from the new model now
    assert workdir_lib.load_json(os.path.join(workdir, "rows"), f"{name}.json")["source"] == (
        retrained["identity"])
