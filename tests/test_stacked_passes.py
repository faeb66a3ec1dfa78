"""`keras_rdrop.src.stacked_passes`: the concatenated mode's `[x; x]` and its split.

`stack_twice` doubles every tensor of a nested input along the batch axis,
`split_passes` cuts nested outputs back into the two passes, in the same
structure, and carries a Keras mask (set by hand, or by
`Embedding(mask_zero=True)`) to both halves; outputs without a mask stay
without one.
"""

import keras
import numpy as np
from keras import ops

from keras_rdrop.src.keras_internals import get_keras_mask, set_keras_mask
from keras_rdrop.src.stacked_passes import split_passes, stack_twice
from tests.testing import to_numpy

RNG = np.random.default_rng(0)


def nested():
    """A nested structure of float and int arrays with different shapes."""
    return {
        "tokens": RNG.integers(0, 9, size=(3, 4)).astype("int32"),
        "extra": [
            RNG.standard_normal((3, 2)).astype("float32"),
            (RNG.standard_normal((3, 5, 2)).astype("float32"),),
        ],
    }


def as_tensors(structure):
    return keras.tree.map_structure(ops.convert_to_tensor, structure)


def assert_same_structure_and_values(actual, expected):
    keras.tree.assert_same_structure(actual, expected)
    for a, e in zip(keras.tree.flatten(actual), keras.tree.flatten(expected)):
        # Concatenation and splitting copy values: exact.
        np.testing.assert_array_equal(to_numpy(a), np.asarray(e))
        assert to_numpy(a).dtype == np.asarray(e).dtype


def test_stack_twice_doubles_every_tensor_along_the_batch_axis():
    inputs = nested()
    stacked = stack_twice(as_tensors(inputs))
    expected = keras.tree.map_structure(lambda t: np.concatenate([t, t]), inputs)
    assert_same_structure_and_values(stacked, expected)


def test_stack_twice_of_a_single_tensor():
    x = RNG.standard_normal((2, 3)).astype("float32")
    stacked = stack_twice(ops.convert_to_tensor(x))
    assert tuple(stacked.shape) == (4, 3)
    np.testing.assert_array_equal(to_numpy(stacked), np.concatenate([x, x]))


def test_split_passes_undoes_stack_twice():
    inputs = nested()
    first, second = split_passes(stack_twice(as_tensors(inputs)))
    assert_same_structure_and_values(first, inputs)
    assert_same_structure_and_values(second, inputs)


def test_split_passes_returns_each_half_in_order():
    one, two = nested(), nested()
    stacked = keras.tree.map_structure(
        lambda a, b: ops.convert_to_tensor(np.concatenate([a, b])), one, two
    )
    first, second = split_passes(stacked)
    assert_same_structure_and_values(first, one)
    assert_same_structure_and_values(second, two)


def test_a_keras_mask_is_split_with_its_tensor():
    values = ops.convert_to_tensor(RNG.standard_normal((4, 3, 2)).astype("float32"))
    mask = np.array(
        [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=bool
    )  # four different rows: a swapped or unsplit mask would not match
    set_keras_mask(values, ops.convert_to_tensor(mask))
    plain = ops.convert_to_tensor(RNG.standard_normal((4, 2)).astype("float32"))
    first, second = split_passes({"seq": values, "plain": plain})
    np.testing.assert_array_equal(to_numpy(get_keras_mask(first["seq"])), mask[:2])
    np.testing.assert_array_equal(to_numpy(get_keras_mask(second["seq"])), mask[2:])
    assert get_keras_mask(first["plain"]) is None
    assert get_keras_mask(second["plain"]) is None


def test_an_embedding_mask_reaches_both_passes():
    tokens = np.array([[3, 4, 0, 0], [5, 0, 0, 0]], dtype="int32")
    embedding = keras.layers.Embedding(9, 2, mask_zero=True)
    outputs = embedding(stack_twice(ops.convert_to_tensor(tokens)))
    assert get_keras_mask(outputs) is not None
    first, second = split_passes(outputs)
    for half in (first, second):
        assert tuple(half.shape) == (2, 4, 2)
        np.testing.assert_array_equal(to_numpy(get_keras_mask(half)), tokens != 0)
