"""Small models and data for the tests. No framework imports."""

import keras
import numpy as np

NUM_CLASSES = 3


def classification_data(n=64, features=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype("float32")
    w = rng.standard_normal((features, NUM_CLASSES))
    y = np.argmax(x @ w, axis=-1).astype("int32")
    return x, y


def mlp(dropout=0.3, features=8, batch_norm=False, seed=0, activation=None):
    layers = [
        keras.Input((features,)),
        keras.layers.Dense(16, activation="relu", kernel_initializer=_init(seed)),
    ]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    if dropout:
        layers.append(keras.layers.Dropout(dropout, seed=seed))
    layers.append(
        keras.layers.Dense(
            NUM_CLASSES, activation=activation, kernel_initializer=_init(seed + 1)
        )
    )
    return keras.Sequential(layers)


def _init(seed):
    return keras.initializers.GlorotUniform(seed=seed)


def sparse_ce(from_logits=True, **kwargs):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, **kwargs)


def sequence_model(
    vocab=20, length=6, dropout=0.3, seed=None, from_logits=True, mask_zero=True
):
    """Token ids -> per-position class scores: Embedding, Dropout, Dense."""
    tokens = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, 8, mask_zero=mask_zero)(tokens)
    h = keras.layers.Dropout(dropout, seed=seed)(h)
    h = keras.layers.Dense(vocab, activation=None if from_logits else "softmax")(h)
    return keras.Model(tokens, h)


def language_model(vocab=11, seed=0):
    """A small language model whose two passes differ: masks, two dropouts,
    a regularization loss and large initial logits (so the KL is not small)."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(vocab, 8, mask_zero=True)(tokens)
    h = keras.layers.Dropout(0.4)(h)
    h = keras.layers.Dense(
        16, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-2)
    )(h)
    h = keras.layers.Dropout(0.4)(h)
    h = keras.layers.Dense(
        vocab, kernel_initializer=keras.initializers.RandomNormal(stddev=2.0)
    )(h)
    return keras.Model(tokens, h)
