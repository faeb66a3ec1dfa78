"""The dropout seed state of the inner model, saved with RDropModel's own state.

Every Keras layer that draws random numbers (`Dropout`, `GaussianNoise`, ...)
owns a `keras.random.SeedGenerator`, whose `state` variable (an integer pair:
the seed and a counter) advances at each draw. Keras lists these variables in
`layer.variables` but not in `layer.weights`, and saves only the weights: a
`.keras` file or a `BackupAndRestore` checkpoint holds no seed state, so a
resumed run draws other dropout masks than an uninterrupted one.
`RDropModel.save_own_variables` stores them next to its own variables with
`save_seed_states`, and `load_own_variables` restores them with
`load_seed_states`, so that a resumed run draws the same masks.
"""

from __future__ import annotations

import keras
import numpy as np

KEY_PREFIX = "seed_state_"


def seed_states(model: keras.Model) -> list:
    """The `state` variables of the seed generators of `model`'s layers.

    They are the variables of `model.variables` that are not in
    `model.weights`, in Keras' (deterministic) traversal order.

    Args:
        model: A `keras.Model`, built.

    Returns:
        A list of integer `keras.Variable`s of shape `(2,)`.
    """
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def is_seed_key(key: str) -> bool:
    """Whether `key` of a weights store names a saved seed state."""
    return key.startswith(KEY_PREFIX)


def save_seed_states(model: keras.Model, store) -> None:
    """Writes the seed states of `model` into `store` (a Keras weights store).

    Args:
        model: The inner model.
        store: The dict-like store given to `save_own_variables`.
    """
    for i, variable in enumerate(seed_states(model)):
        store[f"{KEY_PREFIX}{i}"] = keras.ops.convert_to_numpy(variable.value)


def load_seed_states(model: keras.Model, store) -> None:
    """Restores the seed states of `model` from `store`.

    A store with no seed state (a file written before keras-rdrop saved them)
    leaves the current states as they are.

    Args:
        model: The inner model.
        store: The dict-like store given to `load_own_variables`.

    Raises:
        ValueError: If the store holds seed states for another number of
            seed generators than `model` has.
    """
    keys = [key for key in store.keys() if is_seed_key(key)]
    if not keys:
        return
    variables = seed_states(model)
    if len(keys) != len(variables):
        raise ValueError(
            f"The weights file holds {len(keys)} dropout seed states, but the "
            f"model {model.name!r} has {len(variables)} seed generators "
            f"({[v.path for v in variables]}). Load it into the model it was "
            "saved from."
        )
    for i, variable in enumerate(variables):
        value = np.asarray(store[f"{KEY_PREFIX}{i}"])
        variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))
