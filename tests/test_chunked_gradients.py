"""`keras_rdrop.src.chunked_gradients`: the chunking engine, called directly.

`chunks` (cases beyond those of tests/test_divergences.py: the class axis
first, a chunk axis of size 1, a count of exactly one chunk), `cut`,
`upstream_of`, `set_chunk_elements`/`get_chunk_elements`, and `chunked_op`
with a small custom forward and backward: two live inputs, a constant tensor
and int labels without the class axis, a value stacked on a leading axis.
Chunked and whole, its value and gradients match float64 NumPy; a `None`
gradient becomes zeros; `backward_reads_live=False` hands `None` for the live
chunks; on torch the constants are freed after the forward pass.
"""

import weakref

import keras
import numpy as np
import pytest
from keras import ops

from keras_rdrop.src import chunked_gradients
from keras_rdrop.src.chunked_gradients import (
    chunked_op,
    chunks,
    cut,
    get_chunk_elements,
    set_chunk_elements,
    upstream_of,
)
from tests.test_divergences import _grad
from tests.testing import assert_allclose, to_numpy

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "shape, axis, elements, expected",
    [
        # The class axis first: the next axis is split.
        ((6, 2), 0, 4, (1, [(0, 1), (1, 2)])),
        ((6, 2), -2, 4, (1, [(0, 1), (1, 2)])),
        # Exactly one chunk's worth of elements: not split.
        ((4, 5), -1, 20, None),
        # Just over: two chunks, the last one shorter.
        ((5, 4), -1, 19, (0, [(0, 3), (3, 5)])),
        # The only non-class axis has size 1: nothing to split.
        ((1, 100), -1, 7, None),
        # The largest non-class axis is split, not the first one.
        ((2, 9, 3), -1, 6, (1, [(i, i + 1) for i in range(9)])),
    ],
)
def test_chunks(set_chunks, shape, axis, elements, expected):
    set_chunks(elements)
    assert chunks(shape, axis) == expected


def test_chunks_cover_the_axis_without_overlap(set_chunks):
    set_chunks(10)
    for size in range(2, 40):
        split = chunks((size, 3), -1)
        if split is None:
            assert size * 3 <= 10
            continue
        bounds = split[1]
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
        assert all(stop > start for start, stop in bounds)


def test_cut_without_a_split_is_the_tensor_itself():
    x = ops.ones((3, 4))
    (piece,) = cut(x, 1, None)
    # No slicing at all: the same object comes back.
    assert piece is x


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cut_slices_along_the_axis(axis):
    x = RNG.standard_normal((4, 5, 3)).astype("float32")
    split = (axis, [(0, 1), (1, 3)] + ([(3, x.shape[axis])] if axis < 2 else []))
    pieces = cut(ops.convert_to_tensor(x), axis, split)
    assert len(pieces) == len(split[1])
    for piece, (start, stop) in zip(pieces, split[1]):
        expected = np.take(x, np.arange(start, stop), axis=axis)
        # Slicing copies values exactly.
        np.testing.assert_array_equal(to_numpy(piece), expected)


def test_upstream_of_each_backends_calling_convention():
    u = ops.ones((2,))
    assert upstream_of((u,), None) is u  # JAX and TensorFlow: grad(upstream)
    assert upstream_of((), u) is u  # torch: grad(*inputs, upstream=upstream)


def test_set_and_get_chunk_elements(set_chunks):
    set_chunks(get_chunk_elements())
    set_chunk_elements(12)
    assert get_chunk_elements() == 12 == chunked_gradients.CHUNK_ELEMENTS
    for bad in (0, -3, 2.0, True, "8"):
        with pytest.raises(ValueError, match="`elements` should be a positive int"):
            set_chunk_elements(bad)
    assert get_chunk_elements() == 12


# The custom op of the tests below, with class axis `axis`, live `x` and
# `y`, constants `c` (the live shape) and `labels` (without the class axis):
#
#   value[0] = sum_class(c * x**2)
#   value[1] = sum_class(c * y**2) + x[label]
#
# stacked on a new leading axis, so `out_axis` shifts the chunk axis by one
# (and by one less past the class axis, which the value drops).


def np_op(x, y, c, labels, axis):
    x, y, c = (np.asarray(t, np.float64) for t in (x, y, c))
    picked = np.take_along_axis(x, np.expand_dims(labels, axis), axis=axis)
    first = np.sum(c * x**2, axis=axis)
    return np.stack([first, np.sum(c * y**2, axis=axis) + np.squeeze(picked, axis)])


def np_op_grads(x, y, c, labels, axis, w):
    """The gradients of `sum(w * np_op(...))` in `x` and `y`."""
    num_classes = x.shape[axis]
    one_hot = np.moveaxis(np.eye(num_classes)[labels], -1, axis)
    w0, w1 = (np.expand_dims(w[i], axis) for i in range(2))
    return 2 * c * x * w0 + one_hot * w1, 2 * c * y * w1


def make_op(
    axis, seen, grad_y=True, backward_reads_live=True, chunked=True, save_live=False
):
    """`(x, y, c, labels) -> value` through `chunked_op`; `seen` records the
    live chunks each forward and backward call got."""

    def forward(live, constants):
        # Computed in float32 whatever the live dtype, as the package's ops do.
        x, y = (ops.cast(t, "float32") for t in live)
        c, labels = constants
        seen["forward"].append(tuple(live[0].shape))
        index = ops.expand_dims(labels, axis)
        picked = ops.squeeze(ops.take_along_axis(x, index, axis=axis), axis)
        first = ops.sum(c * ops.square(x), axis=axis)
        second = ops.sum(c * ops.square(y), axis=axis) + picked
        one_hot = ops.one_hot(labels, x.shape[axis], axis=axis)
        # Derived tensors only: a slice of `c` would keep `c` alive.
        saved = (2.0 * c, one_hot)
        if save_live:
            saved += (x + 0.0, y + 0.0)
        return ops.stack([first, second]), saved

    def backward(live, saved, upstream):
        seen["backward"].append(live)
        twice_c, one_hot = saved[:2]
        x, y = saved[2:] if live is None else (ops.cast(t, "float32") for t in live)
        w0, w1 = (ops.expand_dims(upstream[i], axis) for i in range(2))
        dx = twice_c * x * w0 + one_hot * w1
        return dx, (twice_c * y * w1 if grad_y else None)

    def out_axis(chunk_axis):
        return 1 + chunk_axis - (chunk_axis > axis)

    def op(x, y, c, labels):
        return chunked_op(
            (x, y),
            forward,
            backward,
            axis=axis,
            out_axis=out_axis,
            constants=(c, labels),
            chunked=chunked,
            backward_reads_live=backward_reads_live,
        )

    return op


def inputs(shape, axis):
    x, y = (RNG.standard_normal(shape).astype("float32") for _ in range(2))
    c = RNG.uniform(0.5, 2.0, size=shape).astype("float32")
    label_shape = tuple(s for i, s in enumerate(shape) if i != axis)
    labels = RNG.integers(0, shape[axis], size=label_shape).astype("int32")
    return x, y, c, labels


def run(op, x, y, c, labels, w):
    """The op's value, and the gradients of `sum(w * value)` in `x` and `y`."""
    c_t, labels_t = ops.convert_to_tensor(c), ops.convert_to_tensor(labels)
    value = to_numpy(
        op(ops.convert_to_tensor(x), ops.convert_to_tensor(y), c_t, labels_t)
    )
    grads = []
    for wrt in ("x", "y"):
        var = keras.Variable(x if wrt == "x" else y)
        other = ops.convert_to_tensor(y if wrt == "x" else x)

        def loss(var=var, other=other, wrt=wrt):
            # A tensor, not the Variable: torch's autograd.Function tracks
            # only tensor arguments, TensorFlow's custom gradient wants the
            # variable read (as `divergences.as_float` does).
            live = ops.cast(var, var.dtype)
            pair = (live, other) if wrt == "x" else (other, live)
            return ops.sum(ops.convert_to_tensor(w) * op(*pair, c_t, labels_t))

        grads.append(_grad(loss, var))
    return value, grads


# Class axis last: the chunk axis (1) comes before it. Class axis in the
# middle: the chunk axis (2) is past it, and the labels are cut along 1.
CASES = [((3, 4, 5), 2, 1), ((3, 5, 4), 1, 2)]


@pytest.mark.parametrize("shape, axis, chunk_axis", CASES, ids=["last", "middle"])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_chunked_op_matches_numpy(set_chunks, shape, axis, chunk_axis, chunked):
    set_chunks(4)
    split = chunks(shape, axis)
    assert split is not None and split[0] == chunk_axis
    x, y, c, labels = inputs(shape, axis)
    expected = np_op(x, y, c, labels, axis)
    w = RNG.uniform(0.5, 2.0, size=expected.shape).astype("float32")
    seen = {"forward": [], "backward": []}
    value, (gx, gy) = run(make_op(axis, seen, chunked=chunked), x, y, c, labels, w)
    assert value.shape == expected.shape
    assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
    want_x, want_y = np_op_grads(x, y, c, labels, axis, w)
    assert_allclose(gx, want_x, rtol=1e-5, atol=1e-5)
    assert_allclose(gy, want_y, rtol=1e-5, atol=1e-5)
    # Each forward call saw one chunk (or the whole tensor).
    piece = list(shape)
    if chunked:
        piece[chunk_axis] = 1  # 4 elements a chunk: one row of the chunk axis
    assert seen["forward"] and set(seen["forward"]) == {tuple(piece)}
    assert all(live is not None for live in seen["backward"])


def test_chunked_and_whole_give_the_same_gradients(set_chunks):
    set_chunks(4)
    shape, axis = (2, 6, 3), 2
    x, y, c, labels = inputs(shape, axis)
    w = RNG.uniform(0.5, 2.0, size=(2, 2, 6)).astype("float32")
    outs = []
    for chunked in (True, False):
        seen = {"forward": [], "backward": []}
        outs.append(run(make_op(axis, seen, chunked=chunked), x, y, c, labels, w))
    (v1, (gx1, gy1)), (v2, (gx2, gy2)) = outs
    assert_allclose(v1, v2, rtol=1e-6, atol=1e-6)
    assert_allclose(gx1, gx2, rtol=1e-6, atol=1e-6)
    assert_allclose(gy1, gy2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_a_none_gradient_becomes_zeros(set_chunks, chunked):
    set_chunks(4)
    shape, axis = (3, 4, 5), 2
    x, y, c, labels = inputs(shape, axis)
    w = RNG.uniform(0.5, 2.0, size=(2, 3, 4)).astype("float32")
    seen = {"forward": [], "backward": []}
    op = make_op(axis, seen, grad_y=False, chunked=chunked)
    _, (gx, gy) = run(op, x, y, c, labels, w)
    assert gy.shape == y.shape
    np.testing.assert_array_equal(gy, np.zeros_like(y))  # zeros, exactly
    assert_allclose(gx, np_op_grads(x, y, c, labels, axis, w)[0], rtol=1e-5, atol=1e-5)


def test_backward_without_the_live_inputs_gets_none(set_chunks):
    set_chunks(4)
    shape, axis = (3, 4, 5), 2
    x, y, c, labels = inputs(shape, axis)
    w = RNG.uniform(0.5, 2.0, size=(2, 3, 4)).astype("float32")
    seen = {"forward": [], "backward": []}
    op = make_op(axis, seen, backward_reads_live=False, save_live=True)
    _, (gx, gy) = run(op, x, y, c, labels, w)
    assert seen["backward"] and all(live is None for live in seen["backward"])
    want_x, want_y = np_op_grads(x, y, c, labels, axis, w)
    assert_allclose(gx, want_x, rtol=1e-5, atol=1e-5)
    assert_allclose(gy, want_y, rtol=1e-5, atol=1e-5)


def test_gradients_take_the_dtype_of_their_input(set_chunks):
    # The backward's float32 pieces are cast to the live input's dtype
    # (each backend's custom gradient wants the input's dtype back).
    set_chunks(4)
    shape, axis = (3, 4, 5), 2
    x, y, c, labels = inputs(shape, axis)
    x16 = keras.Variable(x, dtype="float16")
    c_t, labels_t = ops.convert_to_tensor(c), ops.convert_to_tensor(labels)
    seen = {"forward": [], "backward": []}
    op = make_op(axis, seen)

    def loss():
        live = ops.cast(x16, "float16")
        return ops.sum(op(live, ops.convert_to_tensor(y), c_t, labels_t))

    grad = _grad(loss, x16)
    assert grad.dtype == np.float16
    rounded = to_numpy(ops.cast(x16, "float32"))
    want = np_op_grads(rounded, y, c, labels, axis, np.ones((2, 3, 4)))[0]
    assert_allclose(grad, want, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="torch runs the op eagerly, so when a constant is freed is "
    "observable; JAX and TensorFlow trace it",
)
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_constants_are_not_kept_after_the_forward_pass_torch(set_chunks, chunked):
    import torch

    set_chunks(4)
    shape, axis = (3, 4, 5), 2
    x, y, c, labels = inputs(shape, axis)
    live = [torch.tensor(t, requires_grad=True) for t in (x, y)]
    c_t, labels_t = torch.tensor(c), torch.tensor(labels)
    alive = weakref.ref(c_t)
    seen = {"forward": [], "backward": []}
    value = make_op(axis, seen, chunked=chunked)(*live, c_t, labels_t)
    del c_t
    assert alive() is None, "the op kept the constant alive"
    torch.sum(value).backward()
    want_x, want_y = np_op_grads(x, y, c, labels, axis, np.ones((2, 3, 4)))
    assert_allclose(live[0].grad, want_x, rtol=1e-5, atol=1e-5)
    assert_allclose(live[1].grad, want_y, rtol=1e-5, atol=1e-5)
