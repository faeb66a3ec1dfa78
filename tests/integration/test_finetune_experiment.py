"""Smoke test of experiments/finetune_text.py and its report: a tiny BERT
fine-tuned end to end, one JSON per arm, resumed, and the report's table."""

import importlib
import json
import sys

import pytest

from tests.integration.test_examples import EXAMPLES, write_questions
from tests.testing import import_keras_hub

EXPERIMENTS = EXAMPLES.parent / "experiments"

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def experiments():
    sys.path[:0] = [str(EXPERIMENTS), str(EXAMPLES)]
    try:
        yield {
            name: importlib.import_module(name)
            for name in ("finetune_text", "finetune_report")
        }
    finally:
        sys.path.remove(str(EXPERIMENTS))
        sys.path.remove(str(EXAMPLES))


def test_train_size_per_task(experiments):
    script = experiments["finetune_text"]
    args = script.build_parser().parse_args(["--train-size", "trec=300,500"])
    assert script.train_size(args, "trec") == 300
    assert script.train_size(args, "movie") == 500
    args = script.build_parser().parse_args(["--train-size", "trec=300"])
    with pytest.raises(SystemExit, match="no size for movie"):
        script.train_size(args, "movie")


def test_protocol_writes_resumes_and_reports(
    experiments, tiny_bert_preset, tmp_path, capsys
):
    import_keras_hub()
    write_questions(tmp_path / "q.txt", per_class=12)
    runs = tmp_path / "runs"
    argv = ["--tasks", "trec", "--data", f"trec={tmp_path / 'q.txt'}"]
    argv += ["--model-dir", tiny_bert_preset, "--runs-dir", str(runs)]
    argv += ["--seeds", "2", "--alphas", "1", "--train-size", "8"]
    argv += ["--val-size", "4", "--test-size", "4", "--sequence-length", "8"]
    argv += ["--batch-size", "4", "--max-epochs", "2", "--patience", "1"]
    experiments["finetune_text"].main(argv)
    printed = capsys.readouterr().out
    assert "[4/4] trec seed 1 alpha 1" in printed
    names = sorted(p.name for p in runs.glob("*.json"))
    assert names == [f"trec-s{s}-a{a}.json" for s in (0, 1) for a in (0, 1)]
    record = json.loads((runs / "trec-s0-a1.json").read_text())
    assert 1 <= record["best_epoch"] <= record["epochs_run"] <= 2
    assert record["train_cpu_seconds_to_best"] > 0
    assert record["steps_to_best"] == record["best_epoch"] * 2
    # A rerun resumes: every arm is found, nothing trains again.
    experiments["finetune_text"].main(argv)
    assert "alpha" not in capsys.readouterr().out
    # Other settings are refused, not mixed with the stored runs.
    with pytest.raises(SystemExit, match="other settings"):
        experiments["finetune_text"].main([*argv, "--lr", "1e-3"])
    out = tmp_path / "report"
    summary = experiments["finetune_report"].main(
        ["--runs-dir", str(runs), "--markdown", str(out.with_suffix(".md"))]
        + ["--json", str(out.with_suffix(".json"))]
        + ["--figure", str(out.with_suffix(".png"))]
    )
    assert summary["trec"]["seeds"] == 2 and summary["trec"]["chosen_alphas"] == [1, 1]
    assert "| trec | 8 | 2 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
