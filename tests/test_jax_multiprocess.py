"""RDropModel and the anchor on JAX across 2 processes (gloo collectives on CPU).

`keras.distribution.initialize` joins two processes into one JAX cluster (one
CPU device each); `DataParallel(auto_shard_dataset=False)` spans both, and
each process passes its own NumPy shard of every batch. The same two
processes also run `ModelParallel` (the hidden Dense layer split across
them) and, where TensorFlow is installed, a `tf.data.Dataset` auto-sharded by
the default `DataParallel()`. The runs happen in
tests/distributed/jax_multiprocess.py, started from here: both processes
once for all runs, and one process on the global batch to compare with.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.processes import child_env, free_port, launch_together

SCRIPT = Path(__file__).resolve().parent / "distributed" / "jax_multiprocess.py"

# The conftest skips `jax` tests on the other backends ("runs only on jax").
pytestmark = [pytest.mark.jax, pytest.mark.multiprocess]

PROCESSES = 2
MODES = ["sequential", "concat"]
TRAINING = [f"{case}:{mode}" for case in ("fixed", "dropout") for mode in MODES]
SINGLE_RUNS = TRAINING
MODEL_PARALLEL = [f"model_parallel:{mode}" for mode in MODES]
# tf.data needs TensorFlow, which the JAX tox envs do not install: there the
# worker is not asked for these runs, and their test skips.
HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
TFDATA = [f"tfdata:{mode}" for mode in MODES] if HAS_TENSORFLOW else []
NO_TENSORFLOW = (
    "tf.data needs TensorFlow, which the JAX env does not install; "
    "auto-sharding of a tf.data dataset across processes is Keras' own "
    "DataParallel path"
)
# Last: it sets the default DataParallel, and stops at its error.
MULTI_RUNS = [*TRAINING, *MODEL_PARALLEL, *TFDATA, "auto_shard"]
# Two processes against one: the same float32 math with the batch split
# across devices and a gloo all-reduce, so round-off differs (seen: 6e-8).
RTOL, ATOL = 1e-5, 1e-6
TIMEOUT_S = 300


def _launch(out_dir):
    """Starts the one-process run and the two processes together, and waits."""
    port = str(free_port())
    commands = {
        "single": ["single", *SINGLE_RUNS],
        **{
            f"process{p}": [str(p), str(PROCESSES), port, *MULTI_RUNS]
            for p in range(PROCESSES)
        },
    }
    env = child_env("jax")
    launches = {
        name: ([sys.executable, str(SCRIPT), str(out_dir), *args], env)
        for name, args in commands.items()
    }
    launch_together(launches, out_dir, TIMEOUT_S, SCRIPT.name)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("jax_multiprocess")
    _launch(out_dir)
    return out_dir


def _run(out_dir, run, processes):
    """The results of one run: `[single]`, or one per process, in order."""
    stem = run.replace(":", "-")
    suffixes = ["single"] if processes == 1 else [f"process{p}" for p in range(2)]
    return [json.loads((out_dir / f"{stem}-{s}.json").read_text()) for s in suffixes]


def _assert_matches(result, single):
    assert sorted(result["history"]) == sorted(single["history"])
    for key, values in single["history"].items():
        np.testing.assert_allclose(
            result["history"][key], values, rtol=RTOL, atol=ATOL, err_msg=key
        )
    for got, expected in zip(result["weights"], single["weights"], strict=True):
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_fixed_two_processes_match_one_on_the_global_batch(mode, results):
    (single,) = _run(results, f"fixed:{mode}", 1)
    processes = _run(results, f"fixed:{mode}", 2)
    assert single["history"]["ref_kl"][-1] > 1e-3  # the anchor is at work
    for result in processes:
        assert result["distribution"] == "DataParallel"
        _assert_matches(result, single)
        # Bitwise: the snapshot is a copy of θ0, which every run builds from
        # the same seed with the same initializer ops.
        for got, expected in zip(result["snapshot"], single["snapshot"], strict=True):
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_processes_keep_equal_weights(mode, results):
    first, second = _run(results, f"dropout:{mode}", 2)
    # Bitwise: each process holds its own copy of the replicated weights and
    # applies the same all-reduced gradient (with two processes, a + b and
    # b + a are the same float) with the same optimizer ops.
    for a, b in zip(first["weights"], second["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    moved = max(
        np.abs(np.asarray(w) - np.asarray(t)).max()
        for w, t in zip(first["weights"], first["theta0"], strict=True)
    )
    assert moved > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_snapshot_is_theta0_on_every_process(mode, results):
    first, second = _run(results, f"dropout:{mode}", 2)
    # Bitwise: each process's snapshot is a copy of its θ0 (no arithmetic),
    # and θ0 is the same on both (same seed, same initializer ops).
    for a, b, theta0 in zip(
        first["snapshot"], second["snapshot"], first["theta0"], strict=True
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, theta0)
    for a, b in zip(first["theta0"], second["theta0"], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_kl_logs_are_global_values_on_every_process(mode, results):
    first, second = _run(results, f"dropout:{mode}", 2)
    assert first["history"]["kl_loss"][0] > 1e-3
    assert first["history"]["ref_kl"][-1] > 1e-3
    for key in ("kl_loss", "ref_kl", "task_loss", "loss"):
        # Both processes run one program over the global batch: the logged
        # values are the same, up to the order of the all-reduce's sum.
        np.testing.assert_allclose(
            first["history"][key], second["history"][key], rtol=1e-6, err_msg=key
        )


@pytest.mark.parametrize("mode", MODES)
def test_dropout_two_processes_match_one_on_the_global_batch(mode, results):
    # On JAX the step is one program over the global batch: the dropout masks
    # are drawn for the whole global batch from the replicated seed state
    # (partitionable threefry, JAX's default), so each process's shard gets
    # its part of the one-process run's masks, and the runs agree (RTOL/ATOL).
    (single,) = _run(results, f"dropout:{mode}", 1)
    for result in _run(results, f"dropout:{mode}", 2):
        _assert_matches(result, single)


def test_default_data_parallel_asks_for_a_dataset_with_numpy_input(results):
    for result in _run(results, "auto_shard", 2):
        assert result["distribution"] == "DataParallel"
        error = result["error"]
        assert error is not None, "fit on NumPy under DataParallel() did not raise"
        # Keras' message (3.15 and 3.16 word the rest differently).
        assert "the data must be provided as a `tf.data.Dataset`" in error
        assert "auto_shard_dataset = False" in error


@pytest.mark.parametrize("mode", MODES)
def test_model_parallel_matches_one_process_on_the_global_batch(mode, results):
    # ModelParallel over a (1, 2) mesh: "batch" has size 1 (every process
    # passes the whole global batch), and "model" splits the hidden Dense
    # kernel's columns and its bias in two, one half per process.
    (single,) = _run(results, f"fixed:{mode}", 1)
    processes = _run(results, f"model_parallel:{mode}", 2)
    assert single["history"]["ref_kl"][-1] > 1e-3  # the anchor is at work
    for result in processes:
        assert result["distribution"] == "ModelParallel"
        kernel = result["weight_layouts"][
            result["paths"].index("sequential/hidden/kernel")
        ]
        # The split is real: each process holds 8 of the 16 columns.
        assert kernel == {
            "spec": [None, "model"],
            "shard_shape": [8, 8],  # of the (8, 16) kernel
            "local_shape": [8, 8],
        }
        # The gathered weights: the same math as one process, with the
        # hidden layer's matmul and its gradient split across the processes
        # (round-off may differ: RTOL/ATOL).
        _assert_matches(result, single)
        # Bitwise: JAX's random bits do not depend on the sharding
        # (partitionable threefry, the default), so the sharded initializer
        # gives the one-process run's θ0; the snapshot is a copy of it.
        for got, expected in zip(result["theta0"], single["theta0"], strict=True):
            np.testing.assert_array_equal(got, expected)
        for got, expected in zip(result["snapshot"], result["theta0"], strict=True):
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_model_parallel_snapshot_copies_are_laid_out_like_their_weights(mode, results):
    for result in _run(results, f"model_parallel:{mode}", 2):
        positions = result["positions"]
        assert positions == list(range(len(result["paths"])))  # all trainable
        # The copies' own paths ("reference/ref_0", ...) match no key of the
        # layout map: left to the distribution, they would be replicated
        # (seen with the snapshot's layout reading patched out). The
        # snapshot creates each copy with its weight's layout.
        assert not any("hidden/" in path for path in result["snapshot_paths"])
        expected = [result["weight_layouts"][p] for p in positions]
        assert result["snapshot_layouts"] == expected
        assert any("model" in layout["spec"] for layout in expected)
        assert result["snapshot_layout_equivalent"] == [True] * len(positions)


@pytest.mark.parametrize("mode", MODES)
def test_tfdata_auto_sharded_across_processes_matches_one_process(mode, results):
    pytest.importorskip("tensorflow", reason=NO_TENSORFLOW)
    # The default DataParallel() rebatches the global batches to per-process
    # batches and gives process p every other one, starting at p: the
    # processes' pieces of step s, end to end, are the global batch s.
    (single,) = _run(results, f"fixed:{mode}", 1)
    for result in _run(results, f"tfdata:{mode}", 2):
        assert result["distribution"] == "DataParallel"
        _assert_matches(result, single)
        for got, expected in zip(result["snapshot"], single["snapshot"], strict=True):
            np.testing.assert_array_equal(got, expected)
