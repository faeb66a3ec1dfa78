"""`StepMode`: the training step decided once; `TrainingOutputs`: the passes
(and the prefix's output) carried from `call` to the loss and metrics in the
`y_pred` Keras passes."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_rdrop.src.rdrop_model as rdrop_model
import keras_rdrop.src.step_mode as step_mode
from keras_rdrop import RDropModel, ReferenceKLRegularizer, TrainingOutputs
from keras_rdrop.src.reference_penalty import ReferenceSettings
from tests.models import NUM_CLASSES, classification_data, mlp, sparse_ce
from tests.testing import assert_allclose, to_numpy

FEATURES = 8


def frozen_base(dropout=0.3):
    """A frozen base, then Dropout and a head: a prefix to share."""
    inputs = keras.Input((FEATURES,))
    base = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(16, activation="relu")]
    )
    base.trainable = False
    h = keras.layers.Dropout(dropout, seed=1)(base(inputs))
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


def built(inner, anchor=False, **kwargs):
    """`inner` wrapped, compiled and its training step built; anchored (the
    state `ReferenceKLRegularizer` sets while `fit` runs) if `anchor`."""
    model = RDropModel(inner, **kwargs)
    model.compile(optimizer="sgd", loss=sparse_ce())
    if anchor:
        ReferenceKLRegularizer(beta=1.0).set_model(model)
    model.make_train_function()
    return model


@pytest.mark.parametrize(
    "alpha, mode, anchor, stacked, shared, reuses",
    [
        (1.0, "concat", False, True, True, False),
        (1.0, "sequential", False, False, True, False),
        # No second pass and no reference: nothing to share the prefix with.
        (0.0, "concat", False, False, False, False),
        # One pass and the reference: the frozen prefix runs once for both.
        (0.0, "concat", True, False, True, True),
        (1.0, "sequential", True, False, True, True),
    ],
)
def test_each_decision_is_in_the_step_mode(
    alpha, mode, anchor, stacked, shared, reuses
):
    model = built(frozen_base(), anchor=anchor, alpha=alpha, mode=mode)
    decided = model._step_mode()
    assert decided.rdrop is (alpha > 0)
    assert decided.stacked is stacked
    assert (decided.split is not None) is shared
    assert (decided.reference is not None) is anchor
    assert decided.reference_reuses_prefix is reuses
    assert decided.chunked is True  # not TensorFlow with XLA


def test_a_trainable_prefix_is_not_reused_by_the_reference():
    # Trainable, the prefix moves away from θ0: the reference runs it.
    inner = frozen_base()
    inner.layers[1].trainable = True
    model = built(inner, anchor=True, alpha=1.0)
    decided = model._step_mode()
    assert decided.reference is not None
    assert not decided.reference_reuses_prefix


def test_a_frozen_prefix_the_snapshot_copied_is_not_reused():
    # Trainable when the snapshot was taken, frozen since: the snapshot holds
    # θ0 of the prefix, which the live prefix need not equal.
    inner = frozen_base()
    inner.layers[1].trainable = True
    model = RDropModel(inner, alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    ReferenceKLRegularizer(beta=1.0).set_model(model)
    inner.layers[1].trainable = False
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.make_train_function()
    decided = model._step_mode()
    assert decided.split is not None and decided.split.frozen
    assert decided.reference is not None
    assert not decided.reference_reuses_prefix


@pytest.mark.parametrize("mode", ["concat", "sequential"])
def test_a_training_call_returns_both_passes_and_the_prefix(mode):
    x = classification_data(n=4)[0]
    model = built(frozen_base(), anchor=True, alpha=1.0, mode=mode)
    out = model(ops.convert_to_tensor(x), training=True)
    assert isinstance(out, TrainingOutputs)
    assert tuple(out.first.shape) == tuple(out.second.shape) == (4, NUM_CLASSES)
    # Dropout differs between the passes.
    assert np.abs(to_numpy(out.first) - to_numpy(out.second)).max() > 1e-4
    # The prefix's output is the frozen base's, for the reference to reuse.
    base = model.model.layers[1]
    assert_allclose(out.prefix, base(x, training=False), rtol=1e-6, atol=1e-6)


def test_without_the_anchor_no_prefix_is_carried_and_one_pass_without_rdrop():
    x = classification_data(n=4)[0]
    out = built(frozen_base(), alpha=1.0)(x, training=True)
    assert out.prefix is None
    out = built(frozen_base(), alpha=0.0)(x, training=True)
    assert out.second is None and out.prefix is None
    assert tuple(out.first.shape) == (4, NUM_CLASSES)
    # Inference calls return what the inner model returns.
    model = built(frozen_base(), alpha=1.0)
    assert_allclose(
        model.predict(x, verbose=0), model.model.predict(x, verbose=0), 1e-6, 1e-7
    )


def test_compute_loss_in_training_takes_the_training_call_only():
    x, y = classification_data(n=4)
    model = built(mlp(), alpha=1.0)
    stacked = np.zeros((8, NUM_CLASSES), "float32")
    with pytest.raises(TypeError, match=r"model\(x, training=True\).*ndarray"):
        model.compute_loss(x, y, stacked, training=True)
    # `training=False`: one pass, Keras' own loss.
    one = np.zeros((4, NUM_CLASSES), "float32")
    assert_allclose(
        model.compute_loss(x, y, one, training=False), np.log(NUM_CLASSES), 1e-6
    )


def test_metrics_measure_the_first_pass_and_evaluate_the_inner_models():
    x, y = classification_data(n=8)
    model = RDropModel(mlp(), alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce(), metrics=["accuracy"])
    model.make_train_function()
    right = np.eye(NUM_CLASSES, dtype="float32")[y] * 5.0  # right on every row
    first = ops.convert_to_tensor(right)
    second = ops.convert_to_tensor(np.zeros_like(right))  # argmax 0 everywhere
    model.compute_loss(x, y, TrainingOutputs(first, second), training=True)
    logs = model.compute_metrics(x, y, TrainingOutputs(first, second))
    assert_allclose(logs["accuracy"], 1.0)
    assert {"kl_loss", "task_loss"} <= set(logs) and "ref_kl" not in logs
    for metric in model.metrics:
        metric.reset_state()
    logs = model.compute_metrics(x, y, first)
    assert not {"kl_loss", "task_loss", "ref_kl"} & set(logs)


@pytest.mark.parametrize("mode", ["concat", "sequential"])
def test_the_step_is_decided_once_and_split_once(mode, monkeypatch):
    decisions, splits = [], []
    real_decide, real_split = rdrop_model.decide_step, step_mode.split_passes

    def decide(**kwargs):
        decisions.append(kwargs)
        return real_decide(**kwargs)

    def split(y_pred):
        splits.append(1)
        return real_split(y_pred)

    monkeypatch.setattr(rdrop_model, "decide_step", decide)
    monkeypatch.setattr(step_mode, "split_passes", split)
    x, y = classification_data(n=16)
    model = RDropModel(frozen_base(), alpha=1.0, mode=mode)
    model.compile(optimizer="sgd", loss=sparse_ce(), run_eagerly=True)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    # One decision per built step (this `fit`), read by every step.
    assert len(decisions) == 1
    # Run eagerly: one split of the stacked passes per step, none without.
    assert len(splits) == (4 if mode == "concat" else 0)


def test_an_anchored_fit_and_a_plain_one_keep_one_mode_each():
    x, y = classification_data(n=16)
    model = RDropModel(frozen_base(), alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    plain = model._step_mode()
    history = model.fit(
        x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ReferenceKLRegularizer(1.0)]
    )
    assert "ref_kl" in history.history
    model.anchor.settings = ReferenceSettings()
    anchored = model._step_mode()
    model.anchor.settings = None
    assert model._step_mode() == plain
    assert plain.reference is None and plain.split is None
    assert anchored.reference is not None and anchored.reference_reuses_prefix
