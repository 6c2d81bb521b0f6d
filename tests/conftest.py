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


# Cases that took 11 s or more on 2 CPU cores (`pytest -v -m "not slow"`,
# per-test times, 2026-12-06), so that the fast tier stays within CI's 30
# minutes: they run in the full suite (`pytest -q`). Kept in the fast tier
# despite their time: the same-numbers-under-every-transform checks, the
# README's runs, one resume-after-damage and one case of each method family.
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
test_checkpoint_nnx.py::test_optimizer_over_the_pruning_wrapper_resumes_exactly
test_checkpoint_nnx.py::test_masks_of_an_nnx_state_round_trip[state]
test_dst.py::test_rigl_on_an_nnx_attention_model_keeps_every_leaf_count
test_dst_granet.py::test_granet_regrows_per_layer_after_global_pruning_and_until_the_end
test_export.py::test_load_sparse_with_like_returns_the_structure_of_linen_params
test_faults.py::test_each_damaged_file_of_the_newest_step_falls_back_exactly_or_is_harmless[delete]
test_faults.py::test_each_damaged_file_of_the_newest_step_falls_back_exactly_or_is_harmless[flip]
test_faults.py::test_each_damaged_file_of_the_newest_step_falls_back_exactly_or_is_harmless[truncate]
test_fsdp.py::test_training_with_fsdp_2_equals_fsdp_1_and_fsdp_4_bitwise[gradual]
test_fsdp.py::test_an_fsdp_checkpoint_restores_sharded_and_into_a_replicated_run
test_gradual.py::test_pruned_gradients_are_masked_before_the_inner_optimizer
test_grain_pipeline.py::test_an_augmented_run_stopped_and_resumed_ends_bitwise_equal
test_identity.py::test_a_swapped_final_json_is_redone_from_the_checkpoints
test_identity.py::test_oneshot_rows_of_a_model_trained_again_are_redone
test_lamp.py::test_lamp_inside_imp_ranks_the_survivors_like_the_authors
test_leaf_kinds.py::test_empty_leaves_pass_through_the_mask_functions_untouched[none]
test_lm.py::test_lm_is_causal
test_lm.py::test_oneshot_prunes_the_lm_block_by_block[wanda]
test_lottery.py::test_global_level_keeps_one_minus_p_of_the_total
test_lottery.py::test_random_prune_has_the_tickets_counts_on_every_leaf
test_lottery_run.py::test_masks_only_shrink_and_controls_differ_from_the_ticket
test_lottery_run.py::test_rewind_point_is_the_dense_state_after_k_steps
test_models.py::test_forward_returns_finite_batch_by_classes_logits_same_jitted_and_eager[resnet20-8x8x3+32x32x3]
test_nm_run.py::test_final_checkpoint_and_export_keep_at_most_n_of_every_m[srste-2-4]
test_nm_run.py::test_mid_training_checkpoint_keeps_dense_weights_and_resume_matches
test_nm_run.py::test_kernel_that_m_does_not_divide_is_named_unless_left_dense
test_sparse_methods_run.py::test_each_method_trains_to_its_exact_sparsity[ste]
test_sparse_methods_run.py::test_snip_in_the_trainer_keeps_numpy_top_k_of_g_times_w_on_the_first_batch
test_train.py::test_pruned_weights_are_exactly_zero_where_masks_are_false
test_train.py::test_one_shot_prunes_at_its_step_then_keeps_the_mask
test_transforms.py::test_eager_step_matches_jit[nm_srste]
test_transforms.py::test_topk_mask_under_vmap_matches_per_row
test_workdir.py::test_different_config_is_refused_and_nothing_changes
test_workdir.py::test_unfinished_run_of_same_config_resumes_from_its_last_checkpoint
test_workdir.py::test_cli_runs_default_config_and_prints_final_line
test_workdir.py::test_cli_refuses_a_workdir_another_process_holds_in_one_line
test_workdir.py::test_cli_workdir_that_is_a_file_is_a_one_line_error
test_workdir.py::test_results_come_from_the_checkpoint_when_metrics_are_lost_or_garbled
test_workdir.py::test_a_library_run_holds_the_workdir_lock_for_the_call_only[train]
test_workdir.py::test_a_library_run_holds_the_workdir_lock_for_the_call_only[lottery]
test_workdir.py::test_a_library_run_holds_the_workdir_lock_for_the_call_only[nm_study]
""".split())


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.nodeid.removeprefix("tests/") in SLOW_CASES:
      item.add_marker(pytest.mark.slow)
