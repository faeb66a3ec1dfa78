"""RDropModel and the anchor under Keras' own torch DDP: 2 gloo processes on CPU.

Keras >= 3.16's torch trainer wraps the model in `DistributedDataParallel`
when `torch.distributed` is initialized, and all-reduces the metric
variables. These tests start `torchrun --nproc_per_node=2` (as
`python -m torch.distributed.run`) from pytest on the script
tests/distributed/torch_ddp.py, and compare with one process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_rdrop

SCRIPT = Path(__file__).resolve().parent / "distributed" / "torch_ddp.py"
KERAS_VERSION = tuple(int(v) for v in keras.__version__.split(".")[:2])

pytestmark = [
    pytest.mark.torch,
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        KERAS_VERSION < (3, 16),
        reason=(
            "Keras < 3.16's torch trainer has no DistributedDataParallel "
            "integration: fit runs on one device (README, Multi-device)"
        ),
    ),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every run the tests below compare, started once: one process on the global
# batch, and one `torchrun` launch of two ranks (see the script's docstring).
SINGLE_RUNS = ["fixed:sequential", "fixed:concat"]
DDP_RUNS = [
    "fixed:sequential:ddp",
    "fixed:concat:ddp",
    "dropout:sequential:ddp",
    "dropout:concat:ddp",
    "fixed:concat:data_parallel",  # last: it sets a global distribution
]


def _launch(runs, out_dir, processes):
    env = dict(os.environ)
    root = str(Path(keras_rdrop.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable]
    if processes > 1:
        command += [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
        ]
    command += [str(SCRIPT), str(out_dir), *runs]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, (
        f"{' '.join(command)} failed ({proc.returncode}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    _launch(SINGLE_RUNS, out_dir, 1)
    _launch(DDP_RUNS, out_dir, 2)
    return out_dir


def _run(out_dir, case, mode, processes, distribution="ddp"):
    """The results of one run: `[single]`, or `[rank 0, rank 1]`."""
    if processes == 1:
        names = [f"{case}-{mode}-single.json"]
    else:
        names = [f"{case}-{mode}-{distribution}-rank{r}.json" for r in range(2)]
    return [json.loads((Path(out_dir) / name).read_text()) for name in names]


@pytest.mark.parametrize(
    "mode, distribution",
    [("sequential", "ddp"), ("concat", "ddp"), ("concat", "data_parallel")],
)
def test_two_processes_match_one_on_the_global_batch(mode, distribution, ddp_results):
    (single,) = _run(ddp_results, "fixed", mode, 1)
    ranks = _run(ddp_results, "fixed", mode, 2, distribution)
    assert all(r["ddp"] for r in ranks), "Keras did not wrap the model in DDP"
    assert single["history"]["ref_kl"][-1] > 1e-4  # the anchor is at work
    for result in ranks:
        assert sorted(result["history"]) == sorted(single["history"])
        for key, values in single["history"].items():
            # Logged values are global: each rank logs the global batch's.
            np.testing.assert_allclose(
                result["history"][key], values, rtol=1e-5, atol=1e-6, err_msg=key
            )
        for got, expected in zip(result["weights"], single["weights"]):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        # Bitwise: the snapshot is a copy of θ0, which both runs build from
        # the same seed with the same initializer ops.
        for got, expected in zip(result["snapshot"], single["snapshot"]):
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_with_dropout_ranks_stay_equal(mode, ddp_results):
    rank0, rank1 = _run(ddp_results, "dropout", mode, 2)
    assert rank0["ddp"] and rank1["ddp"]
    # Different shards and masks, one model: DDP keeps the weights equal,
    # the second pass (sequential mode) included, which calls the inner
    # model and not the DDP wrapper. Bitwise: every rank applies the same
    # all-reduced gradient (one buffer, broadcast) with the same optimizer ops.
    for a, b in zip(rank0["weights"], rank1["weights"]):
        np.testing.assert_array_equal(a, b)
    moved = max(
        np.abs(np.asarray(a) - np.asarray(t)).max()
        for a, t in zip(rank0["weights"], rank0["theta0"])
    )
    assert moved > 1e-3
    # The snapshot is the same on every rank: θ0, which was equal on both
    # (bitwise: a copy, no arithmetic).
    for a, b, theta0 in zip(rank0["snapshot"], rank1["snapshot"], rank0["theta0"]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, theta0)
    # kl_loss and ref_kl are all-reduced: both ranks log the same values.
    assert rank0["history"]["kl_loss"][0] > 0
    for key in ("kl_loss", "ref_kl", "task_loss", "loss"):
        np.testing.assert_allclose(
            rank0["history"][key], rank1["history"][key], rtol=1e-6, err_msg=key
        )
