"""The anchor's cross-entropy + KL to the reference from log-sum-exps (XLA).

`fused_reference_kl.cross_entropy_and_reference_kl` runs by chunks, and on
TensorFlow with XLA on the whole tensors (`fused_reference_kl.chunked_for`).
For the anchor alone (one live pass) on whole tensors,
`reference_kl_from_logsumexp` computes the same values from the
per-row log-sum-exps and one closed-form reduction, and keeps for the
backward pass only the live and reference logits and per-row scalars; the
backward pass recomputes `softmax(live)` from them.

With `x` the live logits, `r` the reference's, `d = x - r`,
`p = softmax(x)`, `q = softmax(r)` and `c = logsumexp(x) - logsumexp(r)`:

```
cross-entropy = logsumexp(x) - x[label]      d/dx = p - one_hot(label)
KL(p||q) = sum(p * d) - c                    d/dx = p * (d - sum(p * d))
KL(q||p) = c - sum(q * d)                    d/dx = p - q
(KL(p||q) + KL(q||p)) / 2                    d/dx = the mean of the two
```

Why a second formulation: under XLA:CPU every reduction writes its input to
memory, so each pass over a logits-sized tensor counts, and the log-softmax
formulation's kept gradient terms take more of them. On lm50k (2 x 512 x
50,257 logits, `benchmarks/bench.py --model lm50k`, one thread) the anchor's
training step cost 1.45x plain in CPU time with this formulation against
1.71x with the log-softmax one, measured side by side
(`benchmarks/results/lm50k-anchor-tensorflow.md`).
"""

from __future__ import annotations

from keras import ops

from keras_rdrop.src.chunked_gradients import upstream_of
from keras_rdrop.src.closed_forms import check_kind


def _reference_kl(x, r, lse, cross, lse_r, kind: str):
    """The KL of `kind` per row, from the log-sum-exps and `cross = sum(p * d)`."""
    c = lse - lse_r
    if kind == "kl":
        return cross - c
    q = ops.exp(r - lse_r)
    q_d = ops.sum(q * (x - r), axis=-1, keepdims=True)
    if kind == "reverse_kl":
        return c - q_d
    return 0.5 * (cross - q_d)


def reference_kl_from_logsumexp(live, reference, labels, kind: str = "kl"):
    """Per position: the live pass's cross-entropy and its KL to the reference.

    The same values and gradient as
    `fused_reference_kl.cross_entropy_and_reference_kl(live, reference,
    labels, kind, chunked=False)` with one live pass; see the module
    docstring for the formulas.

    Args:
        live: The live logits, class axis last, any float dtype.
        reference: The reference's logits, the same shape. Constant: no
            gradient is computed for them.
        labels: int32 class ids, the shape of the logits without their last
            axis. They must be valid class ids (map an `ignore_class` to 0).
        kind: `"kl"` (KL(live || reference)), `"reverse_kl"` (KL(reference
            || live)) or `"symmetric_kl"` (their mean).

    Returns:
        A float32 tensor of shape `(2,) + logits.shape[:-1]`: the sparse
        cross-entropy (`-log softmax(live)[label]`) and the KL to the
        reference at each position.

    Example:

    >>> import numpy as np
    >>> a = np.array([[2.0, 0.5, -1.0]], "float32")
    >>> ref = np.array([[1.0, 1.0, 0.0]], "float32")
    >>> out = reference_kl_from_logsumexp(a, ref, np.array([0], "int32"))
    >>> [round(float(v), 4) for v in out[:, 0]]
    [0.2413, 0.2795]
    """
    check_kind(kind)
    live = ops.convert_to_tensor(live)
    r = ops.cast(ops.stop_gradient(ops.convert_to_tensor(reference)), "float32")
    labels = ops.convert_to_tensor(labels, "int32")
    num_classes = live.shape[-1]

    @ops.custom_gradient
    def op(x_in):
        x = ops.cast(x_in, "float32")
        lse_r = ops.logsumexp(r, axis=-1, keepdims=True)
        top = ops.max(x, axis=-1, keepdims=True)
        e = ops.exp(x - top)
        sum_e = ops.sum(e, axis=-1, keepdims=True)
        lse = top + ops.log(sum_e)
        # sum(p * d), with p = e / sum(e).
        cross = ops.sum(e * (x - r), axis=-1, keepdims=True) / sum_e
        kl = _reference_kl(x, r, lse, cross, lse_r, kind)
        picked = ops.take_along_axis(x, ops.expand_dims(labels, -1), axis=-1)
        value = ops.stack([(lse - picked)[..., 0], kl[..., 0]])

        def grad(*args, upstream=None):
            upstream = upstream_of(args, upstream)
            up_ce = ops.expand_dims(upstream[0], -1)
            up_kl = ops.expand_dims(upstream[1], -1)
            x = ops.cast(x_in, "float32")
            p = ops.exp(x - lse)
            one_hot = ops.one_hot(labels, num_classes, dtype="float32")
            # `(x - cross) - r`, not `x - r - cross`: XLA would share `x - r`
            # with the forward pass and keep it, a logits-sized buffer, for
            # the backward pass.
            if kind == "kl":
                total = p * (up_ce + up_kl * ((x - cross) - r)) - up_ce * one_hot
            else:
                q = ops.exp(r - lse_r)
                reverse = p - q
                if kind == "reverse_kl":
                    kl_grad = reverse
                else:
                    kl_grad = 0.5 * (p * ((x - cross) - r) + reverse)
                total = up_ce * (p - one_hot) + up_kl * kl_grad
            return ops.cast(total, x_in.dtype)

        return value, grad

    return op(live)
