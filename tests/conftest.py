"""Fixtures for the experiment tests: the bundled digits and a tiny config."""

import pytest

from experiments import input_pipeline
from experiments.configs import default


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A TFDS data_dir with sklearn_digits prepared once for the whole session."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.data_source("sklearn_digits", "train", data_dir)
  return data_dir


@pytest.fixture
def tiny_config(digits_dir):
  """The default config shrunk to a few seconds: small MLP, 40 steps, 80% target."""
  config = default.get_config()
  config.data_dir = digits_dir
  config.model.features = (32, 16)
  config.batch_size = 128  # 11 steps per epoch: evals at 11, 22, 33 and 40
  config.num_train_steps = 40
  config.log_every = 10
  config.checkpoint_every = 0  # only at the end
  config.pruning.sparsity = 0.8
  config.pruning.start_fraction = 0.1
  config.pruning.end_fraction = 0.5
  config.pruning.update_every = 5
  return config


# Fast-tier cases that take 18 s or more on 2 CPU cores (measured with
# `pytest -v -m "not slow"` and per-test times): they run in the full suite
# (`pytest -q`), and a cheaper case of the same behaviour stays in the fast
# tier where one exists.
SLOW_CASES = frozenset("""
test_train.py::test_train_step_gives_same_loss_on_4_devices_and_on_1[model1]
test_lottery_run.py::test_every_level_keeps_half_the_hidden_weights_and_the_whole_head
test_transforms.py::test_eager_step_matches_jit[gmp]
test_sparse_methods_run.py::test_a_resumed_rigl_run_ends_bitwise_where_an_uninterrupted_one_does
test_nm_study.py::test_an_unstructured_study_trains_every_method_at_every_sparsity
test_lottery_run.py::test_each_level_and_control_starts_from_the_state_it_should
test_oneshot_run.py::test_image_model_rows_report_accuracy_and_keep_exact_counts
test_lottery.py::test_uniform_levels_keep_one_minus_p_to_the_l_on_every_leaf
test_sparse_methods_run.py::test_each_method_trains_to_its_exact_sparsity[set]
test_sparse_methods_run.py::test_each_method_trains_to_its_exact_sparsity[synflow]
test_sparse_methods_run.py::test_each_method_trains_to_its_exact_sparsity[snip]
test_sparse_methods_run.py::test_each_method_trains_to_its_exact_sparsity[static]
test_lottery_run.py::test_a_level_whose_checkpoints_are_all_damaged_is_retrained_by_a_rerun
test_packed_masks.py::test_the_trainer_with_packed_masks_trains_bitwise_like_bool_and_checkpoints_them
test_packed_masks.py::test_a_lottery_run_with_packed_masks_equals_one_with_bool_masks
test_lottery_run.py::test_cli_prints_the_table_and_rejects_unknown_keys
test_workdir.py::test_overwrite_replaces_run_files_only
test_models.py::test_forward_returns_finite_batch_by_classes_logits_same_jitted_and_eager[resnet50-width8-32x32x3]
test_nm_layouts.py::test_nm_masks_keep_n_of_m_along_every_output_units_input_vector[linen-2-4]
test_train.py::test_same_seed_gives_bitwise_identical_runs
test_selection.py::test_topk_mask_with_x64_enabled_ranks_float64_and_int64_exactly
test_train.py::test_metrics_of_two_runs_are_never_mixed_in_one_workdir
""".split())


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.nodeid.removeprefix("tests/") in SLOW_CASES:
      item.add_marker(pytest.mark.slow)
