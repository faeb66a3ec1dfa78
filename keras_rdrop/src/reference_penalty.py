"""The anchor's penalty: `beta * KL(live || reference)`, and the beta controller.

The reference's outputs come from the live model run with θ0's values
(`ReferenceSnapshot.reference_values`) through `stateless_call`, in inference
mode and with the gradient stopped (`ReferenceRun` says with what). The KL is
computed here on the general path (one `PairwiseTerm` per output); the fused anchor path
(`fused_reference_kl`) computes it with the task loss instead. Either way,
`weighted_penalty` logs `ref_kl`, steps an adaptive `beta` and returns
`beta * KL`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
from keras import ops

from keras_rdrop.src.consistency_terms import (
    copy_sample_weight,
    num_replicas_in_sync,
    per_output_weights,
    position_weights,
)
from keras_rdrop.src.keras_internals import unscale_for_distribution
from keras_rdrop.src.weight_schedules import traced_value

DIRECTIONS = ("forward", "reverse", "symmetric")
_KIND = {"forward": "kl", "reverse": "reverse_kl", "symmetric": "symmetric_kl"}


@dataclasses.dataclass
class ReferenceSettings:
    """What the training step reads at trace time."""

    direction: str = "forward"
    target_kl: float | None = None
    horizon: float = 10000.0
    # A `LearningRateSchedule` `beta`, evaluated inside the step; else None.
    beta_schedule: Any = None

    def key(self) -> tuple:
        """The settings to compare traced steps by (the schedule by identity:
        `dataclasses.astuple` would copy it)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def kl_kind(settings: ReferenceSettings) -> str:
    """The `PairwiseTerm` kind of the settings' KL direction."""
    return _KIND[settings.direction]


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    """What a step needs to run the reference and compare with it.

    Attributes:
        snapshot: The model's `ReferenceSnapshot` (θ0).
        model: The inner model whose weights the snapshot copies.
        kind: The `PairwiseTerm` kind of the KL to the reference.
        split: Where the model's frozen prefix is shared: its
            `shared_prefix.PrefixSplit`, whose rest the reference runs on
            `shared`; else `None` (the reference runs the whole model).
        shared: The live prefix's output on the batch, or `None`.
    """

    snapshot: Any
    model: keras.Model
    kind: str
    split: Any = None
    shared: Any = None


def reference_outputs(reference: ReferenceRun, plan, x, y_pred):
    """The flat live outputs and the reference's (gradient stopped) on `x`.

    Args:
        reference: The snapshot and the model to run it with.
        plan: The step's per-output plan, for the outputs' names.
        x: The batch's inputs.
        y_pred: The live outputs of the first pass on `x`.

    Returns:
        `(flat_live, flat_ref)`, two lists of tensors of the same shapes.
    """
    model = reference.model
    if reference.split is None:
        trainable, non_trainable = reference.snapshot.reference_values(model)
        ref_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
    else:
        # A frozen prefix holds θ0 and ignores the training flag: its live
        # output is the reference's; only the rest runs again.
        split = reference.split
        trainable, non_trainable = reference.snapshot.reference_values(
            model, split.rest
        )
        shared = keras.tree.map_structure(ops.stop_gradient, reference.shared)
        ref_pred = split.run_rest_stateless(trainable, non_trainable, shared)
    flat_live = keras.tree.flatten(y_pred)
    flat_ref = [ops.stop_gradient(t) for t in keras.tree.flatten(ref_pred)]
    if len(flat_live) != len(flat_ref):
        raise ValueError(
            f"The reference gives {len(flat_ref)} outputs but the model gives "
            f"{len(flat_live)}."
        )
    for entry, live, ref in zip(plan, flat_live, flat_ref):
        if tuple(live.shape[1:]) != tuple(ref.shape[1:]):
            raise ValueError(
                f"The reference's output {entry.name!r} has shape "
                f"{tuple(ref.shape)} but the model's has shape "
                f"{tuple(live.shape)}."
            )
    return flat_live, flat_ref


def reference_kl(plan, kind: str, flat_live, flat_ref, sample_weight):
    """The KL of `kind` to the reference, summed over the outputs with a term.

    Each output's KL is reduced like a Keras loss with
    `reduction="mean_with_sample_weight"`; the reference is constant, so no
    gradient is computed for it.
    """
    total = ops.zeros((), "float32")
    weights = per_output_weights(copy_sample_weight(sample_weight), len(flat_live))
    for entry, live, ref, w in zip(plan, flat_live, flat_ref, weights):
        if entry.term is None:
            continue
        loss = entry.term.pairwise(kind, constant_b=True)
        total = total + loss(live, ref, sample_weight=position_weights(w, live))
    return total


def weighted_penalty(anchor, total, batch_size):
    """`beta * total`; logs `ref_kl` and steps the adaptive `beta`.

    Args:
        anchor: The model's `AnchorState`, holding `beta`, the `ref_kl`
            tracker and the anchor's settings.
        total: The step's KL to the reference (a float32 scalar).
        batch_size: The batch's size, to weigh the logged `ref_kl`.
    """
    # `total` is scaled per replica under `tf.distribute`, like the loss.
    kl = unscale_for_distribution(ops.stop_gradient(total))
    anchor.ref_kl_tracker.update_state(kl, sample_weight=batch_size)
    settings = anchor.settings
    if settings.beta_schedule is not None:
        step = ops.convert_to_tensor(anchor.beta_step)
        beta = traced_value(settings.beta_schedule, step, "beta")
        anchor.beta_step.assign_add(1)
    else:
        beta = anchor.beta.value
    if settings.target_kl is not None:
        # Ziegler et al. (2019): proportional control of beta toward a
        # target KL, clipped to +-20% error, over a horizon in examples.
        # Under `tf.distribute` each replica steps by the global batch and
        # the replicas' new values are averaged (`beta` aggregates "mean").
        error = ops.clip(kl / settings.target_kl - 1.0, -0.2, 0.2)
        global_batch = ops.cast(batch_size, "float32") * num_replicas_in_sync()
        step = global_batch / settings.horizon
        anchor.beta.assign(beta * (1.0 + error * step))
    return beta * total
