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

from keras_rdrop.src.output_plan import describe_loss

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


def check_labels(plan, y: Any, y_pred: Any) -> None:
    """Raises a `ValueError` if a categorical loss gets the other kind of label.

    Args:
        plan: The step's plan (`output_plan.build_plan`), for each output's
            name and loss.
        y: The step's labels (any structure Keras accepts).
        y_pred: The predictions of one pass.
    """
    flat_pred = keras.tree.flatten(y_pred)
    labels = _labels_by_output(y, [e.name for e in plan], len(flat_pred))
    if labels is None:
        return
    for entry, label, pred in zip(plan, labels, flat_pred):
        label_shape, pred_shape = _shape(label), _shape(pred)
        if label_shape is None or pred_shape is None or not pred_shape:
            continue
        num_classes = pred_shape[-1]
        if num_classes in (None, 1) or not label_shape:
            continue
        loss_name = describe_loss(entry.loss).loss_name
        same_rank = len(label_shape) == len(pred_shape)
        from_logits = entry.from_logits
        logits = "" if from_logits is None else f"from_logits={from_logits}"
        if loss_name in _SPARSE and same_rank and label_shape[-1] not in (1, None):
            raise ValueError(
                f"Output {entry.name!r}: the compiled loss "
                f"{_loss_description(entry.loss)} takes integer class ids "
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
                f"Output {entry.name!r}: the compiled loss "
                f"{_loss_description(entry.loss)} takes one-hot labels of the "
                f"predictions' shape {pred_shape}, but the labels have shape "
                f"{label_shape}: they are integer class ids. Use "
                f"keras.losses.SparseCategoricalCrossentropy({logits}) for "
                "integer labels, or one-hot encode them "
                f"(`keras.utils.to_categorical(y, {num_classes})`)."
            )
