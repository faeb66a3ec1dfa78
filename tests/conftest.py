"""Shared pytest setup: backend markers, seeding, TensorFlow's eager default
and the `--run-slow` switch.

No framework (tensorflow, torch, jax) is imported at module level: the suite
is collected on every backend.
"""

import gc
import os

import keras
import pytest

BACKENDS = ("tensorflow", "torch", "jax")

# The tests whose outcome depends on the Keras version, by file (`None`: the
# whole file), and why. They run on both Keras versions of the tox matrix
# (`pytest -m keras_version` on 3.15); every other test runs on the newest
# Keras only. torch.compile's smoke test is marked in its file.
KERAS_VERSION_DEPENDENT = {
    # Each private Keras access.
    "test_keras_internals.py": None,
    # The keras-hub release that imports on this Keras.
    "test_keras_hub.py": None,
    # Keras' torch DDP integration (from 3.16; skipped with the reason before).
    "test_torch_ddp.py": None,
    # keras.distribution and tf.distribute.
    "test_distribution.py": None,
    # MultiWorkerMirroredStrategy: Keras' own PerReplica error, recorded on
    # both versions (the test notices the day Keras fixes it).
    "test_tf_multiworker.py": None,
    # The training step inside Keras' trainer: the compute_loss and
    # compute_metrics seam, logs, masks, jit, mixed precision, gradient
    # accumulation, callbacks, saving.
    "test_rdrop_model.py": {
        "test_kl_positive_with_dropout_and_logs",
        "test_one_step_loss_matches_hand_computation",
        "test_evaluate_and_predict_equal_inner_model",
        "test_validation_logs_have_no_kl",
        "test_from_logits_read_from_string_loss_means_probabilities",
        "test_sequence_outputs_with_mask_and_padding_weight",
        "test_jit_compile_modes",
        "test_mixed_precision",
        "test_gradient_accumulation_and_steps_per_execution",
        "test_callbacks",
        "test_save_and_load_keras_file",
        "test_get_config_round_trip",
    },
    # Keras' `Loss` base class: reductions, masks, configs, saving.
    "test_losses.py": {
        "test_each_reduction",
        "test_keras_mask_averages_over_valid_positions",
        "test_serialization_round_trip",
        "test_saved_inside_a_model",
    },
    # The fused paths' recognition of Keras' loss and its settings.
    "test_fused_cross_entropy.py": {
        "test_which_losses_are_fused",
        "test_other_losses_take_the_general_path",
        "test_fused_path_trains_like_the_general_path",
    },
    "test_fused_reference_kl.py": {
        "test_other_losses_take_the_general_anchor_path",
        "test_rdrop_fused_path_is_not_run_twice",
    },
    # The anchor callback's hooks into `fit`, and its saving.
    "test_reference_kl_regularizer.py": {
        "test_repeated_fits_reuse_the_step_and_a_changed_anchor_rebuilds_it",
        "test_alternating_anchored_and_plain_fits_trace_each_step_once",
        "test_snapshot_is_theta0_and_unchanged_by_training",
        "test_resume_keeps_the_original_snapshot",
        "test_saved_model_keeps_its_snapshot",
        "test_refresh_every_epoch",
    },
    # Keras' saving format (old files load), BackupAndRestore, Keras' LoRA.
    "test_partial_snapshot.py": {
        "test_full_snapshot_file_from_751f1f1_loads_as_a_full_snapshot",
        "test_backup_and_restore_resumes_a_partial_snapshot",
        "test_keras_lora_leaves_the_frozen_base_kernels_out",
    },
    # The snapshot's and the anchor state's saved layouts (Keras' saving).
    "test_reference_snapshot.py": None,
    # The shared prefix: Keras' functional graph, what a call's own
    # `training=False` does (3.15 and 3.16 differ), masks across the split
    # (3.15 records a mask as a call's input), saving.
    "test_shared_prefix.py": {
        "test_split_of_the_frozen_base_recipe",
        "test_what_this_keras_does_with_a_calls_own_training_false",
        "test_a_training_false_call_follows_this_keras",
        "test_a_dropout_this_keras_switches_off_is_warned_about",
        "test_frozen_base_trains_as_unshared",
        "test_masks_cross_the_split",
        "test_the_reference_reuses_a_frozen_prefix",
        "test_predict_evaluate_and_saving_are_unchanged",
    },
    # Keras' checkpoints and seed generators.
    "test_exact_resume.py": {
        "test_resumed_run_is_bitwise_the_uninterrupted_one",
        "test_checkpoints_hold_the_seed_states",
        # Keras' torch dropout draws from torch's global generator.
        "test_without_torchs_generator_state_an_unseeded_resume_differs",
        "test_a_wrapped_torch_dropout_resumes_exactly",
    },
    # The 2-process JAX runs (test_jax_multiprocess.py,
    # test_multiprocess_resume.py) run on the newest Keras only, to keep the
    # suite inside its time budget; torch's need Keras >= 3.16 anyway.
}


def depends_on_the_keras_version(item) -> bool:
    names = KERAS_VERSION_DEPENDENT.get(item.path.name, ())
    if "compile" in item.keywords:
        return False  # torch.compile: one smoke test, marked in its file
    return names is None or item.originalname in names


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="also run tests marked `slow`"
    )


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    for item in items:
        if depends_on_the_keras_version(item):
            item.add_marker(pytest.mark.keras_version)
        marked = [b for b in BACKENDS if b in item.keywords]
        if marked and backend not in marked:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"runs only on {', '.join(marked)}; backend is {backend}"
                )
            )
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: use --run-slow"))


@pytest.fixture(autouse=True, scope="session")
def _jax_compilation_cache(tmp_path_factory):
    """On JAX, a compilation cache for this run: many tests build the same
    tiny models, so XLA compiles the same programs again and again; a cache
    hit skips the compiler (a quarter of the JAX suite's time). The cache is
    new each run (pytest's temporary folder) and this process's only: the
    workers that multi-process tests start compile on their own."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    yield
    for name, value in before.items():
        jax.config.update(name, value)


@pytest.fixture(autouse=True)
def _tensorflow_runs_eagerly(request):
    """On TensorFlow, a test's `tf.function`s run eagerly unless it is marked
    `traced`.

    The tests train tiny models for a few steps, where tracing a step costs
    far more than running it. The tests whose subject is tracing or XLA (the
    step modes, `jit_compile`, path and trace records, the prefix's row
    counts, traced-versus-eager checks) are marked `traced` and keep Keras'
    compiled step; every story keeps at least one traced run.
    """
    if keras.backend.backend() != "tensorflow" or "traced" in request.keywords:
        yield
        return
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(False)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    # `clear_session` resets Keras' global state and runs a garbage
    # collection. A full collection walks every object the frameworks have
    # created (0.2-0.5 s a test on torch and TensorFlow); after it, the
    # survivors are frozen (`gc.freeze`), so the next test's collection only
    # walks what that test created. `_full_collection` unfreezes them once
    # per test file.
    keras.backend.clear_session()
    gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def _full_collection():
    yield
    # What the file's tests left behind (module fixtures, cycles frozen after
    # a test) becomes collectable again.
    gc.unfreeze()
    gc.collect()


@pytest.fixture
def set_chunks():
    """Sets the chunk size of the chunked passes through the public
    `keras_rdrop.set_chunk_elements`; the size before the test is restored
    after it. Usage: `set_chunks(16)`."""
    import keras_rdrop

    before = keras_rdrop.get_chunk_elements()
    yield keras_rdrop.set_chunk_elements
    keras_rdrop.set_chunk_elements(before)


@pytest.fixture(scope="session")
def tiny_bert_preset(tmp_path_factory):
    """A tiny BERT (1 layer, hidden 8) with its tokenizer, as a keras-hub preset
    (built once per run: the example smoke tests load it)."""
    from tests.testing import import_keras_hub

    keras_hub = import_keras_hub()
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", "what", "who"]
    vocabulary += [f"w{i}" for i in range(12)] + ["good", "bad", "film", "day"]
    folder = tmp_path_factory.mktemp("tiny_bert")
    keras_hub.models.BertTokenizer(vocabulary=vocabulary).save_to_preset(folder)
    keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
        dropout=0.1,
    ).save_to_preset(folder)
    return str(folder)


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}, " + (
        f"KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}"
    )
