"""`ReferenceSnapshot`: the frozen copy θ0 of a model's weights, and its KL term.

It is a sub-layer of `RDropModel`, so its variables are model state on every
backend: saved and restored with the model (`.keras`, `BackupAndRestore`),
passed into the jitted JAX step, and never trained (they are non-trainable).
It holds no variables until `ReferenceKLRegularizer` takes the snapshot.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from keras_rdrop.src.consistency_terms import (
    copy_sample_weight,
    num_replicas_in_sync,
    per_output_weights,
    position_weights,
    unscale_for_distribution,
)
from keras_rdrop.src.keras_internals import set_variable_layout, variable_layout

DIRECTIONS = ("forward", "reverse", "symmetric")
_KIND = {"forward": "kl", "reverse": "reverse_kl", "symmetric": "symmetric_kl"}


@dataclasses.dataclass
class ReferenceSettings:
    """What the training step reads at trace time."""

    direction: str = "forward"
    target_kl: float | None = None
    horizon: float = 10000.0


def _is_float(variable) -> bool:
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(variable.dtype))


def snapshot_weights(model: keras.Model) -> list:
    """The weights a snapshot copies: every float weight of `model`, in order."""
    return [w for w in model.weights if _is_float(w)]


class ReferenceSnapshot(keras.layers.Layer):
    """Holds θ0 as non-trainable variables and computes the reference KL.

    Variables, in order: `beta` (the current weight of the penalty), then one
    copy per float weight of the inner model (`snapshot_weights`).
    """

    def __init__(self, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.ref_kl_tracker = keras.metrics.Mean(name="ref_kl")
        self.settings: ReferenceSettings | None = None
        self._value_map = None

    @property
    def active(self) -> bool:
        return self.settings is not None and self.built

    def build(self, weight_specs, layouts=None):
        """Creates `beta` and one variable per `(shape, dtype)` in `weight_specs`.

        `layouts`, one per spec, lays each copy out like the weight it copies
        (a `keras.distribution` layout, as Keras' optimizers do for their
        slots); `None` leaves it to the current distribution, if any.
        """
        # `aggregation="mean"`: the adaptive controller assigns `beta` inside
        # the replicated step under `tf.distribute`.
        self.beta = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="float32",
            trainable=False,
            aggregation="mean",
            name="beta",
        )
        layouts = layouts or [None] * len(weight_specs)
        # `add_weight` takes no layout: create the variables as it does.
        with keras.name_scope(self.name, caller=self):
            self.ref_weights = [
                keras.Variable(
                    initializer="zeros",
                    shape=tuple(shape),
                    dtype=dtype,
                    trainable=False,
                    name=f"ref_{i}",
                    layout=layout,
                )
                for i, ((shape, dtype), layout) in enumerate(zip(weight_specs, layouts))
            ]

    def take(self, model: keras.Model, dtype: str | None = None):
        """Copies `model`'s current float weights into the snapshot."""
        weights = snapshot_weights(model)
        if not self.built:
            specs = [
                (tuple(w.shape), dtype or keras.backend.standardize_dtype(w.dtype))
                for w in weights
            ]
            self.build(specs, [variable_layout(w) for w in weights])
        self.check_matches(model)
        self.match_layouts(model)
        for ref, w in zip(self.ref_weights, weights):
            # A copy: on JAX the snapshot must not share the weight's buffer,
            # which the training step donates.
            ref.assign(ops.copy(ops.cast(w.value, ref.dtype)))
        self._value_map = None

    def soft_update(self, model: keras.Model, tau: float):
        """ref <- tau * θ + (1 - tau) * ref."""
        for ref, w in zip(self.ref_weights, snapshot_weights(model)):
            mixed = tau * ops.cast(w.value, "float32") + (1.0 - tau) * ops.cast(
                ref.value, "float32"
            )
            ref.assign(ops.cast(mixed, ref.dtype))

    def check_matches(self, model: keras.Model):
        weights = snapshot_weights(model)
        if len(weights) != len(self.ref_weights):
            raise ValueError(
                f"The reference snapshot holds {len(self.ref_weights)} weights but "
                f"the model has {len(weights)}: it was taken from another model."
            )
        for ref, w in zip(self.ref_weights, weights):
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
        for ref, w in zip(self.ref_weights, snapshot_weights(model)):
            layout = variable_layout(w)
            if layout is not None and variable_layout(ref) is not layout:
                set_variable_layout(ref, layout)  # JAX: re-distributed

    def load_own_variables(self, store):
        # A snapshot saved with the model is restored even into a fresh,
        # never-snapshotted RDropModel: build it from the stored arrays first.
        if not self.built and len(store.keys()) > 1:
            count = len(store.keys())
            specs = [
                (store[f"{i}"].shape, str(store[f"{i}"].dtype)) for i in range(1, count)
            ]
            self.build(specs)
        super().load_own_variables(store)
        self._value_map = None

    # ------------------------------------------------------------- training

    def _reference_values(self, model):
        if self._value_map is None:
            weights = snapshot_weights(model)
            self._value_map = {id(w): i for i, w in enumerate(weights)}

        def value(variable):
            index = self._value_map.get(id(variable))
            if index is None:  # integer state such as seeds: not snapshotted
                return variable.value
            ref = self.ref_weights[index]
            if ref.dtype == variable.dtype:
                return ref.value  # no cast op per weight and step (eager torch)
            return ops.cast(ref.value, variable.dtype)

        return (
            [value(v) for v in model.trainable_variables],
            [value(v) for v in model.non_trainable_variables],
        )

    def penalty(self, plan, model, x, y_pred, sample_weight, batch_size):
        """`beta * KL` between the live outputs and the reference's, on `x`.

        Args:
            plan: The step's per-output plan (`output_plan.build_plan`): the
                outputs with no consistency term get no KL.
            model: The inner model whose weights the snapshot copies.
            x: The batch's inputs.
            y_pred: The live outputs of the first pass on `x`.
            sample_weight: The step's `sample_weight`, or `None`.
            batch_size: The batch's size, to weigh the logged `ref_kl`.
        """
        trainable, non_trainable = self._reference_values(model)
        ref_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        flat_live = keras.tree.flatten(y_pred)
        flat_ref = [ops.stop_gradient(t) for t in keras.tree.flatten(ref_pred)]
        if len(flat_live) != len(flat_ref):
            raise ValueError(
                f"The reference gives {len(flat_ref)} outputs but the model gives "
                f"{len(flat_live)}."
            )
        weights = per_output_weights(copy_sample_weight(sample_weight), len(flat_live))
        kind = _KIND[self.settings.direction]
        total = ops.zeros((), "float32")
        for entry, live, ref, w in zip(plan, flat_live, flat_ref, weights):
            if tuple(live.shape[1:]) != tuple(ref.shape[1:]):
                raise ValueError(
                    f"The reference's output {entry.name!r} has shape "
                    f"{tuple(ref.shape)} but the model's has shape "
                    f"{tuple(live.shape)}."
                )
            if entry.term is None:
                continue
            # The reference is constant: no gradient is computed for it.
            loss = entry.term.pairwise(kind, constant_b=True)
            total = total + loss(live, ref, sample_weight=position_weights(w, live))
        # `total` is scaled per replica under `tf.distribute`, like the loss.
        kl = unscale_for_distribution(ops.stop_gradient(total))
        self.ref_kl_tracker.update_state(kl, sample_weight=batch_size)
        beta = self.beta.value
        settings = self.settings
        if settings.target_kl is not None:
            # Ziegler et al. (2019): proportional control of beta toward a
            # target KL, clipped to +-20% error, over a horizon in examples.
            # Under `tf.distribute` each replica steps by the global batch and
            # the replicas' new values are averaged (`beta` aggregates "mean").
            error = ops.clip(kl / settings.target_kl - 1.0, -0.2, 0.2)
            global_batch = ops.cast(batch_size, "float32") * num_replicas_in_sync()
            step = global_batch / settings.horizon
            self.beta.assign(beta * (1.0 + error * step))
        return beta * total
