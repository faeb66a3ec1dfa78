"""The training step's loss paths, and the one selector that chooses among them.

Every training step's loss is computed by exactly one path, chosen once per
trace by `select_path`:

- `"fused_anchor"` (`FusedAnchorPath`): with the anchor on a language model,
  the task loss, R-Drop's KL and the KL to the reference in one chunked pass
  (`fused_reference_kl`);
- `"fused_rdrop"` (`FusedRDropPath`): R-Drop on a language model, both task
  losses and their KL in one chunked pass (`fused_cross_entropy`), and the
  anchor's KL, if any, as on the general path;
- `"general"` (`GeneralPath`): Keras' compiled loss on each pass, a
  `PairwiseTerm` between the passes and to the reference for each output.

Each path takes one `StepInputs` and returns one `StepLosses`; the step
weighs them (`RDropModel.compute_loss`). `use_paths` restricts the choice
and `record_paths` lists what was chosen, for tests and benchmarks.
"""

from __future__ import annotations

import contextlib

from keras_rdrop.src.consistency_terms import pairwise_terms
from keras_rdrop.src.fused_cross_entropy import FUSED_LANGUAGE_MODEL
from keras_rdrop.src.fused_reference_kl import FUSED_ANCHOR
from keras_rdrop.src.reference_penalty import (
    ReferenceRun,
    reference_kl,
    reference_outputs,
)
from keras_rdrop.src.step_inputs import StepInputs, StepLosses

PATH_NAMES = ("fused_anchor", "fused_rdrop", "general")


def _general_task_loss(step: StepInputs):
    """Keras' compiled loss of the first pass, or the mean over both."""
    if step.y_pred_2 is None:
        return step.task_loss_of(step.y_pred_1)
    return 0.5 * (step.task_loss_of(step.y_pred_1) + step.task_loss_of(step.y_pred_2))


def _general_reference_kl(step: StepInputs, reference: ReferenceRun):
    """The KL to the reference of every output with a term (general path)."""
    flat_live, flat_ref = reference_outputs(reference, step.plan, step.x, step.y_pred_1)
    return reference_kl(
        step.plan, reference.kind, flat_live, flat_ref, step.consistency_weight
    )


class GeneralPath:
    """Keras' compiled loss on each pass; a `PairwiseTerm` per output."""

    name = "general"

    def applies(self, step: StepInputs, anchored: bool) -> bool:
        return True

    def compute(self, step: StepInputs, reference: ReferenceRun | None) -> StepLosses:
        task_loss = _general_task_loss(step)
        terms = ()
        if step.y_pred_2 is not None:
            terms = pairwise_terms(
                step.plan, step.y_pred_1, step.y_pred_2, step.consistency_weight
            )
        ref_kl = None
        if reference is not None:
            ref_kl = _general_reference_kl(step, reference)
        return StepLosses(task_loss, terms, ref_kl)


class FusedRDropPath:
    """R-Drop's language-model pass (`FusedLanguageModelLoss`); the anchor's
    KL, if any, as on the general path."""

    name = "fused_rdrop"

    def applies(self, step: StepInputs, anchored: bool) -> bool:
        return FUSED_LANGUAGE_MODEL.applies(step)

    def compute(self, step: StepInputs, reference: ReferenceRun | None) -> StepLosses:
        task_loss, kl = FUSED_LANGUAGE_MODEL.compute(step)
        ref_kl = None
        if reference is not None:
            ref_kl = _general_reference_kl(step, reference)
        return StepLosses(task_loss, ((step.plan[0], kl),), ref_kl)


class FusedAnchorPath:
    """The anchor's language-model pass (`FusedAnchorLoss`): the task loss,
    R-Drop's KL and the KL to the reference together."""

    name = "fused_anchor"

    def applies(self, step: StepInputs, anchored: bool) -> bool:
        return anchored and FUSED_ANCHOR.applies(step)

    def compute(self, step: StepInputs, reference: ReferenceRun | None) -> StepLosses:
        _, (ref_pred,) = reference_outputs(reference, step.plan, step.x, step.y_pred_1)
        task_loss, rdrop_kl, ref_kl = FUSED_ANCHOR.compute(
            step, ref_pred, reference.kind
        )
        terms = () if rdrop_kl is None else ((step.plan[0], rdrop_kl),)
        return StepLosses(task_loss, terms, ref_kl)


# In the order `select_path` tries them; the general path always applies.
PATHS = (FusedAnchorPath(), FusedRDropPath(), GeneralPath())

_allowed: tuple | None = None
_chunked: bool | None = None
_records: list = []


def select_path(step: StepInputs, anchored: bool):
    """The loss path that computes `step`: the first of `PATHS` that applies.

    Args:
        step: The step's inputs.
        anchored: Whether the anchor (`ReferenceKLRegularizer`) is on.

    Returns:
        A path object with `name` and `compute(step, reference)`.
    """
    for path in PATHS:
        if _allowed is not None and path.name not in _allowed:
            continue
        if path.applies(step, anchored):
            for record in _records:
                record.append(path.name)
            return path
    raise AssertionError("unreachable: the general path always applies")


def chunked_setting(default: bool) -> bool:
    """Whether the fused passes run by chunks: `default` (`chunked_for`),
    unless `use_paths(chunked=...)` says otherwise. Read once, when the
    training step is decided (`step_mode.decide_step`)."""
    return default if _chunked is None else _chunked


@contextlib.contextmanager
def use_paths(*names: str, chunked: bool | None = None):
    """Lets `select_path` choose only among `names` (the general path always).

    For tests and benchmarks that compare a fused path with the general one.

    Args:
        *names: The fused paths allowed (`PATH_NAMES`); none: only the
            general path.
        chunked: `False` runs the fused passes on whole tensors (as on
            TensorFlow with XLA, `chunked_for`), `True` by chunks; `None`
            leaves it to `chunked_for`.

    Example:

    ```python
    import keras
    import numpy as np
    from keras_rdrop import RDropModel
    from keras_rdrop.src.step_paths import record_paths, use_paths

    inner = keras.Sequential([keras.Input((6,), dtype="int32"),
                              keras.layers.Embedding(11, 8),
                              keras.layers.Dropout(0.1), keras.layers.Dense(11)])
    model = RDropModel(inner, alpha=1.0)
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens = np.random.default_rng(0).integers(0, 11, (8, 6))
    with use_paths("general"), record_paths() as taken:
        model.fit(tokens, tokens, epochs=1, verbose=0)
    print(set(taken))  # {'general'}: the fused language-model pass is off
    ```
    """
    global _allowed, _chunked
    unknown = set(names) - set(PATH_NAMES)
    if unknown:
        raise ValueError(
            f"Unknown loss paths {sorted(unknown)}; the paths are {PATH_NAMES}."
        )
    previous = _allowed, _chunked
    _allowed, _chunked = tuple(names) + ("general",), chunked
    try:
        yield
    finally:
        _allowed, _chunked = previous


@contextlib.contextmanager
def record_paths():
    """Yields a list that gets the name of each path `select_path` chooses.

    A path is chosen when the training step is traced (once per compiled
    step; every step when the step runs eagerly).
    """
    record: list = []
    _records.append(record)
    try:
        yield record
    finally:
        _records.remove(record)
