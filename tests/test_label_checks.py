"""Labels of the wrong kind for the loss: a `ValueError` that names the fix.

README, "What happens if": one-hot labels with a sparse loss, integer labels
with `CategoricalCrossentropy`. Checked from static shapes at the first
training step (traced: `jit`, `tf.function`), in the general path, the
fused language-model path and with `alpha=0`.
"""

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel
from tests.models import (
    NUM_CLASSES,
    classification_data,
    mlp,
    sequence_model,
    sparse_ce,
)

V, T = 11, 5  # language model: vocabulary, length


def one_hot(y, n):
    return np.eye(n, dtype="float32")[y]


class CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


@pytest.mark.parametrize("alpha", [1.0, 0.0])
@pytest.mark.parametrize("mode", ["concat", "sequential"])
def test_one_hot_labels_with_a_sparse_loss(alpha, mode):
    x, y = classification_data()
    model = RDropModel(mlp(), alpha=alpha, mode=mode)
    model.compile(optimizer="sgd", loss=sparse_ce())
    count = CountBatches()
    with pytest.raises(
        ValueError,
        match=r"Output 'output_0': the compiled loss SparseCategoricalCrossentropy "
        r"takes integer class ids \(labels of shape \((None|16),\)\), but the "
        r"labels have shape \((None|16), 3\) for predictions of shape "
        r"\((None|16), 3\): they are one-hot.*"
        r"keras.losses.CategoricalCrossentropy\(from_logits=True\)",
    ):
        model.fit(
            x,
            one_hot(y, NUM_CLASSES),
            batch_size=16,
            epochs=1,
            verbose=0,
            callbacks=[count],
        )
    assert count.batches == 0


@pytest.mark.parametrize("labels", ["flat", "column"])
def test_integer_labels_with_a_categorical_loss(labels):
    x, y = classification_data()
    if labels == "column":
        y = y[:, None]
    model = RDropModel(mlp(), alpha=1.0)
    model.compile(
        optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True)
    )
    label_shape = r"\((None|16),\)" if labels == "flat" else r"\((None|16), 1\)"
    count = CountBatches()
    with pytest.raises(
        ValueError,
        match=r"the compiled loss CategoricalCrossentropy takes one-hot labels of "
        r"the predictions' shape \((None|16), 3\), but the labels have shape "
        + label_shape
        + r": they are integer class ids. Use "
        r"keras.losses.SparseCategoricalCrossentropy\(from_logits=True\).*"
        r"to_categorical\(y, 3\)",
    ):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[count])
    assert count.batches == 0


def test_string_losses_are_named_as_given():
    x, y = classification_data()
    model = RDropModel(mlp(activation="softmax"), alpha=1.0)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    with pytest.raises(
        ValueError,
        match=r"the compiled loss 'categorical_crossentropy' takes one-hot.*"
        r"SparseCategoricalCrossentropy\(from_logits=False\)",
    ):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def language_model():
    return sequence_model(vocab=V, length=T, mask_zero=False)


@pytest.mark.traced
def test_one_hot_labels_with_a_sparse_loss_on_the_fused_path():
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, size=(16, T)).astype("int32")
    y = rng.integers(0, V, size=(16, T)).astype("int32")
    model = RDropModel(language_model(), alpha=1.0)
    # Exactly the loss the fused path takes.
    model.compile(optimizer="sgd", loss=sparse_ce())
    count = CountBatches()
    with pytest.raises(
        ValueError,
        match=r"labels have shape \((None|8), 5, 11\) for predictions of shape "
        r"\((None|8), 5, 11\): they are one-hot",
    ):
        model.fit(
            x, one_hot(y, V), batch_size=8, epochs=1, verbose=0, callbacks=[count]
        )
    assert count.batches == 0
    # The right labels train (through the fused path). A fresh model: after a
    # failed `fit`, JAX's trainer leaves the variables purged.
    model = RDropModel(language_model(), alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_matching_labels_train():
    x, y = classification_data()
    for loss, labels in [
        (sparse_ce(), y),
        (sparse_ce(), y[:, None]),
        (keras.losses.CategoricalCrossentropy(from_logits=True), one_hot(y, 3)),
    ]:
        model = RDropModel(mlp(), alpha=1.0)
        model.compile(optimizer="sgd", loss=loss)
        history = model.fit(x, labels, batch_size=16, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
