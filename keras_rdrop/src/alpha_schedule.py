"""RDropModel's `alpha`: a float, a schedule of the training step, or a dict.

A schedule is one of `weight_schedules`: a
`keras.optimizers.schedules.LearningRateSchedule`, called inside the training
step with the step as a scalar int32 tensor (so it runs traced, `jit`,
`tf.function`, `torch.compile`, without retracing), or a plain callable of
the step, called on the host before each step with the step as a Python int
and fed to the step through a variable (`AlphaState.values`), so it may use
`if`.

The step is RDropModel's own counter (`alpha_step`, a non-trainable variable
of its `AlphaState`, created only when `alpha` is scheduled): the number of
training steps the model has taken, saved with its weights. It is a model
variable rather than `optimizer.iterations` because a JAX training step is
stateless: only the model's and the metrics' variables are threaded through
`compute_loss`, so the optimizer's counter would be read as the constant of
the first trace.

The plan (`output_plan.build_plan`) sees a scheduled output with weight 1
(`plan_alpha`), so its consistency term is always computed (a schedule that
is 0 at step 0 does not switch the second pass off); `weigh_terms`
applies the step's value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
from keras import ops

from keras_rdrop.src.weight_schedules import (
    is_host_schedule,
    is_schedule,
    traced_value,
    validate_weight,
)


def validate_alpha(alpha: Any, name: str = "alpha"):
    """`alpha` checked: a float, a schedule, or a dict of them by output name."""
    if isinstance(alpha, dict):
        return {k: validate_alpha(v, f"{name}[{k!r}]") for k, v in alpha.items()}
    return validate_weight(alpha, name, ", or a dict of them keyed by output name")


def step_counter():
    """The non-trainable int32 counter of training steps a schedule reads."""
    return keras.Variable(
        0,
        dtype="int32",
        trainable=False,
        aggregation="only_first_replica",
        name="alpha_step",
    )


def advance(step_variable, schedules: dict, trackers: list, fed: dict) -> dict:
    """Each schedule's value at this step (logged by `trackers`); counts it.

    A `LearningRateSchedule` is evaluated here, on the step read from
    `step_variable`; a plain callable's value is read from its variable in
    `fed` (by log name), which `weight_schedules.feed` assigned on the host.
    Read from and written to variables inside the step, so it is correct
    traced on every backend (on JAX the counter, a non-trainable variable of
    the model, is threaded through the stateless step).
    """
    step = ops.convert_to_tensor(step_variable)
    current = {}
    for tracker, (name, schedule) in zip(trackers, schedules.items()):
        if name in fed:
            current[name] = ops.convert_to_tensor(fed[name])
        else:
            current[name] = traced_value(schedule, step, name)
        tracker.update_state(current[name])
    step_variable.assign_add(1)
    return current


def host_schedules(alpha: Any) -> dict:
    """The plain callables of `alpha` (evaluated on the host), by log name."""
    return {k: v for k, v in log_names(alpha).items() if is_host_schedule(v)}


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


class Consistency(NamedTuple):
    """R-Drop's consistency term of a step, summed over the outputs."""

    weighted: Any
    """`alpha * term` (a scheduled output: its value at the step times the
    term): what the loss adds."""
    unweighted: Any
    """The terms alone: what `kl_loss` logs."""


def weigh_terms(terms, alpha: Any, current: dict) -> Consistency:
    """R-Drop's consistency, weighted: each output's term times its `alpha`.

    The one place where `alpha` and its schedules weigh the terms, for every
    loss path.

    Args:
        terms: `(plan entry, value)` pairs (`StepLosses.terms`), unweighted.
        alpha: The model's validated `alpha`.
        current: The step's value of each schedule, by log name
            (`log_names`); empty when nothing is scheduled.

    Returns:
        A `Consistency`: the sums over the outputs of `alpha * term` (a
        scheduled output: its value at the step times the term) and of the
        terms, float32 scalars (0 without terms).
    """
    weighted = unweighted = ops.zeros((), "float32")
    for entry, value in terms:
        unweighted = unweighted + value
        term = entry.alpha * value
        group = _group_of(alpha, entry.name)
        if group is not None and group in current:
            term = current[group] * term
        weighted = weighted + term
    return Consistency(weighted, unweighted)


def serialize_alpha(alpha: Any):
    """`alpha` for `get_config`: floats as they are, schedules serialized."""
    if isinstance(alpha, dict):
        return {k: serialize_alpha(v) for k, v in alpha.items()}
    if isinstance(alpha, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(alpha)
    if is_host_schedule(alpha):
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
