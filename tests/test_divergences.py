import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_rdrop import kl_divergence, symmetric_kl_divergence
from keras_rdrop.src import chunked_gradients, divergences
from tests.testing import assert_allclose, np_kl, np_symmetric_kl, to_numpy

RNG = np.random.default_rng(0)


def logits(*shape, scale=3.0):
    return (RNG.standard_normal(shape) * scale).astype("float32")


def probs(*shape, axis=-1):
    x = np.exp(logits(*shape))
    return (x / x.sum(axis=axis, keepdims=True)).astype("float32")


@pytest.mark.parametrize("axis", [-1, 1])
def test_kl_matches_numpy_logits(axis):
    p, q = logits(4, 5, 6), logits(4, 5, 6)
    out = kl_divergence(p, q, axis=axis)
    assert tuple(out.shape) == tuple(np.delete(np.array(p.shape), axis))
    assert_allclose(out, np_kl(p, q, axis=axis), rtol=1e-5)


def test_symmetric_matches_numpy_logits():
    p, q = logits(8, 10), logits(8, 10)
    assert_allclose(symmetric_kl_divergence(p, q), np_symmetric_kl(p, q))


def test_probabilities_with_exact_zeros():
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], "float32")
    q = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]], "float32")
    out = to_numpy(kl_divergence(p, q, from_logits=False))
    assert np.all(np.isfinite(out))
    assert_allclose(out, np_kl(p, q, from_logits=False))
    # q has zero mass where p has some: the divergence is +inf, not NaN.
    mirror = to_numpy(kl_divergence(q, p, from_logits=False))
    assert np.all(np.isinf(mirror)) and not np.any(np.isnan(mirror))
    # Identical distributions with zeros: exactly 0.
    assert_allclose(symmetric_kl_divergence(p, p, from_logits=False), [0.0, 0.0])


def test_probabilities_match_logits():
    a, b = logits(6, 7), logits(6, 7)
    pa = keras.ops.softmax(a)
    pb = keras.ops.softmax(b)
    assert_allclose(
        symmetric_kl_divergence(pa, pb, from_logits=False),
        symmetric_kl_divergence(a, b),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("from_logits", [True, False])
def test_binary_outputs_use_bernoulli_kl(from_logits):
    z1, z2 = logits(16, 1), logits(16, 1)
    if from_logits:
        p, q = z1, z2
    else:
        p = 1 / (1 + np.exp(-z1.astype(np.float64)))
        q = 1 / (1 + np.exp(-z2.astype(np.float64)))
        p, q = p.astype("float32"), q.astype("float32")
    out = kl_divergence(p, q, from_logits=from_logits)
    assert tuple(out.shape) == (16,)
    expected = np_kl(p, q, from_logits=from_logits, distribution="bernoulli")
    assert expected.min() >= 0 and expected.max() > 1e-3  # not the trivial 0
    assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    # Bernoulli KL equals the categorical KL over the two classes [0, z].
    two_class = np.concatenate([np.zeros_like(z1), z1], -1)
    two_class_q = np.concatenate([np.zeros_like(z2), z2], -1)
    if from_logits:
        assert_allclose(out, kl_divergence(two_class, two_class_q), rtol=1e-4)


def test_multilabel_bernoulli_sums_over_labels():
    p, q = logits(5, 3), logits(5, 3)
    out = symmetric_kl_divergence(p, q, distribution="bernoulli")
    assert_allclose(out, np_symmetric_kl(p, q, distribution="bernoulli"), rtol=1e-5)
    cat = symmetric_kl_divergence(p, q, distribution="categorical")
    assert not np.allclose(to_numpy(out), to_numpy(cat))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_computed_in_float32(dtype):
    p, q = logits(8, 10), logits(8, 10)
    p_low = keras.ops.cast(p, dtype)
    q_low = keras.ops.cast(q, dtype)
    out = symmetric_kl_divergence(p_low, q_low)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    # The reference sees the same rounded inputs, so only float32 math error
    # remains.
    p_r = to_numpy(keras.ops.cast(p_low, "float32"))
    q_r = to_numpy(keras.ops.cast(q_low, "float32"))
    assert_allclose(out, np_symmetric_kl(p_r, q_r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_low_precision_gradients_keep_the_input_dtype(set_chunks, chunked):
    # Each chunk is cast to float32 and its gradient cast back, so bfloat16
    # logits get bfloat16 gradients without a full-size float32 copy.
    if chunked:
        set_chunks(10)
    p, q = logits(8, 10), logits(8, 10)
    var = keras.Variable(p, dtype="bfloat16")
    q_low = keras.ops.cast(q, "bfloat16")
    grad = _grad_tensor(lambda: keras.ops.sum(symmetric_kl_divergence(var, q_low)), var)
    assert keras.backend.standardize_dtype(grad.dtype) == "bfloat16"
    grad = keras.ops.cast(grad, "float32")
    var32 = keras.Variable(to_numpy(keras.ops.cast(var, "float32")))
    q32 = keras.ops.cast(q_low, "float32")
    expected = _grad(lambda: keras.ops.sum(symmetric_kl_divergence(var32, q32)), var32)
    assert_allclose(grad, expected, rtol=2e-2, atol=2e-3)


def test_extreme_logits_stay_finite_and_exact():
    p = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], "float32")
    q = np.array([[-1e4, 1e4, 0.0], [-1e4, 1e4, -5.0]], "float32")
    out = to_numpy(symmetric_kl_divergence(p, q))
    assert np.all(np.isfinite(out))
    assert_allclose(out, np_symmetric_kl(p, q), rtol=1e-6)
    assert_allclose(out[0], 2e4, rtol=1e-6)


def test_torch_kl_div_argument_order_mapping():
    """`F.kl_div(input=log q, target=p)` is KL(p || q) = kl_divergence(p, q)."""
    a, b = logits(6, 9), logits(6, 9)
    lq = np_log_softmax_f64(b)
    p_prob = np.exp(np_log_softmax_f64(a))
    # What torch computes, written out: sum target * (log target - input).
    torch_style = (p_prob * (np.log(p_prob) - lq)).sum(-1)
    assert_allclose(kl_divergence(a, b), torch_style, rtol=1e-5)


def np_log_softmax_f64(x):
    x = x.astype(np.float64)
    return (
        x
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - (x.max(-1, keepdims=True))
    )


@pytest.mark.torch
def test_against_torch_functional_kl_div():
    import torch
    import torch.nn.functional as F

    a, b = logits(6, 9), logits(6, 9)
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    expected = F.kl_div(F.log_softmax(tb, -1), F.softmax(ta, -1), reduction="none").sum(
        -1
    )
    assert_allclose(kl_divergence(a, b), expected.numpy(), rtol=1e-5)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"from_logits": "yes"}, TypeError, "from_logits"),
        ({"axis": 1.5}, TypeError, "axis"),
        ({"axis": 3}, ValueError, "axis"),
        ({"distribution": "gaussian"}, ValueError, "distribution"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        symmetric_kl_divergence(np.zeros((2, 3)), np.zeros((2, 3)), **kwargs)


def test_integer_inputs_are_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        kl_divergence(np.array([[1, 2]]), np.array([[1, 2]]))


def test_nan_propagates():
    p = np.array([[np.nan, 0.0]], "float32")
    assert np.isnan(to_numpy(kl_divergence(p, np.zeros((1, 2), "float32")))[0])


def test_gradients_finite_for_zero_probabilities():
    # 0 * log 0 must not turn into NaN gradients through `where`.
    p = keras.Variable(np.array([[1.0, 0.0]], "float32"))
    q = np.array([[0.5, 0.5]], "float32")
    grad = _grad(lambda: keras.ops.sum(kl_divergence(p, q, from_logits=False)), p)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "kl"])
@pytest.mark.parametrize("constant", ["a", "b"])
def test_constant_input_gets_zero_gradient_and_the_other_is_unchanged(
    set_chunks, constant, symmetric, chunked
):
    # The anchor declares its reference outputs constant: their gradient is
    # skipped, the live side's must not change.
    if chunked:
        set_chunks(8)
    a, b = logits(4, 3, 6), logits(4, 3, 6)
    w = RNG.uniform(0.5, 2.0, size=(4, 3)).astype("float32")
    grads = {}
    for flag in (None, constant):
        for wrt in ("a", "b"):
            var = keras.Variable(a if wrt == "a" else b)

            def loss(var=var, wrt=wrt, flag=flag):
                pair = (var, b) if wrt == "a" else (a, var)
                value = divergences.divergence(
                    *pair, True, -1, "auto", symmetric=symmetric, constant=flag
                )
                return keras.ops.sum(keras.ops.multiply(w, value))

            grads[flag, wrt] = _grad(loss, var)
    live = "b" if constant == "a" else "a"
    # Bitwise: the gradient of a declared constant is not computed; zeros
    # are returned for it.
    np.testing.assert_array_equal(grads[constant, constant], 0.0)
    assert np.abs(grads[None, constant]).max() > 1e-3  # not zero without the flag
    assert_allclose(grads[constant, live], grads[None, live], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "chunk_elements, expected_bounds",
    [
        (10**9, None),  # small enough for one chunk
        (50, (0, [(0, 3), (3, 6), (6, 7)])),  # uneven last chunk
        (1, (0, [(i, i + 1) for i in range(7)])),  # at most one row each
    ],
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "kl"])
def test_chunked_logits_match_numpy(
    set_chunks, chunk_elements, expected_bounds, symmetric
):
    # Logits of shape (7, 3, 6): the largest non-class axis (0) is split.
    set_chunks(chunk_elements)
    assert chunked_gradients.chunks((7, 3, 6), -1) == expected_bounds
    a, b = logits(7, 3, 6), logits(7, 3, 6)
    fn = symmetric_kl_divergence if symmetric else kl_divergence
    np_fn = np_symmetric_kl if symmetric else np_kl
    assert_allclose(fn(a, b), np_fn(a, b), rtol=1e-5, atol=1e-6)
    # Class axis in the middle: the value's axes shift past it.
    assert_allclose(fn(a, b, axis=1), np_fn(a, b, axis=1), rtol=1e-5, atol=1e-6)


def test_chunks_skip_unknown_and_class_axes(set_chunks):
    set_chunks(8)
    # The batch size is unknown (traced): the sequence axis is split.
    expected = (1, [(i, i + 1) for i in range(4)])
    assert chunked_gradients.chunks((None, 4, 8), -1) == expected
    # Only the class axis has a static size: one chunk.
    assert chunked_gradients.chunks((None, 64), -1) is None
    # The number of chunks is bounded; the chunks grow instead.
    set_chunks(1)
    count = len(chunked_gradients.chunks((1000, 10), -1)[1])
    assert 32 < count <= chunked_gradients.MAX_CHUNKS


def _finite_difference_grad(fn, x, eps=1e-6):
    """Central differences of a float64 NumPy function of `x`."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "kl"])
@pytest.mark.parametrize("shape, axis", [((4, 5), -1), ((2, 5, 3), 1)])
def test_kl_gradient_matches_float64_finite_differences(
    set_chunks, shape, axis, symmetric, chunked
):
    # The gradients R-Drop and the anchor train with (closed form for
    # categorical logits), against the float64 reference; `chunked` splits
    # every tensor into pieces of at most 4 elements.
    if chunked:
        set_chunks(4)
    rng = np.random.default_rng(0)
    a = rng.normal(size=shape) * 2
    b = rng.normal(size=shape) * 2
    np_fn = np_symmetric_kl if symmetric else np_kl
    fn = symmetric_kl_divergence if symmetric else kl_divergence
    w = rng.uniform(0.5, 2.0, size=np_fn(a, b, axis=axis).shape)

    def reference(a_, b_):
        return float(np.sum(w * np_fn(a_, b_, axis=axis)))

    for wrt, other in [("a", b), ("b", a)]:
        var = keras.Variable((a if wrt == "a" else b).astype("float32"))
        const = other.astype("float32")

        def loss(var=var, const=const, wrt=wrt):
            pair = (var, const) if wrt == "a" else (const, var)
            value = fn(*pair, axis=axis)
            return keras.ops.sum(keras.ops.multiply(w.astype("float32"), value))

        actual = _grad(loss, var)
        if wrt == "a":
            expected = _finite_difference_grad(lambda x: reference(x, b), a)
        else:
            expected = _finite_difference_grad(lambda x: reference(a, x), b)
        assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def _grad(fn, var):
    return to_numpy(_grad_tensor(fn, var))


def _grad_tensor(fn, var):
    """The gradient of `fn()` with respect to `var`, as a backend tensor."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn()
        return tape.gradient(value, var.value)
    if backend == "jax":
        import jax

        def pure(v):
            with keras.StatelessScope(state_mapping=[(var, v)]):
                return fn()

        return jax.grad(pure)(var.value)
    import torch

    value = fn()
    (g,) = torch.autograd.grad(value, var.value)
    return g


finite_logits = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5),
    elements=st.floats(-50, 50, width=32),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_properties(data):
    p = data.draw(finite_logits)
    q = data.draw(
        hnp.arrays(np.float32, p.shape, elements=st.floats(-50, 50, width=32))
    )
    axis = data.draw(st.integers(-p.ndim, p.ndim - 1))
    shift = data.draw(st.floats(-100, 100, width=32))
    kl = to_numpy(kl_divergence(p, q, axis=axis))
    skl = to_numpy(symmetric_kl_divergence(p, q, axis=axis))
    assert np.all(kl >= -1e-5) and np.all(skl >= -1e-5)
    assert_allclose(skl, to_numpy(symmetric_kl_divergence(q, p, axis=axis)), atol=1e-5)
    assert_allclose(symmetric_kl_divergence(p, p, axis=axis), np.zeros(skl.shape))
    # Invariant to a constant added to the logits (categorical only).
    if p.shape[axis] > 1:
        shifted = to_numpy(symmetric_kl_divergence(p + shift, q, axis=axis))
        assert_allclose(shifted, skl, rtol=1e-3, atol=1e-3)
    assert_allclose(skl, np_symmetric_kl(p, q, axis=axis), rtol=1e-4, atol=1e-4)
