"""R-Drop and the anchor under Keras' distribution engines, on simulated devices.

- JAX: `keras.distribution.DataParallel` (4-way) and `ModelParallel` (a 2 x 2
  "batch" x "model" mesh with a `LayoutMap` splitting the large Dense layer),
  on 4 virtual CPU devices.
- TensorFlow: `tf.distribute.MirroredStrategy` over 2 logical CPU devices.

The device count is fixed when the framework starts, so each backend's runs
happen in a fresh process (`tests/distributed/*.py`, started with this
interpreter), which prints its measurements as one JSON line; the assertions
are here. Every distributed run is compared with the same run on one device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras_rdrop

# Each backend's distributed runs happen in a Python process of their own.
pytestmark = pytest.mark.multiprocess

SCRIPTS = Path(__file__).resolve().parent / "distributed"
# The logged losses: the one-device and distributed runs agree to float32
# round-off (the reductions are split differently across devices).
RTOL, ATOL = 1e-5, 1e-6
WEIGHT_ATOL = 1e-5


def run_script(name):
    env = dict(os.environ)
    # The child imports the same `keras_rdrop` as this process.
    package_root = str(Path(keras_rdrop.__file__).resolve().parent.parent)
    paths = [package_root, env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU devices only, even on a GPU machine
    # TensorFlow's runtime can die by a signal (SIGSEGV) while it sets up
    # MirroredStrategy on logical CPUs: seen once in eight runs of
    # `tf_mirrored.py` beside a busy process, before any result was printed.
    # A death by signal (a negative return code) is rerun, at most twice; a
    # Python error or a failed check in the script is not.
    for _attempt in range(3):
        proc = subprocess.run(
            [sys.executable, str(SCRIPTS / name)],
            env=env,
            capture_output=True,
            text=True,
            timeout=540,
        )
        if proc.returncode >= 0:
            break
    assert proc.returncode == 0, (
        f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-6000:]}"
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"{name} printed no result:\n{proc.stdout[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def assert_same_history(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key
        )


# ----------------------------------------------------------------------- JAX


@pytest.fixture(scope="module")
def jax_results():
    return run_script("jax_distribution.py")


@pytest.mark.jax
@pytest.mark.parametrize("run", ["data_parallel", "model_parallel"])
def test_jax_distributed_rdrop_and_anchor_match_one_device(jax_results, run):
    """R-Drop (dropout included; "sequential" mode under DataParallel,
    "concat" under ModelParallel) plus the anchor, trained 8 steps: the same
    losses and weights as on one device, and the snapshot is still θ0."""
    assert jax_results["devices"] == [f"cpu:{i}" for i in range(4)]
    single = jax_results["single_sequential" if run == "data_parallel" else "single"]
    result = jax_results[run]
    assert sorted(result["history"]) == ["kl_loss", "loss", "ref_kl", "task_loss"]
    assert_same_history(result["history"], single["history"])
    assert result["history"]["kl_loss"][0] > 0  # dropout made the passes differ
    assert result["history"]["ref_kl"][-1] > 0  # and the model left θ0
    assert result["trained_vs_theta0"] > 1e-2
    assert result["weights_vs_single"] < WEIGHT_ATOL
    # Bitwise: the snapshot is a copy of θ0 (no arithmetic), never trained.
    assert result["reference_vs_theta0"] == 0.0


@pytest.mark.jax
def test_jax_data_parallel_replicates_model_and_snapshot(jax_results):
    for layout in jax_results["data_parallel"]["layouts"]:
        assert layout["devices"] == layout["ref_devices"] == 4, layout
        assert layout["same"], layout
        assert layout["ref_shard"] == layout["shard"], layout


def assert_laid_out_like_the_model(layouts):
    sharded = {layout["path"]: layout for layout in layouts}
    for layout in layouts:
        assert layout["same"], (
            f"snapshot of {layout['path']} is laid out as {layout['ref_spec']}, "
            f"the model variable as {layout['spec']}"
        )
        assert layout["ref_shard"] == layout["shard"], layout
    # The LayoutMap split the large layer over the "model" axis: each device
    # holds half of its kernel and bias, and of their snapshots.
    kernel = next(v for k, v in sharded.items() if k.endswith("big/kernel"))
    bias = next(v for k, v in sharded.items() if k.endswith("big/bias"))
    assert kernel["spec"] == "P(None, 'model')"
    assert kernel["ref_shard"] == [8, 16]
    assert bias["ref_shard"] == [16]


@pytest.mark.jax
def test_jax_model_parallel_snapshot_is_sharded_like_the_model(jax_results):
    """Needs the patch: without it, the snapshot is replicated on every device."""
    assert_laid_out_like_the_model(jax_results["model_parallel"]["layouts"])


@pytest.mark.jax
def test_jax_model_parallel_moving_bfloat16_snapshot(jax_results):
    """A bfloat16 snapshot moved by soft updates, with the adaptive beta: same
    run as on one device, and still sharded like the model after training."""
    single = jax_results["moving_single"]
    result = jax_results["moving_model_parallel"]
    assert_same_history(result["history"], single["history"])
    assert result["weights_vs_single"] < WEIGHT_ATOL
    assert result["beta"] == pytest.approx(single["beta"], rel=1e-6)
    assert result["beta"] != 0.5  # the controller moved it
    assert result["reference_vs_theta0"] > 1e-3  # the soft updates moved θ0
    assert_laid_out_like_the_model(result["layouts"])


@pytest.mark.jax
def test_jax_model_parallel_partial_snapshot(jax_results):
    """The head is frozen: the snapshot copies only the sharded layer, laid
    out like it, and the run matches the one-device run."""
    single = jax_results["partial_single"]
    result = jax_results["partial_model_parallel"]
    assert_same_history(result["history"], single["history"])
    assert result["weights_vs_single"] < WEIGHT_ATOL
    assert [path.split("/")[-2:] for path in result["copied"]] == [
        ["big", "bias"],
        ["big", "kernel"],
    ]
    # Bitwise: copies of θ0, and frozen weights that no step writes.
    assert result["reference_vs_theta0"] == 0.0
    assert result["uncopied_vs_theta0"] == 0.0  # the frozen head is still θ0
    assert result["trained_vs_theta0"] > 1e-2
    assert_laid_out_like_the_model(result["layouts"])


@pytest.mark.jax
def test_jax_model_parallel_loaded_snapshot_is_sharded_when_training_starts(
    jax_results,
):
    """A `.keras` file loaded under ModelParallel restores the snapshot before
    it can see the model's layouts; `fit` with the callback lays it out like
    the model and keeps θ0."""
    before = {layout["path"]: layout for layout in jax_results["loaded_before_fit"]}
    assert any(not layout["same"] for layout in before.values())
    result = jax_results["loaded_model_parallel"]
    assert_laid_out_like_the_model(result["layouts"])
    # Bitwise: a saved and re-laid-out copy of θ0 (no arithmetic).
    assert result["reference_vs_theta0"] == 0.0
    assert np.isfinite(result["history"]["loss"]).all()


# ---------------------------------------------------------------- TensorFlow


@pytest.fixture(scope="module")
def tf_results():
    return run_script("tf_mirrored.py")


def assert_matches_one_device(result):
    assert result["trained"] > 1e-2  # the weights did move
    assert result["weights_diff"] < WEIGHT_ATOL
    assert result["reference_diff"] < WEIGHT_ATOL
    single, mirrored = result["single"], result["mirrored"]
    assert_same_history(mirrored["history"], single["history"])
    assert mirrored["evaluate"] == pytest.approx(single["evaluate"], rel=RTOL)
    assert mirrored["beta"] == pytest.approx(single["beta"], rel=1e-6)


@pytest.mark.tensorflow
@pytest.mark.parametrize("run", ["anchor", "rdrop", "weighted_balanced", "partial"])
def test_tf_mirrored_strategy_matches_one_device(tf_results, run):
    """Two replicas train like one device on the global batch: the same
    logged losses, weights, snapshot, evaluation loss and beta.

    Needs the patch: Keras scales each replica's loss by 1/replicas for the
    gradient; without the patch `task_loss`, `kl_loss` and `ref_kl` are
    logged scaled (half their value here), and the adaptive beta controller
    sees the scaled KL."""
    assert tf_results["replicas"] == 2
    result = tf_results[run]
    history = result["mirrored"]["history"]
    assert {"loss", "task_loss", "ref_kl"} <= set(history)
    if run != "anchor":
        assert history["kl_loss"][0] > 0  # the two passes differed
    assert_matches_one_device(result)


@pytest.mark.tensorflow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Known limitation: under tf.distribute each replica normalises the "
    "R-Drop and anchor terms by its own sample-weight sum (as Keras does for "
    "masked losses and reduction='mean_with_sample_weight'), so they equal the "
    "global-batch value only when the weights sum the same on every replica.",
)
def test_tf_mirrored_strategy_sample_weights_uneven_across_replicas(tf_results):
    assert_matches_one_device(tf_results["weighted_uneven"])


@pytest.mark.tensorflow
def test_tf_snapshot_is_mirrored_like_the_model(tf_results):
    """Needs the patch: without it, the callback creates the snapshot outside
    the strategy's scope, as plain variables on one device."""
    for run in ("anchor", "rdrop", "weighted_balanced", "weighted_uneven", "partial"):
        mirrored = tf_results[run]["mirrored"]
        assert mirrored["weight_class"] == "MirroredVariable"
        assert mirrored["reference_classes"] == ["MirroredVariable"]
        # Every weight is copied, except the frozen body of the partial run.
        assert mirrored["copied_count"] == (2 if run == "partial" else 4)
