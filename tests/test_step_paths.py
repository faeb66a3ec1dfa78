"""`keras_rdrop.src.step_paths`: which loss path computes a step, and the hooks.

The `StepInputs` are those of a real `RDropModel.compute_loss(...,
training=True)` call (caught on their way to `select_path`). `select_path`
picks `fused_anchor` (anchored, a fusable language-model loss, R-Drop off or
on for the output), `fused_rdrop` (R-Drop on, fusable, not anchored or the
anchor's path not allowed) or `general` (everything else); `use_paths`
restricts the choice (a path that does not apply falls back to the general
one; an unknown name is an error; the previous restriction comes back on
exit) and passes `chunked` to the fused anchor pass; `record_paths` lists the
choices. The general and fused R-Drop paths' losses match float64 NumPy.
"""

import dataclasses
import re
import types

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel
from keras_rdrop.src import rdrop_model, step_paths
from keras_rdrop.src.step_inputs import StepLosses
from keras_rdrop.src.step_paths import (
    PATH_NAMES,
    PATHS,
    FusedAnchorPath,
    FusedRDropPath,
    GeneralPath,
    record_paths,
    select_path,
    use_paths,
)
from tests.models import classification_data, mlp, sparse_ce
from tests.models import language_model as lm
from tests.testing import assert_allclose, np_log_softmax, np_symmetric_kl, to_numpy

RNG = np.random.default_rng(0)


def step_of(model, x, y, monkeypatch, sample_weight=None):
    """The `StepInputs` that `model.compute_loss` hands to `select_path`."""
    caught = []
    real = rdrop_model.select_path

    def spy(step, anchored):
        caught.append(step)
        return real(step, anchored)

    monkeypatch.setattr(rdrop_model, "select_path", spy)
    y_pred = model(x, training=True)
    model.compute_loss(x, y, y_pred, sample_weight, training=True)
    monkeypatch.setattr(rdrop_model, "select_path", real)
    (step,) = caught
    return step


def lm_step(monkeypatch, alpha=1.0, loss=None):
    model = RDropModel(lm(), alpha=alpha)
    model.compile(optimizer="sgd", loss=loss or sparse_ce(from_logits=True))
    tokens = RNG.integers(1, 11, size=(4, 6)).astype("int32")
    return step_of(model, tokens, tokens, monkeypatch)


def classifier_step(monkeypatch, from_logits=True):
    inner = mlp(activation=None if from_logits else "softmax")
    model = RDropModel(inner, alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce(from_logits=from_logits))
    x, y = classification_data(n=8)
    return step_of(model, x, y, monkeypatch)


def test_path_names_are_the_paths_in_the_order_they_are_tried():
    assert PATH_NAMES == ("fused_anchor", "fused_rdrop", "general")
    assert tuple(path.name for path in PATHS) == PATH_NAMES


def test_a_language_model_with_rdrop(monkeypatch):
    step = lm_step(monkeypatch)
    assert step.y_pred_2 is not None
    assert select_path(step, anchored=False).name == "fused_rdrop"
    assert select_path(step, anchored=True).name == "fused_anchor"


def test_a_language_model_without_rdrop(monkeypatch):
    # alpha=0: one pass, so R-Drop's fused pass does not apply; the anchor's
    # does.
    step = lm_step(monkeypatch, alpha=0.0)
    assert step.y_pred_2 is None
    assert select_path(step, anchored=False).name == "general"
    assert select_path(step, anchored=True).name == "fused_anchor"


def test_a_classifier_of_logits_is_fused_too(monkeypatch):
    # (batch, classes) logits with Keras' sparse cross-entropy of logits.
    step = classifier_step(monkeypatch)
    assert select_path(step, anchored=False).name == "fused_rdrop"


class SubclassedCrossentropy(keras.losses.SparseCategoricalCrossentropy):
    """Keras' loss subclassed: what it computes is no longer known to be Keras'."""


@pytest.mark.parametrize(
    "loss",
    [
        SubclassedCrossentropy(from_logits=True),
        keras.losses.CategoricalCrossentropy(from_logits=True),
    ],
    ids=["subclassed", "categorical"],
)
def test_other_language_model_losses_take_the_general_path(loss, monkeypatch):
    if isinstance(loss, keras.losses.CategoricalCrossentropy):
        model = RDropModel(lm(), alpha=1.0)
        model.compile(optimizer="sgd", loss=loss)
        tokens = RNG.integers(1, 11, size=(4, 6)).astype("int32")
        step = step_of(model, tokens, np.eye(11, dtype="float32")[tokens], monkeypatch)
    else:
        step = lm_step(monkeypatch, loss=loss)
    for anchored in (False, True):
        assert select_path(step, anchored).name == "general"


def test_probabilities_take_the_general_path(monkeypatch):
    step = classifier_step(monkeypatch, from_logits=False)
    for anchored in (False, True):
        assert select_path(step, anchored).name == "general"


def test_use_paths_restricts_the_choice(monkeypatch):
    step = lm_step(monkeypatch)
    with use_paths("general"):
        assert select_path(step, True).name == "general"
    with use_paths():  # no fused path: only the general one
        assert select_path(step, True).name == "general"
    with use_paths("fused_rdrop"):
        assert select_path(step, True).name == "fused_rdrop"
    with use_paths("fused_anchor", "fused_rdrop"):
        assert select_path(step, True).name == "fused_anchor"


def test_forcing_a_path_that_does_not_apply_falls_back_to_the_general_one(
    monkeypatch,
):
    # Not anchored: the anchor's fused path does not apply, and R-Drop's is
    # not allowed.
    step = lm_step(monkeypatch)
    with use_paths("fused_anchor"):
        assert select_path(step, False).name == "general"
    # One pass: R-Drop's fused path does not apply.
    single = lm_step(monkeypatch, alpha=0.0)
    with use_paths("fused_rdrop"):
        assert select_path(single, True).name == "general"


def test_use_paths_nests_and_restores(monkeypatch):
    step = lm_step(monkeypatch)
    with use_paths("fused_rdrop"):
        with use_paths("general"):
            assert select_path(step, True).name == "general"
        assert select_path(step, True).name == "fused_rdrop"
    assert select_path(step, True).name == "fused_anchor"
    with pytest.raises(RuntimeError), use_paths("general"):
        raise RuntimeError  # restored on an error too
    assert select_path(step, True).name == "fused_anchor"


def test_an_unknown_path_is_reported():
    message = (
        "Unknown loss paths ['fused', 'generic']; the paths are "
        "('fused_anchor', 'fused_rdrop', 'general')."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        with use_paths("fused", "general", "generic"):
            pass


@pytest.mark.traced
def test_record_paths_lists_each_choice(monkeypatch):
    step = lm_step(monkeypatch)
    with record_paths() as outer:
        select_path(step, False)
        with record_paths() as inner, use_paths("general"):
            select_path(step, True)
        select_path(step, True)
    select_path(step, True)  # after the block: not recorded
    assert outer == ["fused_rdrop", "general", "fused_anchor"]
    assert inner == ["general"]


@pytest.mark.traced
def test_record_paths_sees_compute_loss(monkeypatch):
    model = RDropModel(lm(), alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce(from_logits=True))
    tokens = RNG.integers(1, 11, size=(4, 6)).astype("int32")
    with record_paths() as taken:
        model.compute_loss(tokens, tokens, model(tokens, training=True))
    assert taken == ["fused_rdrop"]


def test_use_paths_passes_chunked_to_the_fused_anchor_pass(monkeypatch):
    # `use_paths(chunked=...)` sets the step's `chunked` when the step is
    # decided (`StepMode.chunked`); the fused anchor pass, and the
    # reference's forward pass, replaced by stubs that record what they get.
    default = lm_step(monkeypatch, alpha=0.0).chunked
    steps = []
    for chunked in (None, False, True):
        with use_paths("fused_anchor", chunked=chunked):
            steps.append(lm_step(monkeypatch, alpha=0.0))
    seen = []

    def compute(step, ref_pred, kind):
        seen.append((step.chunked, ref_pred, kind))
        return "task", None, "ref_kl"

    monkeypatch.setattr(
        step_paths, "FUSED_ANCHOR", types.SimpleNamespace(compute=compute)
    )
    monkeypatch.setattr(
        step_paths, "reference_outputs", lambda *args: ([None], ["reference"])
    )
    reference = types.SimpleNamespace(kind="reverse_kl")
    for step in steps:
        losses = FusedAnchorPath().compute(step, reference)
        assert losses == StepLosses("task", (), "ref_kl")
    assert seen == [
        (default, "reference", "reverse_kl"),
        (False, "reference", "reverse_kl"),
        (True, "reference", "reverse_kl"),
    ]


def np_ce(logits, labels):
    index = np.asarray(labels)[..., None]
    return -np.take_along_axis(np_log_softmax(logits), index, axis=-1)[..., 0]


@pytest.mark.parametrize(
    "path", [GeneralPath(), FusedRDropPath()], ids=lambda p: p.name
)
def test_the_rdrop_paths_losses_match_numpy(path, monkeypatch):
    inner = mlp()
    model = RDropModel(inner, alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce(from_logits=True))
    x, y = classification_data(n=8)
    weights = RNG.uniform(0.5, 2.0, size=(8,)).astype("float32")
    step = step_of(model, x, y, monkeypatch, sample_weight=weights)
    losses = path.compute(step, None)
    a, b = to_numpy(step.y_pred_1), to_numpy(step.y_pred_2)
    assert np.abs(a - b).max() > 1e-3  # dropout: the passes differ
    # Keras' sum_over_batch_size: sum(w * ce) / batch size; the consistency
    # term: sum(w * skl) / sum(w).
    task = 0.5 * (np.sum(weights * np_ce(a, y)) + np.sum(weights * np_ce(b, y))) / 8
    assert_allclose(losses.task_loss, task, rtol=1e-5)
    ((entry, kl),) = losses.terms
    assert entry is step.plan[0]
    skl = np.sum(weights * np_symmetric_kl(a, b)) / np.sum(weights)
    assert_allclose(kl, skl, rtol=1e-5)
    assert losses.reference_kl is None


def test_the_general_path_without_a_second_pass(monkeypatch):
    step = classifier_step(monkeypatch)
    one_pass = dataclasses.replace(step, y_pred_2=None)
    losses = GeneralPath().compute(one_pass, None)
    assert losses.terms == ()
    x, y = classification_data(n=8)
    expected = np.mean(np_ce(to_numpy(step.y_pred_1), y))
    assert_allclose(losses.task_loss, expected, rtol=1e-5)
