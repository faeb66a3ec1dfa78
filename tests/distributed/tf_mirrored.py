"""R-Drop and the anchor under `tf.distribute.MirroredStrategy` (2 logical CPUs).

Run by `tests/test_distribution.py` in a fresh process, because logical
devices must be configured before TensorFlow initialises its runtime. Trains
the same model on one device and on two replicas, with the randomness fixed
(no dropout; where R-Drop is on, a deterministic layer stands in for it so the
two passes differ the same way on every replica), and prints one JSON line:
histories, evaluation losses, the largest weight and snapshot differences
between the two runs, and the variable classes of the snapshot.
"""

import json
import os
import sys
import warnings

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_rdrop import RDropModel, ReferenceKLRegularizer  # noqa: E402

FEATURES, HIDDEN, CLASSES = 8, 32, 4
RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, FEATURES)).astype("float32")
Y = np.argmax(X @ RNG.standard_normal((FEATURES, CLASSES)), axis=-1).astype("int32")
# Per-example weights. A global batch of 16 is split into rows 0-7 and 8-15,
# one half per replica: "balanced" weights sum to the same on both halves,
# "uneven" ones do not.
ROW = np.arange(64) % 16
WEIGHTS = {
    "balanced": np.where(ROW % 2 == 0, 1.0, 3.0).astype("float32"),
    "uneven": np.where(ROW < 8, 1.0, 3.0).astype("float32"),
}


class HalfScale(keras.layers.Layer):
    """Dropout's deterministic stand-in: in training, the first half of the
    rows is scaled by 1.2 and the second by 0.8. In `concat` mode the inner
    model sees `[x; x]`, so the two R-Drop passes differ, and identically on
    one device and on each replica."""

    def call(self, x, training=None):
        if not training:
            return x
        first, second = ops.split(x, 2, axis=0)
        return ops.concatenate([first * 1.2, second * 0.8], axis=0)


def inner_model(noise, frozen_body=False):
    init = keras.initializers.GlorotUniform
    body = keras.layers.Dense(HIDDEN, activation="relu", kernel_initializer=init(0))
    layers = [keras.Input((FEATURES,)), body]
    if noise:
        layers.append(HalfScale())
    layers.append(keras.layers.Dense(CLASSES, kernel_initializer=init(1)))
    model = keras.Sequential(layers, name="inner")
    # A frozen body: the snapshot copies only the head.
    body.trainable = not frozen_body
    return model


def train(strategy, alpha, sample_weight=None, frozen_body=False, **callback_kwargs):
    with strategy.scope():
        inner = inner_model(noise=alpha > 0, frozen_body=frozen_body)
        with warnings.catch_warnings():
            # HalfScale is not a layer RDropModel knows to be stochastic.
            warnings.filterwarnings("ignore", "The model .* has no stochastic layer")
            model = RDropModel(inner, alpha=alpha)
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(
        X,
        Y,
        sample_weight=None if sample_weight is None else WEIGHTS[sample_weight],
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=2.0, **callback_kwargs)],
    )
    return {
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "evaluate": float(model.evaluate(X, Y, batch_size=16, verbose=0)),
        "weights": [w.numpy() for w in inner.weights],
        "copied": [w.numpy() for w, _ in model.reference.copies(inner)],
        "copied_count": len(model.reference.copies(inner)),
        "reference": [r.numpy() for _, r in model.reference.copies(inner)],
        "beta": float(model.anchor.beta.numpy()),
        "weight_class": type(inner.weights[0].value).__name__,
        "reference_classes": sorted(
            {type(r.value).__name__ for _, r in model.reference.copies(inner)}
        ),
    }


def max_diff(a, b):
    return max(float(np.max(np.abs(p - q))) for p, q in zip(a, b))


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    configs = {
        # The fixed-randomness run: no R-Drop, the anchor alone, with
        # the snapshot moved by soft updates from the callback.
        "anchor": dict(alpha=0.0, soft_update_tau=0.5, soft_update_every=3),
        # R-Drop (concat) with the anchor and the adaptive beta controller,
        # which assigns beta inside the replicated step.
        "rdrop": dict(alpha=1.0, target_kl=0.01),
        # With sample weights: each replica takes the weighted mean of its
        # own rows, as Keras' masked and `mean_with_sample_weight` losses do.
        "weighted_balanced": dict(alpha=1.0, sample_weight="balanced"),
        "weighted_uneven": dict(alpha=1.0, sample_weight="uneven"),
        # A partial snapshot (the body is frozen), moved by soft updates.
        "partial": dict(
            alpha=1.0, frozen_body=True, soft_update_tau=0.5, soft_update_every=3
        ),
    }
    results = {"replicas": mirrored.num_replicas_in_sync}
    for name, config in configs.items():
        single = train(tf.distribute.get_strategy(), **config)
        multi = train(mirrored, **config)
        results[name] = {
            "single": {k: single[k] for k in ("history", "evaluate", "beta")},
            "mirrored": {
                k: multi[k]
                for k in (
                    "history",
                    "evaluate",
                    "beta",
                    "weight_class",
                    "reference_classes",
                    "copied_count",
                )
            },
            "weights_diff": max_diff(single["weights"], multi["weights"]),
            "reference_diff": max_diff(single["reference"], multi["reference"]),
            "trained": max_diff(single["copied"], single["reference"]),
        }
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
