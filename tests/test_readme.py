"""Every ```python block of README.md runs as written on the current backend.

Each block runs as `__main__` in this pytest process (a fresh process per
block would spend most of its time importing the framework), in a temporary
directory (so the files it saves do not litter the tree), with this
checkout's `keras_rdrop` and the warning filters of `pyproject.toml`
(warnings are errors). Keras' global state is reset before each block
(`clear_session`, the seed, the dtype policy), as a fresh process would have
it. A `print(...)` line followed by a comment `# -> text` (on the same line
or the next) must print exactly `text`; a block that prints anything else,
or raises, fails.
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


def python_blocks(text):
    """`(first line number, code)` of each ```python fenced block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 2
        blocks.append((line, match.group(1)))
    return blocks


def expected_output(code):
    """The `# -> text` annotations of a block, in order."""
    return [m.group(1).rstrip() for m in re.finditer(r"#\s*->\s?(.*)$", code, re.M)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_the_runnable_blocks():
    # The Usage, divergences and keras-hub examples; a regex that stopped
    # matching would otherwise make this file pass by running nothing.
    assert len(BLOCKS) >= 3
    assert any("RDropModel(inner" in code for _, code in BLOCKS)
    assert any("symmetric_kl_divergence(p, q" in code for _, code in BLOCKS)
    assert all("KERAS_BACKEND" in code for _, code in BLOCKS)
    assert sum(len(expected_output(code)) for _, code in BLOCKS) >= 4


def test_python_blocks_parse_without_stubs():
    # `...` as a value ("loss=..., metrics=[...]") is what broke the README
    # before: it compiles, then fails inside Keras.
    for line, code in BLOCKS:
        tree = ast.parse(code, f"README.md:{line}")
        stubs = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value is Ellipsis
        ]
        assert not stubs, f"`...` in the README.md block at line {line}: {stubs}"


def test_expected_output_parser():
    code = "print(1)  # -> 1\nprint(sorted(d))\n# -> ['a', 'b']\nx = 2  # not output\n"
    assert expected_output(code) == ["1", "['a', 'b']"]


@pytest.mark.parametrize(
    "line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS]
)
def test_readme_block_runs(line, code, tmp_path, monkeypatch, capsys):
    if "keras_hub" in code:
        import_keras_hub()
    script = tmp_path / f"readme_line_{line}.py"
    script.write_text(code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    capsys.readouterr()
    try:
        runpy.run_path(str(script), run_name="__main__")
    except (Exception, SystemExit) as error:
        raise AssertionError(
            f"README.md block at line {line} failed on {keras.backend.backend()}: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        keras.config.set_dtype_policy("float32")
    out = capsys.readouterr().out
    printed = [printed_line.rstrip() for printed_line in out.splitlines()]
    assert printed == expected_output(code), (
        f"README.md block at line {line} printed {printed}, "
        f"its `# ->` comments say {expected_output(code)}"
    )
