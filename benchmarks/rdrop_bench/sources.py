"""Where the workers import keras_rdrop from, and the commit of each source.

The default source is the working tree, or a snapshot of a commit
(`--at-commit REV`, extracted with `git archive`). `--rdrop-src LABEL=X`
adds more: a variant `NAME@LABEL` imports keras_rdrop from the tree `X` (a
folder holding `keras_rdrop/`) or from a snapshot of the revision `X`, so
two versions of the package run side by side in the same interleaved rounds.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from rdrop_bench.config import REPO

# Label -> {"path": folder put first on PYTHONPATH, "git": its commit state}.
# The default source has the label None.
SOURCES: dict = {}


def _git(cwd, *args) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True
    ).stdout.strip()


def snapshot(rev: str) -> Path:
    """Extracts keras_rdrop/ at `rev` into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="keras_rdrop-bench-"))
    archive = subprocess.run(
        ["git", "archive", rev, "keras_rdrop"], cwd=REPO, capture_output=True
    )
    if archive.returncode:
        raise SystemExit(f"git archive {rev} failed: {archive.stderr.decode()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def _tree_state(path: Path) -> dict:
    """The commit of a checkout and whether its keras_rdrop/ is modified."""
    top = _git(path, "rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != Path(path).resolve():
        # Not the root of a checkout (e.g. a `git archive` extract): a commit
        # of an enclosing repository would be wrong.
        return {
            "commit": None,
            "keras_rdrop_dirty": None,
            "source": f"folder {path}, not a git checkout: commit unknown",
        }
    commit = _git(path, "rev-parse", "--short", "HEAD")
    return {
        "commit": commit,
        "keras_rdrop_dirty": bool(_git(path, "status", "--porcelain", "keras_rdrop")),
        "source": f"tree {path}",
    }


def _rev_state(rev: str) -> dict:
    return {
        "commit": _git(REPO, "rev-parse", "--short", rev),
        "keras_rdrop_dirty": False,
        "source": f"git archive of {rev}",
    }


def add_source(label: str | None, where: str | None):
    """Registers a source of keras_rdrop under `label`.

    Args:
        label: the `@LABEL` of the variants that use it; None for the default.
        where: a folder holding `keras_rdrop/` (a checkout), a git revision of
            this repository, or None for the working tree.
    """
    if where is None:
        SOURCES[label] = {"path": REPO, "git": _tree_state(REPO)}
        SOURCES[label]["git"]["source"] = "working tree"
        return
    path = Path(where).expanduser()
    if path.is_dir():
        if not (path / "keras_rdrop" / "__init__.py").exists():
            raise SystemExit(
                f"`--rdrop-src {label}={where}`: {path} holds no keras_rdrop/"
            )
        SOURCES[label] = {"path": path.resolve(), "git": _tree_state(path)}
        return
    if not _git(REPO, "rev-parse", "--verify", "--quiet", f"{where}^{{commit}}"):
        raise SystemExit(
            f"`--rdrop-src` / `--at-commit`: {where!r} is neither a folder nor a "
            "git revision of this repository"
        )
    SOURCES[label] = {"path": snapshot(where), "git": _rev_state(where)}


def parse_sources(items: list[str]) -> dict:
    """`["before=751f1f1", "after=/path"]` -> `{"before": ..., "after": ...}`."""
    out = {}
    for item in items:
        label, sep, where = item.partition("=")
        if not sep or not label or not where or not label.isidentifier():
            raise SystemExit(
                "`--rdrop-src` should be LABEL=PATH_OR_REV with LABEL a name. "
                f"Received: {item!r}"
            )
        out[label] = where
    return out


def source_path(label: str | None) -> Path:
    if label not in SOURCES:
        raise SystemExit(
            f"variant label @{label} has no source: pass --rdrop-src {label}=..."
        )
    return SOURCES[label]["path"]


def git_meta() -> dict:
    """The default source's commit state, plus every labelled source's."""
    meta = dict(SOURCES[None]["git"])
    labelled = {k: v["git"] for k, v in SOURCES.items() if k is not None}
    if labelled:
        meta["sources"] = labelled
    return meta
