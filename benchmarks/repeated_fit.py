"""The cost of calling `fit` again and again: an epoch loop, a tuner.

Times short `fit` calls (2 steps each) after a warm-up, on the backend of
`KERAS_BACKEND`, for plain Keras and for an `RDropModel` with the anchor,
fitted with the anchor at every call or alternately with and without it.
A call that traces and compiles the step again costs far more than its two
steps: the ratio to plain's `fit` shows it. The variants run interleaved.

    KERAS_BACKEND=jax .tox/jax/bin/python benchmarks/repeated_fit.py

To compare two versions, put the other one first on `PYTHONPATH` (a folder
holding `keras_rdrop/`, for example from `git archive REV keras_rdrop`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import keras
import numpy as np

import keras_rdrop
from keras_rdrop import RDropModel, ReferenceKLRegularizer


def build():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(10),
        ]
    )


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=6, help="timed fit calls")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype("float32")
    y = rng.integers(0, 10, 64)
    plain = build()
    plain.compile(optimizer="adam", loss=loss())
    anchored = RDropModel(build(), alpha=1.0)
    anchored.compile(optimizer="adam", loss=loss())
    alternating = RDropModel(build(), alpha=1.0)
    alternating.compile(optimizer="adam", loss=loss())
    anchor = ReferenceKLRegularizer(beta=0.1)

    def fit(model, callbacks):
        start = time.perf_counter()
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
        return time.perf_counter() - start

    # Warm-up: every model traces (and compiles) the steps it will run.
    fit(plain, [])
    fit(anchored, [anchor])
    fit(alternating, [anchor])
    fit(alternating, [])
    times = {"plain": [], "anchored": [], "alternating": []}
    for call in range(args.calls):
        times["plain"].append(fit(plain, []))
        times["anchored"].append(fit(anchored, [anchor]))
        times["alternating"].append(fit(alternating, [anchor] if call % 2 else []))
    base = statistics.median(times["plain"])
    where = os.path.dirname(os.path.dirname(keras_rdrop.__file__))
    print(
        f"backend {keras.backend.backend()}, keras {keras.__version__}, "
        f"keras_rdrop from {where}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:12s} fit of 2 steps: median {1000 * median:8.1f} ms, "
            f"{median / base:6.2f}x plain"
        )


if __name__ == "__main__":
    main()
