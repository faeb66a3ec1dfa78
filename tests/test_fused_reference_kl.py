"""The anchor's fused cross-entropy + KL to the reference (language models)."""

import types
import weakref

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel, ReferenceKLRegularizer
from keras_rdrop.src.fused_cross_entropy import FusedLanguageModelLoss
from keras_rdrop.src.fused_reference_kl import (
    chunked_for,
    cross_entropy_and_reference_kl,
)
from keras_rdrop.src.step_paths import record_paths
from tests.models import language_model as lm
from tests.test_divergences import _finite_difference_grad, _grad
from tests.testing import (
    assert_allclose,
    assert_fused_matches_general,
    np_kl,
    np_log_softmax,
    np_symmetric_kl,
    to_numpy,
)

KINDS = {
    "kl": lambda live, ref: np_kl(live, ref),
    "reverse_kl": lambda live, ref: np_kl(ref, live),
    "symmetric_kl": np_symmetric_kl,
}


def np_fused(live, ref, labels, kind):
    """float64 reference of `cross_entropy_and_reference_kl`, per position."""
    passes = live if isinstance(live, tuple) else (live,)
    index = labels[..., None]
    out = [
        -np.take_along_axis(np_log_softmax(x), index, axis=-1)[..., 0] for x in passes
    ]
    if len(passes) == 2:
        out.append(np_symmetric_kl(*passes))
    out.append(KINDS[kind](passes[0], ref))
    return np.stack(out)


@pytest.mark.parametrize("passes", [1, 2], ids=["anchor", "rdrop_anchor"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(
    "chunk_elements", [2**21, 6, None], ids=["whole", "chunked", "unchunked"]
)
def test_values_match_numpy(set_chunks, passes, kind, chunk_elements):
    # `chunk_elements=None`: `chunked=False`, the whole-tensor pass of
    # TensorFlow + XLA (with one live pass, `logsumexp_reference_kl`'s formula).
    set_chunks(chunk_elements or 2**21)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((passes + 1, 3, 5, 7)) * 4).astype("float32")
    labels = rng.integers(0, 7, size=(3, 5)).astype("int32")
    live = logits[0] if passes == 1 else (logits[0], logits[1])
    out = cross_entropy_and_reference_kl(
        live, logits[-1], labels, kind, chunked=chunk_elements is not None
    )
    assert tuple(out.shape) == (2 * passes, 3, 5)
    expected = np_fused(live, logits[-1], labels, kind)
    assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("passes", [1, 2], ids=["anchor", "rdrop_anchor"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(
    "chunk_elements",
    [2**21, 4, None],
    ids=["whole", "chunked", "unchunked"],
)
def test_gradients_match_float64_finite_differences(
    set_chunks, passes, kind, chunk_elements
):
    # The closed-form gradient of each live pass, against central
    # differences of the float64 reference with a different weight on each
    # output at each position.
    set_chunks(chunk_elements or 2**21)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(passes + 1, 2, 3, 5)) * 2
    ref = logits[-1]
    labels = rng.integers(0, 5, size=(2, 3)).astype("int32")
    w = rng.uniform(0.5, 2.0, size=(2 * passes, 2, 3))

    def reference(*live):
        live = live[0] if passes == 1 else live
        return float(np.sum(w * np_fused(live, ref, labels, kind)))

    for i in range(passes):
        var = keras.Variable(logits[i].astype("float32"))

        def loss(var=var, i=i):
            live = [keras.ops.convert_to_tensor(x, "float32") for x in logits[:passes]]
            live[i] = var
            live = live[0] if passes == 1 else tuple(live)
            out = cross_entropy_and_reference_kl(
                live,
                ref.astype("float32"),
                labels,
                kind,
                chunked=chunk_elements is not None,
            )
            return keras.ops.sum(keras.ops.multiply(w.astype("float32"), out))

        def moved(x, i=i):
            live = list(logits[:passes])
            live[i] = x
            return reference(*live)

        expected = _finite_difference_grad(moved, logits[i])
        assert_allclose(_grad(loss, var), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "unchunked"])
def test_low_precision_logits_computed_in_float32(chunked):
    rng = np.random.default_rng(2)
    a = keras.ops.cast(rng.standard_normal((4, 6)).astype("float32"), "bfloat16")
    ref = keras.ops.cast(rng.standard_normal((4, 6)).astype("float32"), "bfloat16")
    labels = np.array([0, 5, 2, 3], "int32")
    out = cross_entropy_and_reference_kl(a, ref, labels, chunked=chunked)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    exact = [to_numpy(keras.ops.cast(t, "float32")) for t in (a, ref)]
    assert_allclose(out, np_fused(exact[0], exact[1], labels, "kl"), rtol=1e-5)


def test_bad_arguments_are_reported():
    a = np.zeros((2, 3), "float32")
    labels = np.zeros((2,), "int32")
    with pytest.raises(ValueError, match="`kind` should be one of"):
        cross_entropy_and_reference_kl(a, a, labels, kind="js")
    with pytest.raises(ValueError, match="one tensor of logits or a tuple of two"):
        cross_entropy_and_reference_kl((a, a, a), a, labels)


def train(alpha, direction, mode="concat", **options):
    """Three epochs of an anchored `lm` with masks, ignore_class, sample and
    loss weights and a regularizer: `(history, weights)`. `options` go to
    `RDropModel`; the paths are chosen around it (`anchor_matches_general`)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, size=(16, 6)).astype("int32")
    targets = rng.integers(0, 11, size=(16, 6)).astype("int32")
    weights = rng.uniform(0.0, 2.0, size=(16, 6)).astype("float32")
    model = RDropModel(lm(), alpha=alpha, mode=mode, **options)
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
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.8, direction=direction)],
    )
    return history.history, [to_numpy(w) for w in model.weights]


def anchor_matches_general(alpha, direction, chunked=None, general_key=None, **options):
    """The fused anchor path trains as the general anchor path; R-Drop's own
    fused path stays on for the general run: only the anchor's fusion
    differs. `general_key`: see `assert_fused_matches_general`. Returns the
    fused run."""
    fused, _ = assert_fused_matches_general(
        lambda: train(alpha, direction, **options),
        "fused_anchor",
        ("fused_anchor", "fused_rdrop"),
        ("fused_rdrop",),
        general_key=general_key,
        chunked=chunked,
    )
    return fused


@pytest.mark.parametrize(
    "alpha, direction, chunk_elements",
    [
        (0.0, "forward", 2**21),
        (0.0, "forward", 16),
        (0.0, "reverse", 16),
        (0.0, "symmetric", 2**21),
        (1.5, "forward", 16),
        (1.5, "symmetric", 2**21),
        (0.0, "forward", None),
        (0.0, "reverse", None),
        (0.0, "symmetric", None),
        (1.5, "forward", None),
    ],
    ids=[
        "anchor-forward-whole",
        "anchor-forward-chunked",
        "anchor-reverse-chunked",
        "anchor-symmetric-whole",
        "rdrop_anchor-forward-chunked",
        "rdrop_anchor-symmetric-whole",
        "anchor-forward-unchunked",
        "anchor-reverse-unchunked",
        "anchor-symmetric-unchunked",
        "rdrop_anchor-forward-unchunked",
    ],
)
def test_fused_anchor_path_trains_like_the_general_path(
    set_chunks, alpha, direction, chunk_elements
):
    # With a Keras mask (mask_zero), ignore_class, per-position sample
    # weights, loss_weights and a regularization loss, the fused anchor path
    # gives the losses and weights of Keras' cross-entropy plus the KL to
    # the reference (and, with R-Drop, of the R-Drop path).
    # `chunk_elements=None`: the whole-tensor pass that TensorFlow + XLA
    # takes (`chunked_for`), forced on every backend.
    set_chunks(chunk_elements or 2**21)
    chunked = False if chunk_elements is None else None
    # The general run: without R-Drop it has no fused pass, so the chunk
    # size does not enter it and the cases of one direction share one run.
    key = (alpha, direction) if alpha == 0 else (alpha, direction, chunk_elements)
    fused = anchor_matches_general(
        alpha, direction, chunked=chunked, general_key=("anchor_lm", *key)
    )
    # The reference pulls: the KL is not small after the first epoch.
    assert fused[0]["ref_kl"][-1] > 1e-3


@pytest.mark.parametrize(
    "alpha, options",
    [
        ("schedule", {}),
        (0.0, {"consistency_on_all_rows": True}),
        (1.5, {"consistency_on_all_rows": True}),
        ("schedule", {"consistency_on_all_rows": True}),
    ],
    ids=[
        "rdrop_anchor-scheduled_alpha",
        "anchor-all_rows",
        "rdrop_anchor-all_rows",
        "rdrop_anchor-scheduled_alpha-all_rows",
    ],
)
def test_fused_anchor_path_takes_schedules_and_all_rows(alpha, options):
    # A scheduled alpha weighs R-Drop's KL by the schedule's value at each
    # step, and `consistency_on_all_rows=True` gives every position weight 1
    # in both KLs (sample_weight=0 included), on the fused anchor path as on
    # the general one.
    if alpha == "schedule":
        # 0 for the first two steps, then 2.0: the steps differ.
        alpha = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.0, 2.0])
    fused = anchor_matches_general(alpha, "forward", **options)
    assert fused[0]["ref_kl"][-1] > 1e-3


def test_rdrop_fused_path_is_not_run_twice(monkeypatch):
    # With R-Drop and the anchor fused together, R-Drop's own fused path is
    # not asked (the four values come from the one anchor pass).
    calls = []
    applies = FusedLanguageModelLoss.applies

    def spy(self, *args):
        calls.append(True)
        return applies(self, *args)

    monkeypatch.setattr(FusedLanguageModelLoss, "applies", spy)
    rng = np.random.default_rng(0)
    model = RDropModel(lm(), alpha=1.0)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = rng.integers(0, 11, size=(8, 6)).astype("int32")
    y = rng.integers(0, 11, size=(8, 6)).astype("int32")
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReferenceKLRegularizer()])
    assert not calls


def test_other_losses_take_the_general_anchor_path():
    # A subclass of Keras' loss may compute anything: the general path.
    class Custom(keras.losses.SparseCategoricalCrossentropy):
        pass

    model = RDropModel(lm(), alpha=0.0)
    model.compile(optimizer="sgd", loss=Custom(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 11, size=(8, 6)).astype("int32")
    y = rng.integers(0, 11, size=(8, 6)).astype("int32")
    with record_paths() as taken:
        history = model.fit(
            x, y, epochs=1, verbose=0, callbacks=[ReferenceKLRegularizer()]
        )
    assert taken and set(taken) == {"general"}
    assert np.isfinite(history.history["ref_kl"][0])


@pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="counts what torch autograd saves for the backward pass; XLA's "
    "buffers on JAX and TensorFlow are measured by benchmarks/bench.py "
    "--model lm50k",
)
@pytest.mark.parametrize("passes", [1, 2], ids=["anchor", "rdrop_anchor"])
def test_only_the_live_logits_and_reference_are_kept_torch(passes):
    # Autograd saves the fused loss's live inputs and nothing else of their
    # size. Its backward function itself keeps, chunk by chunk, with one pass
    # the two gradient terms (cross-entropy and KL; Keras' cross-entropy
    # keeps its log-probabilities instead of the first), with two the
    # reference's log-probabilities; the general path's chunked KL saves the
    # reference's logits.
    import torch

    from keras_rdrop import kl_divergence

    live = [torch.randn(2, 8, 50, requires_grad=True) for _ in range(passes)]
    ref = torch.randn(2, 8, 50)
    labels = torch.randint(0, 50, (2, 8), dtype=torch.int32)
    size = ref.numel()

    def full_size_saved(fn):
        storages = set()

        def pack(t):
            if t.numel() >= size:
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return storages, out

    def fused():
        inputs = live[0] if passes == 1 else tuple(live)
        return cross_entropy_and_reference_kl(inputs, ref, labels)

    def general():
        ce = keras.ops.sparse_categorical_crossentropy
        return ce(labels, live[0], from_logits=True) + kl_divergence(live[0], ref)

    inputs = {t.untyped_storage().data_ptr() for t in live}
    saved, out = full_size_saved(fused)
    assert saved == inputs
    torch.sum(out).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in live)
    if passes == 1:
        # Keras' cross-entropy keeps its log-probabilities, the chunked KL its
        # two inputs.
        saved, _ = full_size_saved(general)
        extra = saved - inputs - {ref.untyped_storage().data_ptr()}
        assert len(extra) == 1


@pytest.mark.traced
def test_chunked_except_under_tensorflow_xla():
    # TensorFlow's XLA fuses the whole-tensor pass into fewer buffers than
    # the chunked one (see `chunked_for`); every other case runs by chunks.
    xla = types.SimpleNamespace(jit_compile=True)
    assert chunked_for(xla) is (keras.backend.backend() != "tensorflow")
    assert chunked_for(types.SimpleNamespace(jit_compile=False))
    assert chunked_for(object())


@pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="torch runs the step eagerly, so when a tensor is freed is "
    "observable; JAX and TensorFlow trace the op",
)
def test_reference_logits_are_not_kept_for_backward_torch():
    import torch

    live = torch.randn(2, 8, 50, requires_grad=True)
    ref = torch.randn(2, 8, 50)
    labels = torch.randint(0, 50, (2, 8), dtype=torch.int32)
    alive = weakref.ref(ref)
    out = cross_entropy_and_reference_kl(live, ref, labels)
    del ref
    assert alive() is None
    torch.sum(out).backward()
    assert torch.isfinite(live.grad).all()
