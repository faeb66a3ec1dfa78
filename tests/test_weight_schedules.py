"""One schedule type for R-Drop's `alpha` and the anchor's `beta`.

The same three forms (a float, a `LearningRateSchedule`, a plain callable of
the step evaluated on the host) give the same weights at each step, and the
same errors, for both. `alpha`'s own behaviour (logs, dicts, saving the step)
is in tests/test_alpha_schedule.py.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_rdrop import RDropModel, ReferenceKLRegularizer
from tests.models import classification_data, mlp, sparse_ce
from tests.testing import assert_allclose


def with_alpha(weight):
    return RDropModel(mlp(), alpha=weight)


def with_beta(weight):
    return ReferenceKLRegularizer(beta=weight)


OWNERS = pytest.mark.parametrize("make", [with_alpha, with_beta], ids=["alpha", "beta"])


@OWNERS
@pytest.mark.parametrize(
    "weight, error, match",
    [
        ("high", TypeError, "should be a non-negative float or a schedule"),
        (-1.0, ValueError, "should be a non-negative float or a schedule"),
        (float("inf"), ValueError, "should be a non-negative float or a schedule"),
        (lambda step: {"not": "a number"}, TypeError, "failed when called"),
        (lambda step: -1.0, ValueError, "returned -1.0 at step 0"),
        (lambda step: float("nan"), ValueError, "returned nan at step 0"),
        (lambda step: ops.ones((2,)), ValueError, "should return a scalar"),
        (lambda step: np.ones((2,)), ValueError, "should return a scalar"),
    ],
    ids=[
        "string",
        "negative",
        "infinite",
        "not-a-number",
        "negative-schedule",
        "nan-schedule",
        "tensor-not-a-scalar",
        "array-not-a-scalar",
    ],
)
def test_the_same_errors_for_alpha_and_beta(make, weight, error, match):
    name = "alpha" if make is with_alpha else "beta"
    with pytest.raises(error, match=match) as raised:
        make(weight)
    assert f"`{name}`" in str(raised.value)


def off_then_on():
    # 0 at steps 0 and 1, then 3.
    return keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.0, 3.0])


def python_if(step):
    return 0.0 if step < 2 else 3.0


@pytest.mark.traced
@pytest.mark.parametrize(
    "schedule", [off_then_on, lambda: python_if], ids=["lr", "host"]
)
def test_alpha_and_beta_take_the_same_weight_at_each_step(schedule):
    # One batch per epoch, so each epoch's logs are one step's values, from
    # the traced training step (jit on JAX, tf.function on TensorFlow).
    x, y = classification_data(n=32)
    want = [0.0, 0.0, 3.0, 3.0]

    rdrop = RDropModel(mlp(), alpha=schedule())
    rdrop.compile(optimizer="sgd", loss=sparse_ce())
    logs = rdrop.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    assert_allclose(logs["alpha"], want)
    assert_allclose(
        np.subtract(logs["loss"], logs["task_loss"]),
        np.multiply(want, logs["kl_loss"]),
        rtol=1e-5,
        atol=1e-7,
    )

    anchored = RDropModel(mlp(), alpha=0.0)
    anchored.compile(optimizer="sgd", loss=sparse_ce())
    callback = ReferenceKLRegularizer(beta=schedule())
    logs = anchored.fit(
        x, y, batch_size=32, epochs=4, verbose=0, callbacks=[callback]
    ).history
    # The live pass has dropout on, the reference not: the KL is positive.
    assert min(logs["ref_kl"]) > 0
    # A LearningRateSchedule is evaluated inside the step, which counts its
    # steps; a plain callable's value comes from the host, with no counter.
    step = anchored.anchor.beta_step
    if isinstance(callback.beta, keras.optimizers.schedules.LearningRateSchedule):
        assert int(ops.convert_to_numpy(step)) == 4
    else:
        assert step is None
    assert_allclose(
        np.subtract(logs["loss"], logs["task_loss"]),
        np.multiply(want, logs["ref_kl"]),
        rtol=1e-5,
        atol=1e-7,
    )


def test_a_learning_rate_schedule_beta_round_trips_in_the_config():
    callback = ReferenceKLRegularizer(beta=off_then_on(), direction="reverse")
    config = callback.get_config()
    assert config["beta"]["class_name"] == "PiecewiseConstantDecay"
    clone = ReferenceKLRegularizer.from_config(config)
    assert isinstance(clone.beta, keras.optimizers.schedules.PiecewiseConstantDecay)
    assert clone.get_config() == config


def test_plain_callables_have_no_config_for_alpha_and_beta():
    with pytest.raises(NotImplementedError, match="plain callable has no config"):
        with_alpha(python_if).get_config()
    with pytest.raises(NotImplementedError, match="plain callable has no config"):
        with_beta(python_if).get_config()
