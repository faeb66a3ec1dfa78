"""`RDropModel`: R-Drop for any Keras model, on every backend."""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import keras
from keras import ops

from keras_rdrop import keras_hub_support
from keras_rdrop.consistency_terms import (
    PairwiseTerm,
    position_weights,
    unscale_for_distribution,
)
from keras_rdrop.fused_cross_entropy import (
    ReducedLike,
    cross_entropy_and_symmetric_kl,
    fusable_loss,
    sparse_labels,
)
from keras_rdrop.masking import get_keras_mask, set_keras_mask
from keras_rdrop.output_specs import describe_loss, flatten_like_outputs
from keras_rdrop.prediction_checks import (
    check_output_activation,
    check_values,
    output_activations,
)
from keras_rdrop.reference_snapshot import ReferenceSnapshot

MODES = ("sequential", "concat")
_OWN_LOG_NAMES = ("kl_loss", "task_loss", "ref_kl")
_STOCHASTIC_TYPES = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)


def _validate_alpha(alpha: Any, name: str = "alpha"):
    if isinstance(alpha, dict):
        return {k: _validate_alpha(v, f"{name}[{k!r}]") for k, v in alpha.items()}
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not alpha >= 0
        or alpha == float("inf")
    ):
        error = TypeError if not isinstance(alpha, numbers.Real) else ValueError
        raise error(
            f"`{name}` should be a non-negative float (or a dict of them keyed by "
            f"output name). Received: {name}={alpha!r}"
        )
    return float(alpha)


def has_stochastic_layer(model: keras.Model) -> bool:
    """Whether any layer of `model` draws random numbers in training."""
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, _STOCHASTIC_TYPES):
            rate = getattr(layer, "rate", getattr(layer, "stddev", 1.0))
            if rate and rate > 0:
                return True
            continue
        if any(
            isinstance(value, keras.random.SeedGenerator)
            for value in vars(layer).values()
        ):
            return True
    return False


@keras.saving.register_keras_serializable(package="keras_rdrop")
class RDropModel(keras.Model):
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
    (`keras_rdrop.fused_cross_entropy`), then reduced by Keras' own loss
    reduction. The values are those of the general path; the step just keeps
    no logits-sized intermediates, which matters for large vocabularies.

    The training logs show `loss` (the total), `task_loss` (the task loss
    averaged over the two passes), `kl_loss` (the unweighted consistency term,
    summed over outputs) and the compiled metrics, computed on the first pass.

    Args:
        model: The `keras.Model` to train: Sequential, functional (any input
            and output structure), subclassed or a keras-hub task.
        alpha: Weight of the consistency term: a non-negative float, or a dict
            keyed by output name (outputs left out get 0). `alpha=0` skips the
            second pass, so the model trains exactly like plain `fit`.
            Defaults to `1.0`.
        mode: `"sequential"` runs the inner model twice; `"concat"` runs it
            once on the batch concatenated with itself (`[x; x]`, as the
            R-Drop paper does) and splits the output. The math is the same;
            with `"concat"`, BatchNormalization sees 2B rows (the same batch
            twice, so the same statistics) and updates its moving averages
            once per step instead of twice. In this mode, calling the
            `RDropModel` itself with `training=True` returns both passes
            stacked along the batch axis; `predict`, `evaluate` and calls with
            `training=False` return one pass. Defaults to `"concat"`.
        from_logits: Overrides what the compiled loss says: `True` for
            logits, `False` for probabilities, or a dict keyed by output name.
            Required for outputs whose loss is a custom callable. Defaults to
            `None` (read from the loss). A declaration that contradicts the
            output layer's activation (a softmax output declared as logits, an
            output with no activation declared as probabilities) gives one
            `UserWarning` at the first training step; on torch, and with
            `run_eagerly=True` on TensorFlow, the first step's values are
            checked too (see `kl_divergence`).
        regression_consistency: Whether outputs with a regression loss (MSE,
            MAE, Huber, ...) get a mean-squared-difference term between the
            passes. Defaults to `False`.
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
    ```

    Reference:
        Liang et al., "R-Drop: Regularized Dropout for Neural Networks",
        NeurIPS 2021.
    """

    def __init__(
        self,
        model: keras.Model,
        alpha: float | dict = 1.0,
        mode: str = "concat",
        from_logits: bool | dict | None = None,
        regression_consistency: bool = False,
        **kwargs,
    ):
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
        if mode not in MODES:
            raise ValueError(
                f"`mode` should be one of {MODES}. Received: mode={mode!r}"
            )
        if from_logits is not None and not isinstance(from_logits, (bool, dict)):
            raise TypeError(
                "`from_logits` should be None (read it from the compiled loss), a "
                f"bool, or a dict keyed by output name. Received: "
                f"from_logits={from_logits!r}"
            )
        if not isinstance(regression_consistency, bool):
            raise TypeError(
                "`regression_consistency` should be a bool. Received: "
                f"regression_consistency={regression_consistency!r}"
            )
        super().__init__(**kwargs)
        self.model = model
        self.alpha = _validate_alpha(alpha)
        self.mode = mode
        self.from_logits = from_logits
        self.regression_consistency = regression_consistency
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        # Filled by `ReferenceKLRegularizer`; holds no variables until then.
        self.reference = ReferenceSnapshot(name="reference")
        self._stacked_outputs = False
        self._training_step = False
        self._activations_checked = False
        if model.built:
            # RDropModel has no weights of its own: it is built when the inner
            # model is (BackupAndRestore, for one, requires a built model).
            self.built = True
        if self._rdrop_enabled() and not has_stochastic_layer(model):
            warnings.warn(
                f"The model {model.name!r} has no stochastic layer (Dropout, "
                "GaussianNoise, ... with a non-zero rate), so both passes give "
                "the same output and the R-Drop KL term is always 0. Add dropout "
                "or set alpha=0.",
                UserWarning,
                stacklevel=2,
            )

    def _rdrop_enabled(self) -> bool:
        if isinstance(self.alpha, dict):
            return any(a > 0 for a in self.alpha.values())
        return self.alpha > 0

    # ------------------------------------------------------------------ call

    def build(self, input_shape=None):
        # Nothing to create: the inner model builds itself on its first call,
        # and the reference snapshot stays empty until a
        # `ReferenceKLRegularizer` fills it.
        pass

    def call(self, inputs, training=None):
        stack = bool(training) and self.mode == "concat" and self._rdrop_enabled()
        self._stacked_outputs = stack
        if not stack:
            return self.model(inputs, training=training)
        doubled = keras.tree.map_structure(
            lambda t: ops.concatenate([t, t], axis=0), inputs
        )
        return self.model(doubled, training=training)

    # --------------------------------------------------------------- outputs

    def _output_specs(self, y_pred):
        """Per output, in `keras.tree.flatten(y_pred)` order: name, spec, alpha."""
        output_names = getattr(self.model, "output_names", None)
        names, losses = flatten_like_outputs(self.loss, y_pred, output_names, "loss")
        _, alphas = flatten_like_outputs(self.alpha, y_pred, output_names, "alpha")
        alphas = [0.0 if a is None else a for a in alphas]
        if self.from_logits is None:
            overrides = [None] * len(names)
        else:
            _, overrides = flatten_like_outputs(
                self.from_logits, y_pred, output_names, "from_logits"
            )
        activations = [None] * len(names)
        if not self._activations_checked:
            # Read once (at trace time where the step is traced): a softmax
            # output declared as logits, or a linear one as probabilities.
            self._activations_checked = True
            found = output_activations(self.model)
            if len(found) == len(names):
                activations = found
        specs = []
        for name, loss, alpha, override, activation in zip(
            names, losses, alphas, overrides, activations
        ):
            spec = describe_loss(loss, name)
            from_logits = spec.from_logits if override is None else override
            term = None
            if spec.kind == "regression":
                if self.regression_consistency:
                    term = PairwiseTerm("mse")
                elif isinstance(self.alpha, dict) and alpha > 0:
                    raise ValueError(
                        f"`alpha` asks for a KL on output {name!r}, but its loss "
                        f"({spec.loss_name}) is a regression loss, so the output is "
                        "not a distribution. Set regression_consistency=True for a "
                        "mean-squared consistency term, or drop it from `alpha`."
                    )
            elif spec.kind in ("categorical", "bernoulli", "unknown"):
                if from_logits is None:
                    raise ValueError(
                        f"Cannot tell whether output {name!r} holds logits or "
                        f"probabilities: its loss {spec.loss_name!r} does not say. "
                        "Pass `from_logits=True` (or False, or a dict keyed by "
                        "output name) to RDropModel."
                    )
                check_output_activation(activation, from_logits, name)
                distribution = "bernoulli" if spec.kind == "bernoulli" else "auto"
                term = (from_logits, distribution)
            specs.append((name, term, alpha))
        return specs

    def _pairwise(self, term, kind, constant_b=False):
        if isinstance(term, PairwiseTerm):
            return term
        from_logits, distribution = term
        return PairwiseTerm(
            kind,
            from_logits=from_logits,
            distribution=distribution,
            constant_b=constant_b,
        )

    def _split(self, y_pred):
        """Splits the stacked `[pass_1; pass_2]` outputs, masks included."""
        firsts, seconds = [], []
        for t in keras.tree.flatten(y_pred):
            first, second = ops.split(t, 2, axis=0)
            mask = get_keras_mask(t)
            if mask is not None:
                mask_1, mask_2 = ops.split(mask, 2, axis=0)
                set_keras_mask(first, mask_1)
                set_keras_mask(second, mask_2)
            firsts.append(first)
            seconds.append(second)
        pack = keras.tree.pack_sequence_as
        return pack(y_pred, firsts), pack(y_pred, seconds)

    # ------------------------------------------------------------------ loss

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        self._training_step = bool(training)
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
        if not training:
            return super().compute_loss(x, y, y_pred, sample_weight, training=False)
        if self._stacked_outputs:
            y_pred_1, y_pred_2 = self._split(y_pred)
        else:
            y_pred_1 = y_pred
            y_pred_2 = None
            if self._rdrop_enabled():
                y_pred_2 = self.model(x, training=True)
        batch_size = ops.shape(keras.tree.flatten(x)[0])[0]
        fused = self._fused_task_and_consistency(y, y_pred_1, y_pred_2, sample_weight)
        if fused is not None:
            task_loss, consistency = fused
        else:
            task_loss = super().compute_loss(
                x, y, y_pred_1, _copy(sample_weight), training=True
            )
        total = task_loss
        if y_pred_2 is not None:
            if fused is None:
                task_loss_2 = super().compute_loss(
                    x, y, y_pred_2, _copy(sample_weight), training=True
                )
                task_loss = 0.5 * (task_loss + task_loss_2)
                consistency = self._consistency(y_pred_1, y_pred_2, sample_weight)
            total = task_loss + consistency["weighted"]
            # Under `tf.distribute` the loss values are scaled per replica;
            # the logs show them unscaled, as Keras does for `loss`.
            self.kl_loss_tracker.update_state(
                unscale_for_distribution(consistency["unweighted"]),
                sample_weight=batch_size,
            )
        self.task_loss_tracker.update_state(
            unscale_for_distribution(task_loss), sample_weight=batch_size
        )
        if self.reference.active:
            total = total + self.reference.penalty(
                self, x, y_pred_1, sample_weight, batch_size
            )
        return total

    def _fused_task_and_consistency(self, y, y_pred_1, y_pred_2, sample_weight):
        """The task loss and the KL of both passes in one chunked pass.

        Taken when the compiled loss is one Keras
        `SparseCategoricalCrossentropy(from_logits=True)` on one output (the
        language-model case; `fused_cross_entropy.fusable_loss` has the exact
        conditions): the two cross-entropies and the symmetric KL are computed
        together by `cross_entropy_and_symmetric_kl`, then reduced by Keras'
        own loss reduction, so the values are those of the general path
        without its logits-sized intermediates. Returns `None` otherwise.
        """
        nested = keras.tree.is_nested
        if y_pred_2 is None or nested(y_pred_1) or nested(y) or nested(sample_weight):
            return None
        compile_loss = getattr(self, "_compile_loss", None)
        loss_weight = getattr(compile_loss, "_user_loss_weights", None)
        if compile_loss is None or isinstance(loss_weight, bool):
            return None
        if loss_weight is not None and not isinstance(loss_weight, numbers.Real):
            return None
        if not fusable_loss(self.loss, y_pred_1):
            return None
        if self.losses and not hasattr(self, "_aggregate_additional_loss"):
            return None
        ((_name, term, alpha),) = self._output_specs(y_pred_1)
        if alpha == 0 or term != (True, "auto"):
            return None
        labels = sparse_labels(y, y_pred_1)
        if labels is None:
            return None
        check_values(y_pred_1, True, "categorical", -1, "y_pred")
        ignore_class = self.loss.ignore_class
        valid = None
        if ignore_class is not None:
            valid = ops.not_equal(labels, ignore_class)
            labels = ops.where(valid, labels, ops.zeros_like(labels))
        values = cross_entropy_and_symmetric_kl(y_pred_1, y_pred_2, labels)
        reduce = ReducedLike(self.loss)
        task_losses = []
        for i, y_pred in enumerate((y_pred_1, y_pred_2)):
            values_i = values[i]
            mask = get_keras_mask(y_pred)
            if valid is not None:
                values_i = ops.where(valid, values_i, ops.zeros_like(values_i))
                mask = valid if mask is None else ops.logical_and(mask, valid)
            if mask is not None:
                set_keras_mask(values_i, mask)
            value = ops.cast(
                reduce(y, values_i, _copy(sample_weight)), compile_loss.dtype
            )
            if loss_weight is not None:
                value = ops.multiply(value, loss_weight)
            task_losses.append(value)
        task_loss = 0.5 * (task_losses[0] + task_losses[1])
        for loss in self.losses:
            task_loss = task_loss + self._aggregate_additional_loss(loss)
        # The KL is reduced as `PairwiseTerm` reduces it in `_consistency`.
        skl = values[2]
        mask = get_keras_mask(y_pred_2)
        if mask is not None:
            set_keras_mask(skl, mask)
        weights = position_weights(_copy(sample_weight), y_pred_1)
        kl = ReducedLike(PairwiseTerm("symmetric_kl"))(y_pred_1, skl, weights)
        return task_loss, {"weighted": alpha * kl, "unweighted": kl}

    def _consistency(self, y_pred_1, y_pred_2, sample_weight):
        flat_1 = keras.tree.flatten(y_pred_1)
        flat_2 = keras.tree.flatten(y_pred_2)
        weights = _flatten_weights(_copy(sample_weight), len(flat_1))
        weighted = ops.zeros((), "float32")
        unweighted = ops.zeros((), "float32")
        for (_name, term, alpha), a, b, w in zip(
            self._output_specs(y_pred_1), flat_1, flat_2, weights
        ):
            if term is None or alpha == 0:
                continue
            value = self._pairwise(term, "symmetric_kl")(
                a, b, sample_weight=position_weights(w, a)
            )
            unweighted = unweighted + value
            weighted = weighted + alpha * value
        return {"weighted": weighted, "unweighted": unweighted}

    # --------------------------------------------------------------- metrics

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self._stacked_outputs:
            y_pred, _ = self._split(y_pred)
        results = super().compute_metrics(x, y, y_pred, sample_weight)
        if not self._training_step:
            # `evaluate` reports exactly what the inner model would.
            results = {k: v for k, v in results.items() if k not in _OWN_LOG_NAMES}
        else:
            if not self.reference.active:
                results.pop("ref_kl", None)
            if not self._rdrop_enabled():
                results.pop("kl_loss", None)
        return results

    # ------------------------------------------ keras-hub task preprocessing

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        **kwargs,
    ):
        """Trains the model; see `keras.Model.fit`.

        When the inner model is a keras-hub task with a preprocessor, raw
        inputs (for example strings) are preprocessed by the task first, as the
        task's own `fit` does (see `keras_rdrop.keras_hub_support`).
        """
        fn = keras_hub_support.task_preprocessor(self.model)
        x, y, sample_weight = keras_hub_support.preprocess(fn, x, y, sample_weight)
        validation_data = keras_hub_support.preprocess_validation(fn, validation_data)
        _check_not_empty(x)
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_split=validation_split,
            validation_data=validation_data,
            shuffle=shuffle,
            class_weight=class_weight,
            sample_weight=sample_weight,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """Evaluates the inner model; see `keras.Model.evaluate`."""
        fn = keras_hub_support.task_preprocessor(self.model)
        if kwargs.get("_use_cached_eval_dataset"):
            fn = None  # validation inside `fit`: `fit` preprocessed it already
        x, y, sample_weight = keras_hub_support.preprocess(fn, x, y, sample_weight)
        return super().evaluate(
            x=x, y=y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
        )

    def predict(self, x, batch_size=None, **kwargs):
        """Predicts with the inner model; see `keras.Model.predict`."""
        fn = keras_hub_support.task_preprocessor(self.model)
        x, _, _ = keras_hub_support.preprocess(fn, x)
        return super().predict(x, batch_size=batch_size, **kwargs)

    def train_on_batch(self, x, y=None, sample_weight=None, **kwargs):
        fn = keras_hub_support.task_preprocessor(self.model)
        x, y, sample_weight = keras_hub_support.preprocess(fn, x, y, sample_weight)
        return super().train_on_batch(x, y, sample_weight=sample_weight, **kwargs)

    def test_on_batch(self, x, y=None, sample_weight=None, **kwargs):
        fn = keras_hub_support.task_preprocessor(self.model)
        x, y, sample_weight = keras_hub_support.preprocess(fn, x, y, sample_weight)
        return super().test_on_batch(x, y, sample_weight=sample_weight, **kwargs)

    def predict_on_batch(self, x):
        fn = keras_hub_support.task_preprocessor(self.model)
        x, _, _ = keras_hub_support.preprocess(fn, x)
        return super().predict_on_batch(x)

    # ---------------------------------------------------------- serialization

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "alpha": self.alpha,
                "mode": self.mode,
                "from_logits": self.from_logits,
                "regression_consistency": self.regression_consistency,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return cls(**config)


def _check_not_empty(x):
    leaves = keras.tree.flatten(x) if x is not None else []
    if leaves and hasattr(leaves[0], "shape") and len(leaves[0].shape) > 0:
        if leaves[0].shape[0] == 0:
            raise ValueError(
                "`x` is empty: it has 0 samples, so there is nothing to train on. "
                f"Received: x with shape {tuple(leaves[0].shape)}"
            )


def _copy(sample_weight):
    # Keras' loss reduction multiplies a masked `sample_weight` in place
    # (`sample_weight *= mask`), which on torch mutates the caller's tensor:
    # each use gets its own copy.
    if sample_weight is None:
        return None
    return keras.tree.map_structure(ops.copy, sample_weight)


def _flatten_weights(sample_weight, num_outputs):
    if sample_weight is None:
        return [None] * num_outputs
    if isinstance(sample_weight, dict):
        return [sample_weight[k] for k in sorted(sample_weight)]
    if isinstance(sample_weight, (list, tuple)):
        if len(sample_weight) == num_outputs:
            return list(sample_weight)
    return [sample_weight] * num_outputs
