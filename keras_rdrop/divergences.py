"""KL divergences between two predicted distributions, written once in `keras.ops`.

All math runs in float32 whatever the input dtype, in log space: logits go
through `log_softmax` (or `log_sigmoid` for Bernoulli outputs), probabilities
through `log`, and exact zeros follow the convention `0 * log 0 = 0`. Nothing
is clipped, so small probabilities are not biased.

Categorical KLs of logits, the case of language models with large
vocabularies, run chunk by chunk (`CHUNK_ELEMENTS` each) with a closed-form
gradient: besides their inputs and gradients they create no tensor of the
logits' size (benchmarks/README.md, "Large outputs", has the measurements).
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from keras_rdrop.prediction_checks import check_values

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


def _as_float(x, name: str):
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


# Categorical KLs of logits are computed chunk by chunk along one non-class
# axis, with a closed-form gradient, so that no intermediate of the logits'
# full size is created. For a language model's (batch, length, vocabulary)
# logits, autodiff of the whole-tensor formula kept six logits-sized tensors
# (log p, p, log q, q and the two factors of the product) from the forward to
# the backward pass, and eager backends create as many again as temporaries;
# a chunk's temporaries are a chunk's size. See benchmarks/README.md,
# "Large outputs".
CHUNK_ELEMENTS = 2**21  # elements of one chunk (8 MiB in float32)
MAX_CHUNKS = 64  # bounds the size of a compiled graph; chunks grow instead


def _chunks(shape, axis: int):
    """Returns `(chunk_axis, [(start, stop), ...])`, or `None` for one chunk.

    Splits the largest non-class axis of static size into pieces of about
    `CHUNK_ELEMENTS` elements. Unknown dimensions count as 1.
    """
    rank = len(shape)
    axis %= rank
    total = math.prod(size or 1 for size in shape)
    count = min(math.ceil(total / CHUNK_ELEMENTS), MAX_CHUNKS)
    candidates = [(size, i) for i, size in enumerate(shape) if i != axis and size]
    if count <= 1 or not candidates:
        return None
    size, chunk_axis = max(candidates)
    step = math.ceil(size / min(count, size))
    if step >= size:
        return None
    return chunk_axis, [
        (start, min(start + step, size)) for start in range(0, size, step)
    ]


def _slices(x, axis: int, bounds):
    """The pieces of `x` along `axis`, one per `(start, stop)` of `bounds`."""
    # Basic slicing, which every backend's native tensor supports.
    lead = (slice(None),) * axis
    return [x[lead + (slice(start, stop),)] for start, stop in bounds]


def _kl_of_logits_chunk(a, b, axis: int, symmetric: bool):
    a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    log_p = ops.log_softmax(a, axis=axis)
    log_q = ops.log_softmax(b, axis=axis)
    return kl_of_log_probs(log_p, log_q, axis, symmetric)


def kl_of_log_probs(log_p, log_q, axis: int, symmetric: bool):
    """(Symmetric) KL from finite log-probabilities, summed over `axis`."""
    if symmetric:
        diff = ops.exp(log_p) - ops.exp(log_q)
        return 0.5 * ops.sum(diff * (log_p - log_q), axis=axis)
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=axis)


def kl_of_logits_grad_terms(
    log_p, log_q, p, q, axis: int, symmetric: bool, constant=None
):
    """Closed-form gradients of the KL with respect to the logits, per unit.

    Takes the log-probabilities of the two logits `a` and `b` and their
    exponentials `p` and `q` (`q` may be `None` for KL(p||q) with `b`
    constant, which does not need it), and returns `(dKL/da, dKL/db)` for an
    upstream gradient of 1 (`None` for the input named by `constant`, which
    is not computed):

    ```
    d = log p - log q
    dKL(p||q)/da = p * (d - sum(p * d))        dKL(p||q)/db = q - p
    dSKL/da = 0.5 * (p * (d - sum(p * d)) + p - q)
    dSKL/db = 0.5 * (q * (sum(q * d) - d) + q - p)
    ```
    """
    d = log_p - log_q
    term_a = term_b = None
    if constant != "a":
        p_d = ops.sum(p * d, axis=axis, keepdims=True)
        term_a = p * (d - p_d) + p - q if symmetric else p * (d - p_d)
    if constant != "b":
        if symmetric:
            q_d = ops.sum(q * d, axis=axis, keepdims=True)
            term_b = q * (q_d - d) + q - p
        else:
            term_b = q - p
    if symmetric:
        term_a = None if term_a is None else 0.5 * term_a
        term_b = None if term_b is None else 0.5 * term_b
    return term_a, term_b


def _kl_of_logits_chunk_grads(a, b, upstream, axis: int, symmetric: bool, constant):
    """Closed-form gradients with respect to the logits `a` and `b`.

    The gradient of the input named by `constant` (`"a"`, `"b"` or `None`) is
    not computed: `None` is returned for it.
    """
    dtype_a, dtype_b = a.dtype, b.dtype
    a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    log_p = ops.log_softmax(a, axis=axis)
    log_q = ops.log_softmax(b, axis=axis)
    p = ops.exp(log_p)
    # `q` itself is not needed for KL(p||q)'s gradient in `a` alone (the
    # anchor's case).
    q = ops.exp(log_q) if symmetric or constant != "b" else None
    term_a, term_b = kl_of_logits_grad_terms(
        log_p, log_q, p, q, axis, symmetric, constant
    )
    upstream = ops.expand_dims(upstream, axis)
    grad_a = None if term_a is None else ops.cast(upstream * term_a, dtype_a)
    grad_b = None if term_b is None else ops.cast(upstream * term_b, dtype_b)
    return grad_a, grad_b


def chunked_pair_op(a, b, axis: int, value_chunk, grads_chunk, out_axis, extra=None):
    """Runs a function of two logit tensors chunk by chunk, with its gradient.

    The value and the gradient are computed one chunk of `a` and `b` at a
    time (`_chunks`), so that no intermediate of their full size is created.

    Args:
        a, b: Tensors of the same shape; `axis` is their class axis, which is
            never split.
        axis: The class axis, non-negative.
        value_chunk: `value_chunk(a, b, extra)` on one chunk; its output is
            concatenated along `out_axis(chunk_axis)`.
        grads_chunk: `grads_chunk(a, b, extra, upstream)` on one chunk,
            returning `(grad_a, grad_b)`; `None` stands for a gradient not
            computed (an input that is constant), returned as zeros.
        out_axis: Maps the chunk axis of `a` to the one of the value.
        extra: `None`, or a tensor with the shape of `a` without `axis` (the
            labels), sliced like `a` and given no gradient.

    Returns:
        The value, concatenated over chunks.
    """
    chunks = _chunks(tuple(a.shape), axis)

    def pieces(a, b, *more):
        if chunks is None:
            return [(a, b, extra, *more)]
        chunk_axis, bounds = chunks
        extra_axis = chunk_axis - (chunk_axis > axis)
        sliced = [_slices(a, chunk_axis, bounds), _slices(b, chunk_axis, bounds)]
        sliced.append(
            [None] * len(bounds)
            if extra is None
            else _slices(extra, extra_axis, bounds)
        )
        sliced.extend(_slices(t, out_axis(chunk_axis), bounds) for t in more)
        return list(zip(*sliced))

    def value_of(a, b):
        values = [value_chunk(*args) for args in pieces(a, b)]
        if len(values) == 1:
            return values[0]
        return ops.concatenate(values, axis=out_axis(chunks[0]))

    def grads_of(a, b, upstream):
        grads_a, grads_b = zip(*(grads_chunk(*args) for args in pieces(a, b, upstream)))
        grad_a = _join(grads_a, a)
        del grads_a  # free the pieces before the second concatenation
        grad_b = _join(grads_b, b)
        return grad_a, grad_b

    def _join(grads, like):
        # Every backend's custom gradient wants one per input.
        if grads[0] is None:
            return ops.zeros_like(like)
        if len(grads) == 1:
            return grads[0]
        return ops.concatenate(grads, axis=chunks[0])

    @ops.custom_gradient
    def op(a, b):
        def grad(*args, upstream=None):
            # JAX and TensorFlow call `grad(upstream)`; torch calls
            # `grad(a, b, upstream=upstream)` (see `keras.ops.custom_gradient`).
            if upstream is None:
                (upstream,) = args
            return grads_of(a, b, upstream)

        return value_of(a, b), grad

    return op(a, b)


def _kl_of_logits(a, b, axis: int, symmetric: bool, constant=None):
    """Categorical (symmetric) KL of two logit tensors, by chunks.

    Each chunk is cast to float32 on its own, so low-precision logits get no
    full-size float32 copy. `constant` (`"a"` or `"b"`) names an input known
    to get no gradient, such as the anchor's reference outputs: its gradient
    is returned as zeros without being computed.
    """
    axis %= len(a.shape)

    def value_chunk(a, b, _):
        return _kl_of_logits_chunk(a, b, axis, symmetric)

    def grads_chunk(a, b, _, upstream):
        return _kl_of_logits_chunk_grads(a, b, upstream, axis, symmetric, constant)

    def out_axis(chunk_axis):
        return chunk_axis - (chunk_axis > axis)

    return chunked_pair_op(a, b, axis, value_chunk, grads_chunk, out_axis)


def divergence(p, q, from_logits, axis, distribution, symmetric, constant=None):
    """`kl_divergence` or (`symmetric=True`) `symmetric_kl_divergence`.

    `constant` (`"a"` for `p`, `"b"` for `q`, or `None`) names an input that
    gets no gradient; for categorical logits its gradient is then not
    computed (zeros are returned for it).
    """
    from_logits = validate_from_logits(from_logits)
    axis = validate_axis(axis)
    distribution = validate_distribution(distribution)
    p = _as_float(p, "p")
    q = _as_float(q, "q")
    _check_shapes(p, q, axis)
    distribution = _resolve_distribution(p, axis, distribution)
    # One read per declaration and process: `p` stands for both inputs (a
    # second call for `q` would find the declaration already checked).
    check_values(p, from_logits, distribution, axis, "p")
    if from_logits and distribution == "categorical":
        return _kl_of_logits(p, q, axis, symmetric, constant)
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


def kl_divergence(p, q, from_logits: bool = True, axis: int = -1, distribution="auto"):
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
            call with each declaration reads the values and warns once if they
            contradict it: probabilities outside [0, 1] or (categorical) not
            summing to 1, or logits that look like a softmax output. Defaults
            to `True`.
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
    0.28...
    """
    return divergence(p, q, from_logits, axis, distribution, symmetric=False)


def symmetric_kl_divergence(
    p, q, from_logits: bool = True, axis: int = -1, distribution="auto"
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
