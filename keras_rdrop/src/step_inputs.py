"""What one training step's loss is computed from, and what a loss path returns.

`StepInputs` is the one bundle every loss path (`step_paths`) takes: the
batch, both passes, the weights, the per-output plan and the compiled loss.
`StepLosses` is what every path returns, before the step weighs it: the task
loss, R-Drop's per-output consistency terms and the KL to the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The inputs of one training step's loss.

    Attributes:
        x: The batch's inputs.
        y: The batch's targets.
        y_pred_1: The outputs of the first pass (dropout on).
        y_pred_2: The outputs of R-Drop's second pass, or `None` (`alpha=0`).
        sample_weight: The step's `sample_weight`, or `None`.
        consistency_weight: The weight of the consistency terms (R-Drop's
            and the anchor's): `sample_weight`, or `None` where
            `consistency_on_all_rows=True` gives every row weight 1.
        batch_size: The batch's size (a scalar), to weigh the logs.
        plan: The per-output plan (`output_plan.build_plan`).
        loss: The compiled loss.
        loss_weights: The `loss_weights` given to `compile`, or `None`.
        task_loss_of: `y_pred -> Keras' compiled loss of one pass`, plus
            `model.losses` (`Trainer.compute_loss`).
        additional_losses: Each `model.losses` entry, summed as Keras'
            `compute_loss` adds it (the fused paths add them), read before
            the reference's pass.
        chunked: Whether a fused pass runs by chunks (`chunked_for`).
    """

    x: Any
    y: Any
    y_pred_1: Any
    y_pred_2: Any
    sample_weight: Any
    consistency_weight: Any
    batch_size: Any
    plan: tuple
    loss: Any
    loss_weights: Any
    task_loss_of: Callable
    additional_losses: list
    chunked: bool = True


@dataclasses.dataclass(frozen=True)
class StepLosses:
    """What a loss path computes for one step, before the step weighs it.

    Attributes:
        task_loss: The task loss (averaged over both passes with R-Drop),
            with `model.losses`.
        terms: R-Drop's consistency terms, one `(plan entry, value)` per
            output that has one; empty without a second pass. Each value is
            unweighted: `alpha` and its schedule are applied by the step
            (`alpha_schedule.weigh_terms`).
        reference_kl: The KL to the reference (before `beta`), or `None`
            without the anchor.
    """

    task_loss: Any
    terms: tuple = ()
    reference_kl: Any = None
