"""`fit` under `tf.distribute.MultiWorkerMirroredStrategy`: 2 workers on CPU.

Run by tests/test_tf_multiworker.py, once per worker, started together:

    TF_CONFIG='{"cluster": {"worker": ["localhost:P0", "localhost:P1"]},
                "task": {"type": "worker", "index": I}}' \\
        python tf_multiworker.py MODE

MODE is `plain` (a tiny `keras.Sequential`, no keras-rdrop: whether Keras
itself trains under the strategy) or `rdrop` (the same model inside an
`RDropModel`, with `ReferenceKLRegularizer`). Each worker builds the model
under the strategy and calls `fit` on a `tf.data.Dataset` batched with the
global batch size (the strategy splits it across the workers), then prints
one line, `RESULT {json}`: `{"ok": true, "weights": ...}` (with the initial
weights, the history and, for `rdrop`, the snapshot), or `{"ok": false,
"type": ..., "message": ...}` with the exception `fit` raised.
"""

import json
import os
import sys
import traceback
import warnings

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import tensorflow as tf  # noqa: E402

# Created first: the strategy starts TensorFlow's collective runtime, which
# must happen before anything else initialises it.
strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import numpy as np  # noqa: E402

# The whole traceback, Keras' frames included: where `fit` fails.
keras.config.disable_traceback_filtering()

GLOBAL_BATCH, STEPS, FEATURES, CLASSES = 8, 3, 6, 3


def dataset():
    rng = np.random.default_rng(0)  # the same data on every worker
    x = rng.standard_normal((GLOBAL_BATCH * STEPS, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, GLOBAL_BATCH * STEPS).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


def build(mode):
    keras.utils.set_random_seed(0)  # the same initial weights on every worker
    layers = [keras.Input((FEATURES,)), keras.layers.Dense(8, activation="relu")]
    if mode == "rdrop":
        layers.append(keras.layers.Dropout(0.3))
    layers.append(keras.layers.Dense(CLASSES))
    model = keras.Sequential(layers)
    callbacks = []
    if mode == "rdrop":
        from keras_rdrop import RDropModel, ReferenceKLRegularizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = RDropModel(model, alpha=1.0)
        callbacks = [ReferenceKLRegularizer(beta=0.5)]
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, callbacks


def keras_frame(error):
    """`path:line in function` of the innermost frame in Keras' own code."""
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if f"{os.sep}keras{os.sep}src{os.sep}" in f.filename
        and "traceback_utils" not in f.filename
    ]
    if not frames:
        return None
    frame = frames[-1]
    path = frame.filename.split(f"{os.sep}keras{os.sep}src{os.sep}")[-1]
    return f"keras/src/{path}:{frame.lineno} in {frame.name}"


def main():
    (mode,) = sys.argv[1:]
    result = {"mode": mode, "worker": strategy.cluster_resolver.task_id}
    result["replicas"] = strategy.num_replicas_in_sync
    try:
        with strategy.scope():
            model, callbacks = build(mode)
        inner = model.model if mode == "rdrop" else model
        result["theta0"] = [np.asarray(w.numpy()).tolist() for w in inner.weights]
        history = model.fit(dataset(), epochs=2, verbose=0, callbacks=callbacks)
    except Exception as error:  # the outcome is the result, either way
        result.update(
            ok=False,
            type=type(error).__name__,
            message=str(error),
            # Where it failed: the innermost Keras frame, and the frames.
            keras_frame=keras_frame(error),
            traceback="".join(traceback.format_tb(error.__traceback__))[-6000:],
        )
    else:
        result.update(
            ok=True,
            history=history.history,
            weights=[np.asarray(w.numpy()).tolist() for w in inner.weights],
        )
        if mode == "rdrop":
            result["snapshot"] = [
                np.asarray(v.numpy()).tolist() for v in model.reference.ref_weights
            ]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
