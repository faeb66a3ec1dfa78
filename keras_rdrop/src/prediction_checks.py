"""Checks that predictions are what they are declared to be (logits or not).

Two checks:

- `check_values`: reads the values of concrete (eager) predictions. Declared
  probabilities (`from_logits=False`) outside [0, 1] are certainly not
  probabilities: a `ValueError`. Declared categorical probabilities that do
  not sum to 1 over the class axis, and declared logits that lie in [0, 1]
  and sum to 1 over more than one class (very likely probabilities), are
  heuristics: one `UserWarning` per process and kind of problem. Traced
  values (inside `jit`, `tf.function` or `torch.compile`) cannot be read and
  are not checked.
- `check_output_activation`: reads a functional or Sequential model's output
  layer, so it works when the training step is traced: a softmax or sigmoid
  output declared as logits, or an output with no activation declared as
  probabilities, is a `ValueError` at the first training step (RDropModel's
  `check_output_activation=False` turns it off).

Reading values costs a device-to-host copy (a sync on a GPU), so only the
first eager call for each declaration (logits, categorical probabilities,
Bernoulli probabilities) is read in a process: in an eager training loop that
is the first step, and later steps cost nothing.
"""

from __future__ import annotations

import warnings

import keras
from keras import ops

from keras_rdrop.src.keras_internals import output_layer

# How far from 1 a sum of probabilities may be (16-bit softmax outputs summed
# over a large vocabulary are off by a few 1e-3).
SUM_TOLERANCE = 1e-2
# Problems already reported in this process (each is warned once).
_WARNED: set[str] = set()
# Declarations whose values were already read once in this process.
_CHECKED: set[str] = set()


def reset_warnings() -> None:
    """Forgets the checks and warnings so far, so they run again (tests)."""
    _WARNED.clear()
    _CHECKED.clear()


def _warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def values_readable(x) -> bool:
    """Whether the values of `x` can be read now (it is not being traced).

    This is the one place that asks the backend: Keras has no public
    "is this a tracer" test.
    """
    if keras.backend.is_keras_tensor(x):
        return False
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling()
    return backend == "numpy"


def _scalar(value) -> float:
    # `float()` reads a 0-d eager tensor on every backend (torch: `.item()`),
    # without the NumPy conversion that torch tensors warn about.
    return float(value)


def check_values(x, from_logits: bool, distribution: str, axis: int, name: str):
    """Raises or warns once if the values of `x` contradict `from_logits`.

    Declared probabilities outside [0, 1] raise a `ValueError` (each time the
    declaration is read: the check is not marked done). The other findings
    are heuristics and warn once per process.

    Args:
        x: Floating-point predictions (read in float32).
        from_logits: What the caller declared.
        distribution: `"categorical"` or `"bernoulli"` (already resolved).
        axis: The class axis.
        name: The argument's name, for the message.
    """
    key_probabilities = f"probabilities-{distribution}"
    key_logits = "logits-categorical"
    if from_logits and (distribution != "categorical" or x.shape[axis] in (None, 1)):
        return  # Logits of any value are valid; only softmax sums are telling.
    key = key_logits if from_logits else key_probabilities
    if key in _CHECKED or not values_readable(x):
        return
    x = ops.cast(ops.stop_gradient(x), "float32")
    if 0 in tuple(x.shape):  # eager values have a concrete shape
        return
    low = _scalar(ops.min(x))
    high = _scalar(ops.max(x))
    if low != low or high != high:
        return  # NaN: passed through to the result, not a declaration issue.
    in_unit_range = low >= 0.0 and high <= 1.0
    if not from_logits and not in_unit_range:
        # Certain: probabilities cannot leave [0, 1]. Not marked as checked,
        # so the same mistake raises again.
        raise ValueError(
            f"`{name}` was declared as probabilities (from_logits=False), but "
            f"its values range over [{low:.4g}, {high:.4g}], outside [0, 1]: "
            "they are logits (or scores), and the KL of them is meaningless "
            "(inf or NaN). Pass from_logits=True for logits (for RDropModel: "
            "compile with a loss that has from_logits=True, or pass "
            "from_logits=True to RDropModel), or apply a softmax/sigmoid first."
        )
    _CHECKED.add(key)
    if distribution == "categorical":
        sums = ops.sum(x, axis=axis)
        error = _scalar(ops.max(ops.abs(sums - 1.0)))
        sums_to_one = error <= SUM_TOLERANCE
    else:
        error, sums_to_one = 0.0, True
    if from_logits:
        if in_unit_range and sums_to_one:
            _warn_once(
                key_logits,
                f"`{name}` was declared as logits (from_logits=True), but its "
                "values lie in [0, 1] and sum to 1 over the class axis: they "
                "look like probabilities (a softmax output). Pass "
                "from_logits=False for probabilities, or feed the logits from "
                "before the softmax (better: exact in log space).",
                stacklevel=4,
            )
        return
    if not sums_to_one:
        _warn_once(
            key_probabilities,
            f"`{name}` was declared as categorical probabilities "
            "(from_logits=False), but they do not sum to 1 over axis "
            f"{axis} (largest error {error:.3g}). Normalize them, pass "
            "from_logits=True if they are logits, or use "
            'distribution="bernoulli" for independent per-class '
            "probabilities (multi-label sigmoid outputs).",
            stacklevel=4,
        )


# A log_softmax output is valid as logits: softmax(log p) = p.
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def output_activations(model: keras.Model) -> list[str | None]:
    """The activation of each output layer, in `keras.tree.flatten` order.

    Each entry is the activation's name (`"softmax"`, `"sigmoid"`, `"linear"`,
    ...) or `None` where it cannot be read: a subclassed model, or an output
    layer without an `activation` (such as a keras-hub reversible embedding).
    """
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return []
    names = []
    for tensor in keras.tree.flatten(outputs):
        names.append(_activation_name(output_layer(tensor)))
    return names


def output_layer_names(model: keras.Model) -> list[str | None]:
    """The name of each output's layer, like `output_activations`."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return []
    layers = [output_layer(t) for t in keras.tree.flatten(outputs)]
    return [None if layer is None else layer.name for layer in layers]


def _activation_name(layer) -> str | None:
    if layer is None:
        return None
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    if isinstance(activation, keras.layers.Layer):
        return _activation_name(activation)
    name = getattr(activation, "__name__", None)
    return name if isinstance(name, str) else None


def check_output_activation(
    activation: str | None,
    from_logits: bool,
    output_name: str,
    declared_by: str = "the compiled loss or RDropModel",
    loss_name: str | None = None,
    layer_name: str | None = None,
) -> None:
    """Raises a `ValueError` if an output's activation contradicts `from_logits`.

    Args:
        activation: The output layer's activation (`output_activations`), or
            `None` where it cannot be read (nothing is checked).
        from_logits: What was declared.
        output_name: The output's name, for the message.
        declared_by: Where the declaration comes from, for the message
            (`"the compiled loss 'sparse_categorical_crossentropy'"`).
        loss_name: The compiled loss's snake-case name, to name the loss
            class of the fix; `None` for a generic fix.
        layer_name: The output layer's name, for the message.
    """
    if activation is None:
        return
    if layer_name is not None and layer_name != output_name:
        output_name = f"{output_name!r} (layer {layer_name!r})"
    else:
        output_name = repr(output_name)
    opt_out = (
        "If this output really holds {what} despite its activation (a custom "
        "layer), pass check_output_activation=False to RDropModel."
    )
    if from_logits and activation in _PROBABILITY_ACTIVATIONS:
        raise ValueError(
            f"Output {output_name} is declared as logits (from_logits=True, "
            f"from {declared_by}), but its layer ends in a {activation} "
            "activation, so it emits probabilities: the loss and the KL would "
            "treat probabilities as logits. Fix one of the two: (1) remove the "
            f"{activation} from the output layer and keep from_logits=True "
            "(more exact: the loss works in log space), or (2) declare "
            f"probabilities: compile with {_loss_fix(loss_name, False)} (or pass "
            "from_logits=False to RDropModel). " + opt_out.format(what="logits")
        )
    if not from_logits and activation == "linear":
        binary = loss_name is not None and "binary" in loss_name
        raise ValueError(
            f"Output {output_name} is declared as probabilities "
            f"(from_logits=False, from {declared_by}), but its layer has no "
            "activation, so it emits logits: training would log `loss: inf` "
            "and `kl_loss: inf` (or NaN). Fix one of the two: (1) declare "
            f"logits: compile with {_loss_fix(loss_name, True)} (or pass "
            "from_logits=True to RDropModel), or (2) add "
            f"activation={'sigmoid' if binary else 'softmax'!r} to the output "
            "layer. " + opt_out.format(what="probabilities")
        )


def _loss_fix(loss_name: str | None, from_logits: bool) -> str:
    """`keras.losses.X(from_logits=...)` for the loss named `loss_name`."""
    classes = {
        "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
        "categorical_crossentropy": "CategoricalCrossentropy",
        "categorical_focal_crossentropy": "CategoricalFocalCrossentropy",
        "binary_crossentropy": "BinaryCrossentropy",
        "binary_focal_crossentropy": "BinaryFocalCrossentropy",
    }
    name = classes.get(loss_name or "")
    if name is None:
        return f"a loss that has from_logits={from_logits}"
    return f"keras.losses.{name}(from_logits={from_logits})"
