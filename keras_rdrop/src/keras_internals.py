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
"""

from __future__ import annotations

import keras

try:  # Keras 3.15 and 3.16 (3.16 no longer re-exports them in `keras.src.backend`)
    from keras.src.backend.common.masking import get_keras_mask as _get_keras_mask
    from keras.src.backend.common.masking import set_keras_mask as _set_keras_mask
except ImportError:  # pragma: no cover - depends on the Keras version
    _get_keras_mask = _set_keras_mask = None
from keras.src.losses.loss import unscale_loss_for_distribution as _unscale


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
