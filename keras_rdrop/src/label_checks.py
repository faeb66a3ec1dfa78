"""Labels that do not fit the compiled loss: one-hot for a sparse loss and back.

`SparseCategoricalCrossentropy` takes integer class ids (the predictions'
shape without the class axis, or with a class axis of 1);
`CategoricalCrossentropy` (and its focal form) takes one-hot labels of the
predictions' shape. Given the other kind, Keras fails deep inside the loss
with two shapes and no advice, or (a column of class ids against a
categorical loss) may broadcast. `check_labels` compares the static shapes at
the first training step, so it works when the step is traced.
"""

from __future__ import annotations

from typing import Any

import keras

from keras_rdrop.src.output_plan import (
    describe_loss,
    flatten_like_outputs,
    output_names_of,
)
from keras_rdrop.src.prediction_checks import values_readable

_SPARSE = ("sparse_categorical_crossentropy",)
_DENSE = ("categorical_crossentropy", "categorical_focal_crossentropy")


def _labels_by_output(y: Any, names: list[str], num_outputs: int) -> list | None:
    """`y` as one entry per output, or `None` if it cannot be aligned."""
    if isinstance(y, dict):
        return [y.get(name) for name in names]
    if isinstance(y, (list, tuple)):
        return list(y) if len(y) == num_outputs else None
    return [y] if num_outputs == 1 else None


def _shape(x) -> tuple | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def _loss_description(loss: Any) -> str:
    return repr(loss) if isinstance(loss, str) else type(loss).__name__


class LabelCheck:
    """`check_labels` once per loss and shapes (eager steps repeat nothing).

    A traced step (and Keras' symbolic build at the start of `fit`, which
    computes the loss on symbolic tensors) checks afresh and leaves the memo
    alone, as `output_plan.PlanCache` does.
    """

    def __init__(self):
        self._checked = None

    def __call__(self, loss, y, y_pred, output_names) -> None:
        flat_pred = keras.tree.flatten(y_pred)
        if not flat_pred:
            return
        traced = not values_readable(flat_pred[0])
        key = None
        if not traced:
            shapes = [_shape(t) for t in keras.tree.flatten(y) + flat_pred]
            key = (id(loss), str(shapes))
            if key == self._checked:
                return
        check_labels(loss, y, y_pred, output_names)
        if not traced:
            self._checked = key


def check_labels(loss: Any, y: Any, y_pred: Any, output_names=None) -> None:
    """Raises a `ValueError` if a categorical loss gets the other kind of label.

    Args:
        loss: The compiled loss (`model.loss`): one loss, a list or a dict.
        y: The step's labels (any structure Keras accepts).
        y_pred: The predictions of one pass.
        output_names: The inner model's `output_names`, or `None`.
    """
    flat_pred = keras.tree.flatten(y_pred)
    names = output_names_of(y_pred, output_names)
    try:
        losses = flatten_like_outputs(loss, names, "loss")
    except ValueError:
        return  # A loss structure Keras itself reports.
    labels = _labels_by_output(y, names, len(flat_pred))
    if labels is None:
        return
    for name, loss_i, label, pred in zip(names, losses, labels, flat_pred):
        label_shape, pred_shape = _shape(label), _shape(pred)
        if label_shape is None or pred_shape is None or not pred_shape:
            continue
        num_classes = pred_shape[-1]
        if num_classes in (None, 1) or not label_shape:
            continue
        kind = describe_loss(loss_i)
        loss_name = kind.loss_name
        same_rank = len(label_shape) == len(pred_shape)
        from_logits = kind.from_logits
        logits = "" if from_logits is None else f"from_logits={from_logits}"
        if loss_name in _SPARSE and same_rank and label_shape[-1] not in (1, None):
            raise ValueError(
                f"Output {name!r}: the compiled loss "
                f"{_loss_description(loss_i)} takes integer class ids "
                f"(labels of shape {pred_shape[:-1]}), but the labels have shape "
                f"{label_shape} for predictions of shape {pred_shape}: they are "
                "one-hot (or soft) labels. Use "
                f"keras.losses.CategoricalCrossentropy({logits}) for one-hot "
                "labels, or pass integer class ids (`np.argmax(y, axis=-1)`) "
                "with the sparse loss."
            )
        integer_ids = len(label_shape) == len(pred_shape) - 1 or (
            same_rank and label_shape[-1] == 1
        )
        if loss_name in _DENSE and integer_ids:
            raise ValueError(
                f"Output {name!r}: the compiled loss "
                f"{_loss_description(loss_i)} takes one-hot labels of the "
                f"predictions' shape {pred_shape}, but the labels have shape "
                f"{label_shape}: they are integer class ids. Use "
                f"keras.losses.SparseCategoricalCrossentropy({logits}) for "
                "integer labels, or one-hot encode them "
                f"(`keras.utils.to_categorical(y, {num_classes})`)."
            )
