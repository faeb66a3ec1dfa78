"""The chunked, closed-form-gradient engine behind the KLs of large outputs.

Categorical KLs of logits (and the fused cross-entropy + KL) are computed
chunk by chunk along one non-class axis, with a closed-form gradient, so
that no intermediate of the logits' full size is created. For a language
model's (batch, length, vocabulary) logits, autodiff of the whole-tensor
formula kept six logits-sized tensors (log p, p, log q, q and the two factors
of the product) from the forward to the backward pass, and eager backends
create as many again as temporaries; a chunk's temporaries are a chunk's
size. See benchmarks/README.md, "Large outputs".

`chunked_pair_op` is the engine; `kl_of_logits` and
`fused_cross_entropy.cross_entropy_and_symmetric_kl` are built on it.
The chunk size is set with `keras_rdrop.set_chunk_elements`.
"""

from __future__ import annotations

import math

from keras import ops

CHUNK_ELEMENTS = 2**21  # elements of one chunk (8 MiB in float32)
MAX_CHUNKS = 64  # bounds the size of a compiled graph; chunks grow instead


def chunks(shape, axis: int):
    """Returns `(chunk_axis, [(start, stop), ...])`, or `None` for one chunk.

    Splits the largest non-class axis of static size into pieces of about
    `CHUNK_ELEMENTS` elements. Unknown dimensions count as 1.
    """
    rank = len(shape)
    axis %= rank
    total = 1
    for size in shape:  # not `math.prod` of a generator: torch.compile breaks
        total *= size or 1
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


def upstream_of(args, upstream):
    """The upstream gradient a `keras.ops.custom_gradient` backward got.

    JAX and TensorFlow call `grad(upstream)`; torch calls
    `grad(*inputs, upstream=upstream)` (see `keras.ops.custom_gradient`).
    """
    if upstream is None:
        (upstream,) = args
    return upstream


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
    time (`chunks`), so that no intermediate of their full size is created.

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
    split = chunks(tuple(a.shape), axis)

    def pieces(a, b, *more):
        if split is None:
            return [(a, b, extra, *more)]
        chunk_axis, bounds = split
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
        return ops.concatenate(values, axis=out_axis(split[0]))

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
        return ops.concatenate(grads, axis=split[0])

    @ops.custom_gradient
    def op(a, b):
        def grad(*args, upstream=None):
            return grads_of(a, b, upstream_of(args, upstream))

        return value_of(a, b), grad

    return op(a, b)


def kl_of_logits(a, b, axis: int, symmetric: bool, constant=None):
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


def set_chunk_elements(elements: int) -> None:
    """Sets the size of the chunks the KL of large outputs is computed in.

    The categorical KL of logits, and the fused cross-entropy + KL of
    RDropModel's language-model path, run over chunks of about this many
    elements with a closed-form gradient: smaller chunks lower the peak
    memory of a step, larger ones give fewer, bigger operations. The number
    of chunks of one tensor is capped at 64 (`MAX_CHUNKS`, to bound the
    size of a compiled graph), so a chunk of a very large tensor holds more
    than `elements`. Set it before `fit`: a traced training step keeps the
    chunking it was traced with.

    Args:
        elements: Elements per chunk, a positive int. Defaults (at import)
            to `2**21` (8 MiB of float32).

    Example:

    >>> import keras_rdrop
    >>> keras_rdrop.set_chunk_elements(2**20)
    >>> keras_rdrop.get_chunk_elements()
    1048576
    >>> keras_rdrop.set_chunk_elements(2**21)  # back to the default
    """
    global CHUNK_ELEMENTS
    if isinstance(elements, bool) or not isinstance(elements, int) or elements < 1:
        raise ValueError(
            f"`elements` should be a positive int. Received: elements={elements!r}"
        )
    CHUNK_ELEMENTS = elements


def get_chunk_elements() -> int:
    """The current chunk size in elements (see `set_chunk_elements`)."""
    return CHUNK_ELEMENTS
