"""RDropModel + ReferenceKLRegularizer under Keras' own torch DDP (Keras >= 3.16).

Run by tests/test_torch_ddp.py, either as one process on the global batch:

    python torch_ddp.py OUT_DIR CASE:MODE[:DIST] ...

or as two gloo processes on CPU, each on its own shard of every batch, on one
node:

    python -m torch.distributed.run --nproc_per_node=2 \
        torch_ddp.py OUT_DIR CASE:MODE[:DIST] ...

or on two nodes (two launches, one per node, started together; here both on
localhost):

    python -m torch.distributed.run --nnodes=2 --nproc_per_node=1 \
        --node_rank=N --master_addr=127.0.0.1 --master_port=PORT \
        torch_ddp.py OUT_DIR CASE:MODE[:DIST] ...

Each `CASE:MODE[:DIST]` is one training run, in the order given, in the same
processes (one launch: starting torch and the process group is most of the
cost of a run). DIST is `ddp` (the default: only `torch.distributed`
initialized) or `data_parallel`
(`keras.distribution.DataParallel(auto_shard_dataset=False)` set as well, and
unset after the run).

Keras' torch trainer wraps the model in `DistributedDataParallel` when
`torch.distributed` is initialized and all-reduces the metric variables, so
nothing here is ours but the sharding of the NumPy inputs (Keras does not
shard them for DDP). CASE is `fixed` (no stochastic layer: every pass is the
same, so two processes must match one process on the global batch) or
`dropout` (each rank draws its own masks). Each process writes
OUT_DIR/CASE-MODE-DIST-rank{rank}.json (or CASE-MODE-single.json) with its
history, weights and snapshot.
"""

import json
import os
import sys
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)

import keras  # noqa: E402

from keras_rdrop import RDropModel, ReferenceKLRegularizer  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 3
FEATURES = 6


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((GLOBAL_BATCH * STEPS, FEATURES)).astype("float32")
    y = (rng.standard_normal((GLOBAL_BATCH * STEPS, 3)) @ np.ones(3)).astype("int32")
    return x, np.abs(y) % 3


def shard(array, rank, world):
    """The rows of `array` that rank `rank` sees, step by step.

    Step s of the one-process run takes rows [16 s, 16 s + 16); rank r takes
    the r-th of `world` equal pieces of them, so that the ranks' batches of
    each step together are the global batch.
    """
    per_rank = GLOBAL_BATCH // world
    pieces = [
        array[
            s * GLOBAL_BATCH + rank * per_rank : s * GLOBAL_BATCH
            + (rank + 1) * per_rank
        ]
        for s in range(STEPS)
    ]
    return np.concatenate(pieces)


def build(case):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((FEATURES,)), keras.layers.Dense(16, activation="relu")]
    if case == "dropout":
        layers.append(keras.layers.Dropout(0.3))
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def train(case, mode, distribution, out_dir, rank, world):
    distributed = world > 1
    if distributed:
        if distribution == "data_parallel":
            # Keras' torch `keras.distribution` (3.16): the same DDP step,
            # with each rank passing its own shard.
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(auto_shard_dataset=False)
            )
        # Each rank draws its own dropout masks, as on separate devices.
        keras.utils.set_random_seed(1 + rank)
    x, y = data()
    x, y = shard(x, rank, world), shard(y, rank, world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # `fixed`: no dropout
        model = RDropModel(build(case), alpha=1.0, mode=mode)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    theta0 = [np.asarray(w.numpy()) for w in model.model.weights]
    history = model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH // world,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.5)],
    )
    result = {
        "rank": rank,
        "world": world,
        # Where torchrun placed this rank: its node and that node's ranks.
        "node": int(os.environ.get("GROUP_RANK", 0)),
        "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        "ddp": model.ddp_model is not None if hasattr(model, "ddp_model") else None,
        "history": history.history,
        "weights": [np.asarray(w.numpy()).tolist() for w in model.model.weights],
        "theta0": [w.tolist() for w in theta0],
        "snapshot": [
            np.asarray(v.numpy()).tolist() for v in model.reference.ref_weights
        ],
    }
    suffix = f"{distribution}-rank{rank}" if distributed else "single"
    with open(os.path.join(out_dir, f"{case}-{mode}-{suffix}.json"), "w") as f:
        json.dump(result, f)
    if distributed:
        keras.distribution.set_distribution(None)
        dist.barrier()
    keras.backend.clear_session()


def main():
    out_dir, *runs = sys.argv[1:]
    distributed = "RANK" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    for run in runs:
        case, mode, distribution = (run.split(":") + ["ddp"])[:3]
        train(case, mode, distribution, out_dir, rank, world)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
