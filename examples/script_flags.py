"""Command-line flags shared by the example scripts.

`--backend` picks the Keras backend before Keras is imported; `--results`,
`--tiny` and `--verbose` mean the same in every script. Imports nothing from
Keras, so the scripts can call it first.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

BACKENDS = ("jax", "tensorflow", "torch")


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


def add_output_flags(parser, tiny: dict, results_help: str | None = None):
    """Adds `--results`, `--tiny` (with the script's tiny defaults) and `--verbose`."""
    parser.add_argument(
        "--results",
        default=None,
        help=results_help or "also write the markdown table to this file",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny defaults for a smoke test (other flags still apply): "
        + ", ".join(f"{k}={v}" for k, v in tiny.items()),
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Keras' progress bars"
    )


def parse_with_tiny(parser, tiny: dict, argv=None):
    """Parses `argv`; with `--tiny`, the tiny defaults apply first.

    Flags given explicitly still win over the tiny defaults.
    """
    if "--tiny" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**tiny)
    return parser.parse_args(argv)


def print_and_save(table: str, start: float, results: str | None) -> None:
    """Prints the table and the wall time since `start`; `--results` saves both.

    `start` is a `time.perf_counter()` reading.
    """
    text = f"{table}\n\nwall time {time.perf_counter() - start:.0f} s"
    print()
    print(text, flush=True)
    if results:
        Path(results).write_text(text + "\n")
