"""KL divergences between two predicted distributions, written once in `keras.ops`.

All math runs in float32 whatever the input dtype, in log space: logits go
through `log_softmax` (or `log_sigmoid` for Bernoulli outputs), probabilities
through `log`, and exact zeros follow the convention `0 * log 0 = 0`. Nothing
is clipped, so small probabilities are not biased.

Categorical KLs of logits, the case of language models with large
vocabularies, go to the chunked engine (`chunked_gradients.kl_of_logits`):
chunk by chunk with a closed-form gradient, so that besides their inputs and
gradients they create no tensor of the logits' size.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_rdrop.src.chunked_gradients import kl_of_logits
from keras_rdrop.src.prediction_checks import check_values

DISTRIBUTIONS = ("auto", "categorical", "bernoulli")


def validate_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"`distribution` should be one of {DISTRIBUTIONS}. "
            f"Received: distribution={distribution!r}"
        )
    return distribution


def validate_axis(axis: Any) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(
            f"`axis` should be an int. Received: axis={axis!r} "
            f"of type {type(axis).__name__}"
        )
    return axis


def validate_from_logits(from_logits: Any) -> bool:
    if not isinstance(from_logits, bool):
        raise TypeError(
            "`from_logits` should be a bool: True for logits, False for "
            f"probabilities. Received: from_logits={from_logits!r}"
        )
    return from_logits


def as_float(x, name: str):
    """Converts `x` to a float tensor, and rejects non-float dtypes."""
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise TypeError(
            f"`{name}` should hold floating-point logits or probabilities. "
            f"Received a tensor of dtype {dtype}. Cast it to a float dtype "
            "(integer class labels are not predictions)."
        )
    # float16/bfloat16 logits stay as they are: each chunk of the categorical
    # KL is cast on its own (no full-size float32 copy). Casting to their
    # own dtype still turns a variable into a tensor (TensorFlow reads it),
    # which `ops.custom_gradient` needs.
    return ops.cast(x, dtype if dtype in ("float16", "bfloat16") else "float32")


def _check_shapes(p, q, axis: int):
    p_shape, q_shape = tuple(p.shape), tuple(q.shape)
    if len(p_shape) != len(q_shape) or any(
        a is not None and b is not None and a != b for a, b in zip(p_shape, q_shape)
    ):
        raise ValueError(
            "The two predictions must have the same shape. Received: "
            f"p.shape={p_shape} and q.shape={q_shape}"
        )
    if not -len(p_shape) <= axis < len(p_shape):
        raise ValueError(
            f"`axis` is out of range for predictions of rank {len(p_shape)}. "
            f"Received: axis={axis}"
        )


def _resolve_distribution(x, axis: int, distribution: str) -> str:
    if distribution != "auto":
        return distribution
    return "bernoulli" if x.shape[axis] == 1 else "categorical"


def _log_prob_states(x, from_logits: bool, distribution: str, axis: int):
    """Returns `[(log_prob, prob), ...]`, one pair per state to sum over.

    A categorical distribution has one pair whose tensors hold every class
    along `axis`. A Bernoulli one has two pairs, for the events 1 and 0.
    """
    if distribution == "categorical":
        if from_logits:
            log_p = ops.log_softmax(x, axis=axis)
            return [(log_p, ops.exp(log_p))]
        return [(_safe_log(x), x)]
    if from_logits:
        log_p1, log_p0 = ops.log_sigmoid(x), ops.log_sigmoid(-x)
        return [(log_p1, ops.exp(log_p1)), (log_p0, ops.exp(log_p0))]
    return [(_safe_log(x), x), (_safe_log(1.0 - x), 1.0 - x)]


def _safe_log(p):
    # log(p) where p > 0; the zeros are masked out by `_kl_terms`. Taking the
    # log of 1 there keeps the gradient of the unselected branch finite.
    return ops.log(ops.where(p > 0, p, ops.ones_like(p)))


def _kl_terms(log_p, p, log_q, q, from_logits: bool):
    """Elementwise `p * (log p - log q)` with `0 * log 0 = 0`."""
    if from_logits:
        # Log-probabilities from logits are finite; an underflowed p is 0
        # and its term is exactly 0.
        return p * (log_p - log_q)
    inf = ops.full_like(p, float("inf"))
    term = ops.where(q > 0, p * (log_p - log_q), inf)
    return ops.where(p > 0, term, ops.zeros_like(p))


def divergence(p, q, from_logits, axis, distribution, symmetric, constant=None):
    """`kl_divergence` or (`symmetric=True`) `symmetric_kl_divergence`.

    `constant` (`"a"` for `p`, `"b"` for `q`, or `None`) names an input that
    gets no gradient; for categorical logits its gradient is then not
    computed (zeros are returned for it).
    """
    from_logits = validate_from_logits(from_logits)
    axis = validate_axis(axis)
    distribution = validate_distribution(distribution)
    p = as_float(p, "p")
    q = as_float(q, "q")
    _check_shapes(p, q, axis)
    distribution = _resolve_distribution(p, axis, distribution)
    # One read per declaration and process: `p` stands for both inputs (a
    # second call for `q` would find the declaration already checked).
    check_values(p, from_logits, distribution, axis, "p")
    if from_logits and distribution == "categorical":
        return kl_of_logits(p, q, axis, symmetric, constant)
    p, q = ops.cast(p, "float32"), ops.cast(q, "float32")
    p_states = _log_prob_states(p, from_logits, distribution, axis)
    q_states = _log_prob_states(q, from_logits, distribution, axis)
    total = None
    for (log_p, p_), (log_q, q_) in zip(p_states, q_states):
        if symmetric and from_logits:
            # Both log-probabilities are finite: one fused expression.
            term = 0.5 * (p_ - q_) * (log_p - log_q)
        elif symmetric:
            term = 0.5 * (
                _kl_terms(log_p, p_, log_q, q_, from_logits)
                + _kl_terms(log_q, q_, log_p, p_, from_logits)
            )
        else:
            term = _kl_terms(log_p, p_, log_q, q_, from_logits)
        total = term if total is None else total + term
    return ops.sum(total, axis=axis)


def kl_divergence(
    p, q, from_logits: bool = True, axis: int = -1, distribution: str = "auto"
):
    """KL divergence `KL(p || q)` per position.

    Formula:

    ```
    KL(p || q) = sum_k p_k * (log p_k - log q_k)    # over `axis`
    ```

    Mapping from PyTorch: `torch.nn.functional.kl_div(input, target,
    reduction="none").sum(-1)` computes `KL(target || input)` with `input` as
    log-probabilities. With logits `a` (target side) and `b`, it equals
    `kl_divergence(a, b)`: the *first* argument here is the distribution the
    expectation is taken under.

    Args:
        p: Predictions of the first distribution, logits or probabilities,
            with shape `[..., num_classes, ...]`.
        q: Predictions of the second distribution, the same shape as `p`.
        from_logits: Whether `p` and `q` are logits (`True`) or probabilities
            (`False`). Probabilities may contain exact zeros. The first eager
            call with each declaration reads the values: probabilities outside
            [0, 1] raise a `ValueError`; categorical probabilities not
            summing to 1, or logits that look like a softmax output, warn
            once. Defaults to `True`.
        axis: The class axis. Defaults to `-1`.
        distribution: `"categorical"` (softmax over `axis`), `"bernoulli"`
            (each entry along `axis` is an independent Bernoulli, such as a
            sigmoid output or multi-label logits; their KLs are summed) or
            `"auto"`: Bernoulli when `axis` has size 1, categorical otherwise.
            A softmax over a single class is constant, so a size-1 axis always
            means a binary output. Defaults to `"auto"`.

    Returns:
        A float32 tensor with the shape of `p` without `axis`.

    Example:

    >>> import numpy as np
    >>> p = np.array([[2.0, 0.5, -1.0]])
    >>> q = np.array([[1.0, 1.0, 0.0]])
    >>> float(kl_divergence(p, q)[0])  # doctest: +ELLIPSIS
    0.279...
    """
    return divergence(p, q, from_logits, axis, distribution, symmetric=False)


def symmetric_kl_divergence(
    p, q, from_logits: bool = True, axis: int = -1, distribution: str = "auto"
):
    """Symmetric KL divergence `(KL(p || q) + KL(q || p)) / 2` per position.

    This is the consistency term of R-Drop (Liang et al., 2021).

    Formula:

    ```
    SKL(p, q) = 0.5 * sum_k (p_k - q_k) * (log p_k - log q_k)    # over `axis`
    ```

    Args:
        p: Predictions of the first distribution, logits or probabilities,
            with shape `[..., num_classes, ...]`.
        q: Predictions of the second distribution, the same shape as `p`.
        from_logits: Whether `p` and `q` are logits (`True`) or probabilities
            (`False`), checked as in `kl_divergence`. Defaults to `True`.
        axis: The class axis. Defaults to `-1`.
        distribution: `"categorical"`, `"bernoulli"` or `"auto"`, as in
            `kl_divergence`. Defaults to `"auto"`.

    Returns:
        A float32 tensor with the shape of `p` without `axis`.

    Example:

    >>> import numpy as np
    >>> p = np.array([[2.0, 0.5, -1.0]])
    >>> q = np.array([[1.0, 1.0, 0.0]])
    >>> s = symmetric_kl_divergence(p, q)
    >>> bool(abs(float(s[0]) - float(symmetric_kl_divergence(q, p)[0])) < 1e-7)
    True

    Reference:
        Liang et al., "R-Drop: Regularized Dropout for Neural Networks",
        NeurIPS 2021.
    """
    return divergence(p, q, from_logits, axis, distribution, symmetric=True)
