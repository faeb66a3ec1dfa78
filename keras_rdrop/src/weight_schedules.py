"""Schedules of the training step, for R-Drop's `alpha` and the anchor's `beta`.

Both weights take one of three things, with the same meaning:

- a float: the weight at every step;
- a `keras.optimizers.schedules.LearningRateSchedule` (any of
  `keras.optimizers.schedules.*`, or a subclass): called with the step as a
  scalar int32 tensor, as Keras calls a learning-rate schedule, so it is
  written with `keras.ops` and can run inside the compiled training step;
- any other callable of the step: called on the host before each training
  step with the step as a Python `int` (so it may use `if`), its value fed to
  the step through a variable, so the step is not traced again when it
  changes. Like any callback that runs at each batch, it makes `fit` wait
  for each step before the next one starts.

A schedule must return a non-negative, finite scalar; it is called at step 0
when it is given, so a schedule that cannot run fails at once, with the
reason. Plain callables have no config: a model or callback holding one
cannot be saved whole.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

# A schedule of the training step (see the module docstring).
Schedule = keras.optimizers.schedules.LearningRateSchedule | Callable[[Any], Any]


def is_traced_schedule(value: Any) -> bool:
    """Whether `value` is a `LearningRateSchedule` (evaluated on tensors)."""
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule)


def is_host_schedule(value: Any) -> bool:
    """Whether `value` is a plain callable of the step (evaluated on the host)."""
    return (
        callable(value)
        and not isinstance(value, type)
        and not is_traced_schedule(value)
    )


def is_schedule(value: Any) -> bool:
    """Whether `value` is a schedule of either kind."""
    return is_traced_schedule(value) or is_host_schedule(value)


def check_schedule(schedule: Schedule, name: str) -> None:
    """Calls `schedule` at step 0 to check that it runs and what it returns."""
    if is_traced_schedule(schedule):
        value = traced_value(schedule, ops.convert_to_tensor(0, "int32"), name)
        value = float(ops.convert_to_numpy(value))
        _check_value(value, 0, name)
    else:
        host_value(schedule, 0, name)


def _check_value(value: float, step, name: str) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(
            f"The `{name}` schedule returned {value} at step {step}; it should "
            "return a non-negative, finite float."
        )


def _scalar(value, name: str):
    if len(value.shape) != 0:
        raise ValueError(
            f"The `{name}` schedule should return a scalar. Received a value of "
            f"shape {tuple(value.shape)}."
        )
    return value


def traced_value(schedule, step, name: str):
    """`schedule(step)` of a `LearningRateSchedule`, as a float32 scalar tensor."""
    try:
        value = ops.cast(ops.convert_to_tensor(schedule(step)), "float32")
    except Exception as error:  # any failure of user code, re-raised with help
        raise TypeError(
            f"The `{name}` schedule failed when called with the training step "
            f"as a scalar int32 tensor ({type(error).__name__}: {error}). A "
            "keras.optimizers.schedules.LearningRateSchedule is called inside "
            "the (possibly compiled) training step: write it with keras.ops, "
            "or pass a plain callable of the step, which is called on the host "
            "with the step as a Python int."
        ) from error
    return _scalar(value, name)


def host_value(schedule, step: int, name: str) -> float:
    """`schedule(step)` of a plain callable, on the host, as a checked float."""
    try:
        value = schedule(step)
        if not isinstance(value, (numbers.Real, np.ndarray, np.generic)):
            value = ops.convert_to_numpy(value)  # a backend tensor
        value = np.asarray(value, dtype="float64")
    except Exception as error:  # any failure of user code, re-raised with help
        raise TypeError(
            f"The `{name}` schedule failed when called with the training step "
            f"{step} (a Python int) ({type(error).__name__}: {error}). It should "
            "return a non-negative float."
        ) from error
    _check_value(float(_scalar(value, name)), step, name)
    return float(value)


def host_variable(name: str) -> keras.Variable:
    """The variable a plain callable's value is fed to the step through."""
    return keras.Variable(
        0.0,
        dtype="float32",
        trainable=False,
        aggregation="only_first_replica",
        name=name,
    )


class HostScheduleFeed(keras.callbacks.Callback):
    """Feeds plain-callable schedules to the training step, before each batch.

    Args:
        feeds: `(name, schedule, variable)` triples: before each training
            step, `variable` is assigned `schedule(step)`.
        step_of: A function of the model giving its current step as an int,
            read once per epoch (the step of a batch is that plus its index
            in the epoch).
    """

    def __init__(self, feeds, step_of: Callable[[keras.Model], int]):
        super().__init__()
        self.feeds = list(feeds)
        self.step_of = step_of
        self._base = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._base = self.step_of(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        # `self.model` brings the JAX state back to the variables first, so
        # that the assignments reach the next step.
        self.model  # noqa: B018
        feed(self.feeds, self._base + batch)


def feed(feeds, step: int) -> None:
    """Assigns each `(name, schedule, variable)`'s value at `step`."""
    for name, schedule, variable in feeds:
        variable.assign(host_value(schedule, step, name))


def validate_weight(value: Any, name: str, more: str = ""):
    """`value` checked as a weight: a non-negative float, or a schedule.

    A schedule is called at step 0 (`check_schedule`). `more` names what
    else the caller accepts, for the error message.
    """
    if is_schedule(value):
        check_schedule(value, name)
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not value >= 0
        or value == float("inf")
    ):
        error = TypeError if not isinstance(value, numbers.Real) else ValueError
        raise error(
            f"`{name}` should be a non-negative float or a schedule of the step "
            "(a keras.optimizers.schedules.LearningRateSchedule, or a callable "
            f"of the step evaluated on the host){more}. Received: {name}={value!r}"
        )
    return float(value)


def weight_at(value: Any, step: int, name: str) -> float:
    """The weight `value` (`validate_weight`) at `step`, on the host."""
    if is_traced_schedule(value):
        step = ops.convert_to_tensor(step, "int32")
        return float(ops.convert_to_numpy(traced_value(value, step, name)))
    if is_host_schedule(value):
        return host_value(value, step, name)
    return value
