"""`SymmetricKLDivergence`, the R-Drop consistency term as a `keras.losses.Loss`."""

from __future__ import annotations

import keras

from keras_rdrop.src.divergences import (
    symmetric_kl_divergence,
    validate_axis,
    validate_distribution,
    validate_from_logits,
)


@keras.saving.register_keras_serializable(package="keras_rdrop")
class SymmetricKLDivergence(keras.losses.Loss):
    """Symmetric KL divergence between two predictions of the same inputs.

    The two arguments are two predictions, not a label and a prediction:
    `loss(p, q) = reduce((KL(p || q) + KL(q || p)) / 2)`, where the KL is
    summed over `axis` and the reduction is Keras' own (`sample_weight`,
    Keras masks and every reduction behave as for any Keras loss).

    Formula:

    ```
    per_position = 0.5 * sum_k (p_k - q_k) * (log p_k - log q_k)
    loss = reduction(per_position * sample_weight)
    ```

    The math is computed in float32 whatever the input dtype, in log space.

    Mapping from the original R-Drop code: `compute_kl_loss(p, q, pad_mask)`
    runs `F.kl_div(log_softmax(p), softmax(q), reduction="none")` and its
    mirror, zeroes the pad positions, sums each over everything and averages
    the two. That equals `SymmetricKLDivergence(reduction="sum")(p, q,
    sample_weight=not_pad)`. The default `"sum_over_batch_size"` divides by the
    number of positions (the batch size for `(batch, classes)` outputs: the
    "batchmean" form), so the scale does not grow with the batch. For a mean
    over valid tokens of a padded sequence, use
    `reduction="mean_with_sample_weight"` with the padding mask as
    `sample_weight`, or pass outputs that carry a Keras mask (then
    `"sum_over_batch_size"` already averages over unmasked positions).

    Args:
        from_logits: Whether the predictions are logits (`True`) or
            probabilities (`False`, exact zeros allowed), checked once on
            eager values as in `kl_divergence`. Defaults to `True`.
        axis: The class axis. Defaults to `-1`.
        distribution: `"categorical"`, `"bernoulli"` (independent sigmoid
            outputs, as for `BinaryCrossentropy`) or `"auto"` (Bernoulli when
            `axis` has size 1). Defaults to `"auto"`.
        reduction: One of Keras' reductions: `"sum_over_batch_size"`,
            `"sum"`, `"mean"`, `"mean_with_sample_weight"`, `"none"` or
            `None`. Defaults to `"sum_over_batch_size"`.
        name: Name of the loss. Defaults to `"symmetric_kl_divergence"`.
        dtype: Dtype of the returned loss. The math itself always runs in
            float32. Defaults to `None` (`keras.backend.floatx()`).

    Returns:
        Calling the loss returns a scalar, or per-position values of shape
        `p.shape` without `axis` when `reduction` is `"none"`.

    Example:

    >>> import numpy as np
    >>> loss = SymmetricKLDivergence()
    >>> p = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    >>> q = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    >>> value = loss(p, q)  # mean over the 2 examples
    >>> bool(float(value) > 0)
    True

    Reference:
        Liang et al., "R-Drop: Regularized Dropout for Neural Networks",
        NeurIPS 2021.
    """

    def __init__(
        self,
        from_logits: bool = True,
        axis: int = -1,
        distribution: str = "auto",
        reduction: str | None = "sum_over_batch_size",
        name: str = "symmetric_kl_divergence",
        dtype: str | None = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = validate_from_logits(from_logits)
        self.axis = validate_axis(axis)
        self.distribution = validate_distribution(distribution)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # `Loss.__call__` casts its inputs to `self.dtype`, which would turn
        # integer labels passed by mistake into "predictions" silently.
        for name, value in (("y_true", y_true), ("y_pred", y_pred)):
            dtype = getattr(value, "dtype", None)
            if dtype is not None and not keras.backend.is_float_dtype(
                keras.backend.standardize_dtype(dtype)
            ):
                raise TypeError(
                    f"`{self.__class__.__name__}` compares two predictions, so "
                    f"`{name}` should hold floating-point logits or "
                    f"probabilities. Received dtype {dtype}."
                )
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        return symmetric_kl_divergence(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            axis=self.axis,
            distribution=self.distribution,
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "from_logits": self.from_logits,
                "axis": self.axis,
                "distribution": self.distribution,
                "dtype": self.dtype,
            }
        )
        return config
