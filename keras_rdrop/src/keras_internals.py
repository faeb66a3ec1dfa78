"""The one door to private Keras: every access keras-rdrop cannot avoid.

keras-rdrop otherwise uses only public `keras` and `keras.ops`. Each access
below is one small function, and `tests/test_keras_internals.py` checks each
against the installed Keras, so a Keras release that moves one fails a named
test instead of silently changing behaviour.

- `get_keras_mask`, `set_keras_mask`: `keras.src.backend.common.masking`. The
  concatenated mode splits an output in two and must carry its Keras mask to
  each half; Keras exports no mask getter or setter.
- `flatten_layers`: `Layer._flatten_layers`. Every layer nested in any model
  (subclassed ones included), to find stochastic layers.
- `output_layer`: `KerasTensor._keras_history`. The layer that produced a
  functional model's output, to read its activation.
- `variable_layout`, `set_variable_layout`: `Variable._layout`. Lays the
  reference snapshot out like the weight it copies under
  `keras.distribution` (JAX); `add_weight` takes no layout.
- `loss_function_kwargs`: `LossFunctionWrapper._fn_kwargs`. The settings a
  Keras loss passes to its function; read only for a setting that the
  loss's `get_config()` leaves out (Keras 3.15's
  `SparseCategoricalCrossentropy` omits `axis`).
- `additional_losses`: `Trainer._aggregate_additional_loss`. The fused paths
  add `model.losses` to their task loss exactly as Keras' `compute_loss` does.
- `unscale_for_distribution`: `keras.src.losses.loss.
  unscale_loss_for_distribution`. A loss value logged as a metric under
  `tf.distribute` is multiplied back by the replica count, as Keras does for
  `loss`.
- `functional_graph`: `Functional._nodes_by_depth`, `_inputs_struct`,
  `_outputs_struct` and `Sequential._functional`; each node's `operation`,
  `is_input`, `input_tensors`, `outputs` and `arguments.kwargs`. The calls of
  a functional model's graph, to find the part that dropout cannot change
  (`shared_prefix`); Keras exports no graph walk.
"""

from __future__ import annotations

import dataclasses

import keras

try:  # Keras 3.15 and 3.16 (3.16 no longer re-exports them in `keras.src.backend`)
    from keras.src.backend.common.masking import get_keras_mask as _get_keras_mask
    from keras.src.backend.common.masking import set_keras_mask as _set_keras_mask
except ImportError:  # pragma: no cover - depends on the Keras version
    _get_keras_mask = _set_keras_mask = None
from keras.src.losses.loss import unscale_loss_for_distribution as _unscale
from keras.src.models.functional import Functional as _Functional


def get_keras_mask(x):
    """The Keras mask that `x` carries (`Embedding(mask_zero=True)`), or `None`."""
    if _get_keras_mask is None:  # pragma: no cover
        return getattr(x, "_keras_mask", None)
    return _get_keras_mask(x)


def set_keras_mask(x, mask) -> None:
    """Attaches `mask` to `x` as its Keras mask, as Keras' layers do."""
    if _set_keras_mask is None:  # pragma: no cover
        x._keras_mask = mask
        return
    _set_keras_mask(x, mask)


def flatten_layers(model: keras.layers.Layer) -> list:
    """`model` and every layer nested in it, at any depth."""
    return list(model._flatten_layers(include_self=True))


def output_layer(tensor):
    """The layer whose call produced the symbolic `tensor`, or `None`."""
    history = getattr(tensor, "_keras_history", None)
    return getattr(history, "operation", None)


def variable_layout(variable):
    """The `keras.distribution` layout `variable` was created with, or `None`."""
    return getattr(variable, "_layout", None)


def set_variable_layout(variable, layout) -> None:
    """Gives `variable` a new layout; its value is re-distributed on assign."""
    variable._layout = layout
    variable.assign(variable.value)


def loss_function_kwargs(loss) -> dict:
    """The keyword arguments a `LossFunctionWrapper` passes to its function."""
    kwargs = getattr(loss, "_fn_kwargs", None)
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def additional_losses(model: keras.Model) -> list:
    """Each of `model.losses`, summed and cast as Keras' `compute_loss` adds it."""
    return [model._aggregate_additional_loss(loss) for loss in model.losses]


def unscale_for_distribution(value):
    """`value` times the `tf.distribute` replica count (1 elsewhere)."""
    return _unscale(value)


@dataclasses.dataclass(frozen=True)
class GraphCall:
    """One call in a functional model's graph: a layer (or operation) called
    on symbolic tensors.

    Attributes:
        operation: The layer or operation called.
        inputs: The symbolic tensors it was called on, flat.
        outputs: The symbolic tensors it returned, flat.
        kwargs: The keyword arguments of the call (`training=False`, ...).
    """

    operation: object
    inputs: tuple
    outputs: tuple
    kwargs: dict


@dataclasses.dataclass(frozen=True)
class FunctionalGraph:
    """A functional model's inputs and outputs (as structured when it was
    built) and its calls, each after the calls it depends on."""

    inputs: object
    outputs: object
    calls: tuple


def functional_graph(model: keras.Model) -> FunctionalGraph | None:
    """The graph that `model.call` runs, or `None` if `model` runs Python code.

    A functional model (a keras-hub task included) and a `Sequential` model
    with an `Input` have one; a subclassed model, or a functional one whose
    class overrides `call`, has none.
    """
    if isinstance(model, keras.Sequential):
        if type(model).call is not keras.Sequential.call:
            return None
        graph = getattr(model, "_functional", None)
    else:
        graph = model
    nodes_by_depth = getattr(graph, "_nodes_by_depth", None)
    if graph is None or nodes_by_depth is None:
        return None
    if not isinstance(graph, _Functional) or type(graph).call is not _Functional.call:
        return None
    calls = []
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            calls.append(
                GraphCall(
                    operation=node.operation,
                    inputs=tuple(node.input_tensors),
                    outputs=tuple(node.outputs),
                    kwargs=dict(node.arguments.kwargs),
                )
            )
    return FunctionalGraph(graph._inputs_struct, graph._outputs_struct, tuple(calls))
