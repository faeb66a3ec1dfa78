"""RDropModel and the anchor under Keras' own torch DDP: 2 gloo processes on CPU.

Keras >= 3.16's torch trainer wraps the model in `DistributedDataParallel`
when `torch.distributed` is initialized, and all-reduces the metric
variables. These tests start `torchrun` (as `python -m torch.distributed.run`)
from pytest on the script tests/distributed/torch_ddp.py, in two layouts: one
node with 2 ranks (`--nproc_per_node=2`), and two nodes with one rank each
(`--nnodes=2 --nproc_per_node=1`: two launches, `--node_rank=0` and `1`,
started together with one rendezvous on localhost). Both go through the same
checks, against one process on the global batch.
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.processes import child_env, free_port, launch_together

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


# Every run the tests below compare, started once: one process on the global
# batch, one `torchrun` launch of two ranks on one node, and (a subset, for
# time: each launch costs ~10 s) two launches of one rank each, as two nodes.
SINGLE_RUNS = ["fixed:sequential", "fixed:concat"]
DDP_RUNS = [
    "fixed:sequential:ddp",
    "fixed:concat:ddp",
    "dropout:sequential:ddp",
    "dropout:concat:ddp",
    "fixed:concat:data_parallel",  # last: it sets a global distribution
]
TWO_NODE_RUNS = ["fixed:concat:ddp", "dropout:sequential:ddp"]
TIMEOUT_S = 300  # a launch: ~10-20 s on 2 busy cores


def _launch(launches, out_dir):
    """`launch_together` of `{name: argv}`, each in a torch worker's env."""
    env = child_env("torch")
    launches = {name: (argv, env) for name, argv in launches.items()}
    launch_together(launches, out_dir, TIMEOUT_S, SCRIPT.name)


def _torchrun(*options):
    return [sys.executable, "-m", "torch.distributed.run", *options]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """One process on the global batch, then 2 ranks on one node."""
    out_dir = tmp_path_factory.mktemp("ddp")
    script = [str(SCRIPT), str(out_dir)]
    _launch({"single": [sys.executable, *script, *SINGLE_RUNS]}, out_dir)
    one_node = _torchrun(
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    )
    _launch({"one_node": [*one_node, *script, *DDP_RUNS]}, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def two_node_results(tmp_path_factory):
    """2 nodes of one rank each: two launches, one rendezvous on localhost."""
    out_dir = tmp_path_factory.mktemp("ddp_two_nodes")
    port = free_port()
    launches = {
        f"node{node}": [
            *_torchrun(
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
            ),
            str(SCRIPT),
            str(out_dir),
            *TWO_NODE_RUNS,
        ]
        for node in range(2)
    }
    _launch(launches, out_dir)
    return out_dir


# Where each layout's ranks run: their node, and the ranks on that node.
PLACEMENT = {"one_node": ([0, 0], 2), "two_nodes": ([0, 1], 1)}


def _ranks(request, layout, case, mode, distribution="ddp"):
    """Both ranks' results of one run in `layout`, checked to be there."""
    fixture = {"one_node": "ddp_results", "two_nodes": "two_node_results"}[layout]
    ranks = _run(request.getfixturevalue(fixture), case, mode, 2, distribution)
    nodes, local_world = PLACEMENT[layout]
    assert [r["node"] for r in ranks] == nodes
    assert all(r["local_world"] == local_world for r in ranks)
    assert [r["rank"] for r in ranks] == [0, 1]
    return ranks


def _run(out_dir, case, mode, processes, distribution="ddp"):
    """The results of one run: `[single]`, or `[rank 0, rank 1]`."""
    if processes == 1:
        names = [f"{case}-{mode}-single.json"]
    else:
        names = [f"{case}-{mode}-{distribution}-rank{r}.json" for r in range(2)]
    return [json.loads((Path(out_dir) / name).read_text()) for name in names]


@pytest.mark.parametrize(
    "mode, distribution, layout",
    [
        ("sequential", "ddp", "one_node"),
        ("concat", "ddp", "one_node"),
        ("concat", "data_parallel", "one_node"),
        ("concat", "ddp", "two_nodes"),
    ],
)
def test_two_processes_match_one_on_the_global_batch(
    mode, distribution, layout, ddp_results, request
):
    (single,) = _run(ddp_results, "fixed", mode, 1)
    ranks = _ranks(request, layout, "fixed", mode, distribution)
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


@pytest.mark.parametrize(
    "mode, layout",
    [("sequential", "one_node"), ("concat", "one_node"), ("sequential", "two_nodes")],
)
def test_with_dropout_ranks_stay_equal(mode, layout, request):
    rank0, rank1 = _ranks(request, layout, "dropout", mode)
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
