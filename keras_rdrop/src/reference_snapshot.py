"""`ReferenceSnapshot`: the frozen copy θ0 of a model's weights.

It is a sub-layer of `RDropModel`, so its variables are model state on every
backend: saved and restored with the model (`.keras`, `BackupAndRestore`),
passed into the jitted JAX step, and never trained (they are non-trainable).
It holds no variables until `ReferenceKLRegularizer` takes the snapshot.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_rdrop.src.keras_internals import set_variable_layout, variable_layout


def _is_float(variable) -> bool:
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(variable.dtype))


def float_weights(model: keras.Model) -> list:
    """Every float weight of `model`, in order: a snapshot indexes this list."""
    return [w for w in model.weights if _is_float(w)]


# Snapshot files also store the positions (in `float_weights`) of the weights
# they copy. Files written before partial snapshots (keras-rdrop up to
# 751f1f1) lack the key: they copy every float weight, in order.
_POSITIONS_KEY = "positions"


class _Probe(keras.layers.Layer):
    """Runs a function under `compute_output_spec`: traced, never computed."""

    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self._fn = fn  # a plain function: nothing tracked

    def call(self, inputs):
        return self._fn(inputs)


def _probe_inputs(model: keras.Model):
    """Symbolic inputs for one training-mode trace of `model`, or `None`.

    Taken from the model's own `keras.Input`s (Functional and Sequential
    models, keras-hub tasks and backbones). Unknown dimensions become 2: the
    trace only needs some valid shape (a sequence of 2 fits any position
    embedding; 1 would make attention softmaxes over one key).
    """
    try:
        inputs = model.inputs[0] if isinstance(model, keras.Sequential) else model.input
    except (AttributeError, ValueError, IndexError, TypeError):
        return None  # a subclassed model: no symbolic inputs
    if inputs is None:
        return None

    def concrete(tensor):
        shape = tuple(2 if d is None else d for d in tensor.shape)
        return keras.KerasTensor(shape, dtype=tensor.dtype)

    return keras.tree.map_structure(concrete, inputs)


def updated_in_training(model: keras.Model) -> set | None:
    """Ids of the variables a training-mode forward pass of `model` assigns.

    The model is traced once, symbolically (no computation, no memory), with
    `training=True` under a `keras.StatelessScope`, which records every
    `Variable.assign` instead of applying it. This finds the non-trainable
    state a training step updates (BatchNormalization's moving statistics,
    but only in BatchNormalization layers that are trainable: a frozen one
    runs in inference mode), and nothing that training leaves alone: the
    frozen base kernel of a LoRA layer (`enable_lora`) is a non-trainable
    variable of a trainable layer, but no call assigns it. Seed generators
    are assigned too; they are integer state, never snapshotted.

    Returns `None` when the model has no symbolic inputs to trace it with
    (a subclassed model).
    """
    inputs = _probe_inputs(model)
    if inputs is None:
        return None
    assigned = set()

    def training_call(x):
        with keras.StatelessScope() as scope:
            outputs = model(x, training=True)
        assigned.update(scope.state_mapping)  # keyed by id(variable)
        return outputs

    _Probe(training_call, name="reference_probe").compute_output_spec(inputs)
    return assigned


def changeable_positions(model: keras.Model) -> list[int]:
    """Positions in `float_weights(model)` of the weights training can change.

    The rule: a float weight is copied into the snapshot if it is trainable
    (the optimizer moves it) or if a training-mode forward pass assigns it
    (`updated_in_training`: moving statistics of trainable
    BatchNormalization layers, and any other state a layer updates in its
    `call`, as Keras layers do). Every other float weight is frozen: it keeps
    its value θ0 while it stays frozen, so the reference reads it from the
    live model. Trainability flags alone cannot tell these apart: the frozen
    base kernel of `Dense.enable_lora` is a non-trainable weight of a
    trainable layer, exactly like a moving mean, but training never changes
    it. A model that cannot be traced symbolically (a subclassed model, with
    no `keras.Input`) gets every float weight copied, as before.
    """
    weights = float_weights(model)
    assigned = updated_in_training(model)
    if assigned is None:
        return list(range(len(weights)))
    return [i for i, w in enumerate(weights) if w.trainable or id(w) in assigned]


class ReferenceSnapshot(keras.layers.Layer):
    """Holds θ0 as non-trainable variables, and nothing else.

    Variables: one copy per weight that training can change
    (`changeable_positions`); the positions of the copied weights in
    `float_weights(model)` are `self.positions`. The other weights of the
    reference are read from the live model: they are frozen, so they still
    hold θ0. The anchor's other state (`beta`, the `ref_kl` tracker, its
    settings) is `anchor_state.AnchorState`.

    The variables are created by `take` and `extend` (and, on loading, by
    `load_own_variables`), not by Keras' `build`, so that `extend` can add
    copies after the first snapshot, when frozen layers become trainable.

    Args:
        legacy_beta: Called with the `beta` found in a file written when the
            snapshot also held it (its first variable), to restore it where
            it lives now (`AnchorState.restore_beta`). Defaults to `None`
            (such a `beta` is dropped).
    """

    def __init__(self, legacy_beta=None, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self._legacy_beta = legacy_beta
        self._value_map = None
        self.positions: list[int] | None = None
        self.ref_weights = []
        self._load_error = None

    @property
    def taken(self) -> bool:
        """Whether a snapshot was taken (or loaded)."""
        return self.positions is not None

    def build(self, weight_specs=None, layouts=None):
        """Creates one copy per `(shape, dtype)` in `weight_specs`.

        Kept for callers of the former full-snapshot API: the copies are of
        the first `len(weight_specs)` float weights, in order. Keras locks a
        layer's state after `build`, so a snapshot built this way cannot be
        extended later: `take`, `extend` and `load_own_variables` call
        `_allocate` instead.
        """
        specs = list(weight_specs or [])
        self._allocate(list(range(len(specs))), specs, layouts)

    def _allocate(self, positions, weight_specs, layouts=None):
        """Adds one copy per `(shape, dtype)` spec.

        `layouts`, one per spec, lays each copy out like the weight it copies
        (a `keras.distribution` layout, as Keras' optimizers do for their
        slots); `None` leaves it to the current distribution, if any.
        """
        if self.positions is None:
            self.positions = []
            self.built = True
        layouts = layouts or [None] * len(weight_specs)
        # `add_weight` takes no layout: create the variables as it does.
        with keras.name_scope(self.name, caller=self):
            for position, (shape, dtype), layout in zip(
                positions, weight_specs, layouts
            ):
                self.ref_weights.append(
                    keras.Variable(
                        initializer="zeros",
                        shape=tuple(shape),
                        dtype=dtype,
                        trainable=False,
                        name=f"ref_{position}",
                        layout=layout,
                    )
                )
                self.positions.append(int(position))
        self._value_map = None

    def copies(self, model: keras.Model) -> list[tuple]:
        """`(weight, copy)` pairs: each copied weight of `model` and its θ0."""
        weights = float_weights(model)
        return [(weights[p], ref) for p, ref in zip(self.positions, self.ref_weights)]

    def extend(self, model: keras.Model, dtype: str | None = None) -> list:
        """Adds copies of the weights training can now change, at their value.

        A weight that was frozen and not updated since the snapshot was taken
        still holds θ0 (the reference read it from the live model), so its
        current value is the right copy. Called when `fit` starts: layers
        unfrozen between `fit` calls stay anchored to θ0. Returns the weights
        it added.
        """
        weights = float_weights(model)
        held = set(self.positions or [])
        new = [p for p in changeable_positions(model) if p not in held]
        added = [weights[p] for p in new]
        specs = [
            (tuple(w.shape), dtype or keras.backend.standardize_dtype(w.dtype))
            for w in added
        ]
        self._allocate(new, specs, [variable_layout(w) for w in added])
        for w, ref in zip(added, self.ref_weights[len(self.ref_weights) - len(new) :]):
            ref.assign(ops.copy(ops.cast(w.value, ref.dtype)))
        return added

    def missing(self, model: keras.Model) -> list:
        """Trainable float weights of `model` that the snapshot does not copy."""
        held = set(self.positions or [])
        return [
            w
            for i, w in enumerate(float_weights(model))
            if w.trainable and i not in held
        ]

    def take(self, model: keras.Model, dtype: str | None = None):
        """Copies `model`'s current changeable weights into the snapshot.

        The first call (or one after trainability changed) also decides which
        weights to copy (`extend`); later calls, such as the periodic
        refreshes, re-copy the same weights.
        """
        if self.positions is None:
            self.extend(model, dtype)
        self.check_matches(model)
        self.match_layouts(model)
        self.refresh(model)

    def refresh(self, model: keras.Model):
        """Re-copies the current values of the copied weights."""
        for w, ref in self.copies(model):
            # A copy: on JAX the snapshot must not share the weight's buffer,
            # which the training step donates.
            ref.assign(ops.copy(ops.cast(w.value, ref.dtype)))
        self._value_map = None

    def soft_update(self, model: keras.Model, tau: float):
        """ref <- tau * θ + (1 - tau) * ref (frozen weights: ref is θ)."""
        for w, ref in self.copies(model):
            mixed = tau * ops.cast(w.value, "float32") + (1.0 - tau) * ops.cast(
                ref.value, "float32"
            )
            ref.assign(ops.cast(mixed, ref.dtype))

    def check_matches(self, model: keras.Model):
        weights = float_weights(model)
        if self.positions and max(self.positions) >= len(weights):
            raise ValueError(
                f"The reference snapshot copies weight number {max(self.positions)} "
                f"but the model has {len(weights)} float weights: it was taken from "
                "another model."
            )
        for w, ref in self.copies(model):
            if tuple(ref.shape) != tuple(w.shape):
                raise ValueError(
                    "The reference snapshot does not match the model: weight "
                    f"{w.path!r} has shape {tuple(w.shape)} in the model but "
                    f"{tuple(ref.shape)} in the reference."
                )

    def match_layouts(self, model: keras.Model):
        """Lays each copy out like its weight (JAX `keras.distribution`).

        A snapshot restored from a file is built before it can see the
        model's layouts: it is re-laid out here, shard by shard.
        """
        for w, ref in self.copies(model):
            layout = variable_layout(w)
            if layout is not None and variable_layout(ref) is not layout:
                set_variable_layout(ref, layout)  # JAX: re-distributed

    def save_own_variables(self, store):
        super().save_own_variables(store)  # "0", "1", ...: the copies
        if self.positions is not None:
            store[_POSITIONS_KEY] = np.asarray(self.positions, dtype="int64")

    def load_own_variables(self, store):
        stored = _stored_snapshot(store)
        if stored is None:  # nothing stored for the snapshot
            if self.positions is None:
                return
            # A failure, as in Keras' own check. Keras then tries the other
            # places the layer may be stored under and reports the last
            # error: repeat a mismatch found at the first place, if any.
            error, self._load_error = self._load_error, None
            raise error or ValueError(
                f"Layer {self.name!r} holds a reference snapshot of "
                f"{len(self.ref_weights)} weights, but the file has none for it."
            )
        positions, values, beta, full = stored
        if self.positions is None:
            # A snapshot saved with the model is restored even into a fresh,
            # never-snapshotted RDropModel: build it from the stored arrays.
            specs = [(values[p].shape, str(values[p].dtype)) for p in positions]
            self._allocate(positions, specs)
        elif sorted(positions) != sorted(self.positions):
            self._load_error = _mismatch(positions, self.positions, full)
            raise self._load_error
        self._load_error = None
        if beta is not None and self._legacy_beta is not None:
            self._legacy_beta(beta)
        for p, ref in zip(self.positions, self.ref_weights):
            ref.assign(values[p])
        self._value_map = None

    # ------------------------------------------------------------- the step

    def _copy_index(self, model: keras.Model) -> dict:
        """`{id(weight): index of its copy}`, kept until the copies change."""
        if self._value_map is None:
            self._value_map = {id(w): i for i, (w, _) in enumerate(self.copies(model))}
        return self._value_map

    def copies_any(self, model: keras.Model, weights) -> bool:
        """Whether the snapshot holds a copy of any of `weights` of `model`."""
        copied = self._copy_index(model)
        return any(id(w) in copied for w in weights)

    def reference_values(self, model, target=None):
        """θ0's values for `target.stateless_call`: `(trainable, non_trainable)`.

        Args:
            model: The model the snapshot copies.
            target: A model made of some of `model`'s layers (the rest of a
                split model, `shared_prefix`). Defaults to `model`.
        """
        target = model if target is None else target
        copied = self._copy_index(model)

        def value(variable):
            index = copied.get(id(variable))
            if index is None:
                # Frozen weights (still θ0) and integer state such as seeds:
                # read from the live model, not copied.
                return variable.value
            ref = self.ref_weights[index]
            if ref.dtype == variable.dtype:
                return ref.value  # no cast op per weight and step (eager torch)
            return ops.cast(ref.value, variable.dtype)

        return (
            [value(v) for v in target.trainable_variables],
            [value(v) for v in target.non_trainable_variables],
        )


def _stored_snapshot(store):
    """`(positions, values by position, legacy beta, full)` from a store.

    `None` if the store holds no snapshot. Three layouts are read: the
    copies at "0", "1", ... with their positions (this version); `beta` at
    "0", then the copies, with their positions (files written when the
    snapshot also held `beta`); and `beta`, then a copy of every float
    weight, without positions (`full`: files from keras-rdrop up to 751f1f1).
    """
    keys = set(store.keys())
    count = len(keys - {_POSITIONS_KEY})
    if _POSITIONS_KEY in keys:
        positions = [int(p) for p in np.asarray(store[_POSITIONS_KEY])]
        first = count - len(positions)  # 1: "0" is a legacy beta
        if first not in (0, 1):
            raise ValueError(
                f"The reference snapshot in the file has {count} arrays for "
                f"{len(positions)} positions: it is not a snapshot file."
            )
    elif count:
        first, positions = 1, list(range(count - 1))
    else:
        return None
    beta = store["0"] if first else None
    values = {p: store[f"{i + first}"] for i, p in enumerate(positions)}
    return positions, values, beta, _POSITIONS_KEY not in keys


def _mismatch(positions, held, full: bool) -> ValueError:
    """The error for a file whose snapshot copies other weights than `held`."""
    return ValueError(
        "The reference snapshot in the file copies the float weights at "
        f"positions {sorted(positions)} of the model, but this model's "
        f"snapshot copies {sorted(held)}: the weights that are "
        "trainable differ between the run that wrote the file and this "
        "one. Freeze and unfreeze the same layers as in that run before "
        "restoring it (`BackupAndRestore` restores after "
        "`ReferenceKLRegularizer` has taken the snapshot of this run)."
        + (
            " The file holds a full snapshot (written by keras-rdrop "
            "up to 751f1f1); load it with `keras.saving.load_model`, "
            "which restores it as a full snapshot."
            if full
            else ""
        )
    )
