"""What `show`, `diff`, `explain` and `report` say about an entry: the reference config, the
times, and recorded misses; named the same way in each."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import book_files
from test_cli import entry, invoke, module_file, result, the_doc, tune_add, write_doc
from tunebook._book import Document, config_id

# The command line: last Triton only (test_cli.py says why).
pytestmark = pytest.mark.once

FIRST_FAILED = {"BLOCK": 32}


def _book_with_a_failed_first_config(book_dir: Path) -> Document:
    """add_kernel tuned for 100, 1000, 5000; for 1000 the first config (BLOCK=32) failed."""
    tune_add()
    doc = the_doc(book_dir)
    k1000 = next(k for k, e in doc.entries.items() if e.key[0] == 1000)
    broken = doc.entries[k1000]
    first = config_id(result(FIRST_FAILED, 1).config)
    results = {**broken.results, first: replace(broken.results[first], ms=None, error="OutOfResources: smem")}
    doc = replace(doc, entries={**doc.entries, k1000: replace(broken, results=results)})
    for path in book_files(book_dir):  # the tuned page, replaced by the doctored one
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_doc(book_dir, doc)
    return doc


def test_the_reference_is_the_first_config_and_a_fallback_is_labelled(book_dir: Path, tmp_path: Path) -> None:
    _book_with_a_failed_first_config(book_dir)
    data = json.loads(invoke("show", "--json").stdout)
    refs = {e["key"][0]: e["reference"] for e in data["files"][0]["entries"]}
    assert refs[100]["rule"] == "first" and refs[100]["ms"] == 3.0 and refs[100]["note"] is None
    # 1000: BLOCK=32 failed; successful medians 0.5, 1, 2: the median config is 1 ms
    assert refs[1000]["rule"] == "median" and refs[1000]["ms"] == 1.0
    assert refs[1000]["note"] == "the first config failed"

    text = invoke("show").stdout
    assert "first config" in text and "first ms" not in text
    row_1000 = next(line for line in text.splitlines() if "[1000," in line)
    assert "median" in row_1000 and "2.00x" in row_1000
    assert "median: the first config failed" in text  # the footnote says what the label means

    report = tmp_path / "r.html"
    invoke("report", "-o", report)
    html = report.read_text()
    assert "6.00x" in html and "2.00x" in html
    assert "against each key's median config" not in html and "first config" in html
    assert "median: the first config failed" in html


def test_times_are_shown_in_readable_units(book_dir: Path) -> None:
    doc = the_doc_of(book_dir, ms_by_block={32: 10120.0, 64: 0.0123, 128: 2.5})
    write_doc(book_dir, doc)
    text = invoke("show").stdout
    assert "10.1 s" in text and "12.3 µs" in text and "e+" not in text


def the_doc_of(book_dir: Path, ms_by_block: dict[int, float]) -> Document:
    results = [result({"BLOCK": block}, ms) for block, ms in ms_by_block.items()]
    e = replace(entry([7, "torch.float32"], results), first=config_id(results[0].config))
    return Document(
        {"name": "slow_kernel", "hash": "cd" * 32, "key": ["n"]},
        {"backend": "cuda", "device": "NVIDIA H200", "arch": "90", "triton": "3.6.0", "timer": "events"},
        {json.dumps(list(e.key), separators=(",", ":")): e},
    )


def _book_with_a_recorded_miss(book_dir: Path) -> tuple[Document, Document]:
    """(tuned, tuned + key 7000 met 3 times by serve mode and never tuned), the latter in the book."""
    tune_add()
    tuned = the_doc(book_dir)
    miss = replace(entry([7000, "torch.float32", "torch.float32", "torch.float32"], []), misses=3)
    with_miss = replace(tuned, entries={**tuned.entries, "[7000]": miss})
    with_miss = Document.from_json(json.loads(with_miss.dumps()))
    write_doc(book_dir, with_miss)
    return tuned, with_miss


def test_recorded_misses_are_shown_as_such_everywhere(book_dir: Path, tmp_path: Path) -> None:
    tuned, _ = _book_with_a_recorded_miss(book_dir)
    hint = "recorded miss: run `tunebook tune --misses"

    text = invoke("show").stdout
    row = next(line for line in text.splitlines() if "[7000," in line)
    assert "recorded miss" in row and "3 serving processes" in row
    assert hint in text
    entries = json.loads(invoke("show", "--json").stdout)["files"][0]["entries"]
    by_n = {e["key"][0]: e for e in entries}
    assert by_n[7000]["misses"] == 3 and by_n[7000]["recorded_miss"] is True
    assert by_n[100]["misses"] == 0 and by_n[100]["recorded_miss"] is False

    write_doc(tmp_path / "tuned", tuned)
    text = invoke("diff", book_dir, tmp_path / "tuned", ok=False).stdout
    line = next(line for line in text.splitlines() if "[7000," in line)
    assert "recorded miss" in line and hint in text
    data = json.loads(invoke("diff", book_dir, tmp_path / "tuned", "--json", ok=False).stdout)
    assert [k[0] for k in data["pages"][0]["recorded_misses_a"]] == [7000]

    module = module_file(tmp_path)
    res = invoke("explain", f"{module}:add")
    assert f"recorded miss: run `tunebook tune --misses {module}`" in res.stdout
    assert "[7000," in next(line for line in res.stdout.splitlines() if "recorded miss" in line)
    data = json.loads(invoke("explain", f"{module}:add", "--json").stdout)
    assert [k[0] for k in data["files"][0]["recorded_misses"]] == [7000]

    report = tmp_path / "r.html"
    invoke("report", "-o", report)
    html = report.read_text()
    assert "recorded miss (3 serving processes)" in html and "tunebook tune --misses" in html
