"""`ReferenceKLRegularizer`: anchor fine-tuning to a frozen snapshot of the model."""

from __future__ import annotations

import contextlib
import numbers

import keras
from keras import ops

from keras_rdrop.src.reference_penalty import DIRECTIONS, ReferenceSettings
from keras_rdrop.src.reference_snapshot import ReferenceSnapshot
from keras_rdrop.src.weight_schedules import (
    Schedule,
    is_host_schedule,
    is_schedule,
    is_traced_schedule,
    validate_weight,
    weight_at,
)


def _positive_int_or_none(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` should be a positive int or None. Received: {name}={value!r}"
        )
    return value


def _iterations(model) -> int:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return 0
    return int(ops.convert_to_numpy(optimizer.iterations))


@keras.saving.register_keras_serializable(package="keras_rdrop")
class ReferenceKLRegularizer(keras.callbacks.Callback):
    """Adds `beta * KL(model || reference)` to the loss of an `RDropModel`.

    When training starts, the callback copies the inner model's weights that
    training can change (the trainable ones, and state such as the moving
    statistics of trainable BatchNormalization layers) into a frozen snapshot
    θ0, non-trainable state of the `RDropModel`; frozen weights are read from
    the live model, where they keep their θ0 values. In every
    training step it runs the snapshot on the same batch, in inference mode
    (dropout off, BatchNormalization on its moving statistics, nothing in the
    live model updated, no gradient), and adds the penalty:

    ```
    loss = task_loss + beta * E_x[ KL(p_theta(.|x) || p_theta0(.|x)) ]
    ```

    The sign is **plus**: the penalty pulls the model toward the reference,
    which curbs forgetting. (Some write-ups print a minus sign, which would
    push it away.) The KL is exact over the classes or vocabulary, masked and
    weighted like the task loss (padding in sequence outputs is ignored), and
    applied to every output RDropModel treats as a distribution. `ref_kl`
    (the unweighted KL) is logged in the progress bar and `History`.

    Direction, against PyTorch's `F.kl_div(input, target)` (which computes
    `KL(target || input)` with `input` as log-probabilities):

    - `"forward"`: `KL(p_theta || p_theta0)`, i.e.
      `F.kl_div(log p_theta0, p_theta)`: mode-seeking, the default.
    - `"reverse"`: `KL(p_theta0 || p_theta)`, i.e.
      `F.kl_div(log p_theta, p_theta0)`: mass-covering, like distillation
      from the reference.
    - `"symmetric"`: the mean of both.

    In TRL's and distillation's naming, `"forward"` here (`KL(policy ||
    reference)`, the RLHF penalty) is what they call the *reverse* KL, and
    `"reverse"` here is their *forward* KL.

    Cost: one copy of the weights that training changes (half with
    `reference_dtype="bfloat16"`), so a LoRA or frozen-backbone model holds a
    copy of its small trainable part only, and one inference forward pass per
    step. Layers unfrozen between `fit` calls are added to the snapshot when
    the next `fit` starts; unfreezing one during `fit` is an error.

    The snapshot is taken once per `RDropModel` and kept across `fit` calls,
    `.keras` saves and `BackupAndRestore` resumes: a resumed run is anchored
    to the original θ0, not to the resumed weights. Pass
    `reset_reference=True` to re-anchor to the current weights.

    Args:
        beta: Weight of the penalty: a non-negative float, or a schedule of
            the training step, as `RDropModel`'s `alpha` takes one: a
            `keras.optimizers.schedules.LearningRateSchedule`, called inside
            the training step with the step as a scalar int32 tensor, or a
            plain callable of the step, called on the host before each batch
            with the step as a Python int (so it may use `if`) and fed to the
            step through a variable, so the step is not retraced. The step
            counts from the optimizer's when `fit` starts. With `target_kl` it
            is the initial value, a float. Defaults to `0.1`.
        direction: `"forward"`, `"reverse"` or `"symmetric"`, see above.
            Defaults to `"forward"`.
        refresh_every_epochs: Re-take the snapshot from the current weights
            at the end of every N epochs. Defaults to `None` (never).
        refresh_every_steps: Re-take it every N steps. Defaults to `None`.
        soft_update_tau: With `soft_update_every`, every N steps move the
            reference toward the model: `ref <- tau * theta + (1 - tau) * ref`
            (TR-DPO). Defaults to `None`.
        soft_update_every: Steps between soft updates. Defaults to `None`.
        target_kl: Adapt `beta` toward this KL after every step with the
            proportional controller of Ziegler et al. (2019):
            `beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon`.
            Defaults to `None` (fixed or scheduled beta).
        horizon: The controller's horizon, in examples. Defaults to `10000`.
        reference_dtype: Dtype to store the snapshot in, such as
            `"bfloat16"` to halve its memory. Defaults to `None` (the
            weights' own dtype).
        reset_reference: Take a new snapshot even if the model already
            carries one. Defaults to `False`.

    Example:

    ```python
    import keras, numpy as np
    from keras_rdrop import RDropModel, ReferenceKLRegularizer

    pretrained = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.1), keras.layers.Dense(4),
    ])
    model = RDropModel(pretrained, alpha=0.0)  # alpha > 0 adds R-Drop too
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.random.rand(32, 8).astype("float32")
    y = np.random.randint(0, 4, size=(32,))
    history = model.fit(x, y, epochs=1, verbose=0,
                        callbacks=[ReferenceKLRegularizer(beta=0.1)])
    "ref_kl" in history.history  # True
    ```

    Reference:
        Ziegler et al., "Fine-Tuning Language Models from Human Preferences",
        2019 (adaptive KL controller); Gorbatovski et al., "Learn Your
        Reference Model for Real Good Alignment", 2024 (TR-DPO updates).
    """

    def __init__(
        self,
        beta: float | Schedule = 0.1,
        direction: str = "forward",
        refresh_every_epochs: int | None = None,
        refresh_every_steps: int | None = None,
        soft_update_tau: float | None = None,
        soft_update_every: int | None = None,
        target_kl: float | None = None,
        horizon: float = 10000.0,
        reference_dtype: str | None = None,
        reset_reference: bool = False,
    ):
        super().__init__()
        self.beta = validate_weight(beta, "beta")
        if direction not in DIRECTIONS:
            raise ValueError(
                f"`direction` should be one of {DIRECTIONS}. Received: "
                f"direction={direction!r}"
            )
        self.direction = direction
        self.refresh_every_epochs = _positive_int_or_none(
            refresh_every_epochs, "refresh_every_epochs"
        )
        self.refresh_every_steps = _positive_int_or_none(
            refresh_every_steps, "refresh_every_steps"
        )
        if (soft_update_tau is None) != (soft_update_every is None):
            raise ValueError(
                "`soft_update_tau` and `soft_update_every` go together: set both "
                f"or neither. Received: soft_update_tau={soft_update_tau!r}, "
                f"soft_update_every={soft_update_every!r}"
            )
        if soft_update_tau is not None and not (
            isinstance(soft_update_tau, numbers.Real) and 0 < soft_update_tau <= 1
        ):
            raise ValueError(
                "`soft_update_tau` should be a float in (0, 1]. Received: "
                f"soft_update_tau={soft_update_tau!r}"
            )
        self.soft_update_tau = soft_update_tau
        self.soft_update_every = _positive_int_or_none(
            soft_update_every, "soft_update_every"
        )
        if target_kl is not None and not (
            isinstance(target_kl, numbers.Real) and target_kl > 0
        ):
            raise ValueError(
                "`target_kl` should be a positive float. Received: "
                f"target_kl={target_kl!r}"
            )
        if target_kl is not None and is_schedule(beta):
            raise ValueError(
                "`target_kl` adapts beta itself, so `beta` should be its initial "
                f"float value, not a schedule. Received: beta={beta!r}"
            )
        self.target_kl = None if target_kl is None else float(target_kl)
        if not (isinstance(horizon, numbers.Real) and horizon > 0):
            raise ValueError(
                f"`horizon` should be a positive number. Received: horizon={horizon!r}"
            )
        self.horizon = float(horizon)
        if reference_dtype is not None and not keras.backend.is_float_dtype(
            keras.backend.standardize_dtype(reference_dtype)
        ):
            raise ValueError(
                "`reference_dtype` should be a float dtype such as 'bfloat16'. "
                f"Received: reference_dtype={reference_dtype!r}"
            )
        self.reference_dtype = reference_dtype
        self.reset_reference = bool(reset_reference)
        self._step = 0

    # ------------------------------------------------------------ attaching

    def set_model(self, model):
        # An RDropModel holds its snapshot as `model.reference` (asked this
        # way so that this module need not import RDropModel).
        if not isinstance(getattr(model, "reference", None), ReferenceSnapshot):
            raise TypeError(
                "ReferenceKLRegularizer works on an RDropModel, which holds the "
                f"reference snapshot. Received a {type(model).__name__}. Wrap your "
                "model first: `model = RDropModel(model, alpha=0.0)` (alpha=0 "
                "gives the anchor alone), then compile and fit it."
            )
        super().set_model(model)
        reference = model.reference
        # Under `tf.distribute`, snapshot variables are created in the model's
        # strategy (mirrored like its weights), not on one device.
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            if reference.positions is None:
                reference.take(model.model, dtype=self.reference_dtype)
            else:
                reference.check_matches(model.model)
                reference.match_layouts(model.model)
                # Layers unfrozen since the snapshot was taken: copy them now,
                # while they still hold θ0.
                reference.extend(model.model, dtype=self.reference_dtype)
                if self.reset_reference:
                    reference.refresh(model.model)
            beta = model.anchor.ensure_beta()
            traced = self.beta if is_traced_schedule(self.beta) else None
            if traced is not None:
                model.anchor.ensure_beta_step()
        model.anchor.settings = ReferenceSettings(
            direction=self.direction,
            target_kl=self.target_kl,
            horizon=self.horizon,
            beta_schedule=traced,
        )
        # `BackupAndRestore` restores a resumed run's beta after this.
        step = _iterations(model)
        beta.assign(self._beta_at(step))
        if traced is not None:
            model.anchor.beta_step.assign(step)
        # The training step reads the settings when it is traced:
        # `RDropModel.make_train_function` rebuilds it if they changed.

    def on_train_begin(self, logs=None):
        self._step = _iterations(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        # The snapshot can only grow between `fit` calls (`set_model`): the
        # training step's state is fixed while `fit` runs.
        model = self.model
        missing = model.reference.missing(model.model)
        if missing:
            names = ", ".join(repr(w.path) for w in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise RuntimeError(
                f"The weights {names}{more} became trainable during `fit`, after "
                "the reference snapshot was taken without them: the anchor would "
                "follow their new values instead of θ0. Change which layers are "
                "trainable between `fit` calls (then compile again): "
                "`ReferenceKLRegularizer` then adds them to the snapshot with "
                "their values at that point, which are still θ0 if they were "
                "frozen until then."
            )

    def on_train_end(self, logs=None):
        # A later `fit` without the anchor rebuilds the step without it.
        self.model.anchor.settings = None

    # ------------------------------------------------------------- stepping

    def _beta_at(self, step: int) -> float:
        return weight_at(self.beta, step, "beta")

    def on_train_batch_begin(self, batch, logs=None):
        if is_host_schedule(self.beta):
            self.model.anchor.beta.assign(self._beta_at(self._step))

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.refresh_every_steps and self._step % self.refresh_every_steps == 0:
            model = self.model
            model.reference.refresh(model.model)
        if self.soft_update_every and self._step % self.soft_update_every == 0:
            model = self.model
            model.reference.soft_update(model.model, self.soft_update_tau)

    def on_epoch_end(self, epoch, logs=None):
        if self.refresh_every_epochs and (epoch + 1) % self.refresh_every_epochs == 0:
            model = self.model
            model.reference.refresh(model.model)

    def get_config(self) -> dict:
        if is_host_schedule(self.beta):
            raise NotImplementedError(
                "A ReferenceKLRegularizer whose `beta` is a plain callable has no "
                "config. Use a keras.optimizers.schedules.LearningRateSchedule (a "
                "custom one registered with @keras.saving.register_keras_serializable)."
            )
        beta = self.beta
        if is_traced_schedule(beta):
            beta = keras.saving.serialize_keras_object(beta)
        return {
            "beta": beta,
            "direction": self.direction,
            "refresh_every_epochs": self.refresh_every_epochs,
            "refresh_every_steps": self.refresh_every_steps,
            "soft_update_tau": self.soft_update_tau,
            "soft_update_every": self.soft_update_every,
            "target_kl": self.target_kl,
            "horizon": self.horizon,
            "reference_dtype": self.reference_dtype,
            "reset_reference": self.reset_reference,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("beta"), dict):
            config["beta"] = keras.saving.deserialize_keras_object(config["beta"])
        return cls(**config)
