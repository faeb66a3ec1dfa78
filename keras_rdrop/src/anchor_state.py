"""`AnchorState`: the anchor's state besides θ0, a sub-layer of `RDropModel`.

It holds what `ReferenceKLRegularizer` changes while it trains: `beta` (the
weight of the penalty, a variable, because the adaptive controller steps it
inside the training step and a resumed run must continue from it), the step
a `LearningRateSchedule` `beta` is evaluated at inside the training step
(`beta_step`), the `ref_kl` tracker, and the settings the training step is
traced with. θ0
itself is in `ReferenceSnapshot`.
"""

from __future__ import annotations

import keras


class AnchorState(keras.layers.Layer):
    """`beta`, the `ref_kl` tracker and the anchor's traced settings.

    `beta` is created by `ensure_beta` when the anchor first attaches (or a
    file holding one is loaded), so a model never anchored has no variable
    for it. `settings` is a `reference_penalty.ReferenceSettings` while a
    `ReferenceKLRegularizer` is on, else `None`.
    """

    def __init__(self, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.ref_kl_tracker = keras.metrics.Mean(name="ref_kl")
        self.settings = None
        self.beta = None
        self.beta_step = None

    def ensure_beta(self) -> keras.Variable:
        """Creates `beta` (at 0) if it does not exist yet; returns it."""
        if self.beta is None:
            # `aggregation="mean"`: the adaptive controller assigns `beta`
            # inside the replicated step under `tf.distribute`.
            self.beta = self.add_weight(
                shape=(),
                initializer="zeros",
                dtype="float32",
                trainable=False,
                aggregation="mean",
                name="beta",
            )
            self.built = True
        return self.beta

    def ensure_beta_step(self) -> keras.Variable:
        """Creates `beta_step` if it does not exist yet; returns it.

        The training steps taken, for a `LearningRateSchedule` `beta`
        evaluated inside the step; created only for one, so that other
        anchored models hold `beta` and θ0 alone.
        """
        if self.beta_step is None:
            self.beta_step = self.add_weight(
                shape=(),
                initializer="zeros",
                dtype="int32",
                trainable=False,
                aggregation="only_first_replica",
                name="beta_step",
            )
        return self.beta_step

    def restore_beta(self, value) -> None:
        """Sets `beta` from a saved value (creating it if needed)."""
        self.ensure_beta().assign(value)

    def save_own_variables(self, store):
        if self.beta is not None:
            store["0"] = keras.ops.convert_to_numpy(self.beta.value)
        if self.beta_step is not None:
            store["1"] = keras.ops.convert_to_numpy(self.beta_step.value)

    def load_own_variables(self, store):
        # Files written before `beta` moved here hold it in the snapshot's
        # store, which restores it through `restore_beta`.
        keys = set(store.keys())
        if "0" in keys:
            self.restore_beta(store["0"])
        if "1" in keys:
            self.ensure_beta_step().assign(store["1"])
