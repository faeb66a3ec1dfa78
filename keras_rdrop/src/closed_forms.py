"""The closed forms of the chunked and fused passes, each defined once.

The sparse cross-entropy and the KLs of categorical distributions given by
log-probabilities, their gradients with respect to the logits, and the
float32 log-softmax every pass starts from. With `p = softmax(a)`,
`q = softmax(b)` and `d = log p - log q`:

```
CE(label, a) = -log p[label]          dCE/da = p - one_hot(label)
KL(p||q) = sum(p * d)                 dKL/da = p * (d - sum(p * d))
                                      dKL/db = q - p
SKL = (KL(p||q) + KL(q||p)) / 2       dSKL/da = (p * (d - sum(p * d)) + p - q) / 2
                                      dSKL/db = (q * (sum(q * d) - d) + q - p) / 2
```

`chunked_gradients` (the KL of logits), `fused_cross_entropy` (R-Drop's
language-model path) and `fused_reference_kl` (the anchor's) evaluate them
chunk by chunk. `logsumexp_reference_kl` has its own formulation of the
anchor's values, for XLA.
"""

from __future__ import annotations

from keras import ops

# The KLs between two categorical distributions: KL(p||q), KL(q||p), their
# mean. Every module that takes a `kind` of KL takes one of these.
KL_KINDS = ("kl", "reverse_kl", "symmetric_kl")


def check_kind(kind: str) -> str:
    """Returns `kind` if it is one of `KL_KINDS`, else raises a `ValueError`."""
    if kind not in KL_KINDS:
        raise ValueError(f"`kind` should be one of {KL_KINDS}. Received: kind={kind!r}")
    return kind


def log_softmax32(x, axis: int = -1):
    """`log_softmax(x)` in float32, whatever the dtype of `x`."""
    return ops.log_softmax(ops.cast(x, "float32"), axis=axis)


def cross_entropy(log_p, labels):
    """The sparse cross-entropy `-log p[label]` per position, class axis last."""
    index = ops.expand_dims(labels, -1)
    return -ops.take_along_axis(log_p, index, axis=-1)[..., 0]


def cross_entropy_grad(p, one_hot):
    """dCE/dx per unit: `softmax(x) - one_hot(label)`."""
    return p - one_hot


def kl_value(log_p, log_q, kind: str, axis: int = -1):
    """The KL of `kind` (`KL_KINDS`) from finite log-probabilities, over `axis`."""
    if kind == "reverse_kl":
        log_p, log_q = log_q, log_p
    if kind == "symmetric_kl":
        diff = ops.exp(log_p) - ops.exp(log_q)
        return 0.5 * ops.sum(diff * (log_p - log_q), axis=axis)
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=axis)


def kl_grad_terms(log_p, log_q, p, q, axis: int, symmetric: bool, constant=None):
    """Closed-form gradients of KL(p||q) or SKL with respect to the logits.

    Takes the log-probabilities of the two logits `a` and `b` and their
    exponentials `p` and `q` (`q` may be `None` for KL(p||q) with `b`
    constant, which does not need it), and returns `(dKL/da, dKL/db)` for an
    upstream gradient of 1 (the module docstring has the formulas). The
    gradient of the input named by `constant` (`"a"`, `"b"` or `None`) is
    not computed: `None` is returned for it.
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


def constant_kl_grad(log_p, log_r, p, kind: str):
    """d KL/d(live logits) per unit, the second distribution constant.

    The KL of `kind` between the live `log_p` (with `p = exp(log_p)`) and a
    constant `log_r` (the anchor's reference), class axis last.
    """
    if kind == "kl":
        term, _ = kl_grad_terms(log_p, log_r, p, None, -1, False, "b")
        return term
    r = ops.exp(log_r)
    if kind == "reverse_kl":
        # KL(r||p): the reference is the first argument, and the constant.
        _, term = kl_grad_terms(log_r, log_p, r, p, -1, False, "a")
        return term
    term, _ = kl_grad_terms(log_p, log_r, p, r, -1, True, "b")
    return term


def two_pass_values(log_p, log_q, labels):
    """R-Drop's per-position values: each pass's cross-entropy and their SKL."""
    return [
        cross_entropy(log_p, labels),
        cross_entropy(log_q, labels),
        kl_value(log_p, log_q, "symmetric_kl"),
    ]


def two_pass_grads(log_p, log_q, p, q, one_hot, up_a, up_b, up_kl):
    """The gradients of `two_pass_values` in both passes' logits.

    `up_a`, `up_b` and `up_kl` are the upstream gradients of the two
    cross-entropies and the SKL, with a class axis of size 1.
    """
    kl_a, kl_b = kl_grad_terms(log_p, log_q, p, q, -1, symmetric=True)
    grad_a = up_a * cross_entropy_grad(p, one_hot) + up_kl * kl_a
    grad_b = up_b * cross_entropy_grad(q, one_hot) + up_kl * kl_b
    return grad_a, grad_b
