"""Shared fixtures: paths to the real data in ../shared/data (tests skip cleanly without it)."""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# One CPU thread in every test and in every command and process a test starts (their default honours
# OMP_NUM_THREADS; set before torch is imported). The tiny models gain nothing from threads, and where a
# machine shows more CPUs than it grants (CI: a 2-core quota) or is busy, one thread per visible CPU made the
# suite many times slower. The tests of the thread policy set or delete the variable themselves.
os.environ["OMP_NUM_THREADS"] = "1"

# Two tiers. `make test` (CI) runs every test; `make check` runs the fast tier, pytest -m "not slow", in under a
# minute on 2 cores. Slow: the tests marked so in their file and those named here by file and function (every
# parametrisation): over about 0.6 s of CPU each (measured one by one: subprocesses and their imports, gloo
# process groups, real datasets, figures, cross-checks against other libraries), the users of a module fixture
# that is, and the users of ffmpeg, sox, espeak-ng or pdflatex (seconds each where installed, as in CI). A test
# that takes longer joins this list; tests/test_e2e_fast.py keeps one tiny train -> kill -9 / resume ->
# analyses -> report path in the fast tier.
SLOW = {
    "test_balance.py": ("test_balance_two_gloo_processes_match_one",),
    "test_claims.py": ("test_command_line_writes_markdown_csv_and_latex",),
    "test_cli.py": ("test_report_prints_accuracy_table",),
    "test_contrastive.py": ("test_a_resumed_contrastive_run_is_bit_identical",),
    "test_distributed.py": ("test_two_gloo_processes_match_one_process",),
    "test_docs_api.py": ("test_api_walkthrough_runs",),
    "test_figures.py": ("test_a_method_has_one_colour_in_every_figure",),
    "test_flatness.py": ("test_top_eigenvalues_and_trace_match_dense",
                         "test_slq_density_is_a_quadrature_of_the_spectrum",
                         "test_fgap_small_radius_is_the_gradient_term",
                         "test_block_top_k_one_is_the_lambda_max_of_the_top_k_solve"),
    "test_flatness_cli.py": ("test_cli_blocks_absent_modality_stability_and_report",
                             "test_cli_pyhessian_backend_and_errors",
                             "test_last_checkpoint_analyses_have_their_own_folder_and_report"),
    "test_fusion.py": ("test_every_analysis_runs_on_every_fusion",),
    "test_geometry.py": ("test_outputs_and_metrics_match_the_stored_embeddings", "test_three_modalities_and_unimodal",
                         "test_command_line", "test_compare_puts_the_runs_side_by_side"),
    "test_geometry_metrics.py": ("test_exact_w2_matches_an_assignment_solver_and_sinkhorn_is_close",
                                 "test_ati_in_a_fresh_process_prints_no_torch_deprecation_warning"),
    "test_loader.py": ("test_validation_and_test_are_fed_the_true_pairs",),
    "test_methods.py": ("test_swa_run_averages_and_recomputes_batchnorm",
                        "test_three_modalities_with_every_method_recorded"),
    "test_methods_inputs.py": ("test_resnet18_initialised_from_a_local_torchvision_state_dict",
                               "test_text_encoder_trains_and_loads_back",
                               "test_text_encoder_weights_come_from_the_directory"),
    "test_prepare_avmnist.py": ("test_counts_are_stratified", "test_splits_are_disjoint_and_keep_labels",
                                "test_pairs_same_digit_and_right_takes",
                                "test_spectrogram_matches_independent_computation",
                                "test_pca_removes_three_quarters_of_the_energy",
                                "test_pca_keep_one_reconstructs_exactly", "test_broken_wavs_are_skipped_and_listed",
                                "test_second_call_is_a_no_op", "test_cli",
                                "test_speaker_split_holds_out_whole_speakers",
                                "test_noise_is_added_to_the_padded_window_at_the_requested_snr",
                                "test_noise_hides_the_zero_padding_floor"),
    "test_prepare_crema_d.py": ("test_shapes_and_classes_as_documented", "test_labels_parsed_from_names",
                                "test_frames_in_time_order_and_padded_by_repetition",
                                "test_audio_is_the_ogm_stft_recipe", "test_truncated_and_missing_files_are_reported",
                                "test_rerun_skips_and_force_rebuilds",
                                "test_other_parameters_are_refused_and_leave_the_dataset_untouched",
                                "test_split_file_speaker_disjoint_and_label_order",
                                "test_interrupted_run_resumes_where_it_stopped",
                                "test_a_dying_worker_costs_only_its_clip"),
    "test_prepare_folder.py": ("test_files_matched_by_stem_and_bad_files_reported",
                               "test_videos_become_frames_and_given_splits_are_kept"),
    "test_prepare_kinetics.py": ("test_kaldi_fbank_shapes_labels_and_report",
                                 "test_audio_comes_from_the_video_track_and_frames_are_ordered",
                                 "test_mel128_from_a_list_file"),
    "test_prepare_ur_funny.py": ("test_three_sequence_modalities_train_and_every_analysis_runs",),
    "test_progress.py": ("test_training_log_shows_steps_and_one_line_per_epoch",),
    "test_registry.py": ("test_a_new_method_is_one_module_and_one_registry_entry",),
    "test_disk_full.py": ("test_prepare_synthetic_on_a_full_disk",
                          "test_training_on_a_full_disk_keeps_its_checkpoint_and_resumes"),
    "test_reliability.py": ("test_synchronised_resumes_of_a_killed_run_never_both_take_its_lock",
                            "test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint",
                            "test_analyses_refuse_a_diverged_checkpoint",
                            "test_resume_falls_back_to_best_when_last_is_corrupt",
                            "test_resume_without_a_good_checkpoint_is_an_error_whose_advice_works",
                            "test_unreadable_metrics_json_is_finished_again_not_called_finished",
                            "test_resume_refuses_a_dataset_that_changed",
                            "test_a_corrupt_previous_result_is_recomputed",
                            "test_a_result_is_not_reused_on_another_preparation_of_the_data",
                            "test_a_kill_while_writing_outputs_leaves_no_result_claimed",
                            "test_the_advice_of_run_errors_works_when_followed"),
    "test_report.py": ("test_refuses_to_average_runs_that_differ_in_more_than_the_seed",
                       "test_sample_level_metrics_on_class_level_pairs_are_flagged", "test_grouping_rules",
                       "test_command_line_and_no_torch", "test_latex_compiles"),
    "test_robustness.py": ("test_clean_accuracy_eps_zero_and_loss_increase",
                           "test_cli_writes_files_compares_and_reuses"),
    "test_sweep.py": ("test_jobs_changes_how_many_runs_go_at_once_never_their_numbers",
                      "test_local_pool_skips_finished_resumes_interrupted_and_survives_a_divergence",
                      "test_submitit_local_executor_runs_training_analyses_and_report",
                      "test_a_run_with_other_settings_is_an_error_not_replaced"),
    "test_threads.py": ("test_a_resume_continues_with_the_thread_count_the_run_recorded",
                        "test_train_applies_the_default_and_records_it_in_env_json",
                        "test_analysis_commands_take_threads_and_record_them"),
    "test_tracking.py": ("test_steps_are_logged_once_at_the_cadence",
                         "test_tensorboard_event_files_hold_each_tag_and_epoch_once",
                         "test_wandb_offline_run_holds_config_epochs_steps_test_and_analysis_once",
                         "test_mlflow_file_store_holds_params_epochs_steps_test_and_analysis_once",
                         "test_an_analysis_appends_its_summary_to_the_runs_loggers",
                         "test_csv_rows_are_the_metrics_jsonl_epochs_once",
                         "test_tensorboard_scalars_are_the_metrics_jsonl_epochs_once"),
    "test_train.py": ("test_run_directory_loss_decreases_and_load_run",
                      "test_same_seed_same_metrics_and_dml_trains_on_repaired_batches",
                      "test_three_modalities_and_unimodal"),
}


def pytest_collection_modifyitems(items):
    """Marks the tests SLOW names slow (deselected by `make check`'s -m "not slow")."""
    for item in items:
        if item.originalname in SLOW.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = SHARED_DATA / "mnist"
    if not (d / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files not found in {d} (see ../shared/data/README.md)")
    return d


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    d = SHARED_DATA / "fsdd" / "recordings"
    if not d.is_dir():
        pytest.skip(f"FSDD recordings not found in {d} (see ../shared/data/README.md)")
    return d


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A small synthetic dataset (180 train / 20 val / 100 test, 3 modalities) shared by the tests."""
    from data_prep.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_synthetic(out, num_classes=4, train_size=200, test_size=100, image_info=2.0, audio_info=2.0,
                      third=True, depth_info=2.0, seed=0)
    return out


# Tiny runs that several test files analyse, by name: the settings tiny_config overrides.
SHARED_RUNS = {"sml": dict(epochs=3), "audio": dict(modalities=["audio"], epochs=1)}


@pytest.fixture(scope="session")
def shared_run(tiny_synthetic, tmp_path_factory):
    """copy(name, dest): a copy at `dest` of the run SHARED_RUNS[name], trained once per session (when first
    asked for) however many files use it; each gets a copy because the analyses write into their run."""
    from mmlab_cli.engine.fit import train

    trained = {}

    def copy(name: str, dest: Path) -> Path:
        if name not in trained:
            trained[name] = tmp_path_factory.mktemp("shared_runs") / name
            train(tiny_config(tiny_synthetic, trained[name], **SHARED_RUNS[name]))
        return Path(shutil.copytree(trained[name], dest))

    return copy


def tiny_config(data: Path, out: Path, **overrides):
    """A TrainConfig that trains in a couple of seconds on the tiny dataset."""
    from mmlab_cli.config import TrainConfig

    values = dict(data=str(data), out=str(out), modalities=["image", "audio"], encoder="tiny_cnn", embed_dim=16,
                  epochs=3, batch_size=16, lr=0.05, step_size=2, seed=0, device="cpu", threads=1)
    values.update(overrides)
    return TrainConfig(**values)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` by relative path: equal snapshots mean nothing was touched."""
    from mmlab_cli.data.format import sha256_file

    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
