"""R-Drop and the anchor under `keras.distribution` on 4 virtual CPU devices.

Run by `tests/test_distribution.py` in a fresh process, because the virtual
devices must be requested (`XLA_FLAGS`) before JAX is imported. Trains the
same seeded model, with dropout, on one device, under `DataParallel` (4-way,
R-Drop's "sequential" mode) and under `ModelParallel` (a 2 x 2 mesh whose
"model" axis splits the large Dense layer, "concat" mode), and prints one
JSON line with what the test checks: histories, the largest weight
differences to the one-device run, and how each snapshot variable is laid
out next to the model variable it copies.
"""

import contextlib
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_rdrop import RDropModel, ReferenceKLRegularizer  # noqa: E402

FEATURES, HIDDEN, CLASSES = 8, 32, 4
RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, FEATURES)).astype("float32")
Y = np.argmax(X @ RNG.standard_normal((FEATURES, CLASSES)), axis=-1).astype("int32")


def inner_model(frozen_head=False):
    init = keras.initializers.GlorotUniform
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(
                HIDDEN, activation="relu", kernel_initializer=init(0), name="big"
            ),
            keras.layers.Dropout(0.3, seed=1),
            keras.layers.Dense(CLASSES, kernel_initializer=init(2), name="head"),
        ],
        name="inner",
    )
    # A frozen head: the snapshot copies only the (sharded) "big" layer.
    model.get_layer("head").trainable = not frozen_head
    return model


def data_parallel():
    return keras.distribution.DataParallel(devices=keras.distribution.list_devices())


def model_parallel():
    mesh = keras.distribution.DeviceMesh(
        (2, 2), ("batch", "model"), keras.distribution.list_devices()
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*big.*kernel"] = (None, "model")
    layout_map[".*big.*bias"] = ("model",)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def layouts(model):
    """Per snapshot variable: its sharding next to the model variable's."""
    out = []
    for w, ref in model.reference.copies(model.model):
        w_sharding, ref_sharding = w.value.sharding, ref.value.sharding
        out.append(
            {
                "path": w.path,
                "spec": str(getattr(w_sharding, "spec", w_sharding)),
                "ref_spec": str(getattr(ref_sharding, "spec", ref_sharding)),
                "same": bool(ref_sharding.is_equivalent_to(w_sharding, len(w.shape))),
                "devices": len(w_sharding.device_set),
                "ref_devices": len(ref_sharding.device_set),
                "shard": list(w.value.addressable_shards[0].data.shape),
                "ref_shard": list(ref.value.addressable_shards[0].data.shape),
            }
        )
    return out


def train(
    distribution,
    epochs=2,
    callback=None,
    model=None,
    mode="concat",
    frozen_head=False,
):
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        if model is None:
            keras.utils.set_random_seed(0)
            model = RDropModel(inner_model(frozen_head), alpha=1.0, mode=mode)
            model.compile(
                optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        theta0 = {w.path: keras.ops.convert_to_numpy(w) for w in model.model.weights}
        callback = callback or ReferenceKLRegularizer(beta=0.5)
        history = model.fit(
            X,
            Y,
            batch_size=16,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[callback],
        )
    return {
        "model": model,
        "theta0": theta0,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "weights": [np.array(w) for w in model.model.get_weights()],
        # The copies, by the path of the weight each one copies.
        "reference": {
            w.path: np.array(keras.ops.convert_to_numpy(r.value), dtype="float32")
            for w, r in model.reference.copies(model.model)
        },
        "final": {w.path: keras.ops.convert_to_numpy(w) for w in model.model.weights},
        "beta": float(keras.ops.convert_to_numpy(model.anchor.beta.value)),
    }


def max_diff(a, b):
    return max((float(np.max(np.abs(p - q))) for p, q in zip(a, b)), default=0.0)


def summary(run, single=None):
    out = {
        "history": run["history"],
        "beta": run["beta"],
        "layouts": layouts(run["model"]),
        # The snapshot is θ0 after training (not overwritten, not donated).
        "reference_vs_theta0": max_diff(
            list(run["reference"].values()),
            [run["theta0"][path] for path in run["reference"]],
        ),
        "trained_vs_theta0": max_diff(
            list(run["final"].values()), list(run["theta0"].values())
        ),
        "copied": sorted(run["reference"]),
        # Weights left out of the snapshot did not move: they are still θ0.
        "uncopied_vs_theta0": max_diff(
            [v for k, v in run["final"].items() if k not in run["reference"]],
            [v for k, v in run["theta0"].items() if k not in run["reference"]],
        ),
    }
    if single is not None:
        out["weights_vs_single"] = max_diff(run["weights"], single["weights"])
    return out


def main():
    results = {"devices": [str(d) for d in jax.devices()]}
    single = train(None)
    results["single"] = summary(single)
    mp = train(model_parallel())
    results["model_parallel"] = summary(mp, single)
    # R-Drop's other mode, with two calls of the inner model per step.
    single_sequential = train(None, mode="sequential")
    results["single_sequential"] = summary(single_sequential)
    results["data_parallel"] = summary(
        train(data_parallel(), mode="sequential"), single_sequential
    )

    # A snapshot stored in bfloat16 and moved by soft updates and the
    # adaptive beta controller keeps the model's layout too.
    def moving():
        return ReferenceKLRegularizer(
            beta=0.5,
            reference_dtype="bfloat16",
            soft_update_tau=0.5,
            soft_update_every=2,
            target_kl=0.01,
        )

    single_moving = train(None, callback=moving())
    results["moving_single"] = summary(single_moving)
    results["moving_model_parallel"] = summary(
        train(model_parallel(), callback=moving()), single_moving
    )

    # A partial snapshot: the head is frozen, only the sharded layer is
    # copied, and laid out like it.
    single_partial = train(None, frozen_head=True)
    results["partial_single"] = summary(single_partial)
    results["partial_model_parallel"] = summary(
        train(model_parallel(), frozen_head=True), single_partial
    )

    # A model saved with its snapshot and loaded under ModelParallel: the
    # snapshot is restored before the model's layouts are known, and laid out
    # like them when training starts.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rdrop.keras")
        mp["model"].save(path)
        distribution = model_parallel()
        with distribution.scope():
            loaded = keras.saving.load_model(path)
        results["loaded_before_fit"] = layouts(loaded)
        resumed = train(distribution, epochs=1, model=loaded)
        # The original snapshot, kept (the loaded weights have other paths).
        resumed["theta0"] = dict(zip(resumed["final"], single["theta0"].values()))
        results["loaded_model_parallel"] = summary(resumed)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
