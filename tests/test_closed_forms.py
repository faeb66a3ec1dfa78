"""`keras_rdrop.src.closed_forms`: the closed forms of the chunked and fused passes.

Each function is called directly on small tensors and checked against float64
NumPy: `log_softmax32` (and its float32 result for low-precision inputs),
`cross_entropy`, `kl_value` for each of `KL_KINDS`, and the closed-form
gradients (`cross_entropy_grad`, `kl_grad_terms`, `constant_kl_grad`,
`two_pass_grads`) against central finite differences of the NumPy values;
`check_kind`'s message.
"""

import re

import keras
import numpy as np
import pytest

from keras_rdrop.src.closed_forms import (
    KL_KINDS,
    check_kind,
    constant_kl_grad,
    cross_entropy,
    cross_entropy_grad,
    kl_grad_terms,
    kl_value,
    log_softmax32,
    two_pass_grads,
    two_pass_values,
)
from tests.test_divergences import _finite_difference_grad
from tests.testing import (
    assert_allclose,
    np_kl,
    np_log_softmax,
    np_symmetric_kl,
    to_numpy,
)

RNG = np.random.default_rng(0)


def logits(*shape, scale=2.0):
    return RNG.standard_normal(shape) * scale


def np_kind(a, b, kind, axis=-1):
    """The KL of `kind` between the distributions of logits `a` and `b`."""
    if kind == "kl":
        return np_kl(a, b, axis=axis)
    if kind == "reverse_kl":
        return np_kl(b, a, axis=axis)
    return np_symmetric_kl(a, b, axis=axis)


def np_ce(x, labels):
    index = np.asarray(labels)[..., None]
    return -np.take_along_axis(np_log_softmax(x), index, axis=-1)[..., 0]


def f32(x):
    return keras.ops.convert_to_tensor(np.asarray(x, np.float32))


def log_probs(x, axis=-1):
    """float32 `(log softmax(x), softmax(x))` as backend tensors."""
    log_p = log_softmax32(f32(x), axis)
    return log_p, keras.ops.exp(log_p)


def test_kl_kinds_are_the_three_kls():
    assert KL_KINDS == ("kl", "reverse_kl", "symmetric_kl")


@pytest.mark.parametrize("kind", KL_KINDS)
def test_check_kind_returns_each_kind(kind):
    assert check_kind(kind) == kind


@pytest.mark.parametrize("kind", ["js", "KL", "", None])
def test_check_kind_names_the_kinds_and_the_value(kind):
    expected = (
        "`kind` should be one of ('kl', 'reverse_kl', 'symmetric_kl'). "
        f"Received: kind={kind!r}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_kind(kind)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_log_softmax32_is_float32_for_any_input(dtype, axis):
    x = keras.ops.convert_to_tensor(logits(2, 4, 5).astype("float32"), dtype=dtype)
    out = log_softmax32(x, axis=axis)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    # The reference takes the rounded low-precision values, so the only
    # error left is float32's.
    rounded = to_numpy(keras.ops.cast(x, "float32")).astype(np.float64)
    assert_allclose(out, np_log_softmax(rounded, axis=axis), rtol=1e-5, atol=1e-5)


def test_cross_entropy_matches_numpy():
    x = logits(3, 4, 6)
    labels = RNG.integers(0, 6, size=(3, 4)).astype("int32")
    log_p, _ = log_probs(x)
    out = cross_entropy(log_p, keras.ops.convert_to_tensor(labels))
    assert tuple(out.shape) == (3, 4)
    assert_allclose(out, np_ce(x, labels), rtol=1e-5, atol=1e-5)


def test_cross_entropy_grad_is_the_finite_difference_of_the_cross_entropy():
    x = logits(4, 5)
    labels = RNG.integers(0, 5, size=(4,))
    _, p = log_probs(x)
    one_hot = keras.ops.one_hot(keras.ops.convert_to_tensor(labels), 5)
    expected = _finite_difference_grad(lambda v: np.sum(np_ce(v, labels)), x)
    assert_allclose(cross_entropy_grad(p, one_hot), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("shape, axis", [((4, 6), -1), ((2, 5, 3), 1)])
def test_kl_value_matches_numpy(kind, shape, axis):
    a, b = logits(*shape), logits(*shape)
    (log_p, _), (log_q, _) = log_probs(a, axis), log_probs(b, axis)
    out = kl_value(log_p, log_q, kind, axis=axis)
    expected = np_kind(a, b, kind, axis=axis)
    assert tuple(out.shape) == expected.shape
    assert (expected > 1e-2).all()  # the comparison is not against ~0
    assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_kl_value_of_identical_distributions_is_zero():
    a = logits(3, 5)
    log_p, _ = log_probs(a)
    for kind in KL_KINDS:
        assert_allclose(kl_value(log_p, log_p, kind), np.zeros(3), atol=1e-7)


@pytest.mark.parametrize("symmetric", [False, True], ids=["kl", "symmetric"])
@pytest.mark.parametrize("shape, axis", [((3, 5), -1), ((2, 4, 3), 1)])
def test_kl_grad_terms_match_finite_differences(symmetric, shape, axis):
    a, b = logits(*shape), logits(*shape)
    kind = "symmetric_kl" if symmetric else "kl"
    # A per-position upstream gradient, so that each position's term is seen.
    w = RNG.uniform(0.5, 2.0, size=np_kind(a, b, kind, axis).shape)
    (log_p, p), (log_q, q) = log_probs(a, axis), log_probs(b, axis)
    term_a, term_b = kl_grad_terms(log_p, log_q, p, q, axis % len(shape), symmetric)
    w_axis = np.expand_dims(w, axis)
    want_a = _finite_difference_grad(lambda v: np.sum(w * np_kind(v, b, kind, axis)), a)
    want_b = _finite_difference_grad(lambda v: np.sum(w * np_kind(a, v, kind, axis)), b)
    assert_allclose(to_numpy(term_a) * w_axis, want_a, rtol=1e-4, atol=1e-5)
    assert_allclose(to_numpy(term_b) * w_axis, want_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True], ids=["kl", "symmetric"])
def test_kl_grad_terms_skip_the_constant_side(symmetric):
    a, b = logits(3, 5), logits(3, 5)
    (log_p, p), (log_q, q) = log_probs(a), log_probs(b)
    both = kl_grad_terms(log_p, log_q, p, q, -1, symmetric)
    only_b = kl_grad_terms(log_p, log_q, p, q, -1, symmetric, constant="a")
    only_a = kl_grad_terms(log_p, log_q, p, q, -1, symmetric, constant="b")
    assert only_b[0] is None and only_b[1] is not None
    assert only_a[1] is None and only_a[0] is not None
    # The side that is computed is the same expression as without `constant`.
    assert_allclose(only_a[0], to_numpy(both[0]), rtol=1e-6, atol=1e-7)
    assert_allclose(only_b[1], to_numpy(both[1]), rtol=1e-6, atol=1e-7)


def test_kl_grad_terms_without_q_for_a_constant_b():
    # KL(p||q)'s gradient in `a` does not read `q`: `None` is accepted.
    a, b = logits(3, 5), logits(3, 5)
    (log_p, p), (log_q, _) = log_probs(a), log_probs(b)
    term_a, term_b = kl_grad_terms(log_p, log_q, p, None, -1, False, "b")
    assert term_b is None
    want = _finite_difference_grad(lambda v: np.sum(np_kl(v, b)), a)
    assert_allclose(term_a, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_constant_kl_grad_matches_finite_differences(kind):
    live, ref = logits(4, 6), logits(4, 6)
    (log_p, p), (log_r, _) = log_probs(live), log_probs(ref)
    want = _finite_difference_grad(lambda v: np.sum(np_kind(v, ref, kind)), live)
    assert_allclose(constant_kl_grad(log_p, log_r, p, kind), want, rtol=1e-4, atol=1e-5)


def test_constant_kl_grad_differs_between_kinds():
    # The three kinds are three gradients (a dispatch that ignores `kind`
    # would fail here even if one of them were right).
    live, ref = logits(4, 6), logits(4, 6)
    (log_p, p), (log_r, _) = log_probs(live), log_probs(ref)
    grads = [to_numpy(constant_kl_grad(log_p, log_r, p, k)) for k in KL_KINDS]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(grads[i] - grads[j]).max() > 1e-3


def test_two_pass_values_match_numpy():
    a, b = logits(3, 4, 7), logits(3, 4, 7)
    labels = RNG.integers(0, 7, size=(3, 4)).astype("int32")
    (log_p, _), (log_q, _) = log_probs(a), log_probs(b)
    ce_a, ce_b, skl = two_pass_values(log_p, log_q, keras.ops.convert_to_tensor(labels))
    assert_allclose(ce_a, np_ce(a, labels), rtol=1e-5, atol=1e-5)
    assert_allclose(ce_b, np_ce(b, labels), rtol=1e-5, atol=1e-5)
    assert_allclose(skl, np_symmetric_kl(a, b), rtol=1e-5, atol=1e-6)


def test_two_pass_grads_match_finite_differences():
    shape = (3, 2, 5)
    a, b = logits(*shape), logits(*shape)
    labels = RNG.integers(0, 5, size=shape[:-1])
    up_a, up_b, up_kl = (RNG.uniform(0.5, 2.0, size=shape[:-1]) for _ in range(3))

    def total(a_, b_):
        return np.sum(
            up_a * np_ce(a_, labels)
            + up_b * np_ce(b_, labels)
            + up_kl * np_symmetric_kl(a_, b_)
        )

    (log_p, p), (log_q, q) = log_probs(a), log_probs(b)
    one_hot = keras.ops.one_hot(keras.ops.convert_to_tensor(labels), shape[-1])
    grad_a, grad_b = two_pass_grads(
        log_p,
        log_q,
        p,
        q,
        one_hot,
        *(f32(u[..., None]) for u in (up_a, up_b, up_kl)),
    )
    want_a = _finite_difference_grad(lambda v: total(v, b), a)
    want_b = _finite_difference_grad(lambda v: total(a, v), b)
    assert_allclose(grad_a, want_a, rtol=1e-4, atol=1e-5)
    assert_allclose(grad_b, want_b, rtol=1e-4, atol=1e-5)
