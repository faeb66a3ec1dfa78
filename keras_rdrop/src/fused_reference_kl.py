"""The anchor's KL to the reference and the task cross-entropy, in one chunked pass.

With `ReferenceKLRegularizer`, a language model's step evaluates on logits of
shape `(batch, length, vocabulary)` the task cross-entropy of the live pass
and the KL between the live pass and the reference's (constant) outputs. The
general path runs Keras' cross-entropy, which keeps a logits-sized tensor for
its backward pass, then the chunked KL, whose gradient is added to the
cross-entropy's as a second logits-sized tensor.
`cross_entropy_and_reference_kl` computes both per position, chunk by chunk,
with one closed-form gradient for the live logits and none for the
reference's; with R-Drop on, the same pass also gives the second pass's
cross-entropy and the symmetric KL between the passes.

`FusedAnchorLoss` is the anchor's language-model path: it applies under the
conditions of `FusedLanguageModelLoss` (`fused_step.fusable_step`)
and reduces the per-position values with Keras' own loss reduction, so the
losses are those of the general path.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_rdrop.src.chunked_gradients import chunked_op
from keras_rdrop.src.closed_forms import (
    check_kind,
    constant_kl_grad,
    cross_entropy,
    cross_entropy_grad,
    kl_value,
    log_softmax32,
    two_pass_grads,
    two_pass_values,
)
from keras_rdrop.src.divergences import as_float
from keras_rdrop.src.fused_step import (
    fusable_step,
    reduce_two_passes,
    reduced_consistency,
    reduced_cross_entropy,
    task_labels,
    with_additional_losses,
)
from keras_rdrop.src.logsumexp_reference_kl import reference_kl_from_logsumexp
from keras_rdrop.src.prediction_checks import check_values
from keras_rdrop.src.step_inputs import StepInputs


def cross_entropy_and_reference_kl(
    live, reference, labels, kind: str = "kl", chunked: bool = True
):
    """Per position: the live passes' cross-entropies and their KLs.

    Args:
        live: Logits of the live pass, or a tuple of the logits of R-Drop's
            two passes; class axis last, any float dtype.
        reference: The reference's logits, the same shape. Constant: no
            gradient is computed for them.
        labels: int32 class ids, the shape of the logits without their last
            axis. They must be valid class ids (map an `ignore_class` to 0).
        kind: The KL to the reference: `"kl"` (KL(live || reference)),
            `"reverse_kl"` (KL(reference || live)) or `"symmetric_kl"`
            (their mean).
        chunked: Whether to compute it by chunks (`chunked_gradients.chunks`)
            or on the whole tensors at once. Defaults to `True`. One live
            pass on whole tensors takes the formulation of
            `logsumexp_reference_kl`, which costs fewer passes under XLA.

    Returns:
        A float32 tensor of shape `(n,) + logits.shape[:-1]`. With one pass,
        `n = 2`: its sparse cross-entropy (`-log softmax(x)[label]`) and its
        KL to the reference. With two, `n = 4`: the cross-entropy of each
        pass, their symmetric KL, and the KL of the first pass to the
        reference. Its gradient with respect to the live logits is computed
        in closed form, chunk by chunk.

    Example:

    >>> import numpy as np
    >>> a = np.array([[2.0, 0.5, -1.0]], "float32")
    >>> ref = np.array([[1.0, 1.0, 0.0]], "float32")
    >>> out = cross_entropy_and_reference_kl(a, ref, np.array([0], "int32"))
    >>> tuple(out.shape)
    (2, 1)
    """
    check_kind(kind)
    passes = tuple(live) if isinstance(live, (tuple, list)) else (live,)
    if len(passes) not in (1, 2):
        raise ValueError(
            "`live` should be one tensor of logits or a tuple of two. Received: "
            f"{len(passes)} tensors"
        )
    passes = tuple(as_float(x, "live") for x in passes)
    reference = as_float(reference, "reference")
    if len(passes) == 2:
        return _two_passes(passes, reference, labels, kind, chunked)
    if chunked:
        return _one_pass(passes[0], reference, labels, kind)
    return reference_kl_from_logsumexp(passes[0], reference, labels, kind)


def _weigh(upstream, term):
    """`term` times the per-position `upstream`, broadcast over the classes."""
    return ops.expand_dims(upstream, -1) * term


def _one_pass(x, reference, labels, kind: str):
    """`cross_entropy_and_reference_kl` of one live pass, by chunks."""
    num_classes = x.shape[-1]

    def forward(live, constants):
        ref, labels = constants
        log_p, log_r = log_softmax32(live[0]), log_softmax32(ref)
        value = ops.stack([cross_entropy(log_p, labels), kl_value(log_p, log_r, kind)])
        # Kept for the backward pass in place of the reference's logits: the
        # two gradient terms (as TensorFlow's cross-entropy keeps its
        # gradient), so that the backward pass only weighs them.
        p = ops.exp(log_p)
        one_hot = ops.one_hot(labels, num_classes, dtype="float32")
        terms = (
            cross_entropy_grad(p, one_hot),
            constant_kl_grad(log_p, log_r, p, kind),
        )
        return value, terms

    def backward(_, terms, upstream):
        ce_term, kl_term = terms
        return (_weigh(upstream[0], ce_term) + _weigh(upstream[1], kl_term),)

    return chunked_op(
        (x,),
        forward,
        backward,
        axis=len(x.shape) - 1,
        out_axis=lambda chunk_axis: chunk_axis + 1,
        constants=(reference, labels),
        backward_reads_live=False,
    )


def _two_passes(passes, reference, labels, kind: str, chunked: bool):
    """`cross_entropy_and_reference_kl` of R-Drop's two passes."""
    num_classes = passes[0].shape[-1]

    def forward(live, constants):
        ref, labels = constants
        log_p, log_q = (log_softmax32(x) for x in live)
        log_r = log_softmax32(ref)
        values = two_pass_values(log_p, log_q, labels)
        values.append(kl_value(log_p, log_r, kind))
        # Kept in place of the reference's logits: its log-probabilities
        # (the passes' are recomputed).
        return ops.stack(values), (log_r, labels)

    def backward(live, saved, upstream):
        log_r, labels = saved
        log_p, log_q = (log_softmax32(x) for x in live)
        p, q = ops.exp(log_p), ops.exp(log_q)
        one_hot = ops.one_hot(labels, num_classes, dtype="float32")
        ups = (ops.expand_dims(upstream[i], -1) for i in range(3))
        grad_a, grad_b = two_pass_grads(log_p, log_q, p, q, one_hot, *ups)
        grad_a = grad_a + _weigh(upstream[3], constant_kl_grad(log_p, log_r, p, kind))
        return grad_a, grad_b

    return chunked_op(
        passes,
        forward,
        backward,
        axis=len(passes[0].shape) - 1,
        out_axis=lambda chunk_axis: chunk_axis + 1,
        constants=(reference, labels),
        chunked=chunked,
    )


def chunked_for(model: keras.Model) -> bool:
    """Whether the fused passes of `model`'s training step run by chunks.

    Both fused language-model passes (R-Drop's and the anchor's) follow it.
    Not on TensorFlow with XLA (`jit_compile=True`): there XLA fuses the
    whole-tensor pass into fewer operations and buffers than the chunked
    one. On lm50k (benchmarks/bench.py, CPU), the anchor's step took 607.8 MB
    of XLA temp whole against 985.4 MB chunked (one logits tensor: 196.3 MB),
    at the same CPU time; R-Drop's step also took less XLA temp, fewer
    FLOPs and less time whole than chunked
    (benchmarks/results/lm50k-rdrop-tensorflow.md).
    Everywhere else (JAX, torch, TensorFlow without XLA) chunks bound the
    pass's temporaries: on JAX the chunked pass is also the faster one.
    """
    return not (
        keras.backend.backend() == "tensorflow"
        and getattr(model, "jit_compile", False) is True
    )


class FusedAnchorLoss:
    """The anchor's language-model path: task loss and reference KL in one pass.

    `applies` says whether the path can compute a step's loss: the
    conditions of `FusedLanguageModelLoss` (one output, the compiled loss
    exactly `SparseCategoricalCrossentropy(from_logits=True)`, a float
    `loss_weights` or none, sparse labels), with R-Drop off, or on for that
    output (then both passes' cross-entropies and their symmetric KL come
    from the same chunked pass). `compute` returns the values of the general
    path, reduced by Keras' own loss reduction.
    """

    def applies(self, step: StepInputs) -> bool:
        """Whether this path computes the step; see the class docstring."""
        if not fusable_step(step):
            return False
        (entry,) = step.plan
        y_pred_2 = step.y_pred_2
        return y_pred_2 is None or (entry.alpha != 0 and hasattr(y_pred_2, "shape"))

    def compute(self, step: StepInputs, reference, kind: str):
        """`(task_loss, rdrop_kl, reference_kl)` for the step.

        Args:
            step: The step's inputs (`applies` returned True for them).
            reference: The reference's logits on the same inputs, constant.
            kind: The KL to the reference (`"kl"`, `"reverse_kl"` or
                `"symmetric_kl"`).

        Returns:
            The task loss (averaged over both passes with R-Drop, plus
            `model.losses`), R-Drop's unweighted symmetric KL (`None`
            without a second pass), and the KL to the reference, reduced as
            `PairwiseTerm(kind)` reduces it.
        """
        y_pred = step.y_pred_1
        check_values(y_pred, True, "categorical", -1, "y_pred")
        labels, valid = task_labels(step.loss, step.y, y_pred)
        live = y_pred if step.y_pred_2 is None else (y_pred, step.y_pred_2)
        values = cross_entropy_and_reference_kl(
            live, reference, labels, kind, chunked=step.chunked
        )
        kl = reduced_consistency(
            kind, values[-1], y_pred, reference, step.consistency_weight
        )
        if step.y_pred_2 is None:
            task_loss = reduced_cross_entropy(
                step.loss,
                step.loss_weights,
                step.y,
                values[0],
                y_pred,
                valid,
                step.sample_weight,
            )
            task_loss = with_additional_losses(task_loss, step.additional_losses)
            return task_loss, None, kl
        task_loss, rdrop_kl = reduce_two_passes(step, values, valid)
        return task_loss, rdrop_kl, kl


# It holds no state: one instance serves every step.
FUSED_ANCHOR = FusedAnchorLoss()
