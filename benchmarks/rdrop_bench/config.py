"""Constants of the benchmark: variants, model sizes, paths; and variant names.

A Keras variant's name is a base (`plain`, `rdrop_concat`, ...) with optional
modifiers: `_sync` (a no-op `on_train_batch_end` callback), `_jit` (compiled
with `jit_compile=True` whatever `--jit` says: `torch.compile` on torch) and
`@LABEL` (keras_rdrop imported from the source tree given as
`--rdrop-src LABEL=PATH_OR_REV`), in that order: `rdrop_concat_jit`,
`anchor@before`.
"""

from __future__ import annotations

from pathlib import Path

# benchmarks/ (keras_models.py, torch_rdrop_loop.py, bench.py) and the repository.
HERE = Path(__file__).resolve().parent.parent
REPO = HERE.parent
BACKENDS = ("jax", "tensorflow", "torch")

# Keras variants, in round order. Each maps to the PyTorch loop variant it is
# compared with.
KERAS_VARIANTS = {
    "plain": "torch_plain",
    "wrapper": "torch_plain",
    "rdrop_seq": "torch_rdrop",
    "rdrop_concat": "torch_rdrop",
    "anchor": "torch_anchor",
    "rdrop_anchor": "torch_rdrop_anchor",
    # The same with `share_prefix=False`: the whole model runs in every pass
    # (not run by default: name them in --variants).
    "rdrop_seq_unshared": "torch_rdrop",
    "rdrop_concat_unshared": "torch_rdrop",
    "anchor_unshared": "torch_anchor",
    "rdrop_anchor_unshared": "torch_rdrop_anchor",
    # Diagnostic, not run by default: the anchor with its per-batch hooks
    # removed (see README, "anchor host sync").
    "anchor_nohooks": "torch_anchor",
    # Diagnostic: a variant plus a no-op `on_train_batch_end` callback, which
    # makes Keras wait for every step's logs on the main thread.
    "plain_sync": "torch_plain",
    "rdrop_seq_sync": "torch_rdrop",
    "rdrop_concat_sync": "torch_rdrop",
}
DIAGNOSTIC_VARIANTS = (
    "anchor_nohooks",
    "plain_sync",
    "rdrop_seq_sync",
    "rdrop_concat_sync",
)
LOOP_VARIANTS = ("torch_plain", "torch_rdrop", "torch_anchor", "torch_rdrop_anchor")
VARIANT_HELP = {
    "plain": "the inner model compiled and fit on its own",
    "wrapper": "RDropModel(alpha=0): the wrapper alone, one pass",
    "rdrop_seq": 'RDropModel(alpha=1, mode="sequential"): two passes',
    "rdrop_concat": 'RDropModel(alpha=1, mode="concat"): one pass on [x; x]',
    "anchor": "RDropModel(alpha=0) + ReferenceKLRegularizer(beta=0.1)",
    "rdrop_anchor": 'RDropModel(alpha=1, mode="concat") + ReferenceKLRegularizer',
    "<variant>_unshared": "rdrop_seq, rdrop_concat, anchor or rdrop_anchor with "
    "share_prefix=False: every pass runs the whole model",
    "anchor_nohooks": "diagnostic: anchor, ReferenceKLRegularizer without its "
    "on_train_batch_begin/end (no per-step host sync)",
    "<variant>_sync": "diagnostic: plain, rdrop_seq or rdrop_concat plus a no-op "
    "on_train_batch_end callback (a host sync per step, as the anchor has)",
    "<variant>_jit": "any variant compiled with jit_compile=True whatever --jit "
    "says (on torch: torch.compile), e.g. plain_jit, rdrop_concat_jit",
    "<variant>@LABEL": "any variant with keras_rdrop imported from the tree "
    "given by --rdrop-src LABEL=PATH_OR_REV, e.g. anchor@before",
    "torch_plain": "PyTorch loop, one pass",
    "torch_rdrop": "PyTorch loop from the R-Drop write-up, two passes",
    "torch_anchor": "PyTorch loop + frozen deepcopy reference, KL to it",
    "torch_rdrop_anchor": "PyTorch R-Drop loop + the reference KL",
}
QUICK_VARIANTS = ("plain", "rdrop_seq", "rdrop_concat", "anchor")
QUICK_LOOPS = ("torch_plain", "torch_rdrop")
# (steps per round, rounds, steps skipped at the start of each round)
FULL_SIZES = {
    "mlp": (20, 12, 2),
    "transformer": (4, 12, 1),
    "frozen_base": (4, 12, 1),
    "bert_tiny": (4, 8, 1),
    "lm50k": (3, 3, 1),
    "lora": (4, 4, 1),
}
QUICK_SIZES = {
    "mlp": (10, 3, 2),
    "transformer": (3, 2, 1),
    "frozen_base": (3, 2, 1),
    "bert_tiny": (3, 2, 1),
    "lm50k": (2, 1, 1),
    "lora": (3, 1, 1),
}
MODEL_NAMES = tuple(FULL_SIZES)
# `--model all`: the main table (results/fused-all). The recipe model
# (`frozen_base`) runs on its own, with the `_unshared` variants beside.
MAIN_TABLE_MODELS = ("mlp", "transformer", "bert_tiny", "lm50k", "lora")
# The batch sizes (keras_models.MODELS holds them too).
MODELS_BATCH = {
    "mlp": 128,
    "transformer": 32,
    "frozen_base": 32,
    "bert_tiny": 32,
    "lm50k": 2,
    "lora": 4,
}
# Models without a PyTorch-loop peer.
NO_LOOP_MODELS = ("lora",)


def parse_variant(name: str) -> dict:
    """Splits a Keras variant name into its base and modifiers.

    Args:
        name: e.g. `"rdrop_concat_jit@before"`.

    Returns:
        A dict with `base` (a key of `KERAS_VARIANTS` without `_sync`),
        `sync` and `jit` (bools) and `source` (the `@` label, or None).

    Example:

    >>> parse_variant("anchor_jit@before")["base"]
    'anchor'
    """
    rest, _, source = name.partition("@")
    jit = rest.endswith("_jit")
    if jit:
        rest = rest[: -len("_jit")]
    sync = rest.endswith("_sync")
    if sync:
        rest = rest[: -len("_sync")]
    if rest not in KERAS_VARIANTS or (not source and "@" in name):
        raise SystemExit(
            f"unknown variant {name!r}: expected one of {list(KERAS_VARIANTS)} "
            "with optional _sync, _jit and @LABEL modifiers"
        )
    return {"base": rest, "sync": sync, "jit": jit, "source": source or None}


def peer_of(name: str) -> str:
    """The PyTorch loop variant a Keras variant is compared with."""
    return KERAS_VARIANTS[parse_variant(name)["base"]]


def counterpart_of(name: str) -> str | None:
    """The variant `name` differs from by one modifier, for a paired ratio.

    `X@LABEL` is compared with `X` (the default tree), then `X_jit` with `X`.
    None for a variant without `_jit` or `@LABEL`.
    """
    if "@" in name:
        return name.partition("@")[0]
    if name.endswith("_jit"):
        return name[: -len("_jit")]
    return None


def plain_of(name: str) -> str:
    """`plain` with the same `_jit` and `@LABEL` modifiers as `name`."""
    v = parse_variant(name)
    return (
        "plain"
        + ("_jit" if v["jit"] else "")
        + (f"@{v['source']}" if v["source"] else "")
    )
