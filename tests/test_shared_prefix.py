"""`shared_prefix`: the part of a model dropout cannot change runs once per step.

Each split is checked against the unshared computation (`share_prefix=False`,
both passes through the whole model): the same losses, logs and weights after
several steps, in both modes, with the anchor too. The calls of the prefix
are counted by the rows they see, so a test fails if the prefix ran twice.
"""

import functools
import logging
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_rdrop import RDropModel, ReferenceKLRegularizer, TrainingOutputs
from keras_rdrop.src.shared_prefix import split_model, training_false_semantics
from tests.models import NUM_CLASSES, sparse_ce
from tests.testing import assert_allclose, assert_same_training, to_numpy

FEATURES = 8


class RowCounter(keras.layers.Layer):
    """The identity, counting the rows it is called on (per trace, or per
    step when the step runs eagerly)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = []

    def call(self, x):
        # Not the symbolic builds (Keras' at the start of `fit`, the
        # snapshot's probe, JAX's shape inference): they compute nothing.
        kind = type(x).__name__
        symbolic = (
            isinstance(x, keras.KerasTensor)
            or "Tracer" in kind  # JAX
            or "Symbolic" in kind  # TensorFlow
            or not isinstance(x.shape[0], int)
            or getattr(getattr(x, "device", None), "type", None) == "meta"  # torch
        )
        if not symbolic:
            self.rows.append(x.shape[0])
        return x


def _dense(units, seed, **kwargs):
    return keras.layers.Dense(
        units, kernel_initializer=keras.initializers.GlorotUniform(seed=seed), **kwargs
    )


def frozen_base_model(batch_norm=False, counter=None, trainable_base=False):
    """The Keras transfer-learning recipe: a base without dropout, frozen,
    then a trainable layer, `Dropout` and a head."""
    layers = [keras.Input((FEATURES,))]
    if counter is not None:
        layers.append(counter)
    # Before BatchNormalization a bias gets a zero gradient: no bias there.
    layers += [_dense(16, 1, activation="relu"), _dense(16, 2, use_bias=not batch_norm)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    base = keras.Sequential(layers, name="base")
    base.trainable = trainable_base
    inputs = keras.Input((FEATURES,))
    h = base(inputs)
    h = _dense(16, 3, activation="relu")(h)
    h = keras.layers.Dropout(0.3, seed=4)(h)
    return keras.Model(inputs, _dense(NUM_CLASSES, 5)(h))


def two_branch_model():
    """Two prefix outputs feed the rest: each branch has its own dropout."""
    inputs = keras.Input((FEATURES,))
    a = _dense(16, 1, activation="relu")(inputs)
    b = _dense(8, 2, activation="tanh")(inputs)
    a = keras.layers.Dropout(0.3, seed=3)(a)
    b = keras.layers.Dropout(0.2, seed=4)(b)
    h = keras.layers.Concatenate()([a, b])
    return keras.Model(inputs, _dense(NUM_CLASSES, 5)(h))


def masked_sequence_model(vocab=20, length=6):
    """Embedding with `mask_zero`: the mask crosses the split."""
    tokens = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, 8, mask_zero=True)(tokens)
    h = _dense(8, 1, activation="relu")(h)
    h = keras.layers.Dropout(0.3, seed=2)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, _dense(NUM_CLASSES, 5)(h))


class SubclassedNet(keras.Model):
    """Dense, Dropout, Dense in Python code: no graph to split."""

    def __init__(self):
        super().__init__()
        self.hidden = _dense(16, 1)
        self.dropout = keras.layers.Dropout(0.3)
        self.out = _dense(NUM_CLASSES, 2)

    def call(self, x, training=None):
        return self.out(self.dropout(self.hidden(x), training=training))


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, n).astype("int32")
    return x, y


def sequences(n=32, vocab=20, length=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab, (n, length)).astype("int32")
    lengths = rng.integers(2, length + 1, n)
    x[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return x, rng.integers(0, NUM_CLASSES, n).astype("int32")


def train(
    build,
    share,
    mode="concat",
    alpha=1.0,
    anchor=False,
    xy=None,
    epochs=2,
    run_eagerly=False,
):
    """Builds, compiles and fits from fixed seeds; `(history, weights, model)`."""
    keras.utils.set_random_seed(0)
    inner = build()
    model = RDropModel(inner, alpha=alpha, mode=mode, share_prefix=share)
    # SGD: Adam would scale up rounding-level differences in small gradients
    # (one matmul on 2B rows or on B rows) to learning-rate-sized steps.
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=sparse_ce(), run_eagerly=run_eagerly
    )
    x, y = data() if xy is None else xy
    callbacks = [ReferenceKLRegularizer(beta=0.5)] if anchor else []
    history = model.fit(
        x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks
    )
    weights = [to_numpy(w) for w in inner.weights]
    return history.history, weights, model


def assert_shared_equals_unshared(build, **kwargs):
    shared = train(build, True, **kwargs)
    unshared = train(build, False, **kwargs)
    assert shared[2]._prefix.split is not None, "the model was not split"
    assert unshared[2]._prefix.split is None
    assert_same_training(shared[:2], unshared[:2])
    return shared, unshared


# ----------------------------------------------------------------- the split


def test_split_of_the_frozen_base_recipe():
    model = frozen_base_model()
    split, reason = split_model(model)
    assert reason == ""
    # The base and the trainable Dense after it; Dropout starts the rest.
    assert split.size == 2
    assert not split.frozen  # the Dense after the base is trainable
    assert [type(layer).__name__ for layer in split.rest.layers][1:] == [
        "Dropout",
        "Dense",
    ]
    x = data()[0]
    assert_allclose(
        ops.stop_gradient(split.rest(split.prefix(x), training=False)),
        ops.stop_gradient(model(x)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_a_frozen_prefix_is_marked_reusable_by_the_reference():
    inputs = keras.Input((FEATURES,))
    base = keras.Sequential([keras.Input((FEATURES,)), _dense(16, 1)])
    base.trainable = False
    h = keras.layers.Dropout(0.3)(base(inputs))
    split, _ = split_model(keras.Model(inputs, _dense(NUM_CLASSES, 2)(h)))
    assert split.size == 1 and split.frozen
    # Frozen but with BatchNormalization that trains: not reusable.
    split, _ = split_model(frozen_base_model(batch_norm=True, trainable_base=True))
    assert split is not None and not split.frozen


@pytest.mark.parametrize(
    "build, reason",
    [
        (
            lambda: keras.Sequential(
                [keras.Input((FEATURES,)), keras.layers.Dropout(0.3), _dense(3, 1)]
            ),
            "first layers are stochastic",
        ),
        (
            lambda: keras.Model(
                (inputs := keras.Input((FEATURES,))),
                [
                    _dense(3, 1)(keras.layers.Dropout(0.3)(inputs)),
                    _dense(3, 2)(inputs),
                ],
            ),
            "does not depend on any stochastic layer",
        ),
    ],
    ids=["stochastic_at_the_input", "deterministic_output"],
)
def test_models_that_cannot_be_split_say_why(build, reason):
    split, why = split_model(build())
    assert split is None
    assert reason in why


def test_a_subclassed_model_cannot_be_split():
    split, why = split_model(SubclassedNet())
    assert split is None and "not a functional model" in why


def test_what_this_keras_does_with_a_calls_own_training_false():
    # The probe's answer, observed directly: a sub-model with dropout called
    # with `training=False`, then a Dropout, run in training mode.
    inputs = keras.Input((256,))
    inner = keras.Sequential([keras.layers.Dropout(0.5)])
    hidden = inner(inputs, training=False)
    after = keras.layers.Dropout(0.5)(hidden)
    hidden, after = keras.Model(inputs, [hidden, after])(
        np.ones((4, 256), "float32"), training=True
    )
    kept = bool(np.all(to_numpy(hidden) == 1.0))
    passed_on = bool(np.all(to_numpy(after) == 1.0))
    assert training_false_semantics() == (kept, passed_on)
    # Keras 3.15 replaces the call's `training=False` by the model's mode;
    # the 3.16 development builds keep it and pass it on to later layers.
    major_minor = tuple(int(p) for p in keras.__version__.split(".")[:2])
    if major_minor <= (3, 15):
        assert not kept
    else:
        assert kept


def test_a_training_false_call_follows_this_keras():
    base = keras.Sequential(
        [keras.Input((FEATURES,)), _dense(16, 1), keras.layers.Dropout(0.5)]
    )
    inputs = keras.Input((FEATURES,))
    h = keras.layers.Dropout(0.3)(base(inputs, training=False))
    split, why = split_model(keras.Model(inputs, _dense(NUM_CLASSES, 2)(h)))
    kept, passed_on = training_false_semantics()
    if not kept:
        # Keras runs the base with dropout on: the base is stochastic.
        assert split is None and "first layers are stochastic" in why
    elif passed_on:
        # Keras would also turn off the Dropout after the base.
        assert split is None and "training=False" in why
    else:
        assert split is not None and split.size == 1


def test_a_dropout_this_keras_switches_off_is_warned_about():
    base = keras.Sequential([keras.Input((FEATURES,)), _dense(16, 1)], name="base")
    base.trainable = False
    inputs = keras.Input((FEATURES,))
    h = keras.layers.Dropout(0.3, name="head_dropout")(base(inputs, training=False))
    inner = keras.Model(inputs, _dense(NUM_CLASSES, 2)(h))
    x, y = data()
    for share in (True, False):
        model = RDropModel(inner, share_prefix=share)
        model.compile(optimizer="sgd", loss=sparse_ce())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(x, y, batch_size=8, verbose=0)
        warned = [
            w
            for w in caught
            if issubclass(w.category, UserWarning)
            and "'head_dropout' runs in inference" in str(w.message)
        ]
        if training_false_semantics()[1]:
            assert len(warned) == 1
            # As warned: the two passes are the same (in concat mode the two
            # halves of one matmul may differ at rounding level, not more).
            assert history.history["kl_loss"][0] < 1e-10
        else:
            assert not warned
            assert history.history["kl_loss"][0] > 1e-6


# --------------------------------------------- shared equals unshared training


@pytest.mark.parametrize("mode", ["concat", "sequential"])
def test_frozen_base_trains_as_unshared(mode):
    assert_shared_equals_unshared(frozen_base_model, mode=mode)


def test_trainable_prefix_without_dropout_trains_as_unshared(mode="concat"):
    # concat: the gradient through the stacked prefix output is the sum of
    # both halves' (sequential mode's sum is checked by the other tests).
    # The prefix's weights get the gradient of both passes.
    shared, unshared = assert_shared_equals_unshared(
        lambda: frozen_base_model(trainable_base=True), mode=mode
    )
    initial = train(lambda: frozen_base_model(trainable_base=True), True, epochs=0)
    assert not np.allclose(shared[1][0], initial[1][0])  # the base kernel moved


def test_batch_normalization_in_the_prefix():
    # concat: the whole model sees [x; x], the shared prefix x: the same
    # batch statistics, and the moving statistics are updated once per step
    # either way.
    build = lambda: frozen_base_model(batch_norm=True, trainable_base=True)  # noqa: E731
    assert_shared_equals_unshared(build, mode="concat")
    # sequential: the same losses and trainable weights; the shared prefix
    # updates the moving statistics once per step, as concat mode does.
    shared = train(build, True, mode="sequential")
    unshared = train(build, False, mode="sequential")
    trainable = [i for i, w in enumerate(shared[2].model.weights) if w.trainable]
    assert_same_training(
        (shared[0], [shared[1][i] for i in trainable]),
        (unshared[0], [unshared[1][i] for i in trainable]),
    )
    # One step, by hand (float64): momentum 0.99, the batch's statistics.
    keras.utils.set_random_seed(0)
    model = RDropModel(build(), mode="sequential")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=sparse_ce())
    x, y = data(n=8)
    kernel_1, bias_1, kernel_2 = (
        to_numpy(w).astype(np.float64) for w in model.model.layers[1].weights[:3]
    )
    features = np.maximum(x @ kernel_1 + bias_1, 0.0) @ kernel_2
    model.train_on_batch(x, y)
    batch_norm = model.model.layers[1].layers[-1]
    assert_allclose(batch_norm.moving_mean, 0.01 * features.mean(0), 1e-5, 1e-6)
    assert_allclose(
        batch_norm.moving_variance, 0.99 + 0.01 * features.var(0), 1e-5, 1e-6
    )


def test_several_prefix_outputs_feed_the_rest(mode="concat"):
    assert split_model(two_branch_model())[0].size == 2
    assert_shared_equals_unshared(two_branch_model, mode=mode)


@pytest.mark.parametrize("mode", ["concat", "sequential"])
def test_masks_cross_the_split(mode):
    xy = sequences()
    shared, _ = assert_shared_equals_unshared(masked_sequence_model, mode=mode, xy=xy)
    # The rest reads the prefix's mask: its pooling averages the valid
    # positions only (float64 NumPy).
    split = shared[2]._prefix.split
    x = xy[0][:4]
    hidden = split.prefix(x)
    # Keras 3.15 records the mask as an input of the calls after the
    # Embedding: it crosses the split as a second tensor, after the features.
    features = to_numpy(keras.tree.flatten(hidden)[0]).astype(np.float64)
    valid = (x != 0).astype(np.float64)[..., None]
    pooled = (features * valid).sum(1) / valid.sum(1)
    kernel, bias = (
        to_numpy(w).astype(np.float64) for w in split.rest.layers[-1].weights
    )
    assert_allclose(
        split.rest(hidden, training=False), pooled @ kernel + bias, rtol=1e-5, atol=1e-6
    )


def test_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        shared = train(frozen_base_model, True)
        unshared = train(frozen_base_model, False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert shared[2]._prefix.split is not None
    # bfloat16 activations: equal to rounding of bfloat16.
    for key in unshared[0]:
        assert_allclose(shared[0][key], unshared[0][key], rtol=2e-2, atol=2e-3)
    for a, b in zip(shared[1], unshared[1]):
        assert_allclose(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("mode", ["concat", "sequential"])
def test_the_anchor_with_rdrop_trains_as_unshared(mode):
    assert_shared_equals_unshared(frozen_base_model, mode=mode, anchor=True)


def frozen_prefix_model(counter):
    """A frozen base, then Dropout: the prefix the reference can reuse."""
    inputs = keras.Input((FEATURES,))
    base = keras.Sequential(
        [keras.Input((FEATURES,)), counter, _dense(16, 1, activation="relu")]
    )
    base.trainable = False
    h = keras.layers.Dropout(0.3, seed=2)(base(inputs))
    return keras.Model(inputs, _dense(NUM_CLASSES, 3)(h))


@pytest.mark.traced
@pytest.mark.parametrize(
    "alpha, mode, unshared_rows",
    [(0.0, "concat", [8, 8]), (1.0, "concat", [16, 8]), (1.0, "sequential", [8, 8, 8])],
)
def test_the_reference_reuses_a_frozen_prefix(alpha, mode, unshared_rows):
    rows, runs = {}, {}
    for share in (True, False):
        counter = RowCounter()
        runs[share] = train(
            functools.partial(frozen_prefix_model, counter),
            share,
            mode=mode,
            alpha=alpha,
            anchor=True,
            run_eagerly=True,
        )
        rows[share] = counter.rows
        assert "ref_kl" in runs[share][0]
    assert runs[True][2]._prefix.split.frozen
    assert_same_training(runs[True][:2], runs[False][:2])
    # Per step (run eagerly): the shared prefix once, on the batch; the
    # unshared passes and the reference each run it.
    assert rows[True] == [8] * 8  # 2 epochs of 4 steps
    assert rows[False] == unshared_rows * 8


def test_a_prefix_unfrozen_between_fits_is_no_longer_reused():
    # Frozen: the reference reuses the live prefix. Unfrozen (and compiled
    # again) the prefix trains away from θ0: the reference runs it again.
    def run(share):
        keras.utils.set_random_seed(0)
        inner = frozen_prefix_model(RowCounter())
        model = RDropModel(inner, alpha=0.0, share_prefix=share)
        x, y = data()
        logs = []
        for trainable in (False, True):
            inner.layers[1].trainable = trainable
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=sparse_ce())
            anchor = ReferenceKLRegularizer(beta=0.5)
            history = model.fit(
                x, y, batch_size=8, epochs=2, verbose=0, callbacks=[anchor]
            )
            logs.append(history.history)
        return logs, [to_numpy(w) for w in inner.weights]

    (shared_logs, shared_weights) = run(True)
    (unshared_logs, unshared_weights) = run(False)
    for shared, unshared in zip(shared_logs, unshared_logs):
        assert_same_training((shared, shared_weights), (unshared, unshared_weights))
    assert shared_logs[1]["ref_kl"][-1] > 1e-4  # the base moved away from θ0


@pytest.mark.traced
@pytest.mark.parametrize("mode", ["concat", "sequential"])
def test_the_prefix_runs_once_per_step(mode):
    rows = {}
    for share in (True, False):
        counter = RowCounter()
        train(
            functools.partial(frozen_base_model, counter=counter),
            share,
            mode=mode,
            run_eagerly=True,
        )
        rows[share] = counter.rows
    assert rows[True] == [8] * 8  # 2 epochs of 4 steps, run eagerly
    expected = [16] if mode == "concat" else [8, 8]
    assert rows[False] == expected * 8


# ------------------------------------------------ opt-out, logs, predict, saving


@pytest.mark.traced
def test_opt_out_runs_the_whole_model_twice():
    counter = RowCounter()
    _, _, model = train(
        lambda: frozen_base_model(counter=counter), False, run_eagerly=True
    )
    assert model._prefix.split is None
    assert counter.rows == [16] * 8
    assert model.get_config()["share_prefix"] is False
    with pytest.raises(TypeError, match="share_prefix"):
        RDropModel(frozen_base_model(), share_prefix="yes")


@pytest.mark.traced
def test_what_is_shared_is_said_once_at_info_level(caplog):
    x, y = data()
    for build, expected in (
        (SubclassedNet, "not a functional model"),
        (frozen_base_model, "run once"),
    ):
        model = RDropModel(build())
        model.compile(optimizer="sgd", loss=sparse_ce())
        with (
            caplog.at_level(logging.INFO, logger="keras_rdrop"),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("error")
            model.fit(x, y, batch_size=8, epochs=2, verbose=0)
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        said = [r for r in caplog.records if r.name == "keras_rdrop"]
        assert len(said) == 1 and said[0].levelno == logging.INFO
        assert expected in said[0].getMessage()
        caplog.clear()


def test_predict_evaluate_and_saving_are_unchanged(tmp_path):
    x, y = data()
    keras.utils.set_random_seed(0)
    inner = frozen_base_model()
    config = inner.get_config()
    model = RDropModel(inner)
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.fit(x, y, batch_size=8, verbose=0)
    assert model._prefix.split is not None
    # The split adds nothing to the inner model's config or its layers.
    assert inner.get_config() == config
    predicted = inner.predict(x, verbose=0)
    # The same layers and weights, compiled in two step functions: equal up
    # to rounding (XLA may fuse the two programs differently).
    assert_allclose(model.predict(x, verbose=0), predicted, 1e-6, 1e-7)
    assert_allclose(
        model.evaluate(x, y, verbose=0), sparse_ce()(y, predicted), 1e-5, 1e-6
    )
    path = str(tmp_path / "inner.keras")
    inner.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert_allclose(
        loaded.predict(x, verbose=0), inner.predict(x, verbose=0), 1e-6, 1e-6
    )
    path = str(tmp_path / "rdrop.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.share_prefix is True
    assert_allclose(
        restored.predict(x, verbose=0), inner.predict(x, verbose=0), 1e-6, 1e-7
    )


def test_a_direct_training_call_returns_both_passes():
    model = RDropModel(frozen_base_model())
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.make_train_function()
    x = data()[0][:4]
    out = model(ops.convert_to_tensor(x), training=True)
    assert isinstance(out, TrainingOutputs)
    assert tuple(out.first.shape) == tuple(out.second.shape) == (4, NUM_CLASSES)
    assert out.prefix is None  # no anchor: nothing reuses the prefix's output
