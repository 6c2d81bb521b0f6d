"""The one-shot pruning binary: its config checks, unigram baseline, and a tiny LM end to end."""

import json
import math
import os
import types

import jax
import numpy as np
import pytest

from experiments import config_checks
from experiments import oneshot
from experiments import train
from experiments import trainer
from experiments import workdir as workdir_lib
from experiments.configs import lm_stdlib
from experiments.configs import oneshot_lm
from sparsejax.checkpoint import SparseCheckpointManager
from sparsejax.checkpoint import load_sparse


class _FakeSplit:
  def __init__(self, labels):
    self.labels = np.asarray(labels)

  def __len__(self):
    return len(self.labels)

  def examples(self, indices):
    indices = list(indices)
    return [None] * len(indices), self.labels[indices]


def test_unigram_loss_is_the_cross_entropy_of_smoothed_train_frequencies():
  # Train bytes: 0 three times, 1 once (vocabulary of 3); add-one: p = (4, 2, 1) / 7.
  data = types.SimpleNamespace(train=_FakeSplit([[0, 0], [0, 1]]), eval=_FakeSplit([[1, 2]]),
                               num_classes=3)
  expected = -(math.log(2 / 7) + math.log(1 / 7)) / 2
  assert oneshot.unigram_loss(data, chunk=1) == pytest.approx(expected)


def test_table_puts_methods_in_rows_and_targets_in_columns():
  rows = [{"method": "magnitude", "pattern": "50%", "test_bits_per_byte": 3.0},
          {"method": "magnitude", "pattern": "2:4", "test_bits_per_byte": 4.0},
          {"method": "sparsegpt", "pattern": "50%", "test_bits_per_byte": 2.5}]
  lines = oneshot.format_table(rows, {"test_bits_per_byte": 2.0}, 5 * math.log(2)).splitlines()
  assert lines[0] == "| method | 50% | 2:4 |"
  assert lines[2] == "| dense (no pruning) | 2.000 | 2.000 |"
  assert lines[3] == "| magnitude | 3.000 | 4.000 |"
  assert lines[4] == "| sparsegpt | 2.500 | - |"
  assert lines[5] == "| unigram (no context) | 5.000 | 5.000 |"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(sparsities=(0.5, 1.0)), r"config.sparsities: .*\[0, 1\)"),
    (lambda c: c.update(patterns=((5, 4),)), r"config.patterns: .*"),
    (lambda c: c.update(patterns=((2, 4, 8),)), r"config.patterns: \(2, 4, 8\) is not an \(N, M\)"),
    (lambda c: c.update(methods=("wanda", "obs")), r"config.methods: .*'obs'"),
    (lambda c: c.update(calibration_sequences=0), r"config.calibration_sequences=0"),
    (lambda c: c.update(exclude="head("), r"config.exclude='head\('"),
    (lambda c: c.update(train_workdir=""), r"config.train_workdir is empty"),
    (lambda c: c.update(dampening=float("inf")), r"^config.dampening=inf must be a finite number"),
    (lambda c: c.update(dampening=float("nan")), r"^config.dampening=nan must be"),
    (lambda c: c.update(dampening=0.0), r"^config.dampening=0.0 must be"),
    (lambda c: c.update(block_size=0), r"^config.block_size=0 must be an integer >= 1"),
])
def test_bad_config_is_an_error_naming_the_key(edit, message, tmp_path):
  config = oneshot_lm.get_config()
  edit(config)
  with pytest.raises(config_checks.ConfigError, match=message):
    oneshot.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_binary_magnitude_default_is_the_library_default_per_layer():
  import inspect  # pylint: disable=g-import-not-at-top
  from sparsejax import oneshot as oneshot_lib  # pylint: disable=g-import-not-at-top
  assert oneshot_lm.get_config().magnitude_per_output is False
  default = inspect.signature(oneshot_lib.prune_layer).parameters["per_output"].default
  assert oneshot_lib.check_per_output("magnitude", default) is False


def test_an_unfinished_training_workdir_is_refused(tmp_path):
  config = oneshot_lm.get_config()
  config.train_workdir = str(tmp_path / "nothing")
  with pytest.raises(config_checks.ConfigError, match="holds no finished experiments.train run"):
    oneshot.run(config, str(tmp_path / "w"))


def _numpy_loss(model, params, inputs, labels, batch=128):
  total = 0.0
  for i in range(0, len(inputs), batch):
    logits = np.asarray(model.apply({"params": params}, inputs[i:i + batch]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total += -np.take_along_axis(log_p, labels[i:i + batch, ..., None], -1).sum()
  return float(total / labels.size)


@pytest.mark.slow
def test_tiny_lm_pruned_by_every_method_end_to_end_and_resumed(tmp_path):
  lm = lm_stdlib.get_config()
  lm.data_dir = str(tmp_path / "tfds")
  lm.model.update(num_layers=2, width=16, num_heads=2, mlp_dim=32)
  lm.num_train_steps, lm.warmup_steps, lm.batch_size, lm.log_every = 60, 10, 8, 30
  lm.checkpoint_every = 0
  lm.eval_batch_size = 256
  trained = train.run(lm, str(tmp_path / "lm"))
  assert trained["test"]["bits_per_byte"] == pytest.approx(trained["test"]["loss"] / math.log(2))
  assert train.final_line(trained, None, lm).startswith(
      f"dense test {trained['test']['bits_per_byte']:.4f} bits per byte (next-byte accuracy ")
  config = oneshot_lm.get_config()
  config.train_workdir = str(tmp_path / "lm")
  config.sparsities, config.patterns = (0.5,), ((2, 4),)
  config.calibration_sequences = 16
  workdir = str(tmp_path / "oneshot")
  result = oneshot.run(config, workdir, log=lambda line: None)

  assert result["dense"]["test_loss"] == pytest.approx(trained["test"]["loss"], rel=1e-6)
  rows = {(r["method"], r["pattern"]): r for r in result["rows"]}
  assert set(rows) == {(m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in ("50%", "2:4")}
  for (method, pattern), row in rows.items():
    assert row["sparsity"] == 0.5  # every pruned kernel has an even number of entries
    assert row["test_bits_per_byte"] == pytest.approx(row["test_loss"] / math.log(2))
    if pattern == "2:4":
      assert row["max_nonzeros_per_group"] == 2
    # The checkpoint and the export hold the same pruned model, the one evaluated.
    name = {"50%": "50pct", "2:4": "2of4"}[pattern]
    directory = os.path.join(workdir, "pruned", f"{method}_{name}")
    exported, masks = load_sparse(directory + ".npz")
    with SparseCheckpointManager(directory) as manager:
      saved = manager.restore(params_like=exported, masks_like=exported)
    for a, b in zip(jax.tree.leaves(saved.masks), jax.tree.leaves(masks)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(exported)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel = np.asarray(saved.params["block_1"]["fc_0"]["kernel"])
    assert (kernel != 0).sum() <= kernel.size // 2
    assert np.asarray(saved.params["head"]["kernel"]).all()  # excluded: dense
  # Against an independent loss on the pruned model: the test loss recomputed
  # from the export with a float64 NumPy softmax.
  lm_trainer = trainer.Trainer(lm)
  inputs, labels = lm_trainer.data.eval.examples(range(len(lm_trainer.data.eval)))
  model = lm_trainer.model
  params, _ = load_sparse(os.path.join(workdir, "pruned", "sparsegpt_2of4.npz"))
  loss = _numpy_loss(model, params, np.stack(inputs).astype(np.int32), labels)
  assert rows[("sparsegpt", "2:4")]["test_loss"] == pytest.approx(loss, rel=1e-4)
  # SparseGPT reconstructs: at 50% it is not worse than magnitude pruning.
  assert rows[("sparsegpt", "50%")]["test_loss"] <= rows[("magnitude", "50%")]["test_loss"]
  with open(os.path.join(workdir, "summary.csv")) as f:
    assert len(f.read().splitlines()) == 1 + 6
  assert os.path.getsize(os.path.join(workdir, "oneshot.png")) > 0
  assert workdir_lib.undeclared(workdir, oneshot.RUN_FILES) == []
  assert workdir_lib.undeclared(config.train_workdir, train.RUN_FILES) == []

  # Resume: a run killed after its fifth row redoes only the sixth.
  os.remove(os.path.join(workdir, "rows", "sparsegpt_2of4.json"))
  os.remove(os.path.join(workdir, "final.json"))
  lines = []
  again = oneshot.run(config, workdir, log=lines.append)
  assert [l for l in lines if l.startswith("[oneshot] ") and "/6:" in l] == [
      "[oneshot] 6/6: sparsegpt at 2:4"]
  assert again["markdown"] == result["markdown"]
  timeless = lambda rows: [{k: v for k, v in r.items() if k != "prune_seconds"} for r in rows]
  with open(os.path.join(workdir, "final.json")) as f:
    assert timeless(json.load(f)["rows"]) == timeless(result["rows"])


def test_image_model_rows_report_accuracy_and_keep_exact_counts(tiny_config, tmp_path):
  tiny_config.pruning.method = "dense"
  tiny_config.dense_baseline = False
  train.run(tiny_config, str(tmp_path / "mlp"))
  config = oneshot_lm.get_config()
  config.train_workdir = str(tmp_path / "mlp")
  config.methods = ("magnitude", "wanda", "sparsegpt")
  config.sparsities, config.patterns = (0.75,), ((1, 4),)
  config.calibration_sequences, config.exclude, config.include = 64, "", "hidden"
  result = oneshot.run(config, str(tmp_path / "oneshot"), log=lambda line: None)
  assert result["unigram_loss"] is None
  assert result["markdown"].splitlines()[0] == "| method | 75% | 1:4 |"
  for row in result["rows"]:
    assert row["test_bits_per_byte"] == "" and 0 < row["test_accuracy"] <= 1
    assert row["sparsity"] == 0.75  # both hidden kernels (64x32, 32x16) exactly
    if row["pattern"] == "1:4":
      assert row["max_nonzeros_per_group"] == 1
  _, masks = load_sparse(str(tmp_path / "oneshot" / "pruned" / "sparsegpt_75pct.npz"))
  assert masks["head"]["kernel"] is None and masks["hidden_1"]["kernel"].mean() == 0.25


def _fake_training_workdir(config, path, steps=()):
  """config.json, final.json and checkpoints at `steps` (fresh states) of a training run."""
  from experiments import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(path)
  workdir_lib.save_json(str(path), workdir_lib.CONFIG_FILE, workdir_lib.config_dict(config))
  workdir_lib.save_json(str(path), workdir_lib.FINAL_FILE, {})
  if steps:
    lm_trainer = trainer.Trainer(config)
    with SparseCheckpointManager(str(path / trainer.CHECKPOINT_DIR), async_save=False) as manager:
      for step in steps:
        state = lm_trainer.initial_state(seed=step)
        lm_trainer.save(manager, state._replace(step=np.int32(step)))


def _listing(root):
  return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)),
                 os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(root) for f in files + ["."])


def test_nm_a_kernel_cannot_take_is_refused_before_the_workdir_is_claimed(tiny_config, tmp_path):
  tiny_config.pruning.method = "dense"
  _fake_training_workdir(tiny_config, tmp_path / "mlp")   # hidden_0: 64 inputs, hidden_1: 32
  config = oneshot_lm.get_config()
  config.train_workdir = str(tmp_path / "mlp")
  config.sparsities, config.patterns, config.exclude = (), ((3, 6),), "head"
  with pytest.raises(config_checks.ConfigError,
                     match=r"^config.patterns: hidden_0/kernel: kernel of shape \(64, 32\) has 64 "
                           r"inputs \(axes \(0,\)\), not divisible by M=6"):
    oneshot.run(config, str(tmp_path / "w"))
  config.patterns, config.block_size = ((2, 4),), 6
  with pytest.raises(config_checks.ConfigError, match=r"^config.block_size: sparsegpt N:M 2:4"):
    oneshot.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
  assert not os.path.exists(tmp_path / "mlp" / "checkpoints")


def test_training_checkpoints_are_read_only_and_a_damaged_latest_step_falls_back(tiny_config,
                                                                                   tmp_path):
  tiny_config.pruning.method = "dense"
  _fake_training_workdir(tiny_config, tmp_path / "mlp", steps=(5, 10))
  for root, _, files in os.walk(tmp_path / "mlp" / "checkpoints" / "10" / "params"):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:  # truncate every file of the item to half
        f.truncate(os.path.getsize(path) // 2)
  before = _listing(tmp_path / "mlp")
  config = oneshot_lm.get_config()
  config.train_workdir = str(tmp_path / "mlp")
  config.methods, config.sparsities, config.patterns = ("magnitude",), (0.5,), ()
  config.calibration_sequences, config.exclude = 8, "head"
  lines = []
  oneshot.run(config, str(tmp_path / "w"), log=lines.append)
  notes = [l for l in lines if "Step 10" in l]
  assert len(notes) == 1 and "Left in place (read-only); trying step 5." in notes[0]
  assert any(l.startswith("[oneshot] mlp from ") and " at step 5;" in l for l in lines), lines
  assert _listing(tmp_path / "mlp") == before   # nothing created, moved or cleaned up there
  with SparseCheckpointManager(str(tmp_path / "mlp" / "checkpoints"), read_only=True) as manager:
    with pytest.raises(Exception, match="opened read-only"):
      manager.save(11, params={"a": np.ones(2)})


def test_read_only_manager_creates_no_directory(tmp_path):
  from sparsejax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  with pytest.raises(CheckpointError, match=r"No checkpoint directory .*none \(opened read-only\)"):
    SparseCheckpointManager(str(tmp_path / "none"), read_only=True)
  assert not os.path.exists(tmp_path / "none")


# --- Layer-adaptive rows: lamp, owl_wanda, owl_sparsegpt. -------------------------------------

def _numpy_owl_sparsities(params, batches, sparsity, m, lam):
  """OWL from the authors' formula (luuyin/OWL lib/prune_all.py), in NumPy on the dense MLP."""
  x = np.concatenate([np.asarray(b, np.float64).reshape(len(b), -1) for b in batches])
  ratios = []
  for name in ("hidden_0", "hidden_1"):
    w = np.asarray(params[name]["kernel"], np.float64)          # (in, out)
    metric = np.abs(w.T) * np.sqrt((x ** 2).sum(0))[None, :]    # torch layout (out, in)
    ratios.append((metric > metric.mean() * m).sum() / metric.size * 100)
    x = np.maximum(x @ w + np.asarray(params[name]["bias"], np.float64), 0.0)
  ratios = np.array(ratios)
  density = (ratios - ratios.min()) * (1 / (ratios.max() - ratios.min()) * lam * 2)
  density = density - density.mean() + (1 - sparsity)
  return dict(zip(("hidden_0", "hidden_1"), ratios)), dict(zip(("hidden_0", "hidden_1"),
                                                               1 - density))


def test_lamp_and_owl_rows_run_with_their_own_allocations(tiny_config, tmp_path):
  tiny_config.pruning.method = "dense"
  _fake_training_workdir(tiny_config, tmp_path / "mlp", steps=(3,))
  config = oneshot_lm.get_config()
  config.train_workdir = str(tmp_path / "mlp")
  config.methods = ("lamp", "owl_wanda", "owl_sparsegpt")
  config.sparsities, config.patterns = (0.6,), ((2, 4),)   # no N:M row for lamp
  config.calibration_sequences, config.exclude = 64, "head"
  config.owl.lam = 0.1
  result = oneshot.run(config, str(tmp_path / "w"), log=lambda line: None)
  rows = {r["method"]: r for r in result["rows"] if r["pattern"] == "60%"}
  assert [(r["method"], r["pattern"]) for r in result["rows"]] == [
      ("lamp", "60%"), ("owl_wanda", "60%"), ("owl_wanda", "2:4"), ("owl_sparsegpt", "60%"),
      ("owl_sparsegpt", "2:4")]
  assert result["markdown"].splitlines()[0] == "| method | 60% | 2:4 |"
  assert result["markdown"].splitlines()[3].startswith("| lamp | ") and "| - |" in result[
      "markdown"].splitlines()[3]
  # LAMP: one global count, exactly round(0.4 n) of the 64x32 + 32x16 kernels.
  assert rows["lamp"]["sparsity"] == 1 - round(0.4 * (64 * 32 + 32 * 16)) / (64 * 32 + 32 * 16)
  lm_trainer = trainer.Trainer(tiny_config)
  params = lm_trainer.initial_state(seed=3).params
  batches = oneshot.calibration_batches(lm_trainer.data, 64, config.calibration_batch, 0)
  ratios, expected = _numpy_owl_sparsities(params, batches, 0.6, 5.0, 0.1)
  for method in ("owl_wanda", "owl_sparsegpt"):
    row = rows[method]
    assert row["outlier_ratios"] == pytest.approx(ratios, abs=1e-9)
    assert row["group_sparsities"] == pytest.approx(expected, abs=1e-9)
    assert max(expected.values()) - min(expected.values()) == pytest.approx(0.2)
    _, masks = load_sparse(str(tmp_path / "w" / "pruned" / f"{method}_60pct.npz"))
    kept = total = 0
    for name, s in expected.items():
      mask = np.asarray(masks[name]["kernel"])
      if method == "owl_wanda":   # per output unit
        assert (mask.sum(0) == round((1 - s) * mask.shape[0])).all(), name
      else:                       # per block of 128 inputs: here the whole kernel
        assert mask.sum() == round((1 - s) * mask.size), name
      kept, total = kept + mask.sum(), total + mask.size
    assert row["sparsity"] == pytest.approx(1 - kept / total)
    assert masks["head"]["kernel"] is None
  # OWL's N:M variant at 2:4 (nm_lam 2): the authors' prune_n, per block, of the same ratios.
  values = np.array(list(ratios.values()))
  offsets = (values - values.min()) * (1 / (values.max() - values.min()) * 2.0)
  pruned = 2 - np.round(offsets - offsets.mean())          # their prune_n counts pruned weights
  expected_n = {name: 4 - int(p) for name, p in zip(ratios, pruned)}
  assert sorted(expected_n.values()) == [1, 3]
  for method in ("owl_wanda", "owl_sparsegpt"):
    row = next(r for r in result["rows"] if (r["method"], r["pattern"]) == (method, "2:4"))
    assert row["outlier_ratios"] == pytest.approx(ratios, abs=1e-9)
    assert row["group_patterns"] == {name: f"{n}:4" for name, n in expected_n.items()}
    assert row["max_nonzeros_per_group"] == 3
    _, masks = load_sparse(str(tmp_path / "w" / "pruned" / f"{method}_2of4.npz"))
    kept = total = 0
    for name, n in expected_n.items():
      mask = np.asarray(masks[name]["kernel"])               # (d_in, d_out): groups along d_in
      assert (mask.reshape(-1, 4, mask.shape[1]).sum(1) == n).all(), (method, name)
      kept, total = kept + mask.sum(), total + mask.size
    assert row["sparsity"] == pytest.approx(1 - kept / total)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.owl.update(lam=-0.1), r"^config.owl.lam=-0.1 must be a finite number in \[0, 0.5\)"),
    (lambda c: c.owl.update(m=0.0), r"^config.owl.m=0.0 must be a finite number in \(0, inf\]"),
    (lambda c: c.owl.update(m=-2.0), r"^config.owl.m=-2.0 must be"),
    (lambda c: c.owl.update(nm_lam=-1.0), r"^config.owl.nm_lam=-1.0 must be a finite number in "
                                          r"\[0, inf\]"),
    (lambda c: c.owl.update(nm_lam=float("nan")), r"^config.owl.nm_lam=nan must be"),
    (lambda c: c.update(methods=("lamp", "owl")), r"^config.methods: unknown one-shot method 'owl'"),
])
def test_bad_owl_values_name_the_key(edit, message, tmp_path):
  config = oneshot_lm.get_config()
  config.methods = ("owl_wanda",)
  edit(config)
  with pytest.raises(config_checks.ConfigError, match=message) as raised:
    oneshot.run(config, str(tmp_path / "w"))
  assert "\n" not in str(raised.value)
  assert not os.path.exists(tmp_path / "w")


def test_rates_config_compares_owl_and_lamp_with_their_plain_methods_unstructured():
  from experiments.configs import oneshot_lm_rates  # pylint: disable=g-import-not-at-top
  config = oneshot_lm_rates.get_config()
  oneshot.check_config(config)
  assert set(config.methods) == {"magnitude", "lamp", "wanda", "owl_wanda", "sparsegpt",
                                 "owl_sparsegpt"}
  assert [name for name, _ in oneshot.targets(config)] == ["50pct", "60pct", "70pct"]
  assert (config.owl.m, config.owl.lam) == (5.0, 0.08)
