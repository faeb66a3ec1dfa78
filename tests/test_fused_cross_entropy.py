"""The fused cross-entropy + symmetric KL of RDropModel's language-model path."""

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel
from keras_rdrop.src import chunked_gradients
from keras_rdrop.src.fused_cross_entropy import cross_entropy_and_symmetric_kl
from keras_rdrop.src.fused_step import fusable_loss
from keras_rdrop.src.step_paths import record_paths
from tests.models import language_model
from tests.testing import (
    assert_allclose,
    assert_fused_matches_general,
    np_log_softmax,
    np_symmetric_kl,
    to_numpy,
)

RNG = np.random.default_rng(0)


def np_fused(a, b, labels):
    """float64 reference: CE of each pass and their symmetric KL, per position."""
    index = labels[..., None]
    ce_a = -np.take_along_axis(np_log_softmax(a), index, axis=-1)[..., 0]
    ce_b = -np.take_along_axis(np_log_softmax(b), index, axis=-1)[..., 0]
    return np.stack([ce_a, ce_b, np_symmetric_kl(a, b)])


def record_chunks(monkeypatch) -> list:
    """A list that gets what `chunked_gradients.chunks` returns, call by call
    (`None`: one piece)."""
    cuts = []
    real_chunks = chunked_gradients.chunks
    monkeypatch.setattr(
        chunked_gradients,
        "chunks",
        lambda *args: cuts.append(real_chunks(*args)) or cuts[-1],
    )
    return cuts


@pytest.mark.parametrize(
    "chunk_elements, chunked",
    [(2**21, True), (6, True), (6, False)],
    ids=["whole", "chunked", "unchunked"],
)
def test_values_match_numpy(set_chunks, chunk_elements, chunked, monkeypatch):
    # `chunked=False` (TensorFlow with XLA, `chunked_for`): one piece, however
    # small the chunks.
    set_chunks(chunk_elements)
    cuts = record_chunks(monkeypatch)
    a = (RNG.standard_normal((3, 5, 7)) * 4).astype("float32")
    b = (RNG.standard_normal((3, 5, 7)) * 4).astype("float32")
    labels = RNG.integers(0, 7, size=(3, 5)).astype("int32")
    out = cross_entropy_and_symmetric_kl(a, b, labels, chunked=chunked)
    assert tuple(out.shape) == (3, 3, 5)
    assert_allclose(out, np_fused(a, b, labels), rtol=1e-5, atol=1e-5)
    pieces = [1 if cut is None else len(cut[1]) for cut in cuts] or [1]
    if chunked and chunk_elements < a.size:
        assert len(pieces) == 1 and pieces[0] > 1
    else:
        assert pieces == [1]


def test_low_precision_logits_computed_in_float32():
    a = RNG.standard_normal((4, 6)).astype("float32")
    b = RNG.standard_normal((4, 6)).astype("float32")
    labels = np.array([0, 5, 2, 3], "int32")
    low_a = keras.ops.cast(a, "bfloat16")
    low_b = keras.ops.cast(b, "bfloat16")
    out = cross_entropy_and_symmetric_kl(low_a, low_b, labels)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    exact_a = to_numpy(keras.ops.cast(low_a, "float32"))
    exact_b = to_numpy(keras.ops.cast(low_b, "float32"))
    assert_allclose(out, np_fused(exact_a, exact_b, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [2**21, 4], ids=["whole", "chunked"])
def test_gradients_match_float64_finite_differences(set_chunks, chunk_elements):
    # The gradient RDropModel trains with, in closed form, against central
    # differences of the float64 reference with a different weight on each
    # of the three outputs at each position.
    set_chunks(chunk_elements)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 3, 5)) * 2
    b = rng.normal(size=(2, 3, 5)) * 2
    labels = rng.integers(0, 5, size=(2, 3)).astype("int32")
    w = rng.uniform(0.5, 2.0, size=(3, 2, 3))

    def reference(a_, b_):
        return float(np.sum(w * np_fused(a_, b_, labels)))

    from tests.test_divergences import _finite_difference_grad, _grad

    for wrt in ("a", "b"):
        var = keras.Variable((a if wrt == "a" else b).astype("float32"))
        const = (b if wrt == "a" else a).astype("float32")

        def loss(var=var, const=const, wrt=wrt):
            pair = (var, const) if wrt == "a" else (const, var)
            out = cross_entropy_and_symmetric_kl(*pair, labels)
            return keras.ops.sum(keras.ops.multiply(w.astype("float32"), out))

        if wrt == "a":
            expected = _finite_difference_grad(lambda x: reference(x, b), a)
        else:
            expected = _finite_difference_grad(lambda x: reference(a, x), b)
        assert_allclose(_grad(loss, var), expected, rtol=1e-4, atol=1e-5)


def test_which_losses_are_fused():
    logits = keras.ops.zeros((2, 3, 5))
    sparse = keras.losses.SparseCategoricalCrossentropy
    assert fusable_loss(sparse(from_logits=True), logits)
    assert fusable_loss(sparse(from_logits=True, ignore_class=0), logits)
    assert not fusable_loss(sparse(from_logits=False), logits)
    assert not fusable_loss(sparse(from_logits=True, axis=1), logits)
    assert not fusable_loss(sparse(from_logits=True, dtype="float64"), logits)
    assert not fusable_loss("sparse_categorical_crossentropy", logits)
    assert not fusable_loss(sparse(from_logits=True), keras.ops.zeros((2, 1)))

    class Custom(sparse):
        pass

    assert not fusable_loss(Custom(from_logits=True), logits)


@pytest.mark.parametrize("mode", ["sequential", "concat"])
@pytest.mark.parametrize("chunk_elements", [2**21, 16], ids=["whole", "chunked"])
def test_fused_path_trains_like_the_general_path(set_chunks, mode, chunk_elements):
    # With a Keras mask (mask_zero), ignore_class, per-position sample
    # weights, loss_weights and a regularization loss, the fused path gives
    # the losses and weights of Keras' own cross-entropy plus the KL.
    set_chunks(chunk_elements)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, size=(16, 6)).astype("int32")
    targets = rng.integers(0, 11, size=(16, 6)).astype("int32")
    weights = rng.uniform(0.0, 2.0, size=(16, 6)).astype("float32")

    def train():
        model = RDropModel(language_model(), alpha=1.5, mode=mode)
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=3
            ),
            loss_weights=0.7,
        )
        keras.utils.set_random_seed(1)
        history = model.fit(
            tokens,
            targets,
            sample_weight=weights,
            batch_size=8,
            epochs=2,
            shuffle=False,
            verbose=0,
        )
        return history.history, [to_numpy(w) for w in model.weights]

    # The general run has no fused pass, so no chunk: one per mode.
    fused, _ = assert_fused_matches_general(
        train, "fused_rdrop", ("fused_rdrop",), (), general_key=("rdrop_lm", mode)
    )
    assert fused[0]["kl_loss"][0] > 0.05


@pytest.mark.traced
def test_the_compiled_step_runs_by_chunks_except_under_tensorflow_xla(
    set_chunks, monkeypatch
):
    # On TensorFlow with XLA the fused R-Drop pass runs on whole tensors
    # (`chunked_for`: fewer FLOPs, bytes and scratch memory there, measured
    # in benchmarks/results/lm50k-rdrop-tensorflow.md); everywhere else by
    # chunks. torch's step runs eagerly here (torch.compile has its own test).
    set_chunks(16)
    cuts = record_chunks(monkeypatch)
    tokens = np.random.default_rng(0).integers(0, 11, size=(8, 6)).astype("int32")
    model = RDropModel(language_model(), alpha=1.0)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=keras.backend.backend() != "torch",
    )
    with record_paths() as taken:
        model.fit(tokens, tokens, batch_size=8, epochs=1, verbose=0)
    assert taken and set(taken) == {"fused_rdrop"}
    split = [cut for cut in cuts if cut is not None]
    if keras.backend.backend() == "tensorflow":
        assert not split
    else:
        assert split


@pytest.mark.parametrize(
    "loss",
    [
        keras.losses.SparseCategoricalCrossentropy(from_logits=False),
        keras.losses.CategoricalCrossentropy(from_logits=True),
    ],
    ids=["probabilities", "categorical"],
)
def test_other_losses_take_the_general_path(loss):
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dropout(0.3), keras.layers.Dense(3)]
    )
    if not loss.get_config().get("from_logits", True):
        inner.add(keras.layers.Softmax())
    model = RDropModel(inner)
    model.compile(optimizer="sgd", loss=loss)
    x = np.random.default_rng(0).random((8, 4)).astype("float32")
    y = np.arange(8) % 3
    if isinstance(loss, keras.losses.CategoricalCrossentropy):
        y = np.eye(3)[y]
    with record_paths() as taken:
        model.fit(x, y, epochs=1, verbose=0)
    assert taken and set(taken) == {"general"}


@pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="counts what torch autograd saves for the backward pass; XLA's "
    "buffers on JAX and TensorFlow are measured by benchmarks/bench.py "
    "--model lm50k",
)
def test_only_the_logits_are_saved_for_backward_torch():
    # What makes large vocabularies fit: the fused loss keeps its two inputs
    # (the logits, which the step holds anyway) and nothing else of their
    # size, where Keras' cross-entropy and the KL keep log-probabilities.
    import torch

    from keras_rdrop import symmetric_kl_divergence

    a = torch.randn(2, 8, 50, requires_grad=True)
    b = torch.randn(2, 8, 50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 8), dtype=torch.int32)

    def full_size_saved(fn):
        storages = set()

        def pack(t):
            if t.numel() >= a.numel():
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return storages

    def fused():
        return cross_entropy_and_symmetric_kl(a, b, labels)

    def general():
        ce = keras.ops.sparse_categorical_crossentropy
        return (
            ce(labels, a, from_logits=True)
            + ce(labels, b, from_logits=True)
            + symmetric_kl_divergence(a, b)
        )

    inputs = {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
    assert full_size_saved(fused) == inputs
    assert len(full_size_saved(general) - inputs) == 2
