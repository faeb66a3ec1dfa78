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


def sparse_ce(from_logits=True):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
