"""The peer: a hand-written PyTorch R-Drop training loop, as users copy it.

The loop follows the R-Drop write-up (github.com/dropreg/R-Drop, "Quick Start"):
an `nn.Module`, two forward passes with dropout active, `compute_kl_loss` with
`F.kl_div` both ways summed, then AdamW, `clip_grad_norm_` and
`loss.backward()`. `compute_kl_loss` is copied as written there (it *sums* over
the batch); keras-rdrop averages the KL over the batch, so the loop divides
`alpha` by the batch size to train the same objective. That changes no cost.

The models here have the same architecture and parameter count as the Keras
models in `keras_models.py` (the benchmark prints both counts).

`bench.py` drives this file in a worker process (`--variants torch_rdrop ...`).
It also runs on its own for a quick look::

    python benchmarks/torch_rdrop_loop.py --model transformer --steps 20
"""

from __future__ import annotations

import argparse
import copy
import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

# Variants of the loop; `bench.py` compares each Keras variant with one of them.
LOOP_VARIANTS = ("torch_plain", "torch_rdrop", "torch_anchor", "torch_rdrop_anchor")


# --------------------------------------------------------------------- models


class MLP(nn.Module):
    """256 -> 512 -> 512 -> 10, ReLU, dropout 0.3 after each hidden layer."""

    def __init__(self, in_dim=256, hidden=512, num_classes=10, dropout=0.3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class TransformerClassifier(nn.Module):
    """Token + learned position embedding, post-norm encoder, mean pooling."""

    def __init__(
        self,
        vocab_size=8000,
        seq_len=64,
        width=128,
        num_layers=2,
        num_heads=4,
        ff_dim=512,
        num_classes=2,
        dropout=0.1,
    ):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(seq_len, width)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=num_heads,
            dim_feedforward=ff_dim,
            dropout=dropout,
            activation="relu",
            layer_norm_eps=1e-5,
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=num_layers, enable_nested_tensor=False
        )
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.dropout(self.token(tokens) + self.position(positions))
        h = self.encoder(h)
        return self.head(self.head_dropout(h.mean(dim=1)))


class FrozenBaseClassifier(nn.Module):
    """`TransformerClassifier`'s body frozen (no dropout inside, no gradient),
    then dropout and a trainable head: the transfer-learning recipe."""

    def __init__(self, dropout=0.1, **body):
        super().__init__()
        self.body = TransformerClassifier(dropout=0.0, **body)
        self.body.head = nn.Identity()
        self.body.requires_grad_(False)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(body["width"], body["num_classes"])

    def forward(self, tokens):
        return self.head(self.head_dropout(self.body(tokens)))


class BertClassifier(nn.Module):
    """keras-hub's `BertTextClassifier` on a `BertBackbone`, in PyTorch.

    Token + position + segment embeddings summed, LayerNorm (epsilon 1e-12),
    dropout; post-norm encoder layers with tanh-approximated GELU whose
    feed-forward block has no dropout between its two Dense layers (keras-hub's
    `TransformerEncoder`; `nn.TransformerEncoderLayer`'s inner dropout is
    replaced by `nn.Identity`); a Dense-tanh pooler on the [CLS] position,
    dropout, the classifier. Padding positions are masked out of attention.
    """

    def __init__(
        self,
        vocab_size=30522,
        max_sequence_length=512,
        num_segments=2,
        hidden_dim=128,
        num_layers=2,
        num_heads=2,
        intermediate_dim=512,
        num_classes=2,
        dropout=0.1,
    ):
        super().__init__()
        self.token = nn.Embedding(vocab_size, hidden_dim)
        self.position = nn.Embedding(max_sequence_length, hidden_dim)
        self.segment = nn.Embedding(num_segments, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=hidden_dim,
            nhead=num_heads,
            dim_feedforward=intermediate_dim,
            dropout=dropout,
            activation=functools.partial(F.gelu, approximate="tanh"),
            layer_norm_eps=1e-12,
            batch_first=True,
        )
        layer.dropout = nn.Identity()  # between linear1 and linear2
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=num_layers, enable_nested_tensor=False
        )
        self.pooler = nn.Linear(hidden_dim, hidden_dim)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, inputs):
        tokens = inputs["token_ids"]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.token(tokens) + self.position(positions)
        h = h + self.segment(inputs["segment_ids"])
        h = self.dropout(self.norm(h))
        h = self.encoder(h, src_key_padding_mask=inputs["padding_mask"] == 0)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return self.head(self.head_dropout(pooled))


class TokenLM(nn.Module):
    """Embedding(50257, 32), dropout, Linear(32, 50257): per-position logits."""

    def __init__(self, vocab_size=50257, width=32, dropout=0.1):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, tokens):
        return self.head(self.dropout(self.token(tokens)))


def build_model(name: str) -> nn.Module:
    from keras_models import MODELS  # numpy only; shared with the Keras side

    cfg = MODELS[name]
    if name == "mlp":
        return MLP()
    if name == "transformer":
        return TransformerClassifier()
    if name == "frozen_base":
        body = ("vocab_size", "seq_len", "width", "num_layers", "num_heads", "ff_dim")
        return FrozenBaseClassifier(
            dropout=cfg["dropout"],
            num_classes=cfg["num_classes"],
            **{k: cfg[k] for k in body},
        )
    if name == "bert_tiny":
        return BertClassifier(
            **{
                k: cfg[k]
                for k in (
                    "vocab_size",
                    "max_sequence_length",
                    "num_segments",
                    "hidden_dim",
                    "num_layers",
                    "num_heads",
                    "intermediate_dim",
                    "num_classes",
                    "dropout",
                )
            }
        )
    if name == "lm50k":
        return TokenLM(cfg["vocab_size"], cfg["width"], cfg["dropout"])
    raise ValueError(f"unknown model {name!r}")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------- the R-Drop write-up


def compute_kl_loss(p, q, pad_mask=None):
    """Verbatim from the R-Drop README (github.com/dropreg/R-Drop)."""
    p_loss = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="none")
    q_loss = F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="none")

    # pad_mask is for seq-level tasks
    if pad_mask is not None:
        p_loss.masked_fill_(pad_mask, 0.0)
        q_loss.masked_fill_(pad_mask, 0.0)

    # You can choose whether to use function "sum" and "mean" depending on your task
    p_loss = p_loss.sum()
    q_loss = q_loss.sum()

    loss = (p_loss + q_loss) / 2
    return loss


class Trainer:
    """One training step of the chosen loop variant.

    `torch_rdrop` is the write-up's loop; `torch_plain` is the same loop with
    one pass and no KL; `torch_anchor` adds `beta * KL(p_theta || p_theta0)`
    against a frozen `copy.deepcopy` of the model run under `torch.no_grad()`
    in eval mode (the usual hand-written reference-KL anchor);
    `torch_rdrop_anchor` does both.
    """

    def __init__(
        self,
        model: nn.Module,
        variant: str,
        alpha: float = 1.0,
        beta: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
    ):
        if variant not in LOOP_VARIANTS:
            raise ValueError(f"unknown loop variant {variant!r}")
        self.model = model
        self.variant = variant
        self.alpha = alpha
        self.beta = beta
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=weight_decay, eps=1e-7
        )
        self.ref_model = None
        if variant in ("torch_anchor", "torch_rdrop_anchor"):
            self.ref_model = copy.deepcopy(model).eval()
            self.ref_model.requires_grad_(False)

    def step(self, x, y):
        model = self.model
        model.train()
        rdrop = self.variant in ("torch_rdrop", "torch_rdrop_anchor")

        # Sequence outputs (lm50k) as (batch * length, vocab) rows; targets
        # as (batch * length,). A no-op for classifiers.
        y = y.reshape(-1)

        # keep dropout and forward twice
        logits = _rows(model(x))
        if rdrop:
            logits2 = _rows(model(x))
            # cross entropy loss for classifier
            ce_loss = 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits2, y))
            kl_loss = compute_kl_loss(logits, logits2)
            # `compute_kl_loss` sums over the rows; keras-rdrop averages.
            loss = ce_loss + self.alpha / y.shape[0] * kl_loss
        else:
            loss = F.cross_entropy(logits, y)

        if self.ref_model is not None:
            with torch.no_grad():
                ref_logits = _rows(self.ref_model(x))
            # KL(p_theta || p_theta0) = F.kl_div(log p_theta0, p_theta).
            ref_kl = F.kl_div(
                F.log_softmax(ref_logits, dim=-1),
                F.log_softmax(logits, dim=-1),
                reduction="batchmean",
                log_target=True,
            )
            loss = loss + self.beta * ref_kl

        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return loss


def _rows(logits):
    """Logits as rows of classes: (..., classes) -> (N, classes)."""
    return logits.reshape(-1, logits.shape[-1])


# ----------------------------------------------------------------- utilities


def make_batches(name: str, steps: int, batch_size: int, device="cpu", seed=0):
    """The fixed dataset, pre-sliced into `steps` batches of `(x, y)` tensors.

    `x` is a dict of tensors for `bert_tiny`. Integer inputs (token ids,
    masks) become int64, as `nn.Embedding` indices usually are.
    """
    from keras_models import make_data  # numpy only; shared with the Keras side

    x, y = make_data(name, steps * batch_size, seed=seed)

    def tensor(a):
        t = torch.from_numpy(a)
        return t if t.is_floating_point() else t.long()

    x = {k: tensor(v) for k, v in x.items()} if isinstance(x, dict) else tensor(x)
    y = torch.from_numpy(y).long()

    # Each batch owns its memory (as a DataLoader's batches do), not a view
    # into the whole dataset.
    def take(t, i):
        return t[i * batch_size : (i + 1) * batch_size].clone().to(device)

    def take_x(i):
        if isinstance(x, dict):
            return {k: take(v, i) for k, v in x.items()}
        return take(x, i)

    return [(take_x(i), take(y, i)) for i in range(steps)]


def saved_activation_bytes(model: nn.Module, x, y) -> int:
    """Bytes autograd saves for backward in one training forward pass.

    That is "one set of activations": what a second pass adds at most. Counted
    with `saved_tensors_hooks`, each storage once, parameters left out.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(_rows(model(x)), y.reshape(-1))
    del loss
    return sum(storages.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=("mlp", "transformer", "bert_tiny", "lm50k"),
        default="mlp",
    )
    parser.add_argument("--variant", choices=LOOP_VARIANTS, default="torch_rdrop")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from keras_models import MODELS

    batch_size = MODELS[args.model]["batch_size"]
    torch.manual_seed(0)
    model = build_model(args.model)
    trainer = Trainer(model, args.variant)
    batches = make_batches(args.model, args.steps, batch_size)
    trainer.step(*batches[0])  # warm-up
    start = time.perf_counter()
    for x, y in batches:
        loss = trainer.step(x, y)
    loss.item()
    ms = (time.perf_counter() - start) * 1000 / len(batches)
    print(
        f"{args.model} {args.variant}: {param_count(model):,} params, "
        f"{ms:.2f} ms/step over {len(batches)} steps "
        f"({torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
