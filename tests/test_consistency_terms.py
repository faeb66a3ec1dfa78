"""`keras_rdrop.src.consistency_terms`: the pairwise terms between two passes.

`PairwiseTerm` for each of `TERM_KINDS` against float64 NumPy (logits,
probabilities, Bernoulli outputs), reduced as `mean_with_sample_weight` with
sample weights and a Keras mask; `constant_b` (no gradient for `b`, the same
value and gradient for `a`); the error for a bad kind; `ConsistencyTerm`'s
choice of term; `copy_sample_weight`, `per_output_weights`,
`position_weights`, `pairwise_terms` over a hand-made plan, and
`num_replicas_in_sync` outside `tf.distribute`.
"""

import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_rdrop.src.consistency_terms import (
    TERM_KINDS,
    ConsistencyTerm,
    PairwiseTerm,
    copy_sample_weight,
    num_replicas_in_sync,
    pairwise_terms,
    per_output_weights,
    position_weights,
)
from keras_rdrop.src.keras_internals import set_keras_mask
from keras_rdrop.src.output_plan import OutputEntry
from tests.test_divergences import _grad
from tests.testing import assert_allclose, np_kl, np_symmetric_kl, to_numpy

RNG = np.random.default_rng(0)


def np_term(kind, a, b, from_logits=True):
    """Per-position float64 value of the term `kind` between `a` and `b`."""
    if kind == "mse":
        return np.mean((np.asarray(a, np.float64) - b) ** 2, axis=-1)
    if kind == "kl":
        return np_kl(a, b, from_logits=from_logits)
    if kind == "reverse_kl":
        return np_kl(b, a, from_logits=from_logits)
    return np_symmetric_kl(a, b, from_logits=from_logits)


def np_weighted_mean(values, weights=None):
    """Keras' `mean_with_sample_weight`: sum(w * v) / sum(w)."""
    if weights is None:
        return values.mean()
    weights = np.broadcast_to(weights, values.shape)
    return np.sum(values * weights) / np.sum(weights)


def logits(*shape, scale=2.0):
    return (RNG.standard_normal(shape) * scale).astype("float32")


def tensor(x):
    return ops.convert_to_tensor(x)


def test_term_kinds():
    assert TERM_KINDS == ("kl", "reverse_kl", "symmetric_kl", "mse")


@pytest.mark.parametrize("kind", TERM_KINDS)
def test_each_kind_matches_numpy(kind):
    a, b = logits(6, 5), logits(6, 5)
    expected = np_term(kind, a, b)
    assert expected.mean() > 1e-2
    term = PairwiseTerm(kind)
    assert term.name == kind
    out = term(tensor(a), tensor(b))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert_allclose(out, expected.mean(), rtol=1e-5, atol=1e-6)


def test_the_kinds_are_different_terms():
    # KL(a||b) and KL(b||a) differ on these logits, so the order is tested.
    a, b = logits(6, 5), logits(6, 5)
    values = {
        k: float(to_numpy(PairwiseTerm(k)(tensor(a), tensor(b)))) for k in TERM_KINDS
    }
    assert abs(values["kl"] - values["reverse_kl"]) > 1e-3
    assert_allclose(
        values["symmetric_kl"], 0.5 * (values["kl"] + values["reverse_kl"]), rtol=1e-5
    )


@pytest.mark.parametrize("kind", TERM_KINDS)
def test_sample_weights_and_a_keras_mask(kind):
    # Sequences (batch 3, length 4): per-position weights, and a Keras mask on
    # `b` (what Keras' `Loss.__call__` reads, from `y_pred`).
    a, b = logits(3, 4, 5), logits(3, 4, 5)
    weights = RNG.uniform(0.5, 2.0, size=(3, 4)).astype("float32")
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    values = np_term(kind, a, b)
    term = PairwiseTerm(kind)
    weighted = term(tensor(a), tensor(b), sample_weight=tensor(weights))
    assert_allclose(weighted, np_weighted_mean(values, weights), rtol=1e-5)
    b_masked = tensor(b)
    set_keras_mask(b_masked, tensor(mask))
    masked = term(tensor(a), b_masked)
    assert_allclose(masked, np_weighted_mean(values, mask), rtol=1e-5)
    b_masked = tensor(b)
    set_keras_mask(b_masked, tensor(mask))
    both = term(tensor(a), b_masked, sample_weight=tensor(weights))
    assert_allclose(both, np_weighted_mean(values, weights * mask), rtol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "symmetric_kl"])
def test_probabilities(kind):
    a, b = logits(5, 4), logits(5, 4)
    pa, pb = (np.exp(x) / np.exp(x).sum(-1, keepdims=True) for x in (a, b))
    term = PairwiseTerm(kind, from_logits=False)
    out = term(tensor(pa.astype("float32")), tensor(pb.astype("float32")))
    assert_allclose(out, np_term(kind, pa, pb, from_logits=False).mean(), rtol=1e-4)


@pytest.mark.parametrize("kind", ["kl", "symmetric_kl"])
def test_bernoulli_outputs(kind):
    a, b = logits(8, 1), logits(8, 1)
    term = PairwiseTerm(kind, distribution="bernoulli")
    # np_kl reads a class axis of size 1 as a Bernoulli distribution.
    assert_allclose(term(tensor(a), tensor(b)), np_term(kind, a, b).mean(), rtol=1e-5)


def test_mse_of_low_precision_outputs_is_float32():
    a, b = logits(4, 3), logits(4, 3)
    a16, b16 = (ops.convert_to_tensor(x, dtype="float16") for x in (a, b))
    out = PairwiseTerm("mse")(a16, b16)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    rounded = [to_numpy(ops.cast(x, "float32")) for x in (a16, b16)]
    assert_allclose(out, np_term("mse", *rounded).mean(), rtol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "symmetric_kl"])
def test_constant_b_gives_b_no_gradient(kind):
    a, b = logits(4, 5), logits(4, 5)

    def grads(constant_b):
        term = PairwiseTerm(kind, constant_b=constant_b)
        out = []
        for wrt in ("a", "b"):
            var = keras.Variable(a if wrt == "a" else b)

            def loss(var=var, wrt=wrt):
                live = ops.convert_to_tensor(var)
                pair = (live, tensor(b)) if wrt == "a" else (tensor(a), live)
                return term(*pair)

            out.append(_grad(loss, var))
        return out

    (ga, gb), (ga_const, gb_const) = grads(False), grads(True)
    assert np.abs(gb).max() > 1e-3  # `b` has a gradient without the flag
    np.testing.assert_array_equal(gb_const, np.zeros_like(b))  # zeros, exactly
    assert_allclose(ga_const, ga, rtol=1e-6, atol=1e-7)
    value = PairwiseTerm(kind, constant_b=True)(tensor(a), tensor(b))
    assert_allclose(value, np_term(kind, a, b).mean(), rtol=1e-5)


@pytest.mark.parametrize("kind", ["js", "KL", None])
def test_a_bad_kind_is_reported(kind):
    expected = (
        "`kind` should be one of ('kl', 'reverse_kl', 'symmetric_kl', 'mse'). "
        f"Received: kind={kind!r}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        PairwiseTerm(kind)


def test_consistency_term_picks_its_pairwise_term():
    regression = ConsistencyTerm("regression").pairwise("kl", constant_b=True)
    assert regression.kind == "mse"
    logits_term = ConsistencyTerm("distribution", from_logits=True)
    kl = logits_term.pairwise("reverse_kl", constant_b=True)
    assert (kl.kind, kl.from_logits, kl.constant_b) == ("reverse_kl", True, True)
    assert logits_term.pairwise().kind == "symmetric_kl"
    bern = ConsistencyTerm("distribution", from_logits=False, distribution="bernoulli")
    term = bern.pairwise()
    assert (term.from_logits, term.distribution) == (False, "bernoulli")


def test_copy_sample_weight():
    assert copy_sample_weight(None) is None
    weights = {"a": tensor(np.arange(3.0)), "b": [tensor(np.ones(2))]}
    copied = copy_sample_weight(weights)
    keras.tree.assert_same_structure(copied, weights)
    for c, w in zip(keras.tree.flatten(copied), keras.tree.flatten(weights)):
        assert c is not w
        np.testing.assert_array_equal(to_numpy(c), to_numpy(w))


def test_pairwise_terms_leave_the_callers_sample_weight_alone():
    # Keras' reduction multiplies a masked weight in place (on torch, the
    # caller's tensor): `pairwise_terms` works on copies.
    a, b = logits(3, 4, 5), logits(3, 4, 5)
    b = tensor(b)
    set_keras_mask(b, tensor(np.array([[1, 1, 0, 0]] * 3, dtype=bool)))
    weights = tensor(RNG.uniform(0.5, 2.0, size=(3, 4)).astype("float32"))
    before = to_numpy(weights).copy()
    plan = (OutputEntry("out", ConsistencyTerm("distribution", True), 1.0, None),)
    pairwise_terms(plan, tensor(a), b, weights)
    np.testing.assert_array_equal(to_numpy(weights), before)


def test_per_output_weights():
    w = tensor(np.ones(4))
    assert per_output_weights(None, 3) == [None, None, None]
    # A dict is read in sorted key order, the order of flattened outputs.
    assert per_output_weights({"b": 2, "a": 1, "c": 3}, 3) == [1, 2, 3]
    assert per_output_weights([1, 2], 2) == [1, 2]
    assert per_output_weights((1, 2), 2) == [1, 2]
    # A list that is not one entry per output is one weight for all of them.
    assert per_output_weights([1, 2, 3], 2) == [[1, 2, 3], [1, 2, 3]]
    repeated = per_output_weights(w, 2)
    assert len(repeated) == 2 and all(r is w for r in repeated)


@pytest.mark.parametrize(
    "weight_shape, output_shape, expected_shape",
    [
        ((4,), (4, 3), (4,)),
        ((4, 1), (4, 3), (4,)),
        ((4,), (4, 5, 3), (4, 5)),
        ((4, 1), (4, 5, 3), (4, 5)),
        ((4, 5), (4, 5, 3), (4, 5)),
        ((4, 5, 1), (4, 5, 3), (4, 5)),
        ((4, 1), (4, 1), (4,)),  # a Bernoulli output: per row
    ],
)
def test_position_weights_broadcast_to_the_positions(
    weight_shape, output_shape, expected_shape
):
    weights = RNG.uniform(0.5, 2.0, size=weight_shape)  # float64 in
    out = position_weights(tensor(weights), ops.zeros(output_shape))
    assert tuple(out.shape) == expected_shape
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    per_row = weights.reshape(4, -1)  # (4, 1) or (4, 5)
    if per_row.shape[1] == 1:
        per_row = per_row[:, 0]
    per_row = per_row.reshape(
        per_row.shape + (1,) * (len(expected_shape) - per_row.ndim)
    )
    expected = np.broadcast_to(per_row, expected_shape)
    assert_allclose(out, expected, rtol=1e-6)


def test_position_weights_of_none_and_of_ints():
    assert position_weights(None, ops.zeros((2, 3))) is None
    out = position_weights(np.array([1, 0]), ops.zeros((2, 3)))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert_allclose(out, [1.0, 0.0])


def test_pairwise_terms_over_a_plan():
    # Four outputs: a categorical one, a regression one (MSE), one without a
    # term and one with alpha 0; the last two get no term.
    shapes = {"cat": (6, 4), "none": (6, 4), "reg": (6, 2), "zero": (6, 4)}
    p1 = {k: logits(*s) for k, s in shapes.items()}
    p2 = {k: logits(*s) for k, s in shapes.items()}
    dist = ConsistencyTerm("distribution", from_logits=True)
    plan = (
        OutputEntry("cat", dist, 0.7, None),
        OutputEntry("none", None, 1.0, None),
        OutputEntry("reg", ConsistencyTerm("regression"), 1.0, None),
        OutputEntry("zero", dist, 0.0, None),
    )
    weights = {k: RNG.uniform(0.5, 2.0, size=(6,)).astype("float32") for k in shapes}
    terms = pairwise_terms(plan, as_tensors(p1), as_tensors(p2), as_tensors(weights))
    assert [entry.name for entry, _ in terms] == ["cat", "reg"]
    (_, cat), (_, reg) = terms
    # The term is unweighted by alpha, and always the symmetric KL.
    cat_values = np_symmetric_kl(p1["cat"], p2["cat"])
    assert_allclose(cat, np_weighted_mean(cat_values, weights["cat"]), rtol=1e-5)
    reg_values = np_term("mse", p1["reg"], p2["reg"])
    assert_allclose(reg, np_weighted_mean(reg_values, weights["reg"]), rtol=1e-5)
    unweighted = pairwise_terms(plan, as_tensors(p1), as_tensors(p2), None)
    assert_allclose(unweighted[0][1], cat_values.mean(), rtol=1e-5)


def as_tensors(structure):
    return keras.tree.map_structure(tensor, structure)


def test_num_replicas_outside_tf_distribute_is_one():
    assert num_replicas_in_sync() == 1
