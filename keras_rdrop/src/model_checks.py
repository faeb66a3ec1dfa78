"""Checks of what RDropModel is given: the model to wrap and its flags."""

from __future__ import annotations

from typing import Any

import keras

from keras_rdrop.src.keras_internals import flatten_layers

_STOCHASTIC_TYPES = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)


def has_stochastic_layer(model: keras.Model) -> bool:
    """Whether any layer of `model` draws random numbers in training."""
    for layer in flatten_layers(model):
        if isinstance(layer, _STOCHASTIC_TYPES):
            rate = getattr(layer, "rate", getattr(layer, "stddev", 1.0))
            if rate and rate > 0:
                return True
            continue
        if any(
            isinstance(value, keras.random.SeedGenerator)
            for value in vars(layer).values()
        ):
            return True
    return False


def validate_bool(value: Any, name: str) -> bool:
    """`value` if it is a bool, else a `TypeError` naming the argument."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` should be a bool. Received: {name}={value!r}")
    return value
