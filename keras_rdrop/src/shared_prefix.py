"""The part of a model that dropout cannot change, run once per training step.

In the common fine-tuning recipe (a frozen base, then `Dropout` and a new
head), everything before the first stochastic layer gives the same result in
both of R-Drop's passes. `split_model` finds that
prefix in a functional model's graph and splits the model in two:

- `prefix`: the model's inputs to the tensors where the prefix ends (the
  "frontier": every tensor of the prefix that a stochastic call reads);
- `rest`: the frontier to the model's outputs.

`rest(prefix(x))` is `model(x)`, with the same layers and weights. The
training step runs the prefix once and the rest twice (`RDropModel`), and
where the prefix is frozen and does not depend on the training flag, the
reference of `ReferenceKLRegularizer` reuses its output too.

A call is deterministic when all its inputs are and either it holds no
stochastic layer (`Dropout`, `GaussianNoise`, ..., or any layer with a
`SeedGenerator`) or it is called with `training=False` (a frozen base in the
Keras transfer-learning recipe: its `Dropout` is then off). A frozen layer
(`trainable=False`) called without `training=False` still drops units, so it
is not part of the prefix.

Keras releases differ in what a call's own `training=False` does inside a
functional model run in training mode (`training_false_semantics`, probed
once): Keras 3.15 replaces it by the model's `training=True`, so the call is
not deterministic; the 3.16 development builds keep it, but also pass it on
to every layer called after it, which turns off the `Dropout` layers after a
frozen base. The split follows the installed Keras: a call's `training=False`
counts only where Keras keeps it, and where Keras also passes it on, the
rest of the model would run in inference mode, so a prefix holding such a
call is not shared (`split_model` says why).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import warnings

import keras
import numpy as np
from keras import ops

from keras_rdrop.src.keras_internals import flatten_layers, functional_graph
from keras_rdrop.src.model_checks import has_stochastic_layer

logger = logging.getLogger("keras_rdrop")


@dataclasses.dataclass(frozen=True)
class PrefixSplit:
    """A model split where its deterministic prefix ends.

    Attributes:
        prefix: `keras.Model` from the model's inputs to the frontier.
        rest: `keras.Model` from the frontier to the model's outputs.
        frozen: Whether the prefix has no trainable weight and gives the same
            output in training and inference mode (`_mode_independent`: no
            trainable BatchNormalization, no layer outside Keras that takes
            `training`, unless called in inference mode): then θ0's prefix
            gives what the live one gives, as long as the reference snapshot
            copies none of its weights.
        size: The number of calls in the prefix.
    """

    prefix: keras.Model
    rest: keras.Model
    frozen: bool
    size: int

    def run_rest_stateless(self, trainable, non_trainable, shared):
        """`rest.stateless_call` in inference mode (the reference's pass)."""
        outputs, _ = self.rest.stateless_call(
            trainable, non_trainable, shared, training=False
        )
        return outputs


class _Rest(keras.Model):
    """The model after the prefix: a functional model that takes masked
    inputs (a shared `Embedding(mask_zero=True)` output) without Keras'
    warning that it would drop their masks. Its layers read the masks; its
    outputs carry the masks its layers give them, and no other."""

    def __init__(self, inputs, outputs, **kwargs):
        super().__init__(inputs, outputs, **kwargs)
        self.supports_masking = True

    def compute_mask(self, inputs, previous_mask):
        return None


@functools.cache
def training_false_semantics() -> tuple[bool, bool]:
    """What the installed Keras does with a call's own `training=False`.

    A functional model run with `training=True`, holding a sub-model called
    with `training=False` and a `Dropout` called after it, is run once on
    ones.

    Returns:
        `(kept, passed_on)`: whether the call runs in inference mode, and
        whether the layers called after it do too.
    """
    inputs = keras.Input((64,))
    inner = keras.Sequential([keras.layers.Dropout(0.5, seed=1)])
    hidden = inner(inputs, training=False)
    after = keras.layers.Dropout(0.5, seed=2)(hidden)
    probe = keras.Model(inputs, [hidden, after])
    hidden, after = probe(np.ones((1, 64), "float32"), training=True)
    kept = bool(np.all(ops.convert_to_numpy(hidden) == 1.0))
    passed_on = bool(np.all(ops.convert_to_numpy(after) == 1.0))
    return kept, passed_on


def _inference_call(call) -> bool:
    """Whether a graph call runs in inference mode whatever the model's mode."""
    return call.kwargs.get("training") is False and training_false_semantics()[0]


def _deterministic_call(call) -> bool:
    """Whether a graph call gives the same output in both passes."""
    if _inference_call(call):
        return True
    operation = call.operation
    return not (
        isinstance(operation, keras.layers.Layer) and has_stochastic_layer(operation)
    )


def _layer_mode_dependent(layer) -> bool:
    """Whether `layer` itself may compute differently in training mode.

    Keras' own layers do only when they draw random numbers (excluded from
    the prefix already) or update statistics (a trainable
    `BatchNormalization`); any other layer whose `call` takes `training` is
    assumed to use it.
    """
    if functional_graph(layer) is not None:
        return False  # a functional model only passes `training` on
    if isinstance(layer, keras.layers.BatchNormalization):
        return layer.trainable
    if type(layer).__module__.startswith("keras."):
        return False
    return "training" in inspect.signature(layer.call).parameters


def _mode_independent(call) -> bool:
    """Whether a call gives the same output in training and inference mode."""
    if _inference_call(call):
        return True
    operation = call.operation
    if not isinstance(operation, keras.layers.Layer):
        return True
    return not any(_layer_mode_dependent(layer) for layer in flatten_layers(operation))


def split_model(model: keras.Model) -> tuple[PrefixSplit | None, str]:
    """Splits `model` where its deterministic prefix ends.

    Args:
        model: The inner model of an `RDropModel`.

    Returns:
        `(split, reason)`: a `PrefixSplit` and `""`, or `None` and why the
        model cannot be split (a sentence to log).

    Example:

    ```python
    import keras
    from keras_rdrop.src.shared_prefix import split_model

    base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    base.trainable = False
    inputs = keras.Input((8,))
    h = keras.layers.Dropout(0.3)(base(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    split, _ = split_model(model)
    split.size, split.frozen  # (1, True): the base runs once per step
    ```
    """
    graph = functional_graph(model)
    if graph is None:
        return None, (
            "it is not a functional model (it is subclassed, or overrides "
            "`call`), so its graph cannot be split"
        )
    flat_inputs = keras.tree.flatten(graph.inputs)
    deterministic = {id(t) for t in flat_inputs}
    in_prefix = []
    for call in graph.calls:
        if all(id(t) in deterministic for t in call.inputs) and _deterministic_call(
            call
        ):
            deterministic.update(id(t) for t in call.outputs)
            in_prefix.append(call)
    for tensor in keras.tree.flatten(graph.outputs):
        if id(tensor) in deterministic:
            return None, (
                f"its output {tensor.name!r} does not depend on any stochastic "
                "layer, so the two passes give it the same value"
            )
    if training_false_semantics()[1]:
        for call in in_prefix:
            if "training" in call.kwargs:
                name = getattr(call.operation, "name", type(call.operation).__name__)
                return None, (
                    f"it calls {name!r} with `training={call.kwargs['training']}`, "
                    "which this Keras version also passes on to every layer "
                    "called after it (the stochastic ones included), and the "
                    "part after a shared prefix would not inherit it"
                )
    prefix_ids = {id(call) for call in in_prefix}
    frontier, seen = [], set()
    for call in graph.calls:
        if id(call) in prefix_ids:
            continue
        for tensor in call.inputs:
            if id(tensor) in deterministic and id(tensor) not in seen:
                seen.add(id(tensor))
                frontier.append(tensor)
    input_ids = {id(t) for t in flat_inputs}
    if all(id(t) in input_ids for t in frontier):
        return None, (
            "its first layers are stochastic (or called on the inputs with "
            "dropout on), so nothing before them can be shared"
        )
    # One tensor, not a list of one: the rest is called on what the prefix
    # returns, and Keras warns when the structures differ.
    ends = frontier[0] if len(frontier) == 1 else frontier
    prefix = keras.Model(graph.inputs, ends, name=f"{model.name}_prefix")
    rest = _Rest(ends, graph.outputs, name=f"{model.name}_rest")
    frozen = not prefix.trainable_weights and all(
        _mode_independent(call) for call in in_prefix
    )
    return PrefixSplit(prefix, rest, frozen, len(in_prefix)), ""


def dropout_switched_off(model: keras.Model) -> tuple[str, str] | None:
    """A stochastic call that this Keras runs in inference mode in training.

    Where Keras passes a call's own `training=False` on to the layers called
    after it (`training_false_semantics`), a `Dropout` after a frozen base
    called with `training=False` is off in training: R-Drop's passes are
    then the same there.

    Returns:
        `(name of the call with training=False, name of the stochastic call
        after it)`, or `None`.
    """
    if not training_false_semantics()[1]:
        return None
    graph = functional_graph(model)
    if graph is None:
        return None
    frozen_call = None
    for call in graph.calls:
        explicit = call.kwargs.get("training")
        if explicit is False and frozen_call is None:
            frozen_call = call
        elif (
            frozen_call is not None
            and explicit is None
            and isinstance(call.operation, keras.layers.Layer)
            and has_stochastic_layer(call.operation)
        ):
            return frozen_call.operation.name, call.operation.name
    return None


class PrefixSharing:
    """The training step's split of one inner model, made once.

    Not a layer: the split's two models hold the inner model's own layers,
    which must not be tracked (and saved) twice.

    Args:
        enabled: Whether to split at all (`RDropModel(share_prefix=...)`).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._model = None
        self._split = None

    def prepare(self, model: keras.Model, rdrop: bool = True) -> PrefixSplit | None:
        """Splits `model` the first time; says once, at info level, what was
        shared or why nothing is.

        Also warns, once, where this Keras switches dropout off after a call
        with `training=False` (`dropout_switched_off`) and R-Drop is on.
        """
        if self._model is model:
            return self.split
        self._model = model
        switched_off = dropout_switched_off(model) if rdrop else None
        if switched_off is not None:
            warnings.warn(
                f"In model {model.name!r}, {switched_off[0]!r} is called with "
                "`training=False`, and this Keras version passes that on to "
                f"the layers called after it: {switched_off[1]!r} runs in "
                "inference mode during training, its dropout off, so R-Drop's "
                "two passes do not differ there. Call the frozen base without "
                "`training=False` (a frozen BatchNormalization runs in "
                "inference mode anyway), and build it with its dropout rates "
                "at 0 if it has dropout.",
                UserWarning,
                stacklevel=2,
            )
        if self.enabled:
            self._split, reason = split_model(model)
            if self._split is None:
                logger.info(
                    "keras_rdrop: both passes run the whole model %r: %s.",
                    model.name,
                    reason,
                )
            else:
                logger.info(
                    "keras_rdrop: the first %d call(s) of model %r are the same "
                    "in both passes and run once per training step%s.",
                    self._split.size,
                    model.name,
                    "; the reference reuses them" if self._split.frozen else "",
                )
        return self.split

    @property
    def split(self) -> PrefixSplit | None:
        """The prepared split, or `None` (not prepared, disabled, or none)."""
        return self._split if self.enabled else None
