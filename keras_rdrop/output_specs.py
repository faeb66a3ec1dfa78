"""What each model output is, read from the loss it was compiled with.

RDropModel needs, per output: is it a distribution (categorical or Bernoulli)
or a regression, and does it hold logits or probabilities. Keras' own losses
say both; custom losses say neither, and then the user must.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

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
class OutputSpec:
    """How one output is compared between two passes."""

    name: str
    kind: str  # "categorical", "bernoulli", "regression" or "unknown"
    from_logits: bool | None
    loss_name: str


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def describe_loss(loss: Any, output_name: str) -> OutputSpec:
    """Reads kind and `from_logits` from one compiled loss."""
    if loss is None:
        return OutputSpec(output_name, "none", None, "None")
    if isinstance(loss, str):
        key = loss
        from_logits = False  # Keras' string losses take probabilities.
    elif isinstance(loss, keras.losses.Loss):
        fn = getattr(loss, "fn", None)
        key = _snake(type(loss).__name__)
        if key == "loss_function_wrapper" and fn is not None:
            key = fn.__name__
        from_logits = getattr(loss, "from_logits", None)
        if from_logits is None:
            from_logits = getattr(loss, "_fn_kwargs", {}).get("from_logits")
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
    return OutputSpec(output_name, kind, from_logits, key)


def _default_from_logits(fn) -> bool | None:
    import inspect

    try:
        parameter = inspect.signature(fn).parameters.get("from_logits")
    except (TypeError, ValueError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return bool(parameter.default)


def flatten_like_outputs(value: Any, y_pred: Any, output_names, what: str) -> list:
    """Aligns a per-output setting with `keras.tree.flatten(y_pred)`.

    `value` is either one setting for every output, a list in output order, or
    a dict keyed by output name.
    """
    flat = keras.tree.flatten(y_pred)
    if isinstance(y_pred, dict):
        names = sorted(y_pred.keys())
    elif output_names and len(output_names) == len(flat):
        names = list(output_names)
    else:
        names = [f"output_{i}" for i in range(len(flat))]
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(
                f"`{what}` has keys {unknown} that name no model output. "
                f"The outputs are {names}."
            )
        return names, [value.get(name) for name in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(flat):
            raise ValueError(
                f"`{what}` has {len(value)} entries but the model has "
                f"{len(flat)} outputs ({names})."
            )
        return names, list(value)
    return names, [value] * len(flat)
