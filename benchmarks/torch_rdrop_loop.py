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


def build_model(name: str) -> nn.Module:
    if name == "mlp":
        return MLP()
    if name == "transformer":
        return TransformerClassifier()
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

        # keep dropout and forward twice
        logits = model(x)
        if rdrop:
            logits2 = model(x)
            # cross entropy loss for classifier
            ce_loss = 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits2, y))
            kl_loss = compute_kl_loss(logits, logits2)
            # `compute_kl_loss` sums over the batch; keras-rdrop averages.
            loss = ce_loss + self.alpha / x.shape[0] * kl_loss
        else:
            loss = F.cross_entropy(logits, y)

        if self.ref_model is not None:
            with torch.no_grad():
                ref_logits = self.ref_model(x)
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


# ----------------------------------------------------------------- utilities


def make_batches(name: str, steps: int, batch_size: int, device="cpu", seed=0):
    """The fixed dataset, pre-sliced into `steps` batches of `(x, y)` tensors."""
    from keras_models import make_data  # numpy only; shared with the Keras side

    x, y = make_data(name, steps * batch_size, seed=seed)
    x = torch.from_numpy(x)
    if name == "transformer":
        x = x.long()  # nn.Embedding takes int64 indices
    y = torch.from_numpy(y).long()
    # Each batch owns its memory (as a DataLoader's batches do), not a view
    # into the whole dataset.
    return [
        (
            x[i * batch_size : (i + 1) * batch_size].clone().to(device),
            y[i * batch_size : (i + 1) * batch_size].clone().to(device),
        )
        for i in range(steps)
    ]


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
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(storages.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "transformer"), default="mlp")
    parser.add_argument("--variant", choices=LOOP_VARIANTS, default="torch_rdrop")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = 128 if args.model == "mlp" else 32
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
