"""The pairwise consistency terms RDropModel adds to the task loss.

Each term compares two predictions of the same batch and is reduced like a
Keras loss with `reduction="mean_with_sample_weight"`: a weighted mean over
the valid positions, honouring `sample_weight`, Keras masks and the per-replica
loss scaling of `tf.distribute`.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_rdrop.divergences import divergence

KINDS = ("symmetric_kl", "kl", "reverse_kl", "mse")


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
        if kind not in KINDS:
            raise ValueError(f"`kind` should be one of {KINDS}. Received: {kind!r}")
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


def unscale_for_distribution(value):
    """Undoes the per-replica scaling of a loss value, for the logs.

    Under `tf.distribute` Keras divides every loss by the number of replicas
    so that the summed gradients are those of the global batch; a value logged
    as a metric must be multiplied back (what Keras does for `loss`).
    """
    replicas = num_replicas_in_sync()
    if replicas > 1:
        value = ops.multiply(value, ops.cast(replicas, value.dtype))
    return value
