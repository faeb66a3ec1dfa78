"""The per-output plan of a training step: resolved once, then handed down.

RDropModel needs, per model output: its name, how two predictions of it are
compared (a `ConsistencyTerm`, or none), and its `alpha`. That depends on the
compiled loss (is the output a distribution or a regression, logits or
probabilities), on RDropModel's own settings and on the output structure.
`build_plan` resolves it into a tuple of `OutputEntry`, once per output
structure (`PlanCache`); the general loss path, the fused language-model path
and the reference penalty all take that plan.

Loss settings are read through `Loss.get_config()`, the public contract
(Keras 3.16 keeps `from_logits` and the like only in the config).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import keras

from keras_rdrop.src.alpha_schedule import plan_alpha
from keras_rdrop.src.consistency_terms import ConsistencyTerm
from keras_rdrop.src.keras_internals import loss_function_kwargs
from keras_rdrop.src.prediction_checks import (
    check_output_activation,
    output_activations,
    output_layer_names,
    values_readable,
)

_CATEGORICAL = (
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
    "categorical_focal_crossentropy",
    "kl_divergence",
    "kld",
    "kullback_leibler_divergence",
    "categorical_hinge",
)
_BERNOULLI = ("binary_crossentropy", "binary_focal_crossentropy")
_REGRESSION = (
    "mean_squared_error",
    "mse",
    "mean_absolute_error",
    "mae",
    "mean_absolute_percentage_error",
    "mape",
    "mean_squared_logarithmic_error",
    "msle",
    "huber",
    "log_cosh",
    "logcosh",
    "cosine_similarity",
)
# Losses that only ever take probabilities.
_PROBABILITY_ONLY = ("kl_divergence", "kld", "kullback_leibler_divergence")


@dataclasses.dataclass(frozen=True)
class LossKind:
    """What one compiled loss says about its output."""

    kind: str  # "categorical", "bernoulli", "regression", "unknown" or "none"
    from_logits: bool | None
    loss_name: str


def loss_config(loss: Any) -> dict:
    """`loss.get_config()`, or `{}` for a loss that has no config."""
    try:
        config = loss.get_config()
    except (NotImplementedError, TypeError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


def loss_setting(loss: Any, name: str, default: Any = None) -> Any:
    """One setting of a Keras loss (`from_logits`, `axis`, ...).

    Read from `loss.get_config()`; a setting the config leaves out (Keras
    3.15's `SparseCategoricalCrossentropy` has no `axis` there) is read from
    the arguments the loss passes to its function, else `default`.
    """
    config = loss_config(loss)
    if name in config:
        return config[name]
    return loss_function_kwargs(loss).get(name, default)


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def describe_loss(loss: Any) -> LossKind:
    """Reads kind and `from_logits` from one compiled loss."""
    if loss is None:
        return LossKind("none", None, "None")
    if isinstance(loss, str):
        key = loss
        from_logits = False  # Keras' string losses take probabilities.
    elif isinstance(loss, keras.losses.Loss):
        fn = getattr(loss, "fn", None)
        key = _snake(type(loss).__name__)
        if key == "loss_function_wrapper" and fn is not None:
            key = fn.__name__
        from_logits = loss_setting(loss, "from_logits")
        if from_logits is None and fn is not None:
            from_logits = _default_from_logits(fn)
    elif callable(loss):
        key = getattr(loss, "__name__", type(loss).__name__)
        from_logits = _default_from_logits(loss)
    else:
        key = repr(loss)
        from_logits = None
    key = key.lower()
    if key in _CATEGORICAL:
        kind = "categorical"
        if key in _PROBABILITY_ONLY:
            from_logits = False
    elif key in _BERNOULLI:
        kind = "bernoulli"
    elif key in _REGRESSION:
        kind = "regression"
        from_logits = None
    else:
        kind = "unknown"
    return LossKind(kind, from_logits, key)


def _default_from_logits(fn) -> bool | None:
    try:
        parameter = inspect.signature(fn).parameters.get("from_logits")
    except (TypeError, ValueError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return bool(parameter.default)


def output_names_of(y_pred: Any, output_names) -> list[str]:
    """The names of the outputs, in `keras.tree.flatten(y_pred)` order."""
    flat = keras.tree.flatten(y_pred)
    if isinstance(y_pred, dict):
        return sorted(y_pred.keys())
    if output_names and len(output_names) == len(flat):
        return list(output_names)
    return [f"output_{i}" for i in range(len(flat))]


def flatten_like_outputs(value: Any, names: list[str], what: str) -> list:
    """Aligns a per-output setting with the outputs named `names`.

    `value` is either one setting for every output, a list in output order, or
    a dict keyed by output name.
    """
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(
                f"`{what}` has keys {unknown} that name no model output. "
                f"The outputs are {names}."
            )
        return [value.get(name) for name in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(
                f"`{what}` has {len(value)} entries but the model has "
                f"{len(names)} outputs ({names})."
            )
        return list(value)
    return [value] * len(names)


@dataclasses.dataclass(frozen=True)
class OutputEntry:
    """One output of the plan.

    Attributes:
        name: The output's name.
        term: How two predictions of it are compared, or `None` for an
            output that gets no consistency term (and no reference KL).
        alpha: Its R-Drop weight (0 for outputs left out of an `alpha` dict;
            1 for a scheduled output, whose weight RDropModel applies in
            the step: `alpha_schedule`).
        loss: The compiled loss of this output.
    """

    name: str
    term: ConsistencyTerm | None
    alpha: float
    loss: Any

    @property
    def from_logits(self) -> bool | None:
        return None if self.term is None else self.term.from_logits


def build_plan(
    loss: Any,
    y_pred: Any,
    output_names,
    alpha: Any,
    from_logits: Any,
    regression_consistency: bool,
    activations: list | None = None,
    layer_names: list | None = None,
) -> tuple[OutputEntry, ...]:
    """Resolves every output's consistency term, in `keras.tree.flatten` order.

    Args:
        loss: The compiled loss (`model.loss`): one loss, a list or a dict.
        y_pred: The outputs of one pass, for their structure.
        output_names: The inner model's `output_names`, or `None`.
        alpha: A float, or a dict keyed by output name.
        from_logits: `None` (read from the loss), a bool or a dict.
        regression_consistency: Whether regression outputs get an MSE term.
        activations: The output layers' activations (`output_activations`),
            to check against the declarations; `None` skips the check.
        layer_names: The output layers' names (`output_layer_names`), for
            the check's messages, or `None`.

    Returns:
        A tuple of `OutputEntry`, one per output.
    """
    names = output_names_of(y_pred, output_names)
    losses = flatten_like_outputs(loss, names, "loss")
    alphas = flatten_like_outputs(alpha, names, "alpha")
    alphas = [0.0 if a is None else a for a in alphas]
    if from_logits is None:
        overrides = [None] * len(names)
    else:
        overrides = flatten_like_outputs(from_logits, names, "from_logits")
    if activations is None or len(activations) != len(names):
        activations = [None] * len(names)
    if layer_names is None or len(layer_names) != len(names):
        layer_names = [None] * len(names)
    entries = []
    for name, loss_i, alpha_i, override, activation, layer_name in zip(
        names, losses, alphas, overrides, activations, layer_names
    ):
        kind = describe_loss(loss_i)
        logits = kind.from_logits if override is None else override
        term = None
        if kind.kind == "regression":
            if regression_consistency:
                term = ConsistencyTerm("regression")
            elif isinstance(alpha, dict) and alpha_i > 0:
                raise ValueError(
                    f"`alpha` asks for a KL on output {name!r}, but its loss "
                    f"({kind.loss_name}) is a regression loss, so the output is "
                    "not a distribution. Set regression_consistency=True for a "
                    "mean-squared consistency term, or drop it from `alpha`."
                )
        elif kind.kind in ("categorical", "bernoulli", "unknown"):
            if logits is None:
                raise ValueError(
                    f"Cannot tell whether output {name!r} holds logits or "
                    f"probabilities: its loss {kind.loss_name!r} does not say. "
                    "Pass `from_logits=True` (or False, or a dict keyed by "
                    "output name) to RDropModel."
                )
            check_output_activation(
                activation,
                logits,
                name,
                declared_by=_declared_by(loss_i, override),
                loss_name=kind.loss_name,
                layer_name=layer_name,
            )
            term = ConsistencyTerm(
                "distribution",
                from_logits=logits,
                distribution="bernoulli" if kind.kind == "bernoulli" else "auto",
            )
        entries.append(OutputEntry(name, term, alpha_i, loss_i))
    return tuple(entries)


def _declared_by(loss: Any, override: bool | None) -> str:
    """Where an output's `from_logits` comes from, for error messages."""
    if override is not None:
        return f"RDropModel(from_logits={override!r})"
    if isinstance(loss, str):
        return f"the compiled loss {loss!r}: Keras' string losses take probabilities"
    return f"the compiled loss {type(loss).__name__}"


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """RDropModel's arguments that a plan depends on (`build_plan`)."""

    alpha: Any
    from_logits: Any
    regression_consistency: bool
    check_output_activation: bool


class PlanCache:
    """The plan of each output structure, built once for a model.

    The key is everything the plan depends on: the compiled loss, the output
    structure and RDropModel's settings. `clear()` (on `compile`) forgets
    every plan. A step being traced (`jit`, `tf.function`,
    `torch.compile`) builds its plan afresh, once per trace, and leaves the
    cache alone: under `torch.compile` a lookup in a dict that the first
    trace then fills would fail the compiled step's guards and recompile it.
    """

    def __init__(self):
        self._plans: dict = {}

    def clear(self) -> None:
        self._plans.clear()

    def get(
        self, inner: keras.Model, loss, settings: PlanSettings, y_pred
    ) -> tuple[OutputEntry, ...]:
        """The plan of `inner` compiled with `loss`, for outputs like `y_pred`.

        Args:
            inner: The model whose outputs the plan covers.
            loss: The compiled loss.
            settings: What of RDropModel's own arguments the plan reads.
            y_pred: The outputs of one pass.
        """
        traced = not values_readable(keras.tree.flatten(y_pred)[0])
        key = (
            None
            if traced
            else (
                id(loss),
                str(keras.tree.map_structure(lambda _: 0, y_pred)),
                repr(settings),
            )
        )
        plan = None if traced else self._plans.get(key)
        if plan is None:
            plan = build_plan(
                loss,
                y_pred,
                getattr(inner, "output_names", None),
                plan_alpha(settings.alpha),
                settings.from_logits,
                settings.regression_consistency,
                output_activations(inner) if settings.check_output_activation else None,
                output_layer_names(inner),
            )
            if not traced:
                self._plans[key] = plan
        return plan
