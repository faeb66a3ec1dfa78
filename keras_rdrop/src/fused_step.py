"""What the fused loss paths share: when a step can be fused, and its reductions.

The fused paths (`fused_cross_entropy`, R-Drop's; `fused_reference_kl`, the
anchor's) compute per-position values of a language model's sparse
cross-entropy and KLs in one chunked pass. This module says when a step's
task loss can be computed that way (`fusable_step`: the compiled loss exactly
`SparseCategoricalCrossentropy(from_logits=True)`, and more) and reduces the
per-position values with Keras' own loss reduction (sample weights, masks,
`ignore_class`, `reduction`), so that the losses are those of the general
path.
"""

from __future__ import annotations

import numbers

import keras
from keras import ops

from keras_rdrop.src.consistency_terms import (
    PairwiseTerm,
    copy_sample_weight,
    position_weights,
)
from keras_rdrop.src.keras_internals import get_keras_mask, set_keras_mask
from keras_rdrop.src.output_plan import loss_config, loss_setting
from keras_rdrop.src.step_inputs import StepInputs


def fusable_loss(loss, y_pred) -> bool:
    """Whether `loss` on `y_pred` can be computed by the fused pass.

    That is: `loss` is exactly `keras.losses.SparseCategoricalCrossentropy`
    with `from_logits=True`, class axis last, dtype float32, and `y_pred` is
    one tensor of static class size above 1. Anything else (subclasses,
    probabilities, several outputs) goes through Keras' own loss.
    """
    if type(loss) is not keras.losses.SparseCategoricalCrossentropy:
        return False
    if loss_setting(loss, "from_logits") is not True or loss.dtype != "float32":
        return False
    if loss_setting(loss, "label_smoothing", 0.0):
        return False
    if not hasattr(y_pred, "shape") or len(y_pred.shape) < 2:
        return False
    axis = loss_setting(loss, "axis", -1)
    if axis not in (-1, len(y_pred.shape) - 1):
        return False
    num_classes = y_pred.shape[-1]
    return num_classes is not None and num_classes > 1


class ReducedLike(keras.losses.Loss):
    """Reduces precomputed per-position loss values as `loss` would.

    Calling it with `(y_true, values, sample_weight)` applies Keras' own
    masking and reduction (`keras.losses.Loss.__call__`) with the reduction,
    dtype and name of `loss`; `values` carries the mask to apply as its Keras
    mask.
    """

    def __init__(self, loss: keras.losses.Loss):
        config = loss_config(loss)
        super().__init__(
            name=config.get("name", loss.name),
            reduction=loss_setting(loss, "reduction", "sum_over_batch_size"),
            dtype=loss.dtype,
        )

    def call(self, y_true, y_pred):
        return y_pred


def sparse_labels(y_true, y_pred):
    """`y_true` as int32 labels of shape `y_pred.shape[:-1]`, as Keras reads them.

    Returns `None` if the shapes do not fit (Keras' loss then reports it).
    """
    y_true = ops.convert_to_tensor(y_true)
    rank = len(y_pred.shape)
    if len(y_true.shape) == rank and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    if len(y_true.shape) != rank - 1:
        return None
    # Keras' loss reads labels through its float32 dtype; vocabulary ids
    # below 2**24 are exact either way.
    return ops.cast(y_true, "int32")


def fusable_step(step: StepInputs) -> bool:
    """Whether one step's task loss can be computed by a fused pass.

    The conditions every fused path shares: one output, whose consistency
    term is a categorical KL of logits, the compiled loss exactly
    `SparseCategoricalCrossentropy(from_logits=True)` (`fusable_loss`), a
    float `loss_weights` or none, and sparse labels of the right shape.
    """
    y, y_pred, loss_weights = step.y, step.y_pred_1, step.loss_weights
    nested = keras.tree.is_nested
    if nested(y_pred) or nested(y) or nested(step.sample_weight):
        return False
    if isinstance(loss_weights, bool) or not (
        loss_weights is None or isinstance(loss_weights, numbers.Real)
    ):
        return False
    if not fusable_loss(step.loss, y_pred):
        return False
    (entry,) = step.plan
    term = entry.term
    if term is None or term.kind != "distribution":
        return False
    if term.from_logits is not True or term.distribution != "auto":
        return False
    return sparse_labels(y, y_pred) is not None


def task_labels(loss, y, y_pred):
    """`(labels, valid)`: valid class ids for the fused pass, and which count.

    `valid` is `None` without an `ignore_class`; with one, its positions are
    `False` and their labels are mapped to 0.
    """
    labels = sparse_labels(y, y_pred)
    ignore_class = loss_setting(loss, "ignore_class")
    valid = None
    if ignore_class is not None:
        valid = ops.not_equal(labels, ignore_class)
        labels = ops.where(valid, labels, ops.zeros_like(labels))
    return labels, valid


def reduced_cross_entropy(loss, loss_weights, y, values, y_pred, valid, sample_weight):
    """Per-position cross-entropy `values` of `y_pred`, reduced as Keras does.

    Applies the Keras mask of `y_pred`, the `ignore_class` positions
    (`valid`), `sample_weight`, the reduction of `loss` and `loss_weights`,
    as Keras' compiled loss does for one output.
    """
    mask = get_keras_mask(y_pred)
    if valid is not None:
        values = ops.where(valid, values, ops.zeros_like(values))
        mask = valid if mask is None else ops.logical_and(mask, valid)
    if mask is not None:
        set_keras_mask(values, mask)
    value = ops.cast(
        ReducedLike(loss)(y, values, copy_sample_weight(sample_weight)),
        keras.backend.floatx(),
    )
    if loss_weights is not None:
        value = ops.multiply(value, loss_weights)
    return value


def reduced_consistency(kind, values, a, b, sample_weight):
    """Per-position KL `values` of `kind` between `a` and `b`, reduced.

    As `PairwiseTerm(kind)(a, b, sample_weight=...)` reduces them on the
    general path: the Keras mask of `b`, the weights of `position_weights`.
    """
    mask = get_keras_mask(b)
    if mask is not None:
        set_keras_mask(values, mask)
    weights = position_weights(copy_sample_weight(sample_weight), a)
    return ReducedLike(PairwiseTerm(kind))(a, values, weights)


def with_additional_losses(task_loss, losses):
    """`task_loss` plus each summed `model.losses` entry
    (`keras_internals.additional_losses`), as `compute_loss` adds them."""
    for extra in losses:
        task_loss = task_loss + extra
    return task_loss


def reduce_two_passes(step: StepInputs, values, valid):
    """R-Drop's `(task_loss, kl)` from fused per-position values.

    Args:
        step: The step's inputs.
        values: `values[0]`, `values[1]`: the cross-entropy of each pass;
            `values[2]`: their symmetric KL.
        valid: The positions that count (`task_labels`), or `None`.
    """
    task_losses = [
        reduced_cross_entropy(
            step.loss,
            step.loss_weights,
            step.y,
            values[i],
            y_pred,
            valid,
            step.sample_weight,
        )
        for i, y_pred in enumerate((step.y_pred_1, step.y_pred_2))
    ]
    task_loss = with_additional_losses(
        0.5 * (task_losses[0] + task_losses[1]), step.additional_losses
    )
    # The KL is reduced as `PairwiseTerm` reduces it on the general path.
    kl = reduced_consistency(
        "symmetric_kl",
        values[2],
        step.y_pred_1,
        step.y_pred_2,
        step.consistency_weight,
    )
    return task_loss, kl
