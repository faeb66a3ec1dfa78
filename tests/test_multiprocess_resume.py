"""Crash and resume across 2 processes, on JAX and on torch: exact, snapshot included.

RDropModel with an unseeded `Dropout`, the anchor (`ReferenceKLRegularizer`)
and `BackupAndRestore`: an uninterrupted run, then a run that crashes in the
middle of its second epoch, then a restarted job (other initial weights and
seeds) that resumes from the checkpoint. The runs happen in
tests/distributed/resume_worker.py, two launches of both processes per
backend: the uninterrupted and the crashing run, then the resume (and its
control). JAX: `keras.distribution.initialize` with gloo CPU collectives and
`DataParallel(auto_shard_dataset=False)`, per-process NumPy shards. torch:
`torchrun --nproc_per_node=2` (gloo), Keras >= 3.16's DDP.

Keras' `BackupAndRestore` and `ModelCheckpoint` save on every process, to
the path each is given: each process here has its own backup directory.

Every comparison is bitwise: the resumed steps are the uninterrupted run's
steps (the same programs on the same shards in the same order, the same
collectives between the same two processes), from loaded copies of the
saved values; dropout masks come from saved integer states (the seed
generator's on JAX, torch's generator on torch).
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.processes import child_env, free_port, launch_together

SCRIPT = Path(__file__).resolve().parent / "distributed" / "resume_worker.py"
KERAS_VERSION = tuple(int(v) for v in keras.__version__.split(".")[:2])
PROCESSES = 2
TIMEOUT_S = 300

pytestmark = pytest.mark.multiprocess
# The conftest skips `jax` and `torch` tests on the other backends.
NEEDS_TORCH_DDP = pytest.mark.skipif(
    KERAS_VERSION < (3, 16),
    reason=(
        "Keras < 3.16's torch trainer has no DistributedDataParallel "
        "integration: fit runs on one device (README, Multi-device)"
    ),
)


def _launch_jax(out_dir, phase):
    """Both processes of one phase, started together."""
    port, env = str(free_port()), child_env("jax")
    command = [sys.executable, str(SCRIPT), str(out_dir), phase]
    launches = {
        f"{phase}-process{p}": ([*command, str(p), str(PROCESSES), port], env)
        for p in range(PROCESSES)
    }
    launch_together(launches, out_dir, TIMEOUT_S, f"{SCRIPT.name} {phase}")


def _launch_torch(out_dir, phase):
    """One `torchrun` of both ranks for one phase."""
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += [f"--nproc_per_node={PROCESSES}", "--master_addr=127.0.0.1"]
    command += [f"--master_port={free_port()}", str(SCRIPT), str(out_dir), phase]
    launches = {phase: (command, child_env("torch"))}
    launch_together(launches, out_dir, TIMEOUT_S, f"{SCRIPT.name} {phase}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    backend = keras.backend.backend()
    out_dir = tmp_path_factory.mktemp(f"resume_{backend}")
    launch = _launch_jax if backend == "jax" else _launch_torch
    launch(out_dir, "first")
    launch(out_dir, "resume")
    return out_dir


def _state(out_dir, run, process):
    with np.load(out_dir / f"{run}-process{process}.npz") as arrays:
        return {key: arrays[key] for key in arrays.files}


def _crashed(out_dir, process):
    return json.loads((out_dir / f"crashed-process{process}.json").read_text())


def check_resume_is_exact(out_dir):
    for p in range(PROCESSES):
        uninterrupted = _state(out_dir, "uninterrupted", p)
        resumed = _state(out_dir, "resumed", p)
        assert sorted(resumed) == sorted(uninterrupted)
        # Weights, seed states, the step, Adam's moments, the anchor's snapshot.
        assert any(k.startswith("snapshot_") for k in resumed)
        for key, value in uninterrupted.items():
            np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    # And the processes hold one model (replicated on JAX, DDP on torch).
    first, second = (_state(out_dir, "resumed", p) for p in range(PROCESSES))
    for key, value in first.items():
        np.testing.assert_array_equal(second[key], value, err_msg=key)


def check_each_process_wrote_its_checkpoint(out_dir):
    for p in range(PROCESSES):
        crashed = _crashed(out_dir, p)
        assert crashed["iterations"] == 3 + 2  # the crash: epoch 2, batch 2
        assert crashed["files"] == ["latest.weights.h5", "training_metadata.json"]


def check_the_control_differs(out_dir):
    """Without the restored mask state the resume is not exact (the check
    above can fail), while the weights and the snapshot are still restored."""
    for p in range(PROCESSES):
        uninterrupted = _state(out_dir, "uninterrupted", p)
        control = _state(out_dir, "control", p)
        assert any(
            not np.array_equal(control[k], v)
            for k, v in uninterrupted.items()
            if k.startswith("model_")
        )
        for key, value in uninterrupted.items():
            if key.startswith("snapshot_"):
                np.testing.assert_array_equal(control[key], value, err_msg=key)


@pytest.mark.jax
def test_jax_resume_is_exact(results):
    check_resume_is_exact(results)


@pytest.mark.jax
def test_jax_each_process_wrote_its_checkpoint(results):
    check_each_process_wrote_its_checkpoint(results)
    for p in range(PROCESSES):
        assert _crashed(results, p)["distribution"] == "DataParallel"
        assert _crashed(results, p)["torch_keys"] == []


@pytest.mark.jax
def test_jax_without_the_seed_states_the_resume_differs(results):
    check_the_control_differs(results)


@pytest.mark.torch
@NEEDS_TORCH_DDP
def test_torch_resume_is_exact(results):
    check_resume_is_exact(results)


@pytest.mark.torch
@NEEDS_TORCH_DDP
def test_torch_each_rank_wrote_its_checkpoint_with_its_generator_state(results):
    check_each_process_wrote_its_checkpoint(results)
    for p in range(PROCESSES):
        # Each rank's file holds its own rank's torch generator state.
        assert _crashed(results, p)["torch_keys"] == [
            f"vars/seed_state_torch_cpu_rank{p}"
        ]


@pytest.mark.torch
@NEEDS_TORCH_DDP
def test_torch_without_the_generator_state_the_resume_differs(results):
    check_the_control_differs(results)
