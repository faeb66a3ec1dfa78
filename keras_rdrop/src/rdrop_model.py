"""`RDropModel`: R-Drop for any Keras model, on every backend."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import keras
from keras import ops

from keras_rdrop.src.alpha_schedule import (
    deserialize_alpha,
    serialize_alpha,
    validate_alpha,
    weigh_terms,
)
from keras_rdrop.src.alpha_state import AlphaState
from keras_rdrop.src.anchor_state import AnchorState
from keras_rdrop.src.consistency_terms import copy_sample_weight
from keras_rdrop.src.fused_reference_kl import chunked_for
from keras_rdrop.src.keras_hub_pipeline import TaskPreprocessingModel
from keras_rdrop.src.keras_internals import additional_losses, unscale_for_distribution
from keras_rdrop.src.label_checks import LabelCheck
from keras_rdrop.src.model_checks import has_stochastic_layer, validate_bool
from keras_rdrop.src.output_plan import PlanCache, PlanSettings
from keras_rdrop.src.reference_penalty import ReferenceRun, kl_kind, weighted_penalty
from keras_rdrop.src.reference_snapshot import ReferenceSnapshot
from keras_rdrop.src.seed_state import is_seed_key, load_seed_states, save_seed_states
from keras_rdrop.src.shared_prefix import PrefixSharing
from keras_rdrop.src.step_inputs import StepInputs
from keras_rdrop.src.step_mode import StepMode, TrainingOutputs, decide_step
from keras_rdrop.src.step_paths import chunked_setting, select_path
from keras_rdrop.src.weight_schedules import Schedule

MODES = ("sequential", "concat")
_OWN_LOG_NAMES = ("kl_loss", "task_loss", "ref_kl")


def _validate_alpha(alpha: Any, name: str = "alpha"):
    """A float, a schedule, or a dict of them (`alpha_schedule.validate_alpha`)."""
    return validate_alpha(alpha, name)


def _check_model(model) -> None:
    """Raises a `TypeError` unless `model` is a Keras model not yet wrapped."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` should be a `keras.Model` (Sequential, functional, "
            "subclassed or a keras-hub task). Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    if isinstance(model, RDropModel):
        raise TypeError(
            "`model` is already an `RDropModel`. Wrap the inner model once."
        )


def _training_outputs(y_pred) -> TrainingOutputs:
    """`y_pred` of a training step, which `RDropModel.call(training=True)`
    makes; a `TypeError` for anything else."""
    if not isinstance(y_pred, TrainingOutputs):
        raise TypeError(
            "`RDropModel.compute_loss(..., training=True)` takes the output of "
            "the model's own training call, `y_pred = model(x, training=True)` "
            "(a `TrainingOutputs` of both passes). Received: y_pred of type "
            f"{type(y_pred).__name__}. For the loss of one pass, call "
            "`compute_loss(..., training=False)`."
        )
    return y_pred


def _check_from_logits(from_logits) -> None:
    """Raises a `TypeError` unless `from_logits` is None, a bool or a dict."""
    if from_logits is not None and not isinstance(from_logits, (bool, dict)):
        raise TypeError(
            "`from_logits` should be None (read it from the compiled loss), a "
            f"bool, or a dict keyed by output name. Received: "
            f"from_logits={from_logits!r}"
        )


@keras.saving.register_keras_serializable(package="keras_rdrop")
class RDropModel(TaskPreprocessingModel):
    """Wraps any Keras model to train it with R-Drop.

    In each training step the inner model runs twice on the same batch with
    dropout active, so the two passes draw different masks. The loss is

    ```
    loss = (task_loss(pass_1) + task_loss(pass_2)) / 2
           + sum_o alpha_o * SKL(pass_1[o], pass_2[o])
    ```

    where `SKL` is the symmetric KL divergence `(KL(p||q) + KL(q||p)) / 2`,
    summed over classes and averaged over valid positions with the same
    `sample_weight` (and Keras mask) as the task loss. `evaluate` and `predict`
    make a single deterministic pass and return exactly what the inner model
    returns.

    Which outputs get the KL, and whether they hold logits, is read from the
    compiled loss: Keras' classification losses (`CategoricalCrossentropy`,
    `SparseCategoricalCrossentropy`, `BinaryCrossentropy` and the focal and
    string forms) mark an output as a distribution, and their `from_logits`
    says logits or probabilities (string losses take probabilities). Binary
    losses use the Bernoulli KL. Regression losses get no term unless
    `regression_consistency=True`, which adds the mean squared difference
    between the passes, as the R-Drop paper did for STS-B.

    Language models: when the compiled loss is one
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True)` on a single
    output (any `ignore_class`, `reduction`, float `loss_weights`, sample
    weights and Keras masks), the two passes' cross-entropies and their KL
    are computed together, in chunks, with a closed-form gradient
    (`FusedLanguageModelLoss`), then reduced by Keras' own loss
    reduction. The values are those of the general path; the step just keeps
    no logits-sized intermediates, which matters for large vocabularies.

    The training logs show `loss` (the total), `task_loss` (the task loss
    averaged over the two passes), `kl_loss` (the unweighted consistency term,
    summed over outputs), `ref_kl` (the KL to the reference, with
    `ReferenceKLRegularizer`) and the compiled metrics, computed on the first
    pass.
    A scheduled `alpha` adds its value at the step to the logs: `alpha`, or
    `alpha_<output>` for each scheduled entry of an `alpha` dict (a float
    `alpha` is not logged).

    Mistakes stop the first training step with a `ValueError` that says how
    to fix them: a `from_logits` that contradicts the output's activation or
    (read where eager) its values, and one-hot labels given to a sparse loss
    or integer labels to a categorical one.

    Args:
        model: The `keras.Model` to train: Sequential, functional (any input
            and output structure), subclassed or a keras-hub task.
        alpha: Weight of the consistency term: a non-negative float, a
            schedule of the training step, or a dict of them keyed by output
            name (outputs left out get 0). `alpha=0` skips the second pass,
            so the model trains exactly like plain `fit`. A schedule is a
            `keras.optimizers.schedules.LearningRateSchedule` (such as
            `PiecewiseConstantDecay` or `PolynomialDecay`), called inside the
            training step with the step as a scalar int32 tensor, like a
            learning-rate schedule; or a plain callable of the step, called on
            the host before each step with the step as a Python int (so it may
            use `if`: `lambda step: 0.0 if step < 1000 else 1.0`) and fed to
            the step through a variable, without retracing. The step is this
            model's training steps so far (`alpha_step`, saved with it). With
            a schedule, the second pass always runs, even where it is 0. The
            same three forms are accepted by `ReferenceKLRegularizer`'s
            `beta`. Plain callables cannot be serialized (`get_config`).
            Defaults to `1.0`.
        mode: `"sequential"` runs the inner model twice; `"concat"` runs it
            once on the batch concatenated with itself (`[x; x]`, as the
            R-Drop paper does) and splits the output. The math is the same;
            with `"concat"`, BatchNormalization sees 2B rows (the same batch
            twice, so the same statistics) and updates its moving averages
            once per step instead of twice. In either mode, calling the
            `RDropModel` itself with `training=True` returns the training
            step's `TrainingOutputs(first, second, prefix)` (both passes, for
            `compute_loss`); `predict`, `evaluate` and calls with
            `training=False` return one pass, as the inner model does.
            Defaults to `"concat"`.
        from_logits: Overrides what the compiled loss says: `True` for
            logits, `False` for probabilities, or a dict keyed by output name.
            Required for outputs whose loss is a custom callable. Defaults to
            `None` (read from the loss). A declaration that contradicts the
            output layer's activation (a softmax output declared as logits, an
            output with no activation declared as probabilities, such as a
            logits model compiled with the string loss
            `"sparse_categorical_crossentropy"`) raises a `ValueError` at the
            first training step, naming both fixes. On torch, and with
            `run_eagerly=True` on TensorFlow, the first step's values are
            checked too: declared probabilities outside [0, 1] raise a
            `ValueError`; declared logits that look like probabilities give
            one `UserWarning` (a heuristic: logits may lie in [0, 1]).
        regression_consistency: Whether outputs with a regression loss (MSE,
            MAE, Huber, ...) get a mean-squared-difference term between the
            passes. Defaults to `False`.
        consistency_on_all_rows: Whether the consistency terms (the R-Drop
            KL, and the anchor's KL when a `ReferenceKLRegularizer` is used)
            take every row at weight 1, whatever its `sample_weight`. Rows
            with `sample_weight=0` then get no task loss but the KL: they are
            unlabeled rows, with any loss (see the README's "Unlabeled rows").
            Keras masks still apply. Defaults to `False`: the consistency
            terms are weighted like the task loss.
        check_output_activation: Whether a `from_logits` declaration that
            contradicts the output layer's activation raises. Set it to
            `False` only for an output layer that emits probabilities without
            a softmax/sigmoid activation (a custom layer normalizing in its
            `call`), or logits despite one. Defaults to `True`.
        share_prefix: Whether the training step runs once what dropout
            cannot change. In a functional model (a `Sequential` one with an
            `Input`, or a keras-hub task), every layer before the first
            stochastic one (a frozen base without dropout, in the Keras
            transfer-learning recipe) gives the same output in both passes:
            it runs once per step, and only the rest of the model runs twice
            (on the prefix's output stacked with itself in `"concat"` mode).
            A sub-model called with `training=False` counts as deterministic
            where the installed Keras runs it in inference mode (the guide's
            "What runs twice" says which releases do). Where that prefix is
            frozen and does not depend on the training flag, the anchor's
            reference reuses its output too. The losses and gradients are
            those of two whole passes, up to float rounding;
            BatchNormalization in the prefix updates its moving statistics
            once per step, as in `"concat"` mode. A model that cannot be
            split (subclassed, or stochastic from its first layer) runs
            whole, and the first training step says so in the
            `"keras_rdrop"` logger, at info level. `predict`,
            `evaluate` and saving are not affected. Defaults to `True`.
        **kwargs: Passed to `keras.Model` (`name`, `trainable`, ...).

    Example:

    ```python
    import keras, numpy as np
    from keras_rdrop import RDropModel

    inner = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(3),
    ])
    model = RDropModel(inner, alpha=1.0)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x = np.random.rand(64, 20).astype("float32")
    y = np.random.randint(0, 3, size=(64,))
    history = model.fit(x, y, epochs=1, verbose=0)
    sorted(history.history)  # ['accuracy', 'kl_loss', 'loss', 'task_loss']
    model.model.save("inner.keras")  # serve without keras-rdrop

    # A warm-up: alpha rises linearly from 0 to 1 over 100 steps, logged.
    warm_up = keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=0.0, decay_steps=100, end_learning_rate=1.0
    )
    model = RDropModel(inner, alpha=warm_up)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    history.history["alpha"]  # ~[0.01]: the value at the last step (step 1)
    ```

    Reference:
        Liang et al., "R-Drop: Regularized Dropout for Neural Networks",
        NeurIPS 2021.
    """

    def __init__(
        self,
        model: keras.Model,
        alpha: float | Schedule | dict = 1.0,
        mode: str = "concat",
        from_logits: bool | dict | None = None,
        regression_consistency: bool = False,
        consistency_on_all_rows: bool = False,
        check_output_activation: bool = True,
        share_prefix: bool = True,
        **kwargs,
    ):
        _check_model(model)
        if mode not in MODES:
            raise ValueError(
                f"`mode` should be one of {MODES}. Received: mode={mode!r}"
            )
        _check_from_logits(from_logits)
        validate_bool(regression_consistency, "regression_consistency")
        validate_bool(consistency_on_all_rows, "consistency_on_all_rows")
        validate_bool(check_output_activation, "check_output_activation")
        validate_bool(share_prefix, "share_prefix")
        alpha = _validate_alpha(alpha)
        super().__init__(**kwargs)
        self.model = model
        self.alpha = alpha
        self.mode = mode
        self.from_logits = from_logits
        self.regression_consistency = regression_consistency
        self.consistency_on_all_rows = consistency_on_all_rows
        self.check_output_activation = check_output_activation
        self.share_prefix = share_prefix
        self._prefix = PrefixSharing(share_prefix)
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        # Alpha's step counter, logged values and host feeds (none for a
        # float alpha), the mirror of the anchor's state.
        self.alpha_state = AlphaState(alpha, name="alpha_state")
        # Filled by `ReferenceKLRegularizer`; holds no variables until then.
        self.anchor = AnchorState(name="anchor")
        self.reference = ReferenceSnapshot(
            legacy_beta=self.anchor.restore_beta, name="reference"
        )
        self._plans = PlanCache()
        self._check_labels = LabelCheck()
        self._loss_weights = None
        # The anchor's state the current training step was built for, and
        # the steps built for other states (`make_train_function`).
        self._train_function_state = None
        self._train_functions = {}
        # The training step's `StepMode` for each anchor state
        # (`_step_mode`), decided when the step is built.
        self._step_modes = {}
        if model.built:
            # RDropModel has no weights of its own: it is built when the inner
            # model is (BackupAndRestore, for one, requires a built model).
            self.built = True
        self._warn_if_passes_are_equal(model)

    def _warn_if_passes_are_equal(self, model) -> None:
        """Warns when the model has no stochastic layer to differ by."""
        if self._rdrop_enabled() and not has_stochastic_layer(model):
            warnings.warn(
                f"The model {model.name!r} has no stochastic layer (Dropout, "
                "GaussianNoise, ... with a non-zero rate), so both passes give "
                "the same output and the R-Drop KL term is always 0 (in "
                '"concat" mode, up to float rounding). Add dropout or set '
                "alpha=0.",
                UserWarning,
                stacklevel=3,
            )

    @property
    def alpha_step(self) -> keras.Variable:
        """The training steps this model has taken, for a scheduled `alpha`
        (saved with the model); there is none for a float `alpha`."""
        if self.alpha_state.step is None:
            raise AttributeError(
                "`alpha_step` exists only for a scheduled `alpha`; this model's "
                f"alpha is {self.alpha!r}."
            )
        return self.alpha_state.step

    def _rdrop_enabled(self) -> bool:
        return self.alpha_state.enabled

    def _training_callbacks(self, callbacks):
        """`callbacks` and the feed of a plain-callable `alpha`, for `fit`."""
        return self.alpha_state.with_feed(callbacks)

    def _before_train_on_batch(self) -> None:
        """Feeds a plain-callable `alpha` its step, for `train_on_batch`."""
        self.alpha_state.feed_now()

    def compile(
        self, optimizer="rmsprop", loss=None, loss_weights=None, *args, **kwargs
    ):
        """Configures the model for training; see `keras.Model.compile`."""
        # The fused path applies `loss_weights` itself.
        self._loss_weights = loss_weights
        self._plans.clear()
        self._train_functions = {}
        self._step_modes = {}
        super().compile(optimizer, loss, loss_weights, *args, **kwargs)

    def make_train_function(self, force=False):
        """Builds the training step; see `keras.Model.make_train_function`.

        The step is traced with the anchor's settings, which
        `ReferenceKLRegularizer` sets when `fit` starts and clears when it
        ends. One step is kept for each settings it was built with: a `fit`
        (or `train_on_batch`) reuses the step built for its settings, so
        alternating anchored and plain `fit` calls trace each step once.
        `compile` clears them.
        """
        self._prefix.prepare(self.model, rdrop=self._rdrop_enabled())
        state = self._anchor_state()
        # Decided again at each `fit`: layers may be unfrozen between them.
        self._step_modes[state] = self._decide_step()
        if self.train_function is not None and not force:
            if self._train_function_state == state:
                return self.train_function
            self._train_functions[self._train_function_state] = self.train_function
            if state in self._train_functions:
                self.train_function = self._train_functions[state]
                self._train_function_state = state
                return self.train_function
            force = True
            # JAX keeps traced steps by their function, and a bound method
            # equals the previous one: a new function object makes the step
            # trace again instead of reusing the trace of the old settings.
            self.train_step = functools.partial(type(self).train_step, self)
        function = super().make_train_function(force=force)
        self._train_function_state = state
        return function

    def _anchor_state(self) -> tuple:
        """What of the anchor a traced training step depends on."""
        settings = self.anchor.settings
        return (
            None if settings is None else settings.key(),
            len(self.reference.ref_weights),
        )

    def compile_from_config(self, config):
        """Compiles the model as `config` says (a loaded `.keras` file)."""
        # Keras skips this for a model whose `compile` is overridden, as
        # ours is, unless the model does it itself.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------------------ call

    def build(self, input_shape=None):
        # Nothing to create: the inner model builds itself on its first call,
        # and the reference snapshot stays empty until a
        # `ReferenceKLRegularizer` fills it.
        pass

    def _decide_step(self) -> StepMode:
        """Every decision about the training step, for the anchor's state."""
        settings = self.anchor.settings
        reference = None
        if settings is not None and self.reference.taken:
            reference = ReferenceRun(self.reference, self.model, kl_kind(settings))
        return decide_step(
            rdrop=self._rdrop_enabled(),
            mode=self.mode,
            split=self._prefix.split,
            reference=reference,
            chunked=chunked_setting(chunked_for(self)),
        )

    def _step_mode(self) -> StepMode:
        """The `StepMode` of a training step with the anchor as it is now."""
        state = self._anchor_state()
        if state not in self._step_modes:  # a call outside `fit`
            self._step_modes[state] = self._decide_step()
        return self._step_modes[state]

    def call(self, inputs, training=None):
        if not training:
            return self.model(inputs, training=training)
        return self._step_mode().forward(self.model, inputs)

    # ------------------------------------------------------------------ loss

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if not training:
            self._check_step(y, y_pred, training)
            return super().compute_loss(x, y, y_pred, sample_weight, training=False)
        outputs = _training_outputs(y_pred)
        self._check_step(y, outputs.first, training)
        mode = self._step_mode()
        step = self._step_inputs(x, y, outputs, sample_weight, mode)
        reference = mode.reference_run(outputs)
        path = select_path(step, reference is not None)
        losses = path.compute(step, reference)
        total = losses.task_loss
        self.task_loss_tracker.update_state(
            unscale_for_distribution(losses.task_loss), sample_weight=step.batch_size
        )
        if step.y_pred_2 is not None:
            current_alphas = self.alpha_state.advance()
            consistency = weigh_terms(losses.terms, self.alpha, current_alphas)
            total = total + consistency.weighted
            # Under `tf.distribute` the loss values are scaled per replica;
            # the logs show them unscaled, as Keras does for `loss`.
            self.kl_loss_tracker.update_state(
                unscale_for_distribution(consistency.unweighted),
                sample_weight=step.batch_size,
            )
        if losses.reference_kl is not None:
            total = total + weighted_penalty(
                self.anchor, losses.reference_kl, step.batch_size
            )
        return total

    def _check_step(self, y, y_pred, training) -> None:
        """Stops a step that cannot compute its loss, saying how to fix it."""
        if training and self.loss is None and not self.losses:
            # Keras' JAX trainer would silently train on a zero loss.
            raise ValueError(
                "No loss to compute: RDropModel needs the task loss. Provide a "
                "`loss` argument in `compile()`."
            )
        if y is None and self.loss is not None:
            raise ValueError(
                "RDropModel received a batch without targets: the data yields "
                "`(x,)` or `x` alone, but the compiled loss needs `y`. Yield "
                "`(x, y)` or `(x, y, sample_weight)` batches (or pass `y=` to "
                "`fit`)."
            )
        if y is not None and self.loss is not None:
            # Also before the first step: Keras' symbolic build at the start
            # of `fit` computes the loss (training=False) on one pass.
            output_names = getattr(self.model, "output_names", None)
            self._check_labels(self.loss, y, y_pred, output_names)

    def _step_inputs(
        self, x, y, outputs: TrainingOutputs, sample_weight, mode: StepMode
    ) -> StepInputs:
        """The training step's `StepInputs`: both passes and their weights."""
        return StepInputs(
            x=x,
            y=y,
            y_pred_1=outputs.first,
            y_pred_2=outputs.second,
            sample_weight=sample_weight,
            consistency_weight=None if self.consistency_on_all_rows else sample_weight,
            batch_size=ops.shape(keras.tree.flatten(x)[0])[0],
            plan=self._plans.get(
                self.model, self.loss, self._plan_settings(), outputs.first
            ),
            loss=self.loss,
            loss_weights=self._loss_weights,
            task_loss_of=self._task_loss_of(x, y, sample_weight),
            additional_losses=additional_losses(self),
            chunked=mode.chunked,
        )

    def _plan_settings(self) -> PlanSettings:
        return PlanSettings(
            alpha=self.alpha,
            from_logits=self.from_logits,
            regression_consistency=self.regression_consistency,
            check_output_activation=self.check_output_activation,
        )

    def _task_loss_of(self, x, y, sample_weight):
        """`y_pred -> Keras' own loss of one pass` (compiled loss plus
        `model.losses`)."""

        def task_loss(y_pred):
            return super(RDropModel, self).compute_loss(
                x, y, y_pred, copy_sample_weight(sample_weight), training=True
            )

        return task_loss

    # --------------------------------------------------------------- metrics

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # A training step's `y_pred` is the `TrainingOutputs` of `call`: the
        # metrics see the first pass.
        training = isinstance(y_pred, TrainingOutputs)
        results = super().compute_metrics(
            x, y, y_pred.first if training else y_pred, sample_weight
        )
        if not training:
            # `evaluate` reports exactly what the inner model would.
            own = set(_OWN_LOG_NAMES) | set(self.alpha_state.schedules)
            return {k: v for k, v in results.items() if k not in own}
        mode = self._step_mode()
        if mode.reference is None:
            results.pop("ref_kl", None)
        if not mode.rdrop:
            results.pop("kl_loss", None)
        return results

    # ---------------------------------------------------------- serialization

    def save_own_variables(self, store):
        """Saves the model's own state, with the inner model's seed states.

        Keras saves no `SeedGenerator` state; storing the inner model's here
        makes a run resumed from a checkpoint (`BackupAndRestore`,
        `load_weights`) draw the dropout masks an uninterrupted run draws.
        """
        super().save_own_variables(store)
        save_seed_states(self.model, store)

    def load_own_variables(self, store):
        """Loads what `save_own_variables` saved (seed states if present)."""
        own = {key: store[key] for key in store.keys() if not is_seed_key(key)}
        if own:
            # Written before `AlphaState`: alpha's variables were the model's
            # own, in the order `AlphaState` creates them.
            self.alpha_state.load_own_variables(own)
        load_seed_states(self.model, store)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "alpha": serialize_alpha(self.alpha),
                "mode": self.mode,
                "from_logits": self.from_logits,
                "regression_consistency": self.regression_consistency,
                "consistency_on_all_rows": self.consistency_on_all_rows,
                "check_output_activation": self.check_output_activation,
                "share_prefix": self.share_prefix,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        if "alpha" in config:
            config["alpha"] = deserialize_alpha(config["alpha"], custom_objects)
        return cls(**config)
