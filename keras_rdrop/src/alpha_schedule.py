"""RDropModel's `alpha`: a float, a schedule of the training step, or a dict.

A schedule is a `keras.optimizers.schedules.LearningRateSchedule` (any of
`keras.optimizers.schedules.*`, or a subclass) or a callable of the step. It
is called inside the training step with the step as a scalar int32 tensor, as
Keras calls a learning-rate schedule, so it runs traced (`jit`,
`tf.function`, `torch.compile`) on every backend without retracing. A plain
callable must therefore be written with `keras.ops`
(`lambda step: keras.ops.minimum(1.0, step / 1000)`), not with Python
control flow on the step.

The step is RDropModel's own counter (`alpha_step`, a non-trainable variable
created only when `alpha` is scheduled): the number of training steps the
model has taken, saved with its weights. It is a model variable rather than
`optimizer.iterations` because a JAX training step is stateless: only the
model's and the metrics' variables are threaded through `compute_loss`, so
the optimizer's counter would be read as the constant of the first trace.

The plan (`output_plan.build_plan`) sees a scheduled output with weight 1
(`plan_alpha`), so its consistency term is always computed (a schedule that
is 0 at step 0 does not switch the second pass off); `weigh_terms`
applies the step's value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

# A schedule of the training step (see the module docstring).
Schedule = keras.optimizers.schedules.LearningRateSchedule | Callable[[Any], Any]


def is_schedule(value: Any) -> bool:
    """Whether `value` is a schedule (a `LearningRateSchedule` or a callable)."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return True
    return callable(value) and not isinstance(value, type)


def validate_alpha(alpha: Any, name: str = "alpha"):
    """`alpha` checked: a float, a schedule, or a dict of them by output name."""
    if isinstance(alpha, dict):
        return {k: validate_alpha(v, f"{name}[{k!r}]") for k, v in alpha.items()}
    if is_schedule(alpha):
        _check_schedule(alpha, name)
        return alpha
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not alpha >= 0
        or alpha == float("inf")
    ):
        error = TypeError if not isinstance(alpha, numbers.Real) else ValueError
        raise error(
            f"`{name}` should be a non-negative float, a schedule of the step "
            "(a keras.optimizers.schedules.LearningRateSchedule or a callable "
            "written with keras.ops), or a dict of them keyed by output name. "
            f"Received: {name}={alpha!r}"
        )
    return float(alpha)


def _check_schedule(schedule, name: str) -> None:
    """Calls `schedule` at step 0 (eagerly) to check what it returns."""
    value = schedule_value(schedule, ops.convert_to_tensor(0, "int32"), name)
    value = float(ops.convert_to_numpy(value))
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(
            f"The `{name}` schedule returned {value} at step 0; it should return "
            "a non-negative, finite float."
        )


def schedule_value(schedule, step, name: str = "alpha"):
    """`schedule(step)` as a float32 scalar, with a clear error if it fails."""
    try:
        value = schedule(step)
        value = ops.cast(ops.convert_to_tensor(value), "float32")
    except Exception as error:  # any failure of user code, re-raised with help
        raise TypeError(
            f"The `{name}` schedule failed when called with the training step "
            f"as a scalar int32 tensor ({type(error).__name__}: {error}). It is "
            "called inside the (possibly compiled) training step, like a Keras "
            "learning-rate schedule: use a keras.optimizers.schedules object, "
            "or write the callable with keras.ops, e.g. "
            "`lambda step: keras.ops.minimum(1.0, step / 1000)`."
        ) from error
    if len(value.shape) != 0:
        raise ValueError(
            f"The `{name}` schedule should return a scalar. Received a value of "
            f"shape {tuple(value.shape)}."
        )
    return value


def step_counter():
    """The non-trainable int32 counter of training steps a schedule reads."""
    return keras.Variable(
        0,
        dtype="int32",
        trainable=False,
        aggregation="only_first_replica",
        name="alpha_step",
    )


def advance(step_variable, schedules: dict, trackers: list) -> dict:
    """Each schedule's value at this step (logged by `trackers`); counts it.

    Read from and written to `step_variable` inside the step, so it is
    correct traced on every backend (on JAX the counter, a non-trainable
    variable of the model, is threaded through the stateless step).
    """
    step = ops.convert_to_tensor(step_variable)
    current = {}
    for tracker, (name, schedule) in zip(trackers, schedules.items()):
        current[name] = schedule_value(schedule, step, name)
        tracker.update_state(current[name])
    step_variable.assign_add(1)
    return current


def is_scheduled(alpha: Any) -> bool:
    """Whether any weight of `alpha` (a validated alpha) is a schedule."""
    if isinstance(alpha, dict):
        return any(is_schedule(a) for a in alpha.values())
    return is_schedule(alpha)


def plan_alpha(alpha: Any):
    """`alpha` with every schedule replaced by 1, for the step's plan."""
    if isinstance(alpha, dict):
        return {k: plan_alpha(v) for k, v in alpha.items()}
    return 1.0 if is_schedule(alpha) else alpha


def log_names(alpha: Any) -> dict:
    """The log name of each schedule: `{"alpha": s}` or `{"alpha_<output>": s}`."""
    if isinstance(alpha, dict):
        return {f"alpha_{k}": v for k, v in alpha.items() if is_schedule(v)}
    return {"alpha": alpha} if is_schedule(alpha) else {}


def _group_of(alpha: Any, output_name: str) -> str | None:
    """The log name of the schedule weighting `output_name`, else `None`."""
    if isinstance(alpha, dict):
        return f"alpha_{output_name}" if is_schedule(alpha.get(output_name)) else None
    return "alpha" if is_schedule(alpha) else None


def weigh_terms(terms, alpha: Any, current: dict) -> dict:
    """R-Drop's consistency, weighted: each output's term times its `alpha`.

    The one place where `alpha` and its schedules weigh the terms, for every
    loss path.

    Args:
        terms: `(plan entry, value)` pairs (`StepLosses.terms`), unweighted.
        alpha: The model's validated `alpha`.
        current: The step's value of each schedule, by log name
            (`log_names`); empty when nothing is scheduled.

    Returns:
        `{"weighted": ..., "unweighted": ...}`: the sums over the outputs of
        `alpha * term` (a scheduled output: its value at the step times the
        term) and of the terms, float32 scalars (0 without terms).
    """
    weighted = unweighted = ops.zeros((), "float32")
    for entry, value in terms:
        unweighted = unweighted + value
        term = entry.alpha * value
        group = _group_of(alpha, entry.name)
        if group is not None and group in current:
            term = current[group] * term
        weighted = weighted + term
    return {"weighted": weighted, "unweighted": unweighted}


def serialize_alpha(alpha: Any):
    """`alpha` for `get_config`: floats as they are, schedules serialized."""
    if isinstance(alpha, dict):
        return {k: serialize_alpha(v) for k, v in alpha.items()}
    if isinstance(alpha, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(alpha)
    if is_schedule(alpha):
        raise NotImplementedError(
            "An RDropModel whose `alpha` is a plain callable has no config, so "
            f"it cannot be saved as a whole (alpha={alpha!r}). Use a "
            "keras.optimizers.schedules.LearningRateSchedule (a custom one "
            "registered with @keras.saving.register_keras_serializable), or "
            "save the inner model (`model.model.save(...)`) or the weights."
        )
    return alpha


def _is_serialized_object(value: Any) -> bool:
    return isinstance(value, dict) and "class_name" in value and "config" in value


def deserialize_alpha(config: Any, custom_objects=None):
    """The inverse of `serialize_alpha`."""
    if _is_serialized_object(config):
        return keras.saving.deserialize_keras_object(
            config, custom_objects=custom_objects
        )
    if isinstance(config, dict):
        return {k: deserialize_alpha(v, custom_objects) for k, v in config.items()}
    return config


class CurrentValue(keras.metrics.Metric):
    """A metric whose result is the last value given (the step's alpha)."""

    def __init__(self, name: str, dtype: str = "float32"):
        super().__init__(name=name, dtype=dtype)
        self.value = self.add_variable(
            shape=(), initializer="zeros", dtype=dtype, aggregation="mean", name="value"
        )

    def update_state(self, value):
        self.value.assign(ops.cast(value, self.dtype))

    def result(self):
        return ops.convert_to_tensor(self.value)
