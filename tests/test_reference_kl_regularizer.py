import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel, ReferenceKLRegularizer
from keras_rdrop.src.step_paths import record_paths
from tests.models import classification_data, mlp, sparse_ce
from tests.testing import (
    CrashAt,
    assert_allclose,
    crash_and_resume,
    np_kl,
    np_symmetric_kl,
    to_numpy,
)

FEATURES = 10
CLASSES = 4


def task(seed, n):
    """A linear 4-class task on shared Gaussian inputs: labels differ by task."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((FEATURES, CLASSES))
    x = np.random.default_rng(100 + n).standard_normal((n, FEATURES)).astype("float32")
    return x, np.argmax(x @ w, axis=-1).astype("int32")


def classifier(dropout=0.1):
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(CLASSES),
        ]
    )


@pytest.fixture(scope="module")
def pretrained_weights():
    keras.utils.set_random_seed(0)
    model = classifier()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=sparse_ce())
    x, y = task(seed=1, n=512)
    model.fit(x, y, batch_size=64, epochs=30, verbose=0)
    return model.get_weights()


def accuracy(model, x, y):
    return float(np.mean(np.argmax(to_numpy(model.predict(x, verbose=0)), -1) == y))


def kl_to(model, weights, x):
    ref = classifier()
    ref.set_weights(weights)
    live = to_numpy(model.predict(x, verbose=0))
    return float(np.mean(np_kl(live, to_numpy(ref.predict(x, verbose=0)))))


@pytest.mark.traced
def test_anchor_curbs_forgetting(pretrained_weights):
    x_a, y_a = task(seed=1, n=1000)  # the old task's test set
    x_b, y_b = task(seed=2, n=512)  # the new task's fine-tuning data
    results = {}
    for beta in [0.0, 3.0]:
        keras.utils.set_random_seed(0)
        inner = classifier()
        inner.set_weights(pretrained_weights)
        model = RDropModel(inner, alpha=0.0)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=sparse_ce())
        model.fit(
            x_b,
            y_b,
            batch_size=64,
            epochs=15,
            verbose=0,
            callbacks=[ReferenceKLRegularizer(beta=beta)],
        )
        results[beta] = {
            "old_accuracy": accuracy(inner, x_a, y_a),
            "new_accuracy": accuracy(inner, x_b, y_b),
            "drift": kl_to(inner, pretrained_weights, x_b),
        }
    free, anchored = results[0.0], results[3.0]
    # Without the anchor the model forgets task A; with it, it keeps much more
    # of it and its predictions on the fine-tuning inputs drift far less.
    assert anchored["old_accuracy"] > free["old_accuracy"] + 0.15, results
    assert anchored["drift"] < 0.5 * free["drift"], results
    assert free["new_accuracy"] > 0.8, results


def test_snapshot_is_theta0_and_unchanged_by_training():
    x, y = classification_data()
    inner = mlp()
    theta0 = [to_numpy(w) for w in inner.weights]
    model = RDropModel(inner, alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    history = model.fit(
        x, y, epochs=2, verbose=0, callbacks=[ReferenceKLRegularizer(beta=0.5)]
    )
    assert history.history["ref_kl"][-1] > 0
    refs = [to_numpy(r) for r in model.reference.ref_weights]
    for ref, w0 in zip(refs, theta0):
        assert_allclose(ref, w0, rtol=0, atol=0)
    assert not np.allclose(to_numpy(inner.weights[0]), theta0[0])
    assert all(not v.trainable for v in model.reference.weights)
    assert len(model.trainable_weights) == len(inner.trainable_weights)


def test_reference_pass_leaves_batch_norm_statistics_untouched():
    x, y = classification_data()
    stats = {}
    for anchored in [False, True]:
        inner = mlp(dropout=0.0, batch_norm=True, seed=7)
        model = RDropModel(inner, alpha=0.0)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss=sparse_ce())
        callbacks = [ReferenceKLRegularizer(beta=1.0)] if anchored else []
        model.fit(
            x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=callbacks
        )
        stats[anchored] = [to_numpy(w) for w in inner.non_trainable_weights]
    for plain, anchored in zip(stats[False], stats[True]):
        assert_allclose(anchored, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "direction, reference",
    [
        ("forward", lambda live, ref: np_kl(live, ref)),
        ("reverse", lambda live, ref: np_kl(ref, live)),
        ("symmetric", np_symmetric_kl),
    ],
)
def test_directions_match_numpy(direction, reference):
    x, y = classification_data(n=32)
    inner = mlp(dropout=0.0)
    theta0 = inner.get_weights()
    model = RDropModel(inner, alpha=0.0)
    # Fit once to take the snapshot and move the weights away from it.
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=sparse_ce())
    model.fit(x, y, epochs=2, verbose=0, callbacks=[ReferenceKLRegularizer(beta=0.0)])
    live = to_numpy(inner.predict(x, verbose=0))
    ref_model = mlp(dropout=0.0)
    ref_model.set_weights(theta0)
    ref = to_numpy(ref_model.predict(x, verbose=0))
    assert not np.allclose(live, ref)
    # A frozen step (learning rate 0) logs the KL between the two.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=sparse_ce())
    beta = 0.25
    h = model.fit(
        x,
        y,
        batch_size=32,
        epochs=1,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=beta, direction=direction)],
    )
    expected = reference(live, ref).mean()
    assert_allclose(h.history["ref_kl"][0], expected, rtol=1e-4)
    assert_allclose(
        h.history["loss"][0], h.history["task_loss"][0] + beta * expected, rtol=1e-4
    )


def test_penalty_is_added_and_pulls_toward_reference():
    x, y = classification_data()
    model = RDropModel(mlp(), alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    h = model.fit(
        x, y, epochs=2, verbose=0, callbacks=[ReferenceKLRegularizer(beta=2.0)]
    )
    loss, task_loss, ref_kl = (
        h.history[k][-1] for k in ["loss", "task_loss", "ref_kl"]
    )
    assert loss > task_loss
    # Averages over an epoch, beta fixed: loss = task + beta * ref_kl.
    assert_allclose(loss, task_loss + 2.0 * ref_kl, rtol=1e-4)


def test_resume_keeps_the_original_snapshot(tmp_path):
    x, y = classification_data(n=128)

    def fresh(seed):
        keras.utils.set_random_seed(seed)
        model = RDropModel(mlp(seed=seed), alpha=1.0)
        model.compile(optimizer="adam", loss=sparse_ce())
        return model

    theta0 = [to_numpy(w) for w in fresh(0).model.weights]

    def fit(model, callbacks):
        if not any(isinstance(c, CrashAt) for c in callbacks):
            # A new process: the model is rebuilt with other initial weights.
            assert not np.allclose(to_numpy(model.model.weights[0]), theta0[0])
        callbacks = [ReferenceKLRegularizer(beta=0.5), *callbacks]
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)

    _, resumed = crash_and_resume(
        fresh, fit, tmp_path / "backup", crash_at=(0, 5), save_freq=2
    )
    for ref, w0 in zip(resumed.reference.ref_weights, theta0):
        assert_allclose(ref, w0, rtol=0, atol=0)


def test_saved_model_keeps_its_snapshot(tmp_path):
    x, y = classification_data()
    model = RDropModel(mlp(), alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    theta0 = [to_numpy(w) for w in model.model.weights]
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReferenceKLRegularizer()])
    path = str(tmp_path / "anchored.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for ref, w0 in zip(loaded.reference.ref_weights, theta0):
        assert_allclose(ref, w0, rtol=0, atol=0)
    h = loaded.fit(x, y, epochs=1, verbose=0, callbacks=[ReferenceKLRegularizer()])
    assert h.history["ref_kl"][0] > 0
    for ref, w0 in zip(loaded.reference.ref_weights, theta0):
        assert_allclose(ref, w0, rtol=0, atol=0)
    # Without the callback, the anchor is off.
    h = loaded.fit(x, y, epochs=1, verbose=0)
    assert "ref_kl" not in h.history


def test_bfloat16_reference_halves_memory():
    x, y = classification_data()
    model = RDropModel(mlp(), alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    h = model.fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(reference_dtype="bfloat16")],
    )
    refs = model.reference.ref_weights
    assert all(keras.backend.standardize_dtype(r.dtype) == "bfloat16" for r in refs)
    assert np.isfinite(h.history["ref_kl"][0])


def test_refresh_and_soft_update():
    x, y = classification_data()
    model = RDropModel(mlp(), alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(refresh_every_steps=1)],
    )
    for ref, w in zip(model.reference.ref_weights, model.model.weights):
        assert_allclose(ref, w, rtol=0, atol=0)
    before = [to_numpy(r) for r in model.reference.ref_weights]
    model.fit(
        x,
        y,
        batch_size=64,
        epochs=1,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(soft_update_tau=0.25, soft_update_every=1)],
    )
    for ref, old, w in zip(model.reference.ref_weights, before, model.model.weights):
        assert_allclose(ref, 0.25 * to_numpy(w) + 0.75 * old, rtol=1e-5, atol=1e-6)


def test_refresh_every_epoch():
    x, y = classification_data()
    model = RDropModel(mlp(), alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.fit(
        x,
        y,
        epochs=2,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(refresh_every_epochs=1)],
    )
    for ref, w in zip(model.reference.ref_weights, model.model.weights):
        assert_allclose(ref, w, rtol=0, atol=0)


def test_beta_schedule_and_adaptive_controller():
    x, y = classification_data()
    seen = []

    def schedule(step):
        seen.append(step)
        return 0.1 * step

    model = RDropModel(mlp(), alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=schedule)],
    )
    assert seen[-4:] == [0, 1, 2, 3]
    assert_allclose(model.anchor.beta, 0.3, rtol=1e-6)
    # KL far above a tiny target: beta grows; far below a huge one: it shrinks.
    for target, grows in [(1e-6, True), (1e3, False)]:
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=2,
            verbose=0,
            callbacks=[ReferenceKLRegularizer(beta=1.0, target_kl=target, horizon=64)],
        )
        beta = float(to_numpy(model.anchor.beta))
        assert (beta > 1.0) if grows else (beta < 1.0), (target, beta)


def test_callback_on_a_plain_model_tells_to_wrap_it():
    x, y = classification_data()
    model = mlp()
    model.compile(optimizer="sgd", loss=sparse_ce())
    with pytest.raises(TypeError, match=r"RDropModel\(model"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[ReferenceKLRegularizer()])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": -0.1}, "beta"),
        ({"direction": "backward"}, "direction"),
        ({"refresh_every_steps": 0}, "refresh_every_steps"),
        ({"soft_update_tau": 0.5}, "soft_update_every"),
        ({"soft_update_tau": 1.5, "soft_update_every": 2}, "soft_update_tau"),
        ({"target_kl": -1.0}, "target_kl"),
        ({"target_kl": 0.1, "beta": lambda s: 0.1}, "target_kl"),
        ({"reference_dtype": "int32"}, "reference_dtype"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReferenceKLRegularizer(**kwargs)


def test_a_beta_of_the_wrong_type_is_a_type_error():
    # As for RDropModel's alpha (tests/test_weight_schedules.py).
    with pytest.raises(TypeError, match="`beta` should be a non-negative float"):
        ReferenceKLRegularizer(beta="high")


def test_reference_from_another_model_is_an_error_naming_shapes():
    x, y = classification_data()
    model = RDropModel(mlp(), alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    other = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32), keras.layers.Dense(3)]
    )
    model.reference.take(other)
    with pytest.raises(ValueError, match=r"\(8, 16\).*\(8, 32\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[ReferenceKLRegularizer()])


def test_get_config_round_trip():
    callback = ReferenceKLRegularizer(
        beta=0.3, direction="symmetric", target_kl=0.05, reference_dtype="bfloat16"
    )
    clone = ReferenceKLRegularizer.from_config(callback.get_config())
    assert clone.get_config() == callback.get_config()


@pytest.mark.traced
def test_repeated_fits_reuse_the_step_and_a_changed_anchor_rebuilds_it():
    # The training step is traced with the anchor's settings: `fit` after
    # `fit` with the same anchor reuses it (no retrace and recompile per
    # call), and a `fit` whose anchor differs, or that has none, rebuilds it,
    # and its logs follow the new settings. No dropout and a zero learning
    # rate: the logged KL is the KL of the predictions, by hand.
    keras.utils.set_random_seed(0)
    inner = classifier(dropout=0.0)
    model = RDropModel(inner, alpha=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=sparse_ce())
    x, y = task(seed=1, n=32)

    def fit(*callbacks):
        history = model.fit(x, y, batch_size=32, verbose=0, callbacks=list(callbacks))
        return model.train_function, history.history

    first, logs = fit(ReferenceKLRegularizer(beta=0.5))
    reference = to_numpy(inner.predict(x, verbose=0))
    # Move the live weights away from θ0 (the snapshot stays θ0).
    inner.set_weights([w * 1.3 for w in inner.get_weights()])
    live = to_numpy(inner.predict(x, verbose=0))
    again, logs = fit(ReferenceKLRegularizer(beta=0.5))
    assert again is first
    assert_allclose(logs["ref_kl"][0], np.mean(np_kl(live, reference)), rtol=1e-4)
    # beta is a variable the step reads, not a traced constant.
    assert fit(ReferenceKLRegularizer(beta=2.0))[0] is first
    plain, logs = fit()
    assert plain is not first and "ref_kl" not in logs
    assert fit()[0] is plain
    reverse, logs = fit(ReferenceKLRegularizer(beta=0.5, direction="reverse"))
    assert reverse is not plain
    assert_allclose(logs["ref_kl"][0], np.mean(np_kl(reference, live)), rtol=1e-4)
    # Back to earlier settings: the steps built for them are reused.
    assert fit(ReferenceKLRegularizer(beta=0.5))[0] is first
    assert fit()[0] is plain


@pytest.mark.traced
def test_alternating_anchored_and_plain_fits_trace_each_step_once():
    # An epoch loop, a tuner, a curriculum: `fit` again and again, with the
    # anchor and without. Each state's step is traced (and compiled) once:
    # the loss path is chosen once per trace on JAX and TensorFlow, and once
    # per step where the step runs eagerly (torch), whose step functions are
    # the ones built first.
    keras.utils.set_random_seed(0)
    model = RDropModel(classifier(dropout=0.1), alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    x, y = task(seed=1, n=32)
    anchor = ReferenceKLRegularizer(beta=0.5)
    functions, traces = {}, []
    with record_paths() as taken:
        for callbacks in ([anchor], [anchor], [], [anchor], [], [anchor], []):
            history = model.fit(x, y, batch_size=16, verbose=0, callbacks=callbacks)
            assert ("ref_kl" in history.history) == bool(callbacks)
            functions.setdefault(bool(callbacks), model.train_function)
            assert model.train_function is functions[bool(callbacks)]
            traces.append(len(taken))
    assert functions[True] is not functions[False]
    if keras.backend.backend() == "torch":
        assert traces == [2 * (i + 1) for i in range(7)]  # 2 steps per fit
    else:
        # The first anchored fit and the first plain one trace (TensorFlow's
        # `tf.function` may trace twice on a first call); no other fit does.
        assert traces[1] == traces[0] and traces[2] > traces[1]
        assert traces[2:] == [traces[2]] * 5, traces
