"""The concatenated mode's two passes in one: `[x; x]` in, `[pass_1; pass_2]` out."""

from __future__ import annotations

import keras
from keras import ops

from keras_rdrop.src.keras_internals import get_keras_mask, set_keras_mask


def stack_twice(inputs):
    """Every input tensor concatenated with itself along the batch axis, its
    Keras mask too (a shared prefix's outputs may carry one)."""

    def stack(t):
        stacked = ops.concatenate([t, t], axis=0)
        mask = get_keras_mask(t)
        if mask is not None:
            set_keras_mask(stacked, ops.concatenate([mask, mask], axis=0))
        return stacked

    return keras.tree.map_structure(stack, inputs)


def split_passes(y_pred):
    """Splits stacked `[pass_1; pass_2]` outputs in two, Keras masks included."""
    firsts, seconds = [], []
    for t in keras.tree.flatten(y_pred):
        first, second = ops.split(t, 2, axis=0)
        mask = get_keras_mask(t)
        if mask is not None:
            mask_1, mask_2 = ops.split(mask, 2, axis=0)
            set_keras_mask(first, mask_1)
            set_keras_mask(second, mask_2)
        firsts.append(first)
        seconds.append(second)
    pack = keras.tree.pack_sequence_as
    return pack(y_pred, firsts), pack(y_pred, seconds)
