"""Every ```python block of README.md and docs/**/*.md runs as written.

Each block runs as `__main__` in this pytest process (a fresh process per
block would spend most of its time importing the framework), in a temporary
directory (so the files it saves do not litter the tree), with this
checkout's `keras_rdrop` and the warning filters of `pyproject.toml`
(warnings are errors). Keras' global state is reset before each block
(`clear_session`, the seed, the dtype policy), as a fresh process would have
it. A `print(...)` line followed by a comment `# -> text` (on the same line
or the next) must print exactly `text`; a block that prints anything else,
or raises, fails.

Fenced blocks indented inside a list item count too. A block that cannot run
offline has the comment `<!-- no-run: why -->` on the line before its fence;
it is reported as skipped with that reason. A block that appears word for
word in two pages (the quickstart) runs once. Every fence names its
language, so no Python hides in an untagged block.
"""

import ast
import pathlib
import re
import runpy

import keras
import pytest

from tests.testing import import_keras_hub

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON = {"python", "py", "python3"}

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.S | re.M,
)
NO_RUN = re.compile(r"<!--\s*no-run:\s*(?P<why>.*?)\s*-->\s*$")


def fenced_blocks(text):
    """`(first line number, language, code, no-run reason or None)` per fence."""
    blocks = []
    for match in FENCE.finditer(text):
        indent = match.group("indent")
        code = "".join(
            line[len(indent) :] if line.startswith(indent) else line
            for line in match.group("body").splitlines(keepends=True)
        )
        line = text.count("\n", 0, match.start()) + 2
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        no_run = NO_RUN.search(before)
        language = match.group("info").strip().split(" ")[0].lower()
        blocks.append((line, language, code, no_run.group("why") if no_run else None))
    return blocks


def python_blocks(text):
    """`(first line number, code)` of each runnable ```python fenced block."""
    return [
        (line, code)
        for line, language, code, why in fenced_blocks(text)
        if language in PYTHON and why is None
    ]


def expected_output(code):
    """The `# -> text` annotations of a block, in order."""
    return [m.group(1).rstrip() for m in re.finditer(r"#\s*->\s?(.*)$", code, re.M)]


def collect():
    """Runnable blocks (identical code once) and no-run blocks, by location."""
    runnable, skipped, fences = {}, [], []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for line, language, code, why in fenced_blocks(page.read_text("utf-8")):
            fences.append((f"{name}:{line}", language, code, why))
            if language not in PYTHON:
                continue
            if why is not None:
                skipped.append((f"{name}:{line}", code, why))
            else:
                runnable.setdefault(code, []).append(f"{name}:{line}")
    return [(where, code) for code, where in runnable.items()], skipped, fences


RUNNABLE, SKIPPED, FENCES = collect()
BLOCKS = [(where[0], code) for where, code in RUNNABLE]


def test_readme_has_the_runnable_blocks():
    # The quickstart, the divergences, unlabeled rows, exact resume and the
    # keras-hub examples; a regex that stopped matching would otherwise make
    # this file pass by running nothing.
    readme = python_blocks(README.read_text(encoding="utf-8"))
    assert any("RDropModel(inner" in code for _, code in readme)
    assert len(BLOCKS) >= 5
    assert any("symmetric_kl_divergence(p, q" in code for _, code in BLOCKS)
    assert any("keras_hub" in code for _, code in BLOCKS)
    assert all("KERAS_BACKEND" in code for _, code in BLOCKS)
    assert sum(len(expected_output(code)) for _, code in BLOCKS) >= 6


def test_every_fence_names_its_language():
    untagged = [where for where, language, _, _ in FENCES if not language]
    assert not untagged, f"fences without a language: {untagged}"


def test_no_run_markers_say_why():
    for where, _, why in SKIPPED:
        assert len(why.split()) >= 3, f"{where}: a no-run marker needs a reason"
    # A marker only counts right before a python fence.
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        markers = len(re.findall(r"<!--\s*no-run:", text))
        tagged = sum(
            1
            for _, language, _, why in fenced_blocks(text)
            if why is not None and language in PYTHON
        )
        assert markers == tagged, f"{page.name}: a no-run marker not before a fence"


def test_python_blocks_parse_without_stubs():
    # `...` as a value ("loss=..., metrics=[...]") is what broke the README
    # before: it compiles, then fails inside Keras.
    for where, code in BLOCKS + [(where, code) for where, code, _ in SKIPPED]:
        tree = ast.parse(code, where)
        stubs = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value is Ellipsis
        ]
        assert not stubs, f"`...` in the block at {where}: {stubs}"


def test_expected_output_parser():
    code = "print(1)  # -> 1\nprint(sorted(d))\n# -> ['a', 'b']\nx = 2  # not output\n"
    assert expected_output(code) == ["1", "['a', 'b']"]


def test_fence_parser():
    text = (
        "- item\n\n  ```python\n  x = 1\n  ```\n\n"
        "<!-- no-run: needs a network connection -->\n```python\ny = 2\n```\n"
        "```text\nz\n```\n"
    )
    assert fenced_blocks(text) == [
        (4, "python", "x = 1\n", None),
        (9, "python", "y = 2\n", "needs a network connection"),
        (12, "text", "z\n", None),
    ]


@pytest.mark.parametrize(
    "where, code",
    [
        *[pytest.param(w[0], c, id=" ".join(w)) for w, c in RUNNABLE],
        *[
            pytest.param(w, c, id=w, marks=pytest.mark.skip(reason=r))
            for w, c, r in SKIPPED
        ],
    ],
)
def test_readme_block_runs(where, code, tmp_path, monkeypatch, capsys):
    if "keras_hub" in code:
        import_keras_hub()
    script = tmp_path / ("block_" + re.sub(r"\W", "_", where) + ".py")
    script.write_text(code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    capsys.readouterr()
    try:
        runpy.run_path(str(script), run_name="__main__")
    except (Exception, SystemExit) as error:
        raise AssertionError(
            f"the block at {where} failed on {keras.backend.backend()}: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        keras.config.set_dtype_policy("float32")
    out = capsys.readouterr().out
    printed = [printed_line.rstrip() for printed_line in out.splitlines()]
    assert printed == expected_output(code), (
        f"the block at {where} printed {printed}, "
        f"its `# ->` comments say {expected_output(code)}"
    )
