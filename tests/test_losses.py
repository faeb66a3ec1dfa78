import warnings

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_rdrop import SymmetricKLDivergence
from tests.testing import assert_allclose, np_symmetric_kl, to_numpy

RNG = np.random.default_rng(1)


def logits(*shape):
    return (RNG.standard_normal(shape) * 2).astype("float32")


P, Q = logits(6, 5), logits(6, 5)
PER = np_symmetric_kl(P, Q)  # (6,)
PS, QS = logits(3, 4, 5), logits(3, 4, 5)
PER_SEQ = np_symmetric_kl(PS, QS)  # (3, 4)
PAD = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], "float32")


def test_unweighted_default_is_batchmean():
    assert_allclose(SymmetricKLDivergence()(P, Q), PER.mean())


def test_sample_weighted():
    w = np.array([1.0, 0.0, 2.0, 0.5, 1.0, 3.0], "float32")
    assert_allclose(SymmetricKLDivergence()(P, Q, sample_weight=w), (PER * w).sum() / 6)


def test_timestep_weighted_padding():
    loss = SymmetricKLDivergence(reduction="sum")
    assert_allclose(loss(PS, QS, sample_weight=PAD), (PER_SEQ * PAD).sum(), rtol=1e-5)
    mean_valid = SymmetricKLDivergence(reduction="mean_with_sample_weight")
    assert_allclose(
        mean_valid(PS, QS, sample_weight=PAD), (PER_SEQ * PAD).sum() / PAD.sum()
    )


def test_all_zero_weights_give_zero():
    zeros = np.zeros((6,), "float32")
    for reduction in ["sum", "sum_over_batch_size", "mean_with_sample_weight"]:
        out = SymmetricKLDivergence(reduction=reduction)(P, Q, sample_weight=zeros)
        assert_allclose(out, 0.0)


@pytest.mark.parametrize(
    "reduction, expected",
    [
        ("sum", PER.sum()),
        ("sum_over_batch_size", PER.mean()),
        ("mean", PER.mean()),
        ("mean_with_sample_weight", PER.mean()),
        ("none", PER),
        (None, PER),
    ],
)
def test_each_reduction(reduction, expected):
    assert_allclose(SymmetricKLDivergence(reduction=reduction)(P, Q), expected)


def test_keras_mask_averages_over_valid_positions():
    tokens = np.array([[3, 4, 0, 0], [5, 6, 7, 0]])
    emb = keras.layers.Embedding(10, 5, mask_zero=True)
    a = emb(tokens)
    b = emb(tokens[:, ::-1].copy())  # different values, mask taken from `b`
    mask = (tokens[:, ::-1] != 0).astype("float64")
    per = np_symmetric_kl(to_numpy(a), to_numpy(b))
    out = SymmetricKLDivergence()(a, b)
    assert_allclose(out, (per * mask).sum() / mask.sum(), rtol=1e-5)


def test_unknown_reduction_lists_allowed():
    with pytest.raises(ValueError, match="sum_over_batch_size"):
        SymmetricKLDivergence(reduction="average")


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)"):
        SymmetricKLDivergence()(P, Q[:, :4])


def test_integer_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        SymmetricKLDivergence()(np.array([[1, 2]]), np.array([[1, 2]]))


def test_serialization_round_trip(tmp_path):
    loss = SymmetricKLDivergence(
        from_logits=False,
        axis=1,
        distribution="categorical",
        reduction="sum",
        name="skl",
    )
    config = loss.get_config()
    clone = SymmetricKLDivergence.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert isinstance(restored, SymmetricKLDivergence)
    assert restored.get_config() == config
    p, q = keras.ops.softmax(P), keras.ops.softmax(Q)
    assert_allclose(restored(p, q), loss(p, q))


def test_saved_inside_a_model(tmp_path):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(5)(inputs))
    model.compile(optimizer="sgd", loss=SymmetricKLDivergence(reduction="sum"))
    model.fit(P, Q, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, SymmetricKLDivergence)
    assert loaded.loss.reduction == "sum"


@pytest.mark.torch
def test_equals_original_rdrop_compute_kl_loss():
    """The R-Drop repository's `compute_kl_loss`, run in PyTorch as written."""
    import torch
    import torch.nn.functional as F

    def compute_kl_loss(p, q, pad_mask=None):
        p_loss = F.kl_div(
            F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="none"
        )
        q_loss = F.kl_div(
            F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="none"
        )
        if pad_mask is not None:
            p_loss.masked_fill_(pad_mask, 0.0)
            q_loss.masked_fill_(pad_mask, 0.0)
        p_loss = p_loss.sum()
        q_loss = q_loss.sum()
        return (p_loss + q_loss) / 2

    p = torch.tensor(PS, dtype=torch.float64)
    q = torch.tensor(QS, dtype=torch.float64)
    pad_mask = torch.tensor(PAD == 0).unsqueeze(-1)
    expected = compute_kl_loss(p, q, pad_mask).item()
    ours = SymmetricKLDivergence(reduction="sum")(PS, QS, sample_weight=PAD)
    assert_allclose(ours, expected, rtol=1e-5)
    assert_allclose(
        SymmetricKLDivergence(reduction="sum")(PS, QS),
        compute_kl_loss(p, q).item(),
        rtol=1e-5,
    )


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_reduce(values, weights, reduction):
    weighted = values * weights
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean_with_sample_weight":
        return weighted.sum() / weights.sum() if weights.sum() else 0.0
    return weighted.sum() / weighted.size  # sum_over_batch_size


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_loss_properties_against_float64_numpy(data):
    # Random shapes, input dtypes, weights acting as a padding mask (0/1) or
    # as weights, reductions, logits up to +-1e4 or probabilities.
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5))
    dtype = data.draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"]))
    from_logits = data.draw(st.booleans())
    reductions = ["sum", "sum_over_batch_size", "mean_with_sample_weight", "none"]
    reduction = data.draw(st.sampled_from(reductions))
    # float16 probabilities from logits beyond +-5 would underflow to 0.
    bound = 1e4 if from_logits else 5.0
    draw_logits = hnp.arrays(np.float64, shape, elements=st.floats(-bound, bound))
    a, b = data.draw(draw_logits), data.draw(draw_logits)
    weights = data.draw(
        hnp.arrays(np.float64, shape[:-1], elements=st.sampled_from([0.0, 1.0, 0.5]))
    )
    if not from_logits:
        a, b = _np_softmax(a), _np_softmax(b)
    if dtype == "float64":  # NumPy float64 as given (JAX has no float64 by default)
        p, q = a, b
    else:
        p, q = keras.ops.cast(a, dtype), keras.ops.cast(b, dtype)
    loss = SymmetricKLDivergence(from_logits=from_logits, reduction=reduction)
    with warnings.catch_warnings():
        # Drawn logits can look like probabilities (rows of 0 and 1): the
        # declaration warning is tested in test_prediction_checks.py.
        warnings.simplefilter("ignore", UserWarning)
        actual = to_numpy(loss(p, q, sample_weight=weights.astype("float32")))
    # The reference sees the inputs as rounded to `dtype`.
    p64 = a if dtype == "float64" else to_numpy(keras.ops.cast(p, "float32"))
    q64 = b if dtype == "float64" else to_numpy(keras.ops.cast(q, "float32"))
    p64, q64 = p64.astype("float64"), q64.astype("float64")
    values = np_symmetric_kl(p64, q64, from_logits=from_logits)
    expected = _np_reduce(values, weights, reduction)
    assert np.all(np.isfinite(actual))
    scale = 1.0 + float(np.max(np.abs(expected)))
    assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale)
