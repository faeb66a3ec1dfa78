"""The chunked, closed-form-gradient engine behind the KLs of large outputs.

Categorical KLs of logits (and the fused cross-entropy + KL) are computed
chunk by chunk along one non-class axis, with a closed-form gradient, so
that no intermediate of the logits' full size is created. For a language
model's (batch, length, vocabulary) logits, autodiff of the whole-tensor
formula kept six logits-sized tensors (log p, p, log q, q and the two factors
of the product) from the forward to the backward pass, and eager backends
create as many again as temporaries; a chunk's temporaries are a chunk's
size. See benchmarks/README.md, "Large outputs".

`chunked_op` is the engine, for any number of live inputs plus constants;
`kl_of_logits`, `fused_cross_entropy.cross_entropy_and_symmetric_kl` and
`fused_reference_kl.cross_entropy_and_reference_kl` are built on it, with the
closed forms of `closed_forms`.
The chunk size is set with `keras_rdrop.set_chunk_elements`.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_rdrop.src.closed_forms import kl_grad_terms, kl_value, log_softmax32

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


def cut(x, axis: int, split):
    """`x` cut along `axis` as `split` (from `chunks`) says: a list of pieces."""
    if split is None:
        return [x]
    # Basic slicing, which every backend's native tensor supports.
    lead = (slice(None),) * axis
    return [x[lead + (slice(start, stop),)] for start, stop in split[1]]


def _join(pieces, axis: int):
    """The pieces of `cut`, concatenated back (one piece is returned as is)."""
    return pieces[0] if len(pieces) == 1 else ops.concatenate(pieces, axis=axis)


def _pieces_of(tensors, rank: int, split, class_axis: int):
    """Per chunk, the tuple of the pieces of `tensors`.

    A tensor of rank `rank` (that of the live inputs) is cut along the chunk
    axis; one without their class axis (labels) along the matching axis.
    """
    if not tensors:
        return [()] * (1 if split is None else len(split[1]))
    axis = 0 if split is None else split[0]
    cuts = []
    for t in tensors:
        t_axis = axis if len(t.shape) == rank else axis - (axis > class_axis)
        cuts.append(cut(t, t_axis, split))
    return list(zip(*cuts))


def chunked_op(
    live,
    forward_chunk,
    backward_chunk,
    *,
    axis: int,
    out_axis,
    constants=(),
    chunked: bool = True,
    backward_reads_live: bool = True,
):
    """Runs a function of logit tensors chunk by chunk, with its gradient.

    The value and the gradient are computed one chunk of the inputs at a
    time (`chunks` of the first live input's shape), so that no intermediate
    of their full size is created.

    Args:
        live: A tuple of tensors of the same shape, which get gradients;
            `axis` is their class axis, which is never split.
        forward_chunk: `forward_chunk(live_chunks, constant_chunks)` on one
            chunk returns `(value, saved)`: the chunk's value, concatenated
            over chunks along `out_axis(chunk_axis)`, and what its backward
            pass needs besides the live inputs.
        backward_chunk: `backward_chunk(live_chunks, saved, upstream)` on one
            chunk returns one gradient per live input (`None`: zeros, for an
            input known to get none). `live_chunks` is `None` unless
            `backward_reads_live`.
        axis: The class axis, non-negative.
        out_axis: Maps the chunk axis of the inputs to the one of the value.
        constants: Tensors with the shape of the live inputs, or that shape
            without `axis` (labels), cut like them and given no gradient.
            They are seen by `forward_chunk` only: on torch, where the
            backward function keeps what the op closes over until the
            backward pass, they are dropped after the forward pass (torch
            runs it once; JAX may trace it more than once).
        chunked: Whether to cut the inputs at all. Defaults to `True`.
        backward_reads_live: Whether `backward_chunk` gets the live chunks.

    Returns:
        The value, concatenated over chunks.
    """
    split = chunks(tuple(live[0].shape), axis) if chunked else None
    chunk_axis = 0 if split is None else split[0]
    held = {"constants": tuple(constants)}
    drop = keras.backend.backend() == "torch"
    del constants

    rank = len(live[0].shape)

    def live_pieces(xs):
        return _pieces_of(xs, rank, split, axis)

    @ops.custom_gradient
    def op(*xs):
        constant = held.pop("constants") if drop else held["constants"]
        constant_pieces = _pieces_of(constant, rank, split, axis)
        del constant
        values, saved = [], []
        for live_chunk, constant_chunk in zip(live_pieces(xs), constant_pieces):
            value, keep = forward_chunk(live_chunk, constant_chunk)
            values.append(value)
            saved.append(keep)
        del constant_pieces

        def grad(*args, upstream=None):
            upstream = upstream_of(args, upstream)
            ups = cut(upstream, out_axis(chunk_axis), split)
            lives = live_pieces(xs) if backward_reads_live else [None] * len(saved)
            per_chunk = [
                list(backward_chunk(*chunk)) for chunk in zip(lives, saved, ups)
            ]
            del lives, ups
            return tuple(
                _joined_grad(per_chunk, i, x, chunk_axis) for i, x in enumerate(xs)
            )

        return _join(values, out_axis(chunk_axis)), grad

    return op(*live)


def _joined_grad(per_chunk, i: int, like, axis: int):
    """Input `i`'s gradient from its pieces, freed from `per_chunk` as joined.

    Every backend's custom gradient wants one per input: `None` pieces (no
    gradient) become zeros.
    """
    pieces = [chunk[i] for chunk in per_chunk]
    for chunk in per_chunk:
        chunk[i] = None
    if pieces[0] is None:
        return ops.zeros_like(like)
    return _join([ops.cast(g, like.dtype) for g in pieces], axis)


def kl_of_logits(a, b, axis: int, symmetric: bool, constant=None):
    """Categorical (symmetric) KL of two logit tensors, by chunks.

    Each chunk is cast to float32 on its own, so low-precision logits get no
    full-size float32 copy. `constant` (`"a"` or `"b"`) names an input known
    to get no gradient, such as the anchor's reference outputs: its gradient
    is returned as zeros without being computed.
    """
    axis %= len(a.shape)
    kind = "symmetric_kl" if symmetric else "kl"

    def forward(live, _):
        log_p, log_q = (log_softmax32(x, axis) for x in live)
        return kl_value(log_p, log_q, kind, axis), None

    def backward(live, _, upstream):
        log_p, log_q = (log_softmax32(x, axis) for x in live)
        p = ops.exp(log_p)
        # `q` itself is not needed for KL(p||q)'s gradient in `a` alone (the
        # anchor's case).
        q = ops.exp(log_q) if symmetric or constant != "b" else None
        terms = kl_grad_terms(log_p, log_q, p, q, axis, symmetric, constant)
        upstream = ops.expand_dims(upstream, axis)
        return tuple(None if term is None else upstream * term for term in terms)

    def out_axis(chunk_axis):
        return chunk_axis - (chunk_axis > axis)

    return chunked_op((a, b), forward, backward, axis=axis, out_axis=out_axis)


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
