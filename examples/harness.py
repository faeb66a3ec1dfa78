"""The harness of the keras-rdrop examples: flags, the paired-seed loop, tables.

Not a public API: the example scripts in this folder import it (the folder is
on `sys.path` when a script runs). It does not import Keras at module level, so
a script can parse its flags and pick the backend (`select_backend`) first.

- Flags: `make_parser` (with `--backend`), `add_sweep_flags` (`--seeds`,
  `--alphas`), `add_common_flags` (`--figures-dir`, `--results`,
  `--runs-json`, `--tiny`, `--full`, `--verbose`, `--run-eagerly`) and
  `parse_args`, where `--tiny` and `--full` swap in a script's preset defaults.
- The paired-seed loop: `paired_sweep` runs every arm of a seed from the same
  start, and can write each finished run to a JSON file as it goes.
- Choices on validation only: `choose_epoch`, `summarize`.
- The tables and figures are in `harness_reports.py`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ("jax", "tensorflow", "torch")
REPO_ROOT = Path(__file__).resolve().parents[1]
# Where the examples write by default: a folder git ignores, so a run never
# changes a tracked file. `--publish` (for maintainers) writes the committed
# results instead: the figures under docs/figures, the demo's tables under
# examples/.
OUTPUT_DIR = REPO_ROOT / "example_output"
DEFAULT_FIGURES_DIR = REPO_ROOT / "docs" / "figures"

# ---------------------------------------------------------------------- flags


def make_parser(doc, epilog=None):
    """An argument parser described by a script's docstring, with `--backend`."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=epilog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_backend_flag(parser)
    return parser


def add_backend_flag(parser):
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="Keras backend to run on (sets KERAS_BACKEND before Keras is "
        "imported). Default: the KERAS_BACKEND environment variable, else "
        "Keras' own default (tensorflow).",
    )


def select_backend(backend: str | None) -> None:
    """Sets `KERAS_BACKEND`; fails if Keras already runs on another backend."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend is None:
        return
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != backend:
            raise SystemExit(
                f"Keras is already imported on the {current!r} backend; cannot "
                f"switch to {backend!r}. Run the script in a fresh process."
            )
        return
    os.environ["KERAS_BACKEND"] = backend


def add_sweep_flags(parser, seeds: int, alphas: str):
    """`--seeds` and `--alphas`: the paired seeds and R-Drop's alpha grid."""
    parser.add_argument("--seeds", type=int, default=seeds, help="paired seeds")
    parser.add_argument(
        "--alphas",
        default=alphas,
        help="R-Drop weights to sweep, comma-separated (alpha=0, the baseline, "
        "always runs); with several, the best on validation is reported",
    )


def _describe(preset: dict) -> str:
    return ", ".join(f"{k.replace('_', '-')}={v}" for k, v in preset.items())


def add_common_flags(
    parser, tiny: dict, full: dict | None = None, figures=True, runs_json=True
):
    """Adds the output flags and `--tiny` (and `--full`) with their presets.

    `figures=False` leaves out `--figures-dir`, `runs_json=False` leaves out
    `--runs-json`, for a script without figures or per-run records.
    """
    if figures:
        parser.add_argument(
            "--figures-dir",
            default=None,
            help="where to write the PNG figures (default: example_output/figures, "
            "which git ignores; docs/figures with --publish; a temporary folder "
            "with --tiny)",
        )
        parser.add_argument(
            "--publish",
            action="store_true",
            help="for maintainers: write the committed figures (docs/figures) "
            "instead of example_output/",
        )
    parser.add_argument(
        "--results", default=None, help="also write the markdown tables to this file"
    )
    parser.add_argument(
        "--runs-json",
        default=None,
        help="write every finished run (per-epoch measurements) to this JSON "
        "file as the sweep goes",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny settings for a smoke test (other flags still apply): "
        + _describe(tiny),
    )
    if full is not None:
        parser.add_argument(
            "--full",
            action="store_true",
            help="the full protocol of the README tables (other flags still "
            "apply): " + _describe(full),
        )
    parser.add_argument(
        "--verbose", action="store_true", help="show Keras' progress bars"
    )
    parser.add_argument(
        "--run-eagerly",
        action="store_true",
        help="no graph compilation (Keras' run_eagerly): for debugging and "
        "smoke tests at tiny sizes, where compiling costs more than it saves",
    )


def parse_args(parser, argv=None, tiny=None, full=None):
    """Parses `argv`; `--tiny` or `--full` sets that preset's defaults first.

    Flags given explicitly still win over a preset.
    """
    given = sys.argv[1:] if argv is None else list(argv)
    if tiny and "--tiny" in given:
        parser.set_defaults(**tiny)
    elif full and "--full" in given:
        parser.set_defaults(**full)
    args = parser.parse_args(given)
    if getattr(args, "tiny", False) and getattr(args, "full", False):
        parser.error("--tiny and --full exclude each other")
    return args


def parse_floats(text):
    return [float(v) for v in str(text).split(",") if v.strip()]


def parse_ints(text):
    return [int(v) for v in str(text).split(",") if v.strip()]


def alpha_grid(text):
    """`[0.0]` (the baseline) then the positive alphas of `text`, sorted."""
    return [0.0] + sorted({a for a in parse_floats(text) if a > 0})


def figures_dir(args):
    """Where figures go: `--figures-dir`, else by preset.

    By default `example_output/figures` (`figures_full` with `--full`), a
    folder git ignores; with `--publish` the committed figures:
    docs/figures (`--full`, the README figures) or docs/figures/default; with
    `--tiny`, a temporary folder.
    """
    if getattr(args, "figures_dir", None) is not None:
        return Path(args.figures_dir)
    if args.tiny:
        import tempfile

        return Path(tempfile.gettempdir()) / "keras_rdrop_tiny_figures"
    full = getattr(args, "full", False)
    if getattr(args, "publish", False):
        return DEFAULT_FIGURES_DIR if full else DEFAULT_FIGURES_DIR / "default"
    return OUTPUT_DIR / ("figures_full" if full else "figures")


@functools.lru_cache(maxsize=1)
def commit_stamp():
    """The git commit of this checkout (with `+changes` if dirty), or 'unknown'.

    Read once per process (the first call), so a long run is stamped with the
    code it started from.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "keras_rdrop", "examples"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" +changes" if dirty else "")


# ------------------------------------------------------------ the paired loop


def paired_sweep(arms, seeds, init, train, log=print, tag="", checkpoint=None):
    """Runs `train(seed, arm, start)` for every seed and arm.

    Args:
        arms: The arm keys (e.g. alphas, with the baseline first).
        seeds: The number of seeds, `0..seeds-1`.
        init: `init(seed)` returns what every arm of that seed starts from
            (initial weights): the pairing.
        train: `train(seed, arm, start)` trains one arm and returns a dict of
            measurements; lists of per-epoch values under `val_accuracy`,
            `test_accuracy` (for the log line).
        log: Progress printer.
        tag: The log lines' prefix, e.g. `"mnist"`.
        checkpoint: A JSON file rewritten after every run with all finished
            runs (`{"arms": {arm: [run, ...]}}`), or `None`.

    Returns:
        `{arm: [run of seed 0, run of seed 1, ...]}`.
    """
    import numpy as np

    commit_stamp()  # read the commit before the run, not after
    runs = {arm: [] for arm in arms}
    start = time.perf_counter()
    for seed in range(seeds):
        first = init(seed)
        for arm in arms:
            t0 = time.perf_counter()
            result = train(seed, arm, first)
            runs[arm].append(result)
            best = int(np.argmax(result["val_accuracy"]))
            log(
                f"[{tag}] seed {seed + 1}/{seeds} alpha={arm:<4g} val acc "
                f"{result['val_accuracy'][-1]:.4f} at the last epoch, best "
                f"{result['val_accuracy'][best]:.4f} at epoch {best + 1}  "
                f"({time.perf_counter() - t0:.1f} s, total "
                f"{time.perf_counter() - start:.0f} s)"
            )
            if checkpoint:
                save_runs(checkpoint, runs)
    return runs


def save_runs(path, runs):
    """Writes `{arm: [run, ...]}` to JSON (NumPy values as lists)."""
    import numpy as np

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        return value

    data = {"arms": {repr(float(k)): plain(v) for k, v in runs.items()}}
    Path(path).write_text(json.dumps(data))


def load_runs(path):
    """The runs written by `save_runs`, per-epoch lists as NumPy arrays."""
    import numpy as np

    data = json.loads(Path(path).read_text())
    return {
        float(k): [
            {
                key: np.asarray(v) if isinstance(v, list) and "accuracy" in key else v
                for key, v in run.items()
            }
            for run in arm
        ]
        for k, arm in data["arms"].items()
    }


def arm_record(alpha, seed, held_out, timer, steps_per_epoch, history, probe=None):
    """One run's measurements from the examples' callbacks (see the scripts)."""
    import numpy as np

    seconds = timer.seconds[1:] or timer.seconds  # the first epoch compiles
    epoch_seconds = float(np.median(seconds))
    return {
        "alpha": float(alpha),
        "seed": seed,
        "val_accuracy": np.array(held_out.history["val"]["accuracy"]),
        "val_nll": np.array(held_out.history["val"]["nll"]),
        "test_accuracy": np.array(held_out.history["test"]["accuracy"]),
        "test_nll": np.array(held_out.history["test"]["nll"]),
        "kl_loss": [float(v) for v in history.history.get("kl_loss", [])],
        "dropout_kl": list(probe.values) if probe is not None else [],
        "epoch_seconds": epoch_seconds,
        "step_seconds": epoch_seconds / max(steps_per_epoch, 1),
    }


# -------------------------------------------------------------------- choices


def choose_epoch(arm):
    """The epoch (0-based) with the best mean validation accuracy over seeds.

    Ties go to the lower mean validation NLL. Only validation is read.
    """
    import numpy as np

    accuracy = np.mean([r["val_accuracy"] for r in arm], axis=0)
    nll = np.mean([r["val_nll"] for r in arm], axis=0)
    return int(np.lexsort((nll, -accuracy))[0])


def summarize(runs):
    """Chooses every arm's epoch and R-Drop's alpha on validation.

    Returns `{"rows": {alpha: row}, "chosen_alpha", "seeds"}`; a row holds the
    per-seed values at the chosen epoch and the paired differences to the
    baseline (`alpha = 0`).
    """
    import numpy as np

    rows = {}
    for alpha, arm in runs.items():
        epoch = choose_epoch(arm)
        rows[alpha] = {
            "epoch": epoch,
            "val_accuracy": np.array([r["val_accuracy"][epoch] for r in arm]),
            "val_nll": np.array([r["val_nll"][epoch] for r in arm]),
            "test_accuracy": np.array([r["test_accuracy"][epoch] for r in arm]),
            "test_nll": np.array([r["test_nll"][epoch] for r in arm]),
            "epoch_seconds": np.array([r["epoch_seconds"] for r in arm]),
            "step_seconds": np.array(
                [r.get("step_seconds", np.nan) for r in arm], "float64"
            ),
        }
    base = rows[0.0]
    for row in rows.values():
        row["diff_accuracy"] = row["test_accuracy"] - base["test_accuracy"]
        row["diff_nll"] = row["test_nll"] - base["test_nll"]
        row["wins"] = int(np.sum(row["diff_accuracy"] > 0))
        row["ties"] = int(np.sum(row["diff_accuracy"] == 0))
    candidates = [a for a in runs if a > 0]
    # The best mean validation accuracy; ties go to the lower validation NLL.
    chosen = max(
        candidates,
        key=lambda a: (rows[a]["val_accuracy"].mean(), -rows[a]["val_nll"].mean()),
    )
    return {"rows": rows, "chosen_alpha": chosen, "seeds": len(runs[0.0])}
