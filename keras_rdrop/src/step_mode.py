"""The training step, decided once: `StepMode`, and what the step's forward
pass hands to its loss, `TrainingOutputs`.

`decide_step` takes every decision about a training step (a second pass or
not, one stacked call or two, the shared prefix, the reference, whether the
reference reuses the prefix's output, chunked fused passes or not) when the
step is built. `RDropModel.call`, `compute_loss` and `compute_metrics` read
the `StepMode` and decide nothing themselves. The forward pass
(`StepMode.forward`) returns a `TrainingOutputs`, which Keras passes on to
`compute_loss` and `compute_metrics` as the step's `y_pred`: the passes, and
the prefix's output where the reference reuses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from keras_rdrop.src.reference_penalty import ReferenceRun
from keras_rdrop.src.stacked_passes import split_passes, stack_twice


class TrainingOutputs(NamedTuple):
    """What `RDropModel(x, training=True)` returns: the training step's
    `y_pred`.

    A named tuple, so a structure every backend's trainer carries as it is
    (a JAX pytree, a `tf.nest` and a torch pytree structure).

    Attributes:
        first: The first pass's outputs, in the inner model's structure.
        second: R-Drop's second pass, in the same structure, or `None`
            (`alpha=0`).
        prefix: The shared prefix's output on the batch, where the anchor's
            reference reuses it (`StepMode.reference_reuses_prefix`), else
            `None`.
    """

    first: Any
    second: Any = None
    prefix: Any = None


@dataclasses.dataclass(frozen=True)
class StepMode:
    """Every decision about one training step, taken once (`decide_step`).

    Attributes:
        rdrop: Whether the step makes R-Drop's second pass.
        stacked: Whether both passes run as one call on `[x; x]`
            (`mode="concat"`).
        split: The prefix split the step runs (`shared_prefix.PrefixSplit`:
            the prefix once, the rest per pass), or `None` (the whole model).
        reference: θ0 and the kind of the KL to it while the anchor is on,
            else `None`.
        reference_reuses_prefix: Whether the reference runs only the rest of
            the model, on the live prefix's output (a frozen prefix whose
            weights the snapshot does not copy).
        chunked: Whether the fused passes run by chunks
            (`fused_reference_kl.chunked_for`).
    """

    rdrop: bool
    stacked: bool
    split: Any = None
    reference: ReferenceRun | None = None
    reference_reuses_prefix: bool = False
    chunked: bool = True

    def forward(self, model, inputs) -> TrainingOutputs:
        """The training step's forward pass of `model` (the inner model) on
        `inputs`: the prefix once, then the passes."""
        head, source, prefix = model, inputs, None
        if self.split is not None:
            prefix = self.split.prefix(inputs, training=True)
            head, source = self.split.rest, prefix
        if not self.rdrop:
            first, second = head(source, training=True), None
        elif self.stacked:
            first, second = split_passes(head(stack_twice(source), training=True))
        else:
            first = head(source, training=True)
            second = head(source, training=True)
        return TrainingOutputs(
            first, second, prefix if self.reference_reuses_prefix else None
        )

    def reference_run(self, outputs: TrainingOutputs) -> ReferenceRun | None:
        """The reference as this step runs it: on the prefix's output in
        `outputs` where it reuses it."""
        if self.reference is None or not self.reference_reuses_prefix:
            return self.reference
        return dataclasses.replace(
            self.reference, split=self.split, shared=outputs.prefix
        )


def decide_step(
    *,
    rdrop: bool,
    mode: str,
    split,
    reference: ReferenceRun | None,
    chunked: bool,
) -> StepMode:
    """The `StepMode` of a training step.

    Args:
        rdrop: Whether R-Drop is on (a second pass).
        mode: `"concat"` or `"sequential"` (`RDropModel(mode=...)`).
        split: The model's prefix split (`PrefixSharing.split`), or `None`.
        reference: θ0 while the anchor is on, else `None`.
        chunked: Whether the fused passes run by chunks.

    Returns:
        The `StepMode`. The prefix is shared where there are passes to share
        it: R-Drop's two, or one pass and the reference on a frozen prefix.
        The reference reuses the prefix's output where the prefix is frozen
        and the snapshot copies none of its weights (checked here, when the
        step is built: layers may be unfrozen between `fit` calls).
    """
    if split is not None and not (rdrop or (split.frozen and reference is not None)):
        split = None
    reuses = (
        reference is not None
        and split is not None
        and split.frozen
        and not split.prefix.trainable_weights
        and not reference.snapshot.copies_any(reference.model, split.prefix.weights)
    )
    return StepMode(
        rdrop=rdrop,
        stacked=rdrop and mode == "concat",
        split=split,
        reference=reference,
        reference_reuses_prefix=reuses,
        chunked=chunked,
    )
