"""docs/numbers.md is what tools/numbers_table.py builds from the committed results.

And every number README.md and docs/*.md quote with a `<!--n:KEY-->` marker
is the table's value for KEY; a ratio (a decimal number followed by `×`) in
their prose without a marker fails. Pure Python: no backend is imported.
"""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "numbers_table", ROOT / "tools" / "numbers_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


numbers_table = load_generator()
ENTRIES = numbers_table.entries()


def test_numbers_md_is_up_to_date():
    committed = numbers_table.OUT.read_text(encoding="utf-8")
    assert committed == numbers_table.render(ENTRIES), (
        "docs/numbers.md is stale: run `python tools/numbers_table.py`"
    )


def test_every_quoted_number_matches_the_table():
    assert numbers_table.check_quotes(ENTRIES) == []


def test_the_docs_quote_numbers():
    # A marker syntax that stopped matching would make the check vacuous.
    quoted = {
        key
        for path in numbers_table.doc_files()
        for key, _ in numbers_table.QUOTE.findall(path.read_text(encoding="utf-8"))
    }
    assert len(quoted) >= 20
    assert any(key.startswith("bench.") for key in quoted)
    assert any(key.startswith("trec.") for key in quoted)


def test_keys_are_unique_and_stale_rows_name_their_commit():
    keys = [entry.key for entry in ENTRIES]
    assert len(keys) == len(set(keys))
    stale = [entry for entry in ENTRIES if entry.status == "stale"]
    assert stale, "fused-all.json predates the current fused paths"
    assert all(len(entry.commit) == 7 for entry in stale)
    assert {entry.source for entry in stale} <= set(numbers_table.STALE)


def test_check_finds_a_wrong_quote_and_an_unmarked_ratio(tmp_path):
    page = tmp_path / "page.md"
    key, value = ENTRIES[0].key, ENTRIES[0].value
    page.write_text(
        f"ok <!--n:{key}-->{value}×, wrong <!--n:{key}-->9.99×, bare 1.23×, "
        "unknown <!--n:no.such.key-->1\n\n```text\n4.56× in code is fine\n```\n",
        encoding="utf-8",
    )
    root = numbers_table.ROOT
    try:
        numbers_table.ROOT = tmp_path
        problems = numbers_table.check_quotes(ENTRIES, [page])
    finally:
        numbers_table.ROOT = root
    assert len(problems) == 3, problems
    assert any("9.99" in p for p in problems)
    assert any("1.23×" in p for p in problems)
    assert any("no.such.key" in p for p in problems)
