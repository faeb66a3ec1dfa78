"""`--backend`: pick the Keras backend before Keras is imported.

Imports nothing from Keras, so the example scripts can call it first.
"""

from __future__ import annotations

import os
import sys

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
