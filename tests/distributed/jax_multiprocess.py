"""RDropModel + ReferenceKLRegularizer on JAX across processes (gloo on CPU).

Run by tests/test_jax_multiprocess.py, either as one process on the global
batch:

    python jax_multiprocess.py OUT_DIR single CASE:MODE ...

or as process PROCESS_ID of NUM_PROCESSES, each on its own shard of every
batch (the test starts both; process 0 is the coordinator, at localhost:PORT):

    python jax_multiprocess.py OUT_DIR PROCESS_ID NUM_PROCESSES PORT RUN ...

Each RUN is one training run, in the order given, in the same processes (one
launch: starting JAX and its collectives is most of the cost). A run is
`CASE:MODE`: CASE is `fixed` (no stochastic layer: every pass is the same, so
the processes must match one process on the global batch) or `dropout`; MODE
is R-Drop's `sequential` or `concat`. Every run has the anchor
(`ReferenceKLRegularizer`) in its callbacks, and runs under
`keras.distribution.DataParallel(auto_shard_dataset=False)` over the devices
of all processes (one CPU device each), every process passing its own NumPy
shard. Two other kinds of run, for processes only:

- `model_parallel:MODE`: the `fixed` case under `ModelParallel` over a
  (1, 2) mesh ("batch", "model"): the hidden Dense kernel and bias are split
  over "model", one half on each process, and everything else is replicated.
  The "batch" axis has size 1: every process passes the whole global batch.
  The weights, θ0 and the snapshot are gathered from both processes, and the
  layouts (`jax.Array.sharding`) of each weight and of its snapshot copy are
  recorded.
- `tfdata:MODE`: the `fixed` case on a `tf.data.Dataset` of the global data,
  batched with the global batch size, under the default `DataParallel()`,
  which auto-shards it across the processes. It needs TensorFlow (imported
  here only).

The run `auto_shard` (last) sets the default `DataParallel()` and records the
error that `fit` on NumPy arrays raises.

Each process writes OUT_DIR/RUN-processP.json (or RUN-single.json; `:` in RUN
becomes `-`) with its history, its own copy of the weights and the snapshot,
and θ0.
"""

import json
import os
import sys
import warnings

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# CPU collectives between processes (the default CPU client has none).
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_rdrop import RDropModel, ReferenceKLRegularizer  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3
FEATURES, HIDDEN, CLASSES = 8, 16, 4


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((GLOBAL_BATCH * STEPS, FEATURES)).astype("float32")
    w = rng.standard_normal((FEATURES, CLASSES))
    return x, np.argmax(x @ w, axis=-1).astype("int32")


def shard(array, process, processes):
    """The rows of `array` that process `process` passes to `fit`, in order.

    Step s of the one-process run takes rows [8 s, 8 s + 8); each process
    takes its own contiguous piece of them. Keras builds the global batch
    with `jax.make_array_from_process_local_data`, which puts the processes'
    pieces in process order along the batch axis, so the pieces of step s,
    end to end, are the one-process run's batch s.
    """
    steps = array.reshape((STEPS, processes, -1) + array.shape[1:])
    return steps[:, process].reshape((-1,) + array.shape[1:])


def build(case):
    keras.utils.set_random_seed(0)
    layers = [
        keras.Input((FEATURES,)),
        keras.layers.Dense(HIDDEN, activation="relu", name="hidden"),
    ]
    if case == "dropout":
        layers.append(keras.layers.Dropout(0.3))
    layers.append(keras.layers.Dense(CLASSES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # `fixed`: no dropout
        return keras.Sequential(layers)


def local(variable):
    """This process's copy of a replicated variable (not a gathered value)."""
    value = variable.value
    if hasattr(value, "addressable_data"):
        value = value.addressable_data(0)
    return np.asarray(value)


def rdrop(case, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # `fixed`: no dropout
        model = RDropModel(build(case), alpha=1.0, mode=mode)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def train(case, mode, process, processes):
    x, y = data()
    x, y = shard(x, process, processes), shard(y, process, processes)
    model = rdrop(case, mode)
    theta0 = [local(w) for w in model.model.weights]
    history = model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH // processes,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.5)],
    )
    return {
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "weights": [local(w).tolist() for w in model.model.weights],
        "theta0": [w.tolist() for w in theta0],
        "snapshot": [local(v).tolist() for v in model.reference.ref_weights],
    }


def model_parallel_distribution():
    """`ModelParallel` over a (1, 2) mesh: the hidden Dense layer split in two."""
    mesh = keras.distribution.DeviceMesh(
        shape=(1, len(keras.distribution.list_devices())),
        axis_names=("batch", "model"),
        devices=keras.distribution.list_devices(),
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")
    layout_map[".*hidden/bias"] = ("model",)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False
    )


def gathered(variable):
    """The global value of a variable, sharded or not (a collective)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(variable.value, tiled=True))


def layout(variable):
    """The layout of a variable's value, as JAX has it (public API)."""
    sharding = variable.value.sharding
    return {
        "spec": [None if a is None else str(a) for a in sharding.spec],
        "shard_shape": list(sharding.shard_shape(tuple(variable.shape))),
        "local_shape": list(variable.value.addressable_data(0).shape),
    }


def model_parallel(mode):
    """The `fixed` run under `ModelParallel`, every process on the global batch."""
    x, y = data()
    model = rdrop("fixed", mode)
    theta0 = [gathered(w) for w in model.model.weights]
    history = model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.5)],
    )
    reference = model.reference
    weights = model.model.weights
    return {
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "weights": [gathered(w).tolist() for w in weights],
        "theta0": [w.tolist() for w in theta0],
        "snapshot": [gathered(v).tolist() for v in reference.ref_weights],
        "positions": list(reference.positions),
        "paths": [w.path for w in weights],
        "snapshot_paths": [v.path for v in reference.ref_weights],
        "weight_layouts": [layout(w) for w in weights],
        "snapshot_layouts": [layout(v) for v in reference.ref_weights],
        # Same devices, same split: what the snapshot code is meant to give.
        "snapshot_layout_equivalent": [
            ref.value.sharding.is_equivalent_to(
                weights[p].value.sharding, len(ref.shape)
            )
            for p, ref in zip(reference.positions, reference.ref_weights, strict=True)
        ],
    }


def tfdata(mode, process, processes):
    """The `fixed` run on a global `tf.data.Dataset`, auto-sharded by Keras."""
    import tensorflow as tf

    keras.distribution.set_distribution(keras.distribution.DataParallel())
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    model = rdrop("fixed", mode)
    theta0 = [local(w) for w in model.model.weights]
    history = model.fit(
        dataset,
        epochs=2,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.5)],
    )
    return {
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "weights": [local(w).tolist() for w in model.model.weights],
        "theta0": [w.tolist() for w in theta0],
        "snapshot": [local(v).tolist() for v in model.reference.ref_weights],
    }


def auto_shard(process, processes):
    """The error of `fit` on NumPy under the default (auto-sharding) DataParallel."""
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    x, y = data()
    model = rdrop("fixed", "concat")
    try:
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def main():
    out_dir, *rest = sys.argv[1:]
    if rest[0] == "single":
        process, processes, runs = 0, 1, rest[1:]
    else:
        process, processes, port = (int(v) for v in rest[:3])
        runs = rest[3:]
        keras.distribution.initialize(
            job_addresses=f"localhost:{port}",
            num_processes=processes,
            process_id=process,
        )
        devices = keras.distribution.list_devices()
        assert len(devices) == processes, devices  # one CPU device per process
    for run in runs:
        if processes > 1:
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(auto_shard_dataset=False)
            )
        kind, _, mode = run.partition(":")
        if run == "auto_shard":
            result = auto_shard(process, processes)
        elif kind == "model_parallel":
            keras.distribution.set_distribution(model_parallel_distribution())
            result = model_parallel(mode)
        elif kind == "tfdata":
            result = tfdata(mode, process, processes)
        else:
            result = train(*run.split(":"), process, processes)
        result.update(process=process, processes=processes, run=run)
        result["distribution"] = type(keras.distribution.distribution()).__name__
        suffix = f"process{process}" if processes > 1 else "single"
        name = run.replace(":", "-") + f"-{suffix}.json"
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(result, f)
        keras.distribution.set_distribution(None)
        keras.backend.clear_session()
    if processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
