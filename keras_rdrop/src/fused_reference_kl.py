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
conditions of `FusedLanguageModelLoss` (`fused_cross_entropy.fusable_step`)
and reduces the per-position values with Keras' own loss reduction, so the
losses are those of the general path.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_rdrop.src.chunked_gradients import (
    chunks,
    kl_of_log_probs,
    kl_of_logits_grad_terms,
    upstream_of,
)
from keras_rdrop.src.divergences import as_float
from keras_rdrop.src.fused_cross_entropy import (
    fusable_step,
    reduce_two_passes,
    reduced_consistency,
    reduced_cross_entropy,
    task_labels,
    with_additional_losses,
)
from keras_rdrop.src.prediction_checks import check_values
from keras_rdrop.src.step_inputs import StepInputs
from keras_rdrop.src.whole_reference_kl import (
    KINDS,
    cross_entropy_and_reference_kl_whole,
)


def _reference_kl(log_p, log_r, kind: str):
    """KL of `kind` between the live `log_p` and the reference's `log_r`."""
    if kind == "reverse_kl":
        return kl_of_log_probs(log_r, log_p, -1, symmetric=False)
    return kl_of_log_probs(log_p, log_r, -1, symmetric=kind == "symmetric_kl")


def _reference_kl_grad(log_p, log_r, p, kind: str):
    """dKL/d(live logits) per unit, for the KL of `kind` (`_reference_kl`)."""
    if kind == "kl":
        term, _ = kl_of_logits_grad_terms(log_p, log_r, p, None, -1, False, "b")
        return term
    r = ops.exp(log_r)
    if kind == "reverse_kl":
        # KL(r||p): the reference is the first argument, and the constant.
        _, term = kl_of_logits_grad_terms(log_r, log_p, r, p, -1, False, "a")
        return term
    term, _ = kl_of_logits_grad_terms(log_p, log_r, p, r, -1, True, "b")
    return term


def _pieces(x, axis: int, split):
    """`x` cut along `axis` as `split` (from `chunked_gradients.chunks`) says."""
    if split is None:
        return [x]
    lead = (slice(None),) * axis
    return [x[lead + (slice(start, stop),)] for start, stop in split[1]]


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
            `whole_reference_kl`, which costs fewer passes under XLA.

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
    if kind not in KINDS:
        raise ValueError(f"`kind` should be one of {KINDS}. Received: kind={kind!r}")
    passes = tuple(live) if isinstance(live, (tuple, list)) else (live,)
    if len(passes) not in (1, 2):
        raise ValueError(
            "`live` should be one tensor of logits or a tuple of two. Received: "
            f"{len(passes)} tensors"
        )
    passes = tuple(as_float(x, "live") for x in passes)
    reference = as_float(reference, "reference")
    if not chunked and len(passes) == 1:
        return cross_entropy_and_reference_kl_whole(passes[0], reference, labels, kind)
    axis = len(passes[0].shape) - 1
    num_classes = passes[0].shape[-1]
    split = chunks(tuple(passes[0].shape), axis) if chunked else None
    chunk_axis = 0 if split is None else split[0]
    count = 2 if len(passes) == 1 else 4

    def log_softmax(x):
        return ops.log_softmax(ops.cast(x, "float32"), axis=-1)

    def value_chunk(log_ps, log_r, labels):
        index = ops.expand_dims(labels, -1)
        out = [-ops.take_along_axis(lp, index, axis=-1)[..., 0] for lp in log_ps]
        if len(log_ps) == 2:
            out.append(kl_of_log_probs(log_ps[0], log_ps[1], -1, symmetric=True))
        out.append(_reference_kl(log_ps[0], log_r, kind))
        return ops.stack(out)

    def unit_grads(log_ps, log_r, labels):
        """Per pass, `(output index, d output / d logits)` pairs."""
        ps = [ops.exp(lp) for lp in log_ps]
        one_hot = ops.one_hot(labels, num_classes, dtype="float32")
        # dCE/dx = softmax(x) - one_hot(label).
        units = [[(i, p - one_hot)] for i, p in enumerate(ps)]
        if len(log_ps) == 2:
            kl_a, kl_b = kl_of_logits_grad_terms(
                log_ps[0], log_ps[1], ps[0], ps[1], -1, symmetric=True
            )
            units[0].append((2, kl_a))
            units[1].append((2, kl_b))
        ref_term = _reference_kl_grad(log_ps[0], log_r, ps[0], kind)
        units[0].append((count - 1, ref_term))
        return units

    def grads_chunk(units, upstream):
        grads = []
        for pass_units, x in zip(units, passes):
            grad = None
            for i, term in pass_units:
                term = ops.expand_dims(upstream[i], -1) * term
                grad = term if grad is None else grad + term
            grads.append(ops.cast(grad, x.dtype))
        return grads

    def live_chunks(xs):
        return list(zip(*(_pieces(x, chunk_axis, split) for x in xs)))

    # On torch the backward function keeps `op`, and so what it closes over,
    # until the backward pass: the reference's logits are handed over and
    # dropped in the forward pass, which torch runs once (JAX may trace it
    # more than once).
    constant = {"reference": reference}
    drop = keras.backend.backend() == "torch"
    del reference

    @ops.custom_gradient
    def op(*xs):
        label_chunks = _pieces(labels, chunk_axis, split)
        ref = constant.pop("reference") if drop else constant["reference"]
        ref_chunks = _pieces(ref, chunk_axis, split)
        del ref
        values, kept = [], []
        for x_chunks, ref, chunk_labels in zip(
            live_chunks(xs), ref_chunks, label_chunks
        ):
            log_ps = [log_softmax(x) for x in x_chunks]
            log_r = log_softmax(ref)
            values.append(value_chunk(log_ps, log_r, chunk_labels))
            # Kept for the backward pass in place of the reference's logits:
            # with one pass, the two gradient terms (as TensorFlow's
            # cross-entropy keeps its gradient), so that the backward pass
            # only weighs them; with two, the reference's log-probabilities
            # (the passes' are recomputed).
            if len(xs) == 1:
                kept.append(unit_grads(log_ps, log_r, chunk_labels))
            else:
                kept.append(log_r)
        del ref_chunks
        value = (
            values[0] if len(values) == 1 else ops.concatenate(values, 1 + chunk_axis)
        )

        def grad(*args, upstream=None):
            upstream = upstream_of(args, upstream)
            up_chunks = _pieces(upstream, 1 + chunk_axis, split)
            recomputed = live_chunks(xs) if len(xs) == 2 else [None] * len(kept)
            per_chunk = []
            for kept_chunk, x_chunks, chunk_labels, up in zip(
                kept, recomputed, label_chunks, up_chunks
            ):
                units = kept_chunk  # one pass: the gradient terms
                if x_chunks is not None:  # two: the reference's log-probabilities
                    log_ps = [log_softmax(x) for x in x_chunks]
                    units = unit_grads(log_ps, kept_chunk, chunk_labels)
                per_chunk.append(grads_chunk(units, up))
            del recomputed, up_chunks
            grads = []
            for i in range(len(xs)):
                pieces = [chunk[i] for chunk in per_chunk]
                for chunk in per_chunk:  # free each pass's pieces once joined
                    chunk[i] = None
                grads.append(
                    pieces[0]
                    if len(pieces) == 1
                    else ops.concatenate(pieces, axis=chunk_axis)
                )
                del pieces
            return tuple(grads)

        return value, grad

    return op(*passes)


def chunked_for(model: keras.Model) -> bool:
    """Whether the fused anchor pass of `model`'s training step runs by chunks.

    Not on TensorFlow with XLA (`jit_compile=True`): there XLA fuses the
    whole-tensor pass into fewer buffers than the chunked one. On lm50k
    (benchmarks/bench.py, CPU) the step's XLA temp was 607.8 MB whole
    against 985.4 MB chunked (one logits tensor: 196.3 MB), at the same CPU
    time. Everywhere else (JAX, torch, TensorFlow without XLA) chunks bound
    the pass's temporaries.
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
