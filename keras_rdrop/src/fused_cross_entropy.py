"""Both passes' sparse cross-entropy and their symmetric KL, in one chunked pass.

A language model's R-Drop step evaluates, on logits of shape
`(batch, length, vocabulary)`, three things: the cross-entropy of each pass
and the symmetric KL between them. Each backend's cross-entropy keeps a
logits-sized tensor per pass for its backward pass (the log-probabilities on
torch, the softmax gradient on TensorFlow, a one-hot target on JAX).
`cross_entropy_and_symmetric_kl` computes all three per position, chunk by
chunk, with a closed-form gradient, so that besides the logits and their
gradients nothing of the logits' size is created.

`FusedLanguageModelLoss` is RDropModel's language-model loss path: it
applies when the compiled loss is a single Keras
`SparseCategoricalCrossentropy(from_logits=True)`, and reduces the
per-position values with Keras' own loss reduction (sample weights, masks,
`ignore_class`, `reduction`), so the loss is the one Keras would compute.
See `fused_step.fusable_step` and `FusedLanguageModelLoss.applies` for the exact
conditions.
"""

from __future__ import annotations

from keras import ops

from keras_rdrop.src.chunked_gradients import chunked_op
from keras_rdrop.src.closed_forms import log_softmax32, two_pass_grads, two_pass_values
from keras_rdrop.src.divergences import as_float
from keras_rdrop.src.fused_step import fusable_step, reduce_two_passes, task_labels
from keras_rdrop.src.prediction_checks import check_values
from keras_rdrop.src.step_inputs import StepInputs


def cross_entropy_and_symmetric_kl(a, b, labels, chunked: bool = True):
    """Per position: `CE(labels, a)`, `CE(labels, b)` and `SKL(a, b)`.

    Args:
        a: Logits of the first pass, class axis last, any float dtype.
        b: Logits of the second pass, the same shape.
        labels: int32 class ids, the shape of `a` without its last axis. They
            must be valid class ids (map an `ignore_class` to 0 first).
        chunked: Whether to compute it by chunks (`chunked_gradients.chunks`)
            or on the whole tensors at once. Defaults to `True`.

    Returns:
        A float32 tensor of shape `(3,) + a.shape[:-1]`: the sparse
        cross-entropy of each pass (`-log softmax(x)[label]`) and the
        symmetric KL `(KL(p||q) + KL(q||p)) / 2` between them. Its gradient
        with respect to `a` and `b` is computed in closed form, chunk by
        chunk; `labels` get none.

    Example:

    >>> import numpy as np
    >>> a = np.array([[2.0, 0.5, -1.0]], "float32")
    >>> b = np.array([[1.0, 1.0, 0.0]], "float32")
    >>> out = cross_entropy_and_symmetric_kl(a, b, np.array([0], "int32"))
    >>> tuple(out.shape)
    (3, 1)
    """
    a = as_float(a, "a")
    b = as_float(b, "b")
    num_classes = a.shape[-1]

    def forward(live, constants):
        (labels,) = constants
        log_p, log_q = (log_softmax32(x) for x in live)
        return ops.stack(two_pass_values(log_p, log_q, labels)), labels

    def backward(live, labels, upstream):
        log_p, log_q = (log_softmax32(x) for x in live)
        p, q = ops.exp(log_p), ops.exp(log_q)
        one_hot = ops.one_hot(labels, num_classes, dtype="float32")
        ups = (ops.expand_dims(upstream[i], -1) for i in range(3))
        return two_pass_grads(log_p, log_q, p, q, one_hot, *ups)

    def out_axis(chunk_axis):
        return chunk_axis + 1  # the value has a leading axis of 3

    return chunked_op(
        (a, b),
        forward,
        backward,
        axis=len(a.shape) - 1,
        out_axis=out_axis,
        constants=(labels,),
        chunked=chunked,
    )


class FusedLanguageModelLoss:
    """The language-model path: both task losses and the KL in one chunked pass.

    `applies` says whether the path can compute a step's loss: one output,
    R-Drop on for it, the compiled loss exactly
    `SparseCategoricalCrossentropy(from_logits=True)` (`fusable_loss`), a
    float `loss_weights` or none, and sparse labels of the right shape.
    `compute` returns the same values as the general path (Keras'
    cross-entropy of each pass plus the chunked KL), reduced by Keras' own
    loss reduction, without the general path's logits-sized intermediates.
    """

    def applies(self, step: StepInputs) -> bool:
        """Whether this path computes the step; see the class docstring."""
        if step.y_pred_2 is None or not fusable_step(step):
            return False
        (entry,) = step.plan
        return entry.alpha != 0

    def compute(self, step: StepInputs):
        """`(task_loss, kl)` for the step (`applies` returned True for it).

        `kl` is the unweighted symmetric KL between the passes, weighted per
        position by `step.consistency_weight` (rows whose label is
        `ignore_class` get the KL too).
        """
        check_values(step.y_pred_1, True, "categorical", -1, "y_pred")
        labels, valid = task_labels(step.loss, step.y, step.y_pred_1)
        values = cross_entropy_and_symmetric_kl(
            step.y_pred_1, step.y_pred_2, labels, chunked=step.chunked
        )
        return reduce_two_passes(step, values, valid)


# It holds no state: one instance serves every step.
FUSED_LANGUAGE_MODEL = FusedLanguageModelLoss()
