"""The pairwise consistency terms RDropModel adds to the task loss.

Each term compares two predictions of the same batch and is reduced like a
Keras loss with `reduction="mean_with_sample_weight"`: a weighted mean over
the valid positions, honouring `sample_weight`, Keras masks and the per-replica
loss scaling of `tf.distribute`.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from keras_rdrop.src.closed_forms import KL_KINDS
from keras_rdrop.src.divergences import divergence

# A consistency term is one of the KLs, or the mean squared difference.
TERM_KINDS = (*KL_KINDS, "mse")


class PairwiseTerm(keras.losses.Loss):
    """Consistency term between two predictions `a` and `b`.

    `kind` is one of `"symmetric_kl"` ((KL(a||b) + KL(b||a)) / 2), `"kl"`
    (KL(a||b)), `"reverse_kl"` (KL(b||a)) or `"mse"` (mean squared difference
    over the last axis, for regression outputs). `constant_b=True` declares
    that `b` gets no gradient (the anchor's reference outputs), so the KL's
    backward pass does not compute one.
    """

    def __init__(
        self, kind, from_logits=True, distribution="auto", name=None, constant_b=False
    ):
        if kind not in TERM_KINDS:
            raise ValueError(
                f"`kind` should be one of {TERM_KINDS}. Received: kind={kind!r}"
            )
        super().__init__(
            name=name or kind, reduction="mean_with_sample_weight", dtype="float32"
        )
        self.kind = kind
        self.from_logits = from_logits
        self.distribution = distribution
        self.constant_b = constant_b

    def call(self, a, b):
        if self.kind == "mse":
            a = ops.cast(a, "float32")
            b = ops.cast(b, "float32")
            return ops.mean(ops.square(a - b), axis=-1)
        symmetric = self.kind == "symmetric_kl"
        first, second = (b, a) if self.kind == "reverse_kl" else (a, b)
        constant = None
        if self.constant_b:
            constant = "a" if self.kind == "reverse_kl" else "b"
        return divergence(
            first,
            second,
            self.from_logits,
            -1,
            self.distribution,
            symmetric=symmetric,
            constant=constant,
        )


@dataclasses.dataclass(frozen=True)
class ConsistencyTerm:
    """How two predictions of one output are compared.

    `kind` is `"distribution"` (a KL, categorical or Bernoulli, of logits or
    probabilities as `from_logits` says) or `"regression"` (the mean squared
    difference, whatever divergence is asked for).
    """

    kind: str
    from_logits: bool | None = None
    distribution: str = "auto"

    def pairwise(self, divergence: str = "symmetric_kl", constant_b: bool = False):
        """The `PairwiseTerm` comparing two predictions with `divergence`.

        `divergence` is `"symmetric_kl"`, `"kl"` or `"reverse_kl"`;
        `constant_b=True` declares that the second prediction gets no
        gradient (the anchor's reference outputs).
        """
        if self.kind == "regression":
            return PairwiseTerm("mse")
        return PairwiseTerm(
            divergence,
            from_logits=self.from_logits,
            distribution=self.distribution,
            constant_b=constant_b,
        )


def copy_sample_weight(sample_weight):
    """A copy of `sample_weight` (any structure), or `None`.

    Keras' loss reduction multiplies a masked `sample_weight` in place
    (`sample_weight *= mask`), which on torch mutates the caller's tensor:
    each use gets its own copy.
    """
    if sample_weight is None:
        return None
    return keras.tree.map_structure(ops.copy, sample_weight)


def per_output_weights(sample_weight, num_outputs: int) -> list:
    """`sample_weight` as one entry per output (`None` where there is none)."""
    if sample_weight is None:
        return [None] * num_outputs
    if isinstance(sample_weight, dict):
        return [sample_weight[k] for k in sorted(sample_weight)]
    if isinstance(sample_weight, (list, tuple)):
        if len(sample_weight) == num_outputs:
            return list(sample_weight)
    return [sample_weight] * num_outputs


def pairwise_terms(plan, y_pred_1, y_pred_2, sample_weight) -> tuple:
    """R-Drop's term between two passes, for each output that has one.

    Args:
        plan: The per-output plan (`output_plan.build_plan`).
        y_pred_1: The outputs of the first pass.
        y_pred_2: The outputs of the second pass, the same structure.
        sample_weight: The consistency weight (any structure) or `None`.

    Returns:
        A tuple of `(plan entry, value)`: the unweighted symmetric KL (or
        mean squared difference) of each output whose entry has a term and a
        non-zero `alpha`, as a float32 scalar.
    """
    flat_1 = keras.tree.flatten(y_pred_1)
    flat_2 = keras.tree.flatten(y_pred_2)
    weights = per_output_weights(copy_sample_weight(sample_weight), len(flat_1))
    terms = []
    for entry, a, b, w in zip(plan, flat_1, flat_2, weights):
        if entry.term is None or entry.alpha == 0:
            continue
        value = entry.term.pairwise("symmetric_kl")(
            a, b, sample_weight=position_weights(w, a)
        )
        terms.append((entry, value))
    return tuple(terms)


def position_weights(sample_weight, output):
    """`sample_weight` broadcast to the per-position shape of `output`.

    The per-position shape is the output's shape without its last (class)
    axis: `(batch,)` for `(batch, classes)`, `(batch, time)` for sequences.
    Returns `None` when there is no weight.
    """
    if sample_weight is None:
        return None
    sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    target_rank = len(output.shape) - 1
    while len(sample_weight.shape) > max(target_rank, 1) and (
        sample_weight.shape[-1] == 1
    ):
        sample_weight = ops.squeeze(sample_weight, axis=-1)
    while len(sample_weight.shape) < target_rank:
        sample_weight = ops.expand_dims(sample_weight, axis=-1)
    ones = ops.ones_like(ops.cast(output[..., 0], "float32"))
    return sample_weight * ones


def num_replicas_in_sync() -> int:
    """The number of `tf.distribute` replicas running the step, else 1."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync
