"""`alpha` as a schedule of the training step (warm-up, R-Drop switched on late).

The weight of the KL term at step k is schedule(k): checked against a float64
NumPy recomputation of the loss on given passes (general and fused paths, a
per-output dict), and in traced `fit` steps (`jit`, `tf.function`) from the
logs. Serialization of schedules, the refusal of plain callables, and the
errors for schedules that cannot run.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_rdrop import RDropModel, TrainingOutputs
from tests.models import classification_data, mlp, sparse_ce
from tests.testing import assert_allclose, np_log_softmax, np_symmetric_kl

B, C = 6, 4


def warm_up(steps=4):
    return keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=0.0, decay_steps=steps, end_learning_rate=2.0
    )


def np_warm_up(k, steps=4):
    return 2.0 * min(k, steps) / steps


def np_sparse_ce(logits, labels):
    log_p = np_log_softmax(logits.astype("float64"))
    return -np.mean(log_p[np.arange(len(labels)), labels])


def passes(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(B, C)).astype("float32") * 2 for _ in range(2)]


def logits_model(name="logits"):
    inputs = keras.Input((3,))
    hidden = keras.layers.Dropout(0.2)(inputs)
    return keras.Model(inputs, keras.layers.Dense(C, name=name)(hidden))


@pytest.mark.parametrize(
    "loss, labels",
    [
        (sparse_ce(), "sparse"),  # the fused language-model path
        (keras.losses.CategoricalCrossentropy(from_logits=True), "one_hot"),
    ],
    ids=["fused", "general"],
)
def test_kl_weight_at_step_k_is_the_schedule_at_k(loss, labels):
    model = RDropModel(logits_model(), alpha=warm_up())
    model.compile(optimizer="sgd", loss=loss)
    x = np.zeros((B, 3), "float32")
    y = np.random.default_rng(9).integers(0, C, size=(B,))
    y_in = y if labels == "sparse" else np.eye(C, dtype="float32")[y]
    for k in range(6):
        a, b = passes(k)
        got = model.compute_loss(
            x, y_in, TrainingOutputs(a, b), sample_weight=None, training=True
        )
        task = 0.5 * (np_sparse_ce(a, y) + np_sparse_ce(b, y))
        skl = np.mean(np_symmetric_kl(a.astype("float64"), b.astype("float64")))
        assert_allclose(got, task + np_warm_up(k) * skl, rtol=1e-5)
        assert_allclose(model.alpha_state.trackers[0].result(), np_warm_up(k))
    assert int(ops.convert_to_numpy(model.alpha_step)) == 6


def two_outputs():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dropout(0.2)(inputs)
    return keras.Model(
        inputs,
        {
            "a": keras.layers.Dense(C, name="a")(hidden),
            "b": keras.layers.Dense(C, name="b")(hidden),
        },
    )


def test_a_dict_mixes_schedules_and_floats():
    model = RDropModel(two_outputs(), alpha={"a": warm_up(), "b": 0.5})
    model.compile(optimizer="sgd", loss={"a": sparse_ce(), "b": sparse_ce()})
    x = np.zeros((B, 3), "float32")
    y = np.random.default_rng(3).integers(0, C, size=(B,))
    unweighted = []
    for k in range(5):
        (a1, a2), (b1, b2) = passes(2 * k), passes(2 * k + 1)
        y_pred = TrainingOutputs({"a": a1, "b": b1}, {"a": a2, "b": b2})
        got = model.compute_loss(x, {"a": y, "b": y}, y_pred, training=True)
        task = sum(
            0.5 * (np_sparse_ce(p, y) + np_sparse_ce(q, y))
            for p, q in [(a1, a2), (b1, b2)]
        )
        skl_a = np.mean(np_symmetric_kl(a1.astype("float64"), a2.astype("float64")))
        skl_b = np.mean(np_symmetric_kl(b1.astype("float64"), b2.astype("float64")))
        want = task + np_warm_up(k) * skl_a + 0.5 * skl_b
        assert_allclose(got, want, rtol=1e-5)
        # kl_loss: the running mean of the unweighted sum over outputs.
        unweighted.append(skl_a + skl_b)
        assert_allclose(model.kl_loss_tracker.result(), np.mean(unweighted))
    logs = model.get_metrics_result()
    assert "alpha_a" in logs and "alpha" not in logs and "alpha_b" not in logs
    assert_allclose(logs["alpha_a"], np_warm_up(4))


@pytest.mark.traced
def test_fit_logs_the_schedule_and_weighs_the_kl_with_it_traced():
    # One batch per epoch: each epoch's logs are one step's values, computed
    # by the traced train function (jit on JAX, tf.function on TensorFlow).
    x, y = classification_data(n=32)
    off_then_on = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.0, 3.0])
    model = RDropModel(mlp(), alpha=off_then_on)
    model.compile(optimizer="sgd", loss=sparse_ce())
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    assert_allclose(history["alpha"], [0.0, 0.0, 3.0, 3.0])
    # The second pass runs while the schedule is 0 (kl_loss > 0), and the
    # total is task_loss + alpha * kl_loss at every step.
    assert min(history["kl_loss"]) > 0
    want = np.array(history["task_loss"]) + np.array(history["alpha"]) * np.array(
        history["kl_loss"]
    )
    assert_allclose(history["loss"], want, rtol=1e-5)
    assert history["loss"][2] > history["task_loss"][2]
    # `evaluate` reports what the inner model would: no alpha.
    assert "alpha" not in model.evaluate(x, y, verbose=0, return_dict=True)
    # A second `fit` continues the count.
    more = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert_allclose(more["alpha"], [3.0])
    assert int(ops.convert_to_numpy(model.alpha_step)) == 5


def test_a_callable_written_with_keras_ops_works_on_the_host_too():
    # A plain callable gets the step as a Python int; keras.ops take it.
    x, y = classification_data(n=32)

    def ramp(step):
        return ops.minimum(1.0, ops.cast(step, "float32") / 2.0)

    model = RDropModel(mlp(), alpha=ramp)
    model.compile(optimizer="sgd", loss=sparse_ce())
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history
    assert_allclose(history["alpha"], [0.0, 0.5, 1.0])
    want = np.array(history["task_loss"]) + np.array(history["alpha"]) * np.array(
        history["kl_loss"]
    )
    assert_allclose(history["loss"], want, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="plain callable has no config"):
        model.get_config()


def test_a_float_alpha_logs_no_alpha_and_creates_no_variable():
    model = RDropModel(mlp(), alpha=1.0)
    assert not hasattr(model, "alpha_step")
    model.compile(optimizer="sgd", loss=sparse_ce())
    x, y = classification_data(n=32)
    assert "alpha" not in model.fit(x, y, epochs=1, verbose=0).history


def test_schedules_serialize_and_the_step_is_saved(tmp_path):
    x, y = classification_data(n=32)
    model = RDropModel(mlp(), alpha={"output_0": warm_up()})
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # 2 steps
    config = model.get_config()
    assert config["alpha"]["output_0"]["class_name"] == "PolynomialDecay"
    clone = RDropModel.from_config(config)
    assert isinstance(
        clone.alpha["output_0"], keras.optimizers.schedules.PolynomialDecay
    )
    assert clone.alpha["output_0"].get_config() == warm_up().get_config()
    path = str(tmp_path / "scheduled.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert int(ops.convert_to_numpy(loaded.alpha_step)) == 2
    history = loaded.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert_allclose(history["alpha_output_0"], [np_warm_up(2)])


def test_plain_callables_are_refused_by_save(tmp_path):
    model = RDropModel(mlp(), alpha=lambda step: ops.minimum(1.0, step / 10))
    model.compile(optimizer="sgd", loss=sparse_ce())
    with pytest.raises(NotImplementedError, match="LearningRateSchedule"):
        model.save(str(tmp_path / "m.keras"))


@pytest.mark.parametrize(
    "schedule, error, match",
    [
        (lambda step: {"not": "a number"}, TypeError, "failed when called"),
        (lambda step: -1.0, ValueError, "returned -1.0 at step 0"),
        (lambda step: ops.ones((2,)), ValueError, "should return a scalar"),
    ],
    ids=["not-a-number", "negative", "not-a-scalar"],
)
def test_bad_schedules_are_refused_at_construction(schedule, error, match):
    with pytest.raises(error, match=match):
        RDropModel(mlp(), alpha=schedule)
    with pytest.raises(error, match=r"alpha\['output_0'\]"):
        RDropModel(mlp(), alpha={"output_0": schedule})


@pytest.mark.traced
def test_python_control_flow_on_the_step_works_on_every_backend():
    # A plain callable runs on the host before each step (with the step as a
    # Python int) and reaches the traced step through a variable: `if` works
    # under jit and tf.function, and the weight changes without retracing.
    x, y = classification_data(n=32)
    model = RDropModel(mlp(), alpha=lambda step: 0.0 if step < 2 else 2.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    assert_allclose(history["alpha"], [0.0, 0.0, 2.0, 2.0])
    want = np.array(history["task_loss"]) + np.array(history["alpha"]) * np.array(
        history["kl_loss"]
    )
    assert_allclose(history["loss"], want, rtol=1e-5)
    assert history["loss"][2] > history["task_loss"][2]
    # Several batches per epoch: the step counts across them and epochs.
    seen = []
    model = RDropModel(mlp(), alpha=lambda step: seen.append(step) or 1.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert seen == [0, *range(8)]  # 0: the check when alpha is given
    # `train_on_batch` feeds it too, at the model's step.
    model.train_on_batch(x[:8], y[:8])
    assert seen[-1] == 8
