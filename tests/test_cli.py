"""The ``tunebook`` command line, on books made by really tuning kernels in the interpreter.

Books with a second platform (another GPU, another Triton) are written as Documents
directly: this machine can only measure the interpreter platform.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

# click, rich and matplotlib come with tunebook[test]: a missing one is a failure, not a skip.
import rich  # noqa: F401
from click.testing import CliRunner

import tunebook
from conftest import TESTS, book_bytes, book_files, remove_page
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook._book import Document, Entry, Result, config_id, config_record, read_document
from tunebook._jsonio import key_text
from tunebook.cli._app import cli
from tunebook.cli._load import canonical_file_name

# The command line over books (show, diff, merge, report, export, prune, tune's progress):
# what it prints and writes. Where it reaches Triton it calls the core, checked on every Triton
# (a kernel's identity: test_fingerprint.py; tuning in workers: test_serving.py). Last Triton
# only (tests/conftest.py).
pytestmark = pytest.mark.once

TABLE = {32: 3.0, 64: 1.0, 128: 2.0, 256: 0.5}  # BLOCK=512 is missing: it fails with a reason
SIZES = (100, 1000, 5000)
MODULE_SOURCE = """
import tunebook
from small_kernels import Replay, add_kernel, block_configs

replay = Replay({TABLE!r})
add = tunebook.autotune(configs=block_configs(32, 64, 128, 256, 512, num_warps=4), key=["n"],
                        pre_hook=replay.pre_hook, do_bench=replay)(add_kernel)
not_a_kernel = 3
"""


def tune_add(sizes: tuple[int, ...] = SIZES) -> tunebook.Autotuner:
    """Really tune add_kernel (5 configs, one failing) for ``sizes``; the book is TUNEBOOK_DIR."""
    replay = Replay(TABLE)
    kernel = tunebook.autotune(
        configs=block_configs(32, 64, 128, 256, 512, num_warps=4),
        key=["n"],
        pre_hook=replay.pre_hook,
        do_bench=replay,
    )(add_kernel)
    for n in sizes:
        x, y, out = vectors(n)
        kernel[grid_1d(n)](x, y, out, n)
    return kernel


def invoke(*args: Any, ok: bool | None = True) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok is True:
        assert result.exit_code == 0, result.output
    elif ok is False:
        assert result.exit_code != 0, result.output
    return result


def the_doc(directory: Path) -> Document:
    (path,) = book_files(directory)
    doc = read_document(path)
    assert doc is not None
    return doc


def write_doc(directory: Path, doc: Document) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / canonical_file_name(doc)
    path.write_text(doc.dumps())
    return path


def result(kwargs: dict[str, Any], ms: float | None, error: str | None = None, **options: Any) -> Result:
    record = config_record(kwargs, {"num_ctas": 1, "num_stages": 3, "num_warps": 4, **options})
    return Result(
        record, (ms, ms * 0.99, ms * 1.01) if ms is not None else None, error, "2026-01-01T00:00:00Z"
    )


def entry(key: list[Any], results: list[Result]) -> Entry:
    return Entry(
        tuple(key),
        {config_id(r.config): r for r in results},
        1.0,
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z",
        "0.1.0",
    )


def h200(doc: Document) -> Document:
    """The same kernel's page moved to another platform."""
    platform = {
        "backend": "cuda",
        "device": "NVIDIA H200",
        "arch": "90",
        "runtime": "cuda 13.0",
        "triton": "3.6.0",
        "timer": "events",
        "sm_count": 132,
    }
    return replace(doc, platform=platform)


def module_file(tmp_path: Path) -> Path:
    path = tmp_path / "mykernels.py"
    path.write_text(MODULE_SOURCE.replace("{TABLE!r}", repr(TABLE)))
    return path


def python_m_tunebook(*args: Any, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "tunebook", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


# ------------------------------------------------------------------------------ entry point


def test_without_click_the_entry_point_prints_the_install_line() -> None:
    code = "import sys; sys.modules['click'] = None; from tunebook.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "pip install 'tunebook[cli]'" in proc.stderr.splitlines()


def test_import_tunebook_does_not_import_the_cli_dependencies() -> None:
    code = (
        "import sys, tunebook; print(sorted(m for m in ('click', 'rich', 'matplotlib') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_python_m_tunebook_shows_a_tuned_book(book_dir: Path) -> None:
    tune_add()
    proc = python_m_tunebook("show", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["format"] == "tunebook-show" and data["book"] == str(book_dir)
    assert [e["key"][0] for e in data["files"][0]["entries"]] == list(SIZES)


# ------------------------------------------------------------------------------------ show


def test_show_json_reports_winners_reference_speedup_and_failures(book_dir: Path) -> None:
    tune_add()
    data = json.loads(invoke("show", "--json").stdout)
    assert data["version"] == 1 and data["skipped"] == [] and data["leftovers"] == []
    (page,) = data["files"]
    assert page["kernel"]["name"] == "add_kernel" and page["kernel"]["key"] == ["n"]
    assert page["platform"]["backend"] == "interpreter" and page["platform"]["timer"] == "custom:Replay"
    for item, n in zip(page["entries"], SIZES, strict=True):
        assert item["key"] == [n, "torch.float32", "torch.float32", "torch.float32"]
        assert item["winner_config"]["kwargs"] == {"BLOCK": 256}
        assert item["winner_ms"] == 0.5
        # the default reference is the first declared config (BLOCK=32, 3 ms), recorded at tuning
        assert item["reference"] == {
            "rule": "first",
            "config": config_id(result({"BLOCK": 32}, 1).config),
            "ms": 3.0,
            "note": None,
        }
        assert item["speedup"] == 6.0
        assert item["configs"] == 5 and item["failed"] == 1
        assert "no timing recorded for BLOCK=512" in item["failures"][0]["error"]
    # successful medians 0.5, 1, 2, 3: the median config is the slower middle one, 2 ms
    median = json.loads(invoke("show", "--json", "--reference", "median").stdout)["files"][0]["entries"][0]
    assert median["reference"] == {
        "rule": "median",
        "config": config_id(result({"BLOCK": 128}, 1).config),
        "ms": 2.0,
        "note": None,
    }
    assert median["speedup"] == 4.0
    slowest = json.loads(invoke("show", "--json", "--reference", "slowest").stdout)
    assert slowest["files"][0]["entries"][0]["speedup"] == 6.0


def test_show_table_for_people_and_filters(book_dir: Path, tmp_path: Path) -> None:
    tune_add()
    text = invoke("show").stdout
    assert "add_kernel" in text and "BLOCK=256" in text and "6.00x" in text and "first config" in text
    assert "failed" in text and "no timing recorded for BLOCK=512" in text
    assert "[100," in text and text.index("[100,") < text.index("[1000,") < text.index("[5000,")
    single = invoke("show", book_files(book_dir)[0], "--no-failures").stdout
    assert "6.00x" in single and "no timing recorded" not in single
    assert "no book file for kernel other" in invoke("show", "--kernel", "other", ok=False).output


def test_show_into_a_pipe_neither_wraps_nor_pads_the_heading(book_dir: Path) -> None:
    """docs/cli.md: output that is not going to a terminal is never wrapped. The heading was
    the table's title once: padded to the table's width, and wrapped where it was wider."""
    name = "mylib.attention." + "very_long_kernel_name_" * 5  # a heading wider than its table
    replay = Replay(TABLE)
    kernel = tunebook.autotune(
        configs=block_configs(32, 64), key=["n"], name=name, pre_hook=replay.pre_hook, do_bench=replay
    )(add_kernel)
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)
    proc = python_m_tunebook("show", "--no-failures")  # stdout is a pipe
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line != line.rstrip()] == [], proc.stdout
    (file_name,) = (p.name for p in book_files(book_dir))
    assert any(f"{file_name} · key (n) + argument dtypes" in line for line in lines), proc.stdout
    assert any(line.startswith(f"{name} ") for line in lines), proc.stdout


def test_show_reports_unreadable_files_and_leftovers(book_dir: Path) -> None:
    tune_add()
    (book_dir / "broken.json").write_text("{not json")
    (book_dir / "x.json.corrupt-20260101T000000-1").write_text("junk")
    result_ = invoke("show")
    assert "skipped" in result_.output and "broken.json" in result_.output
    assert "leftover" in result_.stdout
    data = json.loads(invoke("show", "--json").stdout)
    assert [Path(s["path"]).name for s in data["skipped"]] == ["broken.json"]
    assert len(data["leftovers"]) == 1


def test_a_damaged_key_file_is_named_itself_once_with_its_reason(book_dir: Path) -> None:
    """A key file of a page: show --json gave the page directory as its path (a script that
    removed it deleted the page) and the whole warning as its reason; stderr said it twice;
    a newer tunebook's file was met with advice to delete it."""
    from tunebook import _warnings
    from tunebook._book import pagedir

    tune_add()
    (page,) = book_files(book_dir)
    damaged, newer, *_ = sorted(p for p in page.glob("*.json") if p.name != "page.json")
    damaged.write_text("{not json")
    newer.write_text(json.dumps({**json.loads(newer.read_text()), "version": pagedir.VERSION + 1}))
    data = json.loads(invoke("show", "--json").stdout)
    skipped = {s["path"]: s["reason"] for s in data["skipped"]}
    assert set(skipped) == {str(damaged), str(newer)}, skipped
    assert all("The kernel still runs" not in why for why in skipped.values())
    _warnings.forget()  # each command is a process of its own
    text = invoke("show")
    assert text.stderr.count(damaged.name) == 1 and text.stderr.count(newer.name) == 1, text.stderr
    assert "delete or replace" not in text.stderr.split(newer.name)[1].splitlines()[0]


def test_show_a_missing_book_is_a_clear_error(tmp_path: Path) -> None:
    res = invoke("show", tmp_path / "nope", ok=False)
    assert "no book at" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------------- explain


def test_explain_finds_the_matching_file(book_dir: Path, tmp_path: Path) -> None:
    tune_add()
    data = json.loads(invoke("explain", f"{module_file(tmp_path)}:add", "--json").stdout)
    assert data["verdict"] == "hit"
    (f,) = data["files"]
    assert f["match"] and f["differences"] == [] and f["key_count"] == 3
    assert Path(f["path"]).name == data["expected_file"]
    assert data["platform"]["backend"] == "interpreter"
    # under the interpreter a hit goes through Triton's own launch, and explain says why
    assert "InterpretedFunction" in data["hit_launch"]
    text = invoke("explain", f"{module_file(tmp_path)}:add").stdout
    assert "hits  launch through Triton's JITFunction.run: the kernel is of type InterpretedFunction" in text


def test_explain_lists_keys_in_the_order_people_read_them(book_dir: Path, tmp_path: Path) -> None:
    tune_add((64, 7, 1000))  # in text order: 1000, 64, 7
    data = json.loads(invoke("explain", f"{module_file(tmp_path)}:add", "--json").stdout)
    assert [k[0] for k in data["files"][0]["keys"]] == [7, 64, 1000]


def test_explain_names_each_identity_field_that_differs(book_dir: Path, tmp_path: Path) -> None:
    tune_add()
    doc = the_doc(book_dir)
    for path in book_files(book_dir):
        remove_page(path)
    other = replace(
        doc,
        kernel={**doc.kernel, "hash": "0" * 64},
        platform={**doc.platform, "triton": "3.1.0", "timer": "events"},
    )
    write_doc(book_dir, other)
    res = invoke("explain", f"{module_file(tmp_path)}:add", ok=False)
    assert res.exit_code == 1
    text = res.stdout
    assert "differs" in text and "kernel source hash" in text
    assert (
        "Triton version: book '3.1.0', here" in text and "timer: book 'events', here 'custom:Replay'" in text
    )
    assert "every call misses" in text
    data = json.loads(invoke("explain", f"{module_file(tmp_path)}:add", "--json", ok=False).stdout)
    assert {d["field"] for d in data["files"][0]["differences"]} == {"hash", "triton", "timer"}


def test_explain_says_which_other_files_answer_serve_mode(book_dir: Path, tmp_path: Path) -> None:
    """A file of this kernel under another Triton release on this GPU, or of this kernel
    version on another GPU of this architecture, answers the keys serve mode misses; one of
    another architecture does not."""
    tune_add()
    doc = the_doc(book_dir)
    for path in book_files(book_dir):
        remove_page(path)
    variants = {
        "upgraded": replace(
            doc, kernel={**doc.kernel, "hash": "1" * 64}, platform={**doc.platform, "triton": "3.1.0"}
        ),
        "same_arch": replace(doc, platform={**doc.platform, "device": "NVIDIA H200"}),
        None: replace(doc, platform={**doc.platform, "device": "NVIDIA H200", "arch": "another"}),
    }
    for variant in variants.values():
        write_doc(book_dir, variant)
    data = json.loads(invoke("explain", f"{module_file(tmp_path)}:add", "--json", ok=False).stdout)
    assert sorted(str(f["serve_role"]) for f in data["files"]) == sorted(map(str, variants))
    text = invoke("explain", f"{module_file(tmp_path)}:add", ok=False).stdout
    assert "(an old release's, before the nearest key's)" in text
    assert "(a GPU of this architecture and Triton release: after this GPU's nearest key)" in text


def test_explain_errors_name_what_exists(tmp_path: Path) -> None:
    path = module_file(tmp_path)
    assert "its tunebook kernels: add" in invoke("explain", f"{path}:nope", ok=False).output
    assert (
        "is of type int, not a @tunebook.autotune kernel"
        in invoke("explain", f"{path}:not_a_kernel", ok=False).output
    )
    assert "expected MODULE:KERNEL" in invoke("explain", "justamodule", ok=False).output


@pytest.mark.slow
def test_explain_in_a_subprocess_by_module_name(book_dir: Path, tmp_path: Path) -> None:
    tune_add()
    module_file(tmp_path)
    proc = python_m_tunebook("explain", "mykernels:add", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "match" in proc.stdout and "add_kernel" in proc.stdout


# ------------------------------------------------------------------------------------ merge


def _two_books(book_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A: really tuned. B: the same page from another machine, plus a page on an H200."""
    tune_add()
    doc = the_doc(book_dir)
    k100 = next(k for k, e in doc.entries.items() if e.key[0] == 100)
    mine = doc.entries[k100]
    theirs = entry(
        list(mine.key),
        [
            result({"BLOCK": 64}, 0.2),  # faster than A's 1.0: stands, and becomes the winner
            result({"BLOCK": 256}, 0.9),  # slower than A's 0.5: A's stands
            result({"BLOCK": 512}, 0.7),  # ran here, failed in A: the success stands
            result({"BLOCK": 32}, None, "OutOfResources: shared memory"),  # failed here, ran in A: A's stands
        ],
    )
    new_key = entry([7000, "torch.float32", "torch.float32", "torch.float32"], [result({"BLOCK": 128}, 1.5)])
    b_doc = replace(doc, entries={k100: theirs, key_text(new_key.key): new_key})  # a key's name is its key
    b_doc = Document.from_json(json.loads(b_doc.dumps()))  # key text as the library writes it
    b = tmp_path / "b"
    write_doc(b, b_doc)
    write_doc(b, h200(b_doc))
    return book_dir, b


def test_merge_decides_by_measurement_and_is_order_independent(book_dir: Path, tmp_path: Path) -> None:
    a, b = _two_books(book_dir, tmp_path)
    invoke("merge", a, b, "-o", tmp_path / "ab")
    invoke("merge", b, a, "-o", tmp_path / "ba")
    ab, ba = book_files(tmp_path / "ab"), book_files(tmp_path / "ba")
    assert [p.name for p in ab] == [p.name for p in ba] and len(ab) == 2
    for x, y in zip(ab, ba, strict=True):
        assert book_bytes(x) == book_bytes(y)
    merged = next(read_document(p) for p in ab if "interpreter" in p.name)
    assert merged is not None
    e100 = next(e for e in merged.entries.values() if e.key[0] == 100)
    ms = {r.config["kwargs"]["BLOCK"]: (r.ms[0] if r.ms else r.error) for r in e100.results.values()}
    assert ms == {32: 3.0, 64: 0.2, 128: 2.0, 256: 0.5, 512: 0.7}
    assert e100.results[e100.best()].config["kwargs"] == {"BLOCK": 64}
    assert sorted(e.key[0] for e in merged.entries.values()) == [100, 1000, 5000, 7000]


def test_merge_dry_run_names_the_pages_the_merge_writes(book_dir: Path, tmp_path: Path) -> None:
    """It named format-1 files (``<page>.json``) where the merge writes page directories."""
    a, b = _two_books(book_dir, tmp_path)
    out = tmp_path / "out"
    would = invoke("merge", a, b, "-o", out, "--dry-run").stdout
    assert not out.exists()
    wrote = invoke("merge", a, b, "-o", out).stdout
    assert [line.replace("would write", "wrote") for line in would.splitlines()] == wrote.splitlines()[:-1]
    assert sorted(str(p) for p in out.iterdir()) == sorted(line.split()[2] for line in would.splitlines())


def test_merge_is_idempotent_and_merges_into_an_existing_output(book_dir: Path, tmp_path: Path) -> None:
    a, b = _two_books(book_dir, tmp_path)
    out = tmp_path / "out"
    invoke("merge", a, "-o", out)
    assert [the_doc(out).dumps()] == [the_doc(a).dumps()]
    written = [book_bytes(p) for p in book_files(out)]
    invoke("merge", a, "-o", out)  # again: nothing changes
    assert [book_bytes(p) for p in book_files(out)] == written
    invoke("merge", b, "-o", out)  # what OUT holds takes part
    invoke("merge", a, b, "-o", tmp_path / "direct")
    direct = [book_bytes(p) for p in book_files(tmp_path / "direct")]
    assert [book_bytes(p) for p in book_files(out)] == direct


def test_merge_into_a_book_keeps_the_files_it_could_not_read(book_dir: Path, tmp_path: Path) -> None:
    # A key file written by a newer tunebook, and a format-1 file of a newer format under
    # the page's name, are skipped by the reader: merging into that book leaves them there.
    from tunebook._book import pagedir

    a, _ = _two_books(book_dir, tmp_path)
    out = tmp_path / "out"
    invoke("merge", a, "-o", out)
    (page,) = book_files(out)
    newer_key = page / "7.json"
    newer_key.write_text(json.dumps({"format": "tunebook-entry", "version": pagedir.VERSION + 1, "key": [7]}))
    newer_file = page.with_name(page.name + ".json")
    newer_file.write_text(json.dumps({"format": "tunebook-book", "version": 99}))
    res = invoke("merge", a, "-o", out)
    assert "newer tunebook" in res.output
    assert newer_key.exists() and newer_file.exists()
    merged = read_document(page)
    assert merged is not None and merged.dumps() == the_doc(a).dumps()  # every key merged is there


def test_merge_leaves_a_newer_tunebooks_file_of_a_merged_key_and_keeps_a_damaged_one_aside(
    book_dir: Path, tmp_path: Path
) -> None:
    """The key's own file in OUT, written by a newer tunebook, was rewritten in this format
    (its newer fields lost) with exit status 0; a damaged one was overwritten in place. Now
    the newer one stays (exit 1, named) and the damaged one is kept aside for a person."""
    from tunebook._book import pagedir

    a, _ = _two_books(book_dir, tmp_path)
    out = tmp_path / "out"
    invoke("merge", a, "-o", out)
    (page,) = book_files(out)
    newer, damaged = sorted(p for p in page.glob("*.json") if p.name != "page.json")[:2]
    future = {**json.loads(newer.read_text()), "version": pagedir.VERSION + 1, "future_field": "KEEPME"}
    newer.write_text(json.dumps(future))
    damaged.write_text(damaged.read_text()[:20])
    res = invoke("merge", a, "-o", out, ok=False)
    assert res.exit_code == 1 and "1 key file(s) left as they were" in res.output and newer.name in res.output
    assert json.loads(newer.read_text())["future_field"] == "KEEPME"
    assert list(page.glob(damaged.name + ".corrupt-*")) and json.loads(damaged.read_text())["key"]


def test_a_page_given_where_a_book_belongs_is_named_with_the_path_to_give(
    book_dir: Path, tmp_path: Path
) -> None:
    """Tab completion leads into a page: its page.json or a key file as BOOK was refused as
    "not a tunebook book"; a page as -o had pages written inside it, which no reader finds."""
    a, _ = _two_books(book_dir, tmp_path)
    (page,) = book_files(a)
    for inside in (page / "page.json", next(p for p in page.glob("*.json") if p.name != "page.json")):
        res = invoke("show", inside, ok=False)
        assert (
            res.exit_code == 1 and f"pass the page directory {page}, or the book directory {a}" in res.output
        )
    res = invoke("merge", a, "-o", page, ok=False)
    assert res.exit_code == 2 and f"give the book directory, {a}" in res.output, res.output
    assert [p for p in page.iterdir() if p.is_dir() and not p.name.startswith(".")] == []


def test_merge_and_diff_of_books_with_no_readable_file_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x--0123456789abcdef--cpu--fedcba9876543210.json").write_text("{not json")
    assert "no readable book file" in invoke("merge", bad, "-o", tmp_path / "out", ok=False).output
    assert not (tmp_path / "out").exists()
    assert "no readable book file" in invoke("diff", bad, bad, ok=False).output


def test_merge_in_a_subprocess(book_dir: Path, tmp_path: Path) -> None:
    a, b = _two_books(book_dir, tmp_path)
    proc = python_m_tunebook("merge", a, b, "-o", tmp_path / "sub")
    assert proc.returncode == 0, proc.stderr
    invoke("merge", b, a, "-o", tmp_path / "inproc")
    assert [book_bytes(p) for p in book_files(tmp_path / "sub")] == [
        book_bytes(p) for p in book_files(tmp_path / "inproc")
    ]


# ------------------------------------------------------------------------------------- diff


def test_diff_between_books(book_dir: Path, tmp_path: Path) -> None:
    a, b = _two_books(book_dir, tmp_path)
    res = invoke("diff", a, b, "--json", ok=False)
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["differ"] and data["only_a"] == []
    assert [r["platform"] for r in data["only_b"]] == [
        "NVIDIA-H200-90 (cuda 13.0, 132 SMs, triton 3.6.0, timer events)"
    ]
    (page,) = data["pages"]
    assert [k[0] for k in page["keys_only_a"]] == [1000, 5000] and [k[0] for k in page["keys_only_b"]] == [
        7000
    ]
    (changed,) = page["winner_changed"]
    assert changed["a"]["config"]["kwargs"] == {"BLOCK": 256} and changed["b"]["config"]["kwargs"] == {
        "BLOCK": 64
    }
    by_block = {json.loads(t["config"].split("|")[0].split("=")[1]): t for t in page["timing_changed"]}
    assert by_block[64]["ratio"] == 0.2 and by_block[256]["ratio"] == 1.8
    assert by_block[512]["ratio"] is None and "no timing recorded" in by_block[512]["a_error"]
    text = invoke("diff", a, b, ok=False).stdout
    assert "only in" in text and "winner BLOCK=256" in text and "-> BLOCK=64" in text
    same = invoke("diff", a, a)
    assert "no differences" in same.stdout


def test_diff_between_two_platforms_of_one_book(book_dir: Path, tmp_path: Path) -> None:
    _, b = _two_books(book_dir, tmp_path)
    data = json.loads(invoke("diff", b, "--platform", "interpreter", "--platform", "H200", "--json").stdout)
    assert data["differ"] is False and data["unchanged"] == 1  # the same entries on both
    invoke("merge", book_dir, b, "-o", tmp_path / "m")
    data = json.loads(
        invoke("diff", tmp_path / "m", "--platform", "x86", "--platform", "h200", "--json", ok=False).stdout
    )
    (page,) = data["pages"]
    assert page["a"]["platform_id"] != page["b"]["platform_id"]
    assert [k[0] for k in page["keys_only_a"]] == [1000, 5000]
    res = invoke("diff", b, "--platform", "nothing-like-it", "--platform", "H200", ok=False)
    assert "matches no platform" in res.output and "NVIDIA-H200" in res.output


# ------------------------------------------------------------------------------- vLLM format


def _moe_doc(extra_k: bool = False) -> Document:
    """A fused-MoE-style kernel tuned on an H100: key (num_tokens, N, E[, K]), BLOCK_M/N/K, GROUP_M."""
    names = ["num_tokens", "N", "E"] + (["K"] if extra_k else [])
    entries = {}
    for m, (bm, warps) in {1: (16, 4), 64: (64, 4), 1024: (128, 8)}.items():
        for k in [4096, 2048] if extra_k else [None]:
            key = [m, 14336, 8] + ([k] if k else []) + ["torch.bfloat16"]
            results = [
                result({"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, 0.1, num_warps=warps),
                result({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 1}, 0.9),
            ]
            entries[json.dumps(key, separators=(",", ":"))] = entry(key, results)
    platform = {
        "backend": "cuda",
        "device": "NVIDIA H100 80GB HBM3",
        "arch": "90",
        "runtime": "cuda 12.8",
        "triton": "3.6.0",
        "timer": "events",
    }
    return Document({"name": "fused_moe_kernel", "hash": "ab" * 32, "key": names}, platform, entries)


EXPECTED_VLLM = {
    "1": {
        "BLOCK_SIZE_M": 16,
        "BLOCK_SIZE_N": 64,
        "BLOCK_SIZE_K": 128,
        "GROUP_SIZE_M": 8,
        "num_warps": 4,
        "num_stages": 3,
    },
    "64": {
        "BLOCK_SIZE_M": 64,
        "BLOCK_SIZE_N": 64,
        "BLOCK_SIZE_K": 128,
        "GROUP_SIZE_M": 8,
        "num_warps": 4,
        "num_stages": 3,
    },
    "1024": {
        "BLOCK_SIZE_M": 128,
        "BLOCK_SIZE_N": 64,
        "BLOCK_SIZE_K": 128,
        "GROUP_SIZE_M": 8,
        "num_warps": 8,
        "num_stages": 3,
    },
}
VLLM_NAME = "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json"


def export_moe_args(tmp_path: Path) -> list[Any]:
    """``tunebook export`` of the MoE kernel from tmp_path/book to tmp_path/out."""
    book, out = tmp_path / "book", tmp_path / "out"
    return ["export", "--format", "vllm", book, "-o", out, "--kernel", "fused_moe_kernel"]


def test_export_vllm_infers_the_mapping(tmp_path: Path) -> None:
    write_doc(tmp_path / "book", _moe_doc())
    invoke(
        "export",
        "--format",
        "vllm",
        tmp_path / "book",
        "-o",
        tmp_path / "vllm",
        "--kernel",
        "fused_moe_kernel",
    )
    (path,) = (tmp_path / "vllm").iterdir()
    assert path.name == VLLM_NAME
    text = path.read_text()
    assert json.loads(text) == EXPECTED_VLLM
    assert list(json.loads(text)) == ["1", "64", "1024"]  # batch sizes in numeric order


def test_export_vllm_never_drops_batch_sizes_of_a_file_it_finds_unless_told(tmp_path: Path) -> None:
    """-o is often vLLM's config folder, whose files may hold hand-tuned batch sizes: a file
    holding one this export lacks is left alone (exit 1, nothing written) unless --overwrite.
    Before, it was replaced silently and the batch size lost."""
    write_doc(tmp_path / "book", _moe_doc())
    target = tmp_path / "out" / VLLM_NAME
    target.parent.mkdir()
    target.write_text(json.dumps({"4096": {"BLOCK_SIZE_M": 128}}))
    res = invoke(*export_moe_args(tmp_path), ok=False)
    assert res.exit_code == 1 and f"{target}: 4096" in res.output and "--overwrite" in res.output, res.output
    assert json.loads(target.read_text()) == {"4096": {"BLOCK_SIZE_M": 128}}
    res = invoke(*export_moe_args(tmp_path), "--overwrite")
    assert f"replaced {target}" in res.stdout and "batch sizes 4096 dropped" in res.stdout
    assert "4096" not in json.loads(target.read_text())
    again = invoke(*export_moe_args(tmp_path))  # the same batch sizes: replaced, nothing lost
    assert f"replaced {target} (3 batch sizes)" in again.stdout


def test_export_vllm_binds_a_bucketed_key_by_its_argument_name(tmp_path: Path) -> None:
    """The pack's own MoE kernels key on ``bucket("M", [1, 2, ..., 8192])``, stored as
    ``M|edges=1,2,...``: export found no M, and ``--map M=M`` said there was no such key
    argument; only the whole bucketing spelt out worked."""
    books = Path(tunebook.__file__).parent / "kernels" / "books"
    args = ["export", "--format", "vllm", books, "--kernel", "tunebook.kernels.fused_moe.gemm1"]
    invoke(*args, "-o", tmp_path / "inferred")
    invoke(*args, "-o", tmp_path / "mapped", "--map", "M=M", "--where", "K=4096")
    buckets = [str(2**i) for i in range(14)]  # the shipped buckets, 1-8192, in order
    for out in ("inferred", "mapped"):
        paths = sorted((tmp_path / out).iterdir())
        assert [p.name for p in paths] == [  # Mixtral-8x7B at TP1 and TP2
            "E=8,N=14336,device_name=NVIDIA_H200.json",
            "E=8,N=7168,device_name=NVIDIA_H200.json",
        ]
        tables = [json.loads(p.read_text()) for p in paths]
        assert [list(t) for t in tables] == [buckets, buckets]
        table = tables[0]
        assert set(table["1"]) == {
            "BLOCK_SIZE_M",
            "BLOCK_SIZE_N",
            "BLOCK_SIZE_K",
            "GROUP_SIZE_M",
            "num_warps",
            "num_stages",
        }


def test_export_vllm_with_explicit_map_dtype_and_block_shape(tmp_path: Path) -> None:
    doc = _moe_doc()
    doc = replace(doc, kernel={**doc.kernel, "key": ["tokens", "N", "E"]})
    write_doc(tmp_path / "book", doc)
    common = export_moe_args(tmp_path)
    res = invoke(*common, ok=False)
    assert (
        "no key field(s) M among the key names ['tokens', 'N', 'E']" in res.output and "--map" in res.output
    )
    invoke(*common, "--map", "M=tokens", "--const", "dtype=fp8_w8a8", "--const", "block_shape=[128,128]")
    (path,) = (tmp_path / "out").iterdir()
    assert (
        path.name == "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json"
    )
    # one integer wrote block_shape=[128], a name vLLM never asks for (and import took it back)
    bad = invoke(*common, "--map", "M=tokens", "--const", "block_shape=128", ok=False)
    assert bad.exit_code == 2 and "two integers" in bad.output, bad.output
    odd = tmp_path / "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,block_shape=[128].json"
    odd.write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    res = invoke("import", "--format", "vllm", odd, "--kernel", "moe", "-o", tmp_path / "imp", ok=False)
    assert "block_shape=[128] is not two integers [n,k]" in res.output, res.output


def test_export_vllm_refuses_kernels_that_do_not_fit(book_dir: Path, tmp_path: Path) -> None:
    tune_add()
    res = invoke("export", "--format", "vllm", "-o", tmp_path / "out", "--kernel", "add_kernel", ok=False)
    assert "does not fit vLLM's fused-MoE config format" in res.output
    assert "key field(s) M, E" in res.output and "BLOCK_SIZE_M" in res.output and "--const" in res.output
    assert not (tmp_path / "out").exists()
    res = invoke("export", "--format", "vllm", "-o", tmp_path / "out", "--kernel", "nope", ok=False)
    assert "kernels there: add_kernel" in res.output


def test_export_vllm_collisions_name_the_differing_key_and_the_filter(tmp_path: Path) -> None:
    write_doc(tmp_path / "book", _moe_doc(extra_k=True))
    common = export_moe_args(tmp_path)
    res = invoke(*common, ok=False)
    assert "differ at #3 (K)" in res.output and "--where" in res.output
    invoke(*common, "--where", "K=4096")
    assert json.loads((tmp_path / "out" / VLLM_NAME).read_text()) == EXPECTED_VLLM


MOE_MODULE = """
import triton
import triton.language as tl

import tunebook


@triton.jit
def fused_moe_kernel(x, num_tokens, N, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pass


def config(bm, bn, bk, gm):
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}
    return triton.Config(meta, num_warps=4, num_stages=3)


# The book's winners at M=1 and M=64 and its runner-up; not its winner at M=1024 (BLOCK_M=128, 8 warps).
moe = tunebook.autotune(
    [config(16, 64, 128, 8), config(64, 64, 128, 8), config(256, 256, 64, 1)], key=["num_tokens", "N", "E"]
)(fused_moe_kernel)
"""


def test_export_vllm_writes_only_configs_the_kernel_declares(tmp_path: Path) -> None:
    """A book's winner the kernel no longer declares is never exported: with --declared, the
    fastest declared config is, and the key is named; without it, a warning says that nothing
    was checked (issue 10 item 11)."""
    write_doc(tmp_path / "book", _moe_doc())
    (tmp_path / "moekernels.py").write_text(MOE_MODULE)
    res = invoke(*export_moe_args(tmp_path), "--declared", f"{tmp_path / 'moekernels.py'}:moe")
    written = json.loads((tmp_path / "out" / VLLM_NAME).read_text())
    assert {m: written[m] for m in ("1", "64")} == {m: EXPECTED_VLLM[m] for m in ("1", "64")}
    assert written["1024"] == {
        "BLOCK_SIZE_M": 256,
        "BLOCK_SIZE_N": 256,
        "BLOCK_SIZE_K": 64,
        "GROUP_SIZE_M": 1,
        "num_warps": 4,
        "num_stages": 3,
    }
    assert "key [1024, 14336, 8, 'torch.bfloat16']: winner BLOCK_K=128,BLOCK_M=128" in res.stderr
    assert "is not a config the kernel declares; exported BLOCK_K=64,BLOCK_M=256" in res.stderr
    assert res.stderr.count("not a config the kernel declares") == 1, res.stderr

    unchecked = invoke(
        "export", "--format", "vllm", tmp_path / "book", "-o", tmp_path / "v2", "--kernel", "fused_moe_kernel"
    )
    assert json.loads((tmp_path / "v2" / VLLM_NAME).read_text()) == EXPECTED_VLLM  # as before, but said:
    assert "the 3 winners of fused_moe_kernel were not checked" in unchecked.stderr
    assert "--declared MODULE:KERNEL" in unchecked.stderr
    # --declared naming another kernel said "does not fit vLLM's ... config parameters []"
    (tmp_path / "other.py").write_text(
        MOE_MODULE.replace("(fused_moe_kernel)", "(other_kernel)").replace(
            "def fused_moe_kernel", "def other_kernel"
        )
    )
    res = invoke(
        *export_moe_args(tmp_path),
        "-o",
        tmp_path / "v3",
        "--declared",
        f"{tmp_path / 'other.py'}:moe",
        ok=False,
    )
    assert res.exit_code == 2 and "is kernel other_kernel in the books, not fused_moe_kernel" in res.output


def test_export_vllm_skips_a_key_where_no_declared_config_ran(tmp_path: Path) -> None:
    """Without its runner-up, the key whose winner is undeclared has nothing to export: skipped, named."""
    doc = _moe_doc()
    without_256 = {
        text: replace(e, results={c: r for c, r in e.results.items() if "BLOCK_M=256" not in c})
        for text, e in doc.entries.items()
    }
    write_doc(tmp_path / "book", replace(doc, entries=without_256))
    (tmp_path / "moekernels2.py").write_text(MOE_MODULE)
    res = invoke(*export_moe_args(tmp_path), "--declared", f"{tmp_path / 'moekernels2.py'}:moe")
    assert list(json.loads((tmp_path / "out" / VLLM_NAME).read_text())) == ["1", "64"]
    assert "no declared config ran: key skipped" in res.stderr


def test_import_vllm_round_trips_and_is_marked_imported(tmp_path: Path) -> None:
    write_doc(tmp_path / "book", _moe_doc())
    invoke(
        "export", "--format", "vllm", tmp_path / "book", "-o", tmp_path / "v1", "--kernel", "fused_moe_kernel"
    )
    invoke(
        "import", "--format", "vllm", tmp_path / "v1" / VLLM_NAME, "--kernel", "moe", "-o", tmp_path / "imp"
    )
    doc = the_doc(tmp_path / "imp")
    assert doc.platform["timer"] == "imported:vllm" and doc.platform["device"] == "NVIDIA H100 80GB HBM3"
    assert doc.kernel["key"] == ["E", "N", "M"]
    assert sorted(e.key for e in doc.entries.values()) == [(8, 14336, 1), (8, 14336, 64), (8, 14336, 1024)]
    show = json.loads(invoke("show", tmp_path / "imp", "--json").stdout)
    assert all(
        e["imported"] and e["winner_ms"] is None and e["speedup"] is None for e in show["files"][0]["entries"]
    )
    assert "imported" in invoke("show", tmp_path / "imp").stdout
    invoke("export", "--format", "vllm", tmp_path / "imp", "-o", tmp_path / "v2", "--kernel", "moe")
    assert (tmp_path / "v2" / VLLM_NAME).read_bytes() == (tmp_path / "v1" / VLLM_NAME).read_bytes()
    # re-importing a changed file replaces its entries instead of adding a second winner
    changed = json.loads((tmp_path / "v1" / VLLM_NAME).read_text())
    changed["64"]["BLOCK_SIZE_M"] = 32
    (tmp_path / "v1" / VLLM_NAME).write_text(json.dumps(changed))
    invoke(
        "import", "--format", "vllm", tmp_path / "v1" / VLLM_NAME, "--kernel", "moe", "-o", tmp_path / "imp"
    )
    e64 = next(e for e in the_doc(tmp_path / "imp").entries.values() if e.key[2] == 64)
    assert [r.config["kwargs"]["BLOCK_SIZE_M"] for r in e64.results.values()] == [32]


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            ["--key", "E,N"],
            "batch sizes 1 and 64 both become key ['E', 'N']=[8, 14336] with different configs",
        ),
        (["--key", "E,,M"], "an empty name in 'E,,M': give each key name once"),
        (["--key", "E,M,M"], "M given twice in 'E,M,M'"),
        (["--const", "Q=5"], "Q not among the key names ['E', 'N', 'M']"),
        (["--map", "BLOCK_SIZE_Q=BLOCK_Q"], "BLOCK_SIZE_Q is no field of these files; they give ["),
    ],
)
def test_import_vllm_refuses_key_names_that_would_lose_or_misfile_entries(
    tmp_path: Path, extra: list[str], said: str
) -> None:
    """Each was imported with exit status 0: --key E,N kept one batch size's config of the
    file and dropped the others'; E,,M dropped N; an unused --const or a --map of no field
    did nothing."""
    write_doc(tmp_path / "book", _moe_doc())
    invoke(
        "export", "--format", "vllm", tmp_path / "book", "-o", tmp_path / "v1", "--kernel", "fused_moe_kernel"
    )
    table = json.loads((tmp_path / "v1" / VLLM_NAME).read_text())
    table["64"]["BLOCK_SIZE_M"] = 2 * table["1"]["BLOCK_SIZE_M"]  # batch sizes with different configs
    (tmp_path / "v1" / VLLM_NAME).write_text(json.dumps(table))
    args = (
        "import",
        "--format",
        "vllm",
        tmp_path / "v1" / VLLM_NAME,
        "--kernel",
        "moe",
        "-o",
        tmp_path / "imp",
    )
    res = invoke(*args, *extra, ok=False)
    assert said in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "imp").exists()
    assert invoke(*args, "--kernel", " ", ok=False).exit_code == 2


def test_import_vllm_rejects_foreign_file_names(tmp_path: Path) -> None:
    bad = tmp_path / "tuned.json"
    bad.write_text("{}")
    res = invoke("import", "--format", "vllm", bad, "--kernel", "moe", "-o", tmp_path / "imp", ok=False)
    assert "not a vLLM config file name" in res.output and "E=<int>,N=<int>" in res.output


@pytest.mark.parametrize(
    ("table", "found"),
    [
        ({"1": {"BLOCK_SIZE_M": "x"}}, 'batch size 1: BLOCK_SIZE_M is "x"'),
        ({"1": {"BLOCK_SIZE_M": 16, "num_warps": 4.5}}, "batch size 1: num_warps is 4.5"),
        ({"1": {"GROUP_SIZE_M": True}}, "batch size 1: GROUP_SIZE_M is true"),
        ({"1": {"BLOCK_M": "sixteen", "BLOCK_N": 64, "BLOCK_K": 64}}, 'batch size 1: BLOCK_M is "sixteen"'),
        ({"many": {"BLOCK_SIZE_M": 16}}, 'the batch size "many"'),
    ],
)
def test_import_vllm_refuses_values_vllm_would_not_read_as_integers(
    tmp_path: Path, table: dict[str, Any], found: str
) -> None:
    """Such a file was imported with exit status 0, and failed only when exported later."""
    path = tmp_path / VLLM_NAME
    path.write_text(json.dumps(table))
    res = invoke("import", "--format", "vllm", path, "--kernel", "moe", "-o", tmp_path / "imp", ok=False)
    (message,) = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert f"{path}: {found}; expected an integer" in message and "Fix the file" in message, res.output
    assert not (tmp_path / "imp").exists()


def test_import_vllm_refuses_an_entry_without_tile_sizes(tmp_path: Path) -> None:
    """It was imported (exit 0) as a config of no tile, which vLLM itself cannot launch and
    `show` listed as a winner of nothing but `s3 w4`."""
    path = tmp_path / VLLM_NAME
    tiled = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}
    path.write_text(json.dumps({"1": {"num_warps": 4, "num_stages": 3}, "2": tiled}))
    res = invoke("import", "--format", "vllm", path, "--kernel", "moe", "-o", tmp_path / "imp", ok=False)
    assert res.exit_code == 1 and "batch size 1 has no BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K" in res.output
    assert "(its fields: num_warps, num_stages)" in res.output and "Fix the file" in res.output
    assert not (tmp_path / "imp").exists()
    path.write_text(json.dumps({"1": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1}}))
    invoke("import", "--format", "vllm", path, "--kernel", "moe", "-o", tmp_path / "imp")  # the short names


def test_import_vllm_of_a_file_without_batch_sizes_is_an_error(tmp_path: Path) -> None:
    """It imported nothing and printed nothing, with exit status 0."""
    path = tmp_path / VLLM_NAME
    path.write_text(json.dumps({"triton_version": "3.4.0"}))
    res = invoke("import", "--format", "vllm", path, "--kernel", "moe", "-o", tmp_path / "imp", ok=False)
    assert res.exit_code == 1 and f"{path}: holds no batch size" in res.output
    assert not (tmp_path / "imp").exists()


# ------------------------------------------------------------------------------------ prune


def test_prune_drops_old_kernel_versions_and_corrupt_leftovers(book_dir: Path, tmp_path: Path) -> None:
    tune_add()
    current = book_files(book_dir)[0]
    doc = the_doc(book_dir)
    old = write_doc(book_dir, replace(doc, kernel={**doc.kernel, "hash": "1" * 64}))
    other = write_doc(book_dir, replace(doc, kernel={**doc.kernel, "name": "other_kernel", "hash": "2" * 64}))
    leftover = book_dir / f"{current.name}.corrupt-20260101T000000-1"
    leftover.write_text("junk")
    module = module_file(tmp_path)
    dry = invoke("prune", "--keep", module, "--dry-run").stdout
    assert f"would drop {old}" in dry and str(leftover) in dry and "dry run" in dry
    assert old.exists() and leftover.exists()
    text = invoke("prune", "--keep", module).stdout
    assert "dropped 2 files" in text and "old version of add_kernel" in text
    assert current.exists() and other.exists() and not old.exists() and not leftover.exists()


def test_prune_leaves_pages_of_another_triton_or_other_key_names_and_says_so(
    book_dir: Path, tmp_path: Path
) -> None:
    # The kernel id covers Triton's own jitted functions: under another Triton version a page
    # of unchanged source looks "old". And a kernel of the same name with other key names is
    # most likely another project's in a shared book. Neither is prune's to delete.
    tune_add()
    doc = the_doc(book_dir)
    edited = write_doc(book_dir, replace(doc, kernel={**doc.kernel, "hash": "1" * 64}))
    elsewhere = replace(
        doc, kernel={**doc.kernel, "hash": "3" * 64}, platform={**doc.platform, "triton": "0.1.0"}
    )
    other_triton = write_doc(book_dir, elsewhere)
    other_key = write_doc(book_dir, replace(doc, kernel={**doc.kernel, "hash": "4" * 64, "key": ["m", "k"]}))
    text = invoke("prune", "--keep", module_file(tmp_path)).stdout
    assert not edited.exists() and other_triton.exists() and other_key.exists()
    assert "dropped 1 files" in text
    assert "left 1 files of these kernels tuned under another Triton version" in text
    assert "left 1 files of these kernel names with other key names" in text


def test_prune_needs_no_gpu_driver(book_dir: Path, tmp_path: Path) -> None:
    tune_add()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunebook",
            "prune",
            str(book_dir),
            "--keep",
            str(module_file(tmp_path)),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and "kept 1 current files of 1 kernels" in proc.stdout, (
        proc.stdout + proc.stderr
    )


def test_prune_leaves_foreign_pages_and_drops_copies_kept_aside_inside_pages(
    book_dir: Path, tmp_path: Path
) -> None:
    # A ".foreign-*" page is a readable book of another kernel under this name: not prune's to
    # delete. A key file a write kept aside inside its page is listed by show and pruned.
    tune_add()
    (page,) = book_files(book_dir)
    foreign = book_dir / f"other_kernel--{'1' * 16}--cpu--{'2' * 16}.foreign-20260101T000000-1"
    foreign.mkdir()
    (foreign / "page.json").write_text("{}")
    inside = page / "100,'torch.float32','torch.float32','torch.float32'.json.corrupt-20260101T000000-1"
    inside.write_text("junk")
    assert str(inside) in invoke("show", book_dir).stdout
    text = invoke("prune", "--keep", module_file(tmp_path)).stdout
    assert "dropped 1 files" in text and foreign.exists() and not inside.exists()


def test_prune_that_cannot_delete_says_so_and_fails(book_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    tune_add()
    doc = the_doc(book_dir)
    old = write_doc(book_dir, replace(doc, kernel={**doc.kernel, "hash": "1" * 64}))

    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)
    res = invoke("prune", "--keep", module_file(tmp_path), ok=False)
    assert "could not delete 1 of 1 files (0 dropped)" in res.output and "Permission denied" in res.output
    assert "dropped 1" not in res.output and old.exists()


@contextlib.contextmanager
def read_only_entries(directory: Path) -> Iterator[None]:
    """``directory``'s entries can be neither added nor deleted (their contents can), also for
    root, who ignores permissions: a shared book directory mounted or set so."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)


def test_prune_in_a_book_directory_that_forbids_deleting_leaves_the_page_whole(
    book_dir: Path, tmp_path: Path
) -> None:
    """Found by a misuse review: the page's key files were deleted (its directory writable),
    then deleting the page itself failed, so prune emptied a page it reported it could not drop."""
    tune_add()
    doc = the_doc(book_dir)
    write_doc(tmp_path / "old", replace(doc, kernel={**doc.kernel, "hash": "1" * 64}))
    current = set(book_files(book_dir))
    invoke("merge", tmp_path / "old", "-o", book_dir)  # written as a page directory
    (old,) = set(book_files(book_dir)) - current
    keys = sorted(p.name for p in old.iterdir())
    with read_only_entries(book_dir):
        res = invoke("prune", "--keep", module_file(tmp_path), ok=False)
    assert "could not delete 1 of 1 files (0 dropped)" in res.output, res.output
    assert sorted(p.name for p in old.iterdir()) == keys and "page.json" in keys


def test_a_page_an_interrupted_prune_left_is_shown_and_pruned(book_dir: Path, tmp_path: Path) -> None:
    tune_add()
    (page,) = book_files(book_dir)
    left = shutil.copytree(page, book_dir / f"{page.name}.pruning-123")
    shown = invoke("show", book_dir).stdout
    assert "a page an interrupted prune was deleting" in shown and str(left) in shown
    text = invoke("prune", "--keep", module_file(tmp_path)).stdout
    assert "dropped 1 files" in text and not left.exists() and page.exists()


def test_prune_needs_modules_with_kernels(tmp_path: Path) -> None:
    empty = tmp_path / "empty_mod.py"
    empty.write_text("x = 1\n")
    assert (
        "defines no @tunebook.autotune kernel" in invoke("prune", tmp_path, "--keep", empty, ok=False).output
    )


# ----------------------------------------------------------------------------------- report


def test_report_writes_html_with_decodable_pngs(book_dir: Path, tmp_path: Path) -> None:
    import matplotlib
    import matplotlib.image

    _, b = _two_books(book_dir, tmp_path)
    invoke("merge", book_dir, b, "-o", tmp_path / "m")
    out = tmp_path / "report.html"
    invoke("report", tmp_path / "m", "-o", out)
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count("<section class='page'>") == 2 and "add_kernel" in html and "NVIDIA-H200" in html
    assert "<table>" in html and "no timing recorded" in html
    images = [chunk.split("'", 1)[0] for chunk in html.split("src='data:image/png;base64,")[1:]]
    assert len(images) == 2  # per page: tuned vs first config (the config landscape is a table)
    assert html.count("<table class='heat'>") == 2
    for data in images:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100


# ------------------------------------------------------------------------- required options


def test_output_is_required_where_documented(book_dir: Path, tmp_path: Path) -> None:
    """click >= 8.2 skips the required check of an option declared with an explicit default=None."""
    tune_add()
    for args in (
        ["merge", book_dir],
        ["export", "--format", "vllm", "--kernel", "add_kernel"],
        ["report", book_dir],
    ):
        res = invoke(*args, ok=False)
        assert res.exit_code == 2 and "Missing option '-o' / '--output'" in res.output, res.output


def test_tune_without_a_gpu_or_the_interpreter_says_so_in_one_line(book_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "tunebook", "tune", "--misses", str(module_file(tmp_path)), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot tell this process's platform" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr


def test_verbose_after_the_command_says_where_it_goes(book_dir: Path) -> None:
    """`tunebook show -v` got click's bare "No such option: -v"."""
    tune_add()
    for flag in ("-v", "-vv", "--verbose"):
        res = invoke("show", flag, book_dir, ok=False)
        assert res.exit_code == 2, res.output
        name = "--verbose" if flag == "--verbose" else "-v"
        assert "No such option" in res.output, res.output
        assert f"{name} is an option of tunebook itself; give it before the command" in res.output
        assert f"(tunebook {name} show ...)" in res.output
    assert "add_kernel" in invoke("-v", "show", book_dir).stdout
    assert "is an option of tunebook itself" not in invoke("show", "--wrong", book_dir, ok=False).output


def test_import_vllm_under_a_name_of_the_same_page_name_is_refused(tmp_path: Path) -> None:
    """Found by a misuse review: `--kernel vllm.moe` then `--kernel vllm-moe` wrote one page
    (the names file alike), so the second import replaced the first one's tables: Tables
    ("vllm.moe") then served the other kernel's configs, and Tables("vllm-moe") none."""
    tiles = {"BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}
    first, second = tmp_path / "a" / VLLM_NAME, tmp_path / "b" / VLLM_NAME
    for path, m in ((first, 128), (second, 64)):
        path.parent.mkdir()
        path.write_text(json.dumps({"256": {"BLOCK_SIZE_M": m, **tiles}}))
    # The second import also holds another GPU's file, whose page would be written first.
    amd = second.with_name("E=8,N=14336,device_name=AMD_Instinct_MI300X.json")
    amd.write_text(json.dumps({"256": {"BLOCK_SIZE_M": 32, **tiles}}))
    second = second.parent
    invoke("import", "--format", "vllm", first, "--kernel", "vllm.moe", "-o", tmp_path / "imp")
    (page,) = (tmp_path / "imp").iterdir()
    before = book_bytes(page)
    assert len(before) == 2  # type: ignore[arg-type]  # page.json and the key
    res = invoke(
        "import", "--format", "vllm", second, "--kernel", "vllm-moe", "-o", tmp_path / "imp", ok=False
    )
    assert res.exit_code == 1 and 'imported as kernel "vllm.moe"' in res.output, res.output
    assert "another book (-o DIR)" in res.output
    assert book_bytes(page) == before
    assert [p.name for p in (tmp_path / "imp").iterdir()] == [page.name]  # no page of the refused import
    doc = the_doc(tmp_path / "imp")
    assert doc.kernel["name"] == "vllm.moe"
    assert [r.config["kwargs"]["BLOCK_SIZE_M"] for e in doc.entries.values() for r in e.results.values()] == [
        128
    ]
    invoke(
        "import", "--format", "vllm", second, "--kernel", "vllm-moe", "-o", tmp_path / "imp2"
    )  # elsewhere: fine


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ('{"1": {"BLOCK_SIZE_M": 16}, "1": {"BLOCK_SIZE_M": 32}}', 'the key "1" appears twice'),
        (
            '{"1000000000000000000000000000000000000000001": {}}',
            "the batch size 100000000000000000000000...; expected one from 1",
        ),
        ('{"0": {}}', "the batch size 0; expected one from 1"),
        ('{"1": {"BLOCK_SIZE_M": 100000000000000000000000000000}}', "beyond 64 bits"),
        ('{"1": {"BLOCK_SIZE_M": NaN}}', "NaN is not a number"),
        (
            '{"1": {"BLOCK_SIZE_M": 0, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64}}',
            "BLOCK_SIZE_M is 0; expected 1 or more",
        ),
        (
            '{"1": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": -4}}',
            "num_warps is -4; expected 1",
        ),
        (
            '{"1": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_stages": -3}}',
            "num_stages is -3; expected 0",
        ),
    ],
)
def test_import_vllm_refuses_what_the_book_would_store_otherwise_or_not_read_back(
    tmp_path: Path, text: str, found: str
) -> None:
    """Found by a misuse review: a repeated batch size kept its last entry silently; a 42-digit
    batch size was imported, after which every command warned of an unreadable key file;
    1e29 as an integer was stored as a string, NaN as "nan"; tiles and warps of 0 or less
    were imported as configs nothing can launch."""
    path = tmp_path / VLLM_NAME
    path.write_text(text)
    res = invoke("import", "--format", "vllm", path, "--kernel", "moe", "-o", tmp_path / "imp", ok=False)
    assert res.exit_code == 1 and found in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "imp").exists()


def test_import_vllm_of_a_directory_reads_regular_files_only(tmp_path: Path) -> None:
    """Found by a misuse review: a FIFO with a table's name in the directory hung the import,
    and a link to /dev/zero read until memory ran out."""
    tables = tmp_path / "tables"
    tables.mkdir()
    os.mkfifo(tables / "E=8,N=256,device_name=NVIDIA_H100.json")
    res = invoke("import", "--format", "vllm", tables, "--kernel", "moe", "-o", tmp_path / "imp", ok=False)
    assert res.exit_code == 1 and "named pipe" in res.output, res.output
    os.unlink(tables / "E=8,N=256,device_name=NVIDIA_H100.json")
    os.symlink("/dev/zero", tables / "E=8,N=256,device_name=NVIDIA_H100.json")
    res = invoke("import", "--format", "vllm", tables, "--kernel", "moe", "-o", tmp_path / "imp", ok=False)
    assert res.exit_code == 1 and "character device" in res.output, res.output


@pytest.mark.parametrize("device", ["..", " ", "NVIDIA\tH100"])
def test_import_vllm_refuses_a_device_name_export_would_refuse(tmp_path: Path, device: str) -> None:
    path = tmp_path / f"E=8,N=256,device_name={device}.json"
    path.write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64}}))
    res = invoke("import", "--format", "vllm", path, "--kernel", "moe", "-o", tmp_path / "imp", ok=False)
    assert res.exit_code == 1 and "device name" in res.output, res.output
    assert not (tmp_path / "imp").exists()


# --------------------------------------------- explain, diff and export: a misuse review (s38)


def test_export_vllm_round_trips_rocm_fields(tmp_path: Path) -> None:
    """ROCm tables' waves_per_eu, matrix_instr_nonkdim and kpack were kept by import and
    dropped by export: the round trip was not byte for byte."""
    table = {
        "1": {**EXPECTED_VLLM["1"], "waves_per_eu": 0, "matrix_instr_nonkdim": 16, "kpack": 2},
        "64": {**EXPECTED_VLLM["64"], "waves_per_eu": 1, "matrix_instr_nonkdim": 16, "kpack": 1},
    }
    name = "E=8,N=14336,device_name=AMD_Instinct_MI300X.json"
    (tmp_path / "rocm").mkdir()
    (tmp_path / "rocm" / name).write_text(json.dumps(table, indent=4) + "\n")
    invoke("import", "--format", "vllm", tmp_path / "rocm", "--kernel", "vmoe", "-o", tmp_path / "imp")
    invoke("export", "--format", "vllm", tmp_path / "imp", "-o", tmp_path / "out", "--kernel", "vmoe")
    assert (tmp_path / "out" / name).read_text() == (tmp_path / "rocm" / name).read_text()


def test_export_vllm_refuses_what_vllm_could_not_launch(tmp_path: Path) -> None:
    """A config value that is not an integer (a string, a missing field) was written as is
    (null, "128"), and tunebook's own import refused the file; an unknown --const name went
    into every config, and vLLM launches with **config; a FIFO at a file's name hung the
    export; '--where #x=1' was a traceback."""
    doc = _moe_doc()
    text, first = next(iter(doc.entries.items()))
    lacking = result({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, 0.05)  # no GROUP_M: it wins
    doc.entries[text] = entry(list(first.key), [*first.results.values(), lacking])
    write_doc(tmp_path / "book", doc)
    res = invoke(*export_moe_args(tmp_path), ok=False)
    assert res.exit_code == 1 and "GROUP_SIZE_M=None" in res.output and "nothing written" in res.output
    assert not (tmp_path / "out").exists()

    write_doc(tmp_path / "good", _moe_doc())
    args = ["export", "--format", "vllm", tmp_path / "good", "--kernel", "fused_moe_kernel"]
    res = invoke(*args, "-o", tmp_path / "o2", "--const", "dtpye=fp8_w8a8", ok=False)
    assert res.exit_code == 2 and "unknown vLLM fields ['dtpye']" in res.output
    res = invoke(*args, "-o", tmp_path / "o2", "--where", "#x=1", ok=False)
    assert res.exit_code == 2 and "no such key name or position" in res.output
    (tmp_path / "o3").mkdir()
    os.mkfifo(tmp_path / "o3" / VLLM_NAME)
    res = invoke(*args, "-o", tmp_path / "o3", ok=False)
    assert res.exit_code == 1 and "not a file" in res.output, res.output


def test_export_vllm_refuses_a_book_holding_two_versions_of_the_kernel(tmp_path: Path) -> None:
    """A page of an older source of the kernel (another hash) on the same platform was
    exported with the current one, its winners mixed into the file, with nothing said."""
    write_doc(tmp_path / "book", _moe_doc())
    old = _moe_doc()
    old.kernel["hash"] = "cd" * 32
    write_doc(tmp_path / "book", old)
    res = invoke(*export_moe_args(tmp_path), ok=False)
    assert res.exit_code == 1 and "2 versions of kernel fused_moe_kernel" in res.output, res.output
    assert "tunebook prune" in res.output


def test_an_existing_vllm_file_naming_its_triton_version_is_no_batch_size(tmp_path: Path) -> None:
    write_doc(tmp_path / "book", _moe_doc())
    target = tmp_path / "out" / VLLM_NAME
    target.parent.mkdir()
    target.write_text(json.dumps({"triton_version": "3.4.0", **EXPECTED_VLLM}))
    res = invoke(*export_moe_args(tmp_path))
    assert f"replaced {target} (3 batch sizes)" in res.stdout, res.output


def test_explain_of_a_book_that_holds_no_book_file_is_an_error(tmp_path: Path) -> None:
    """A junk file or a FIFO given as BOOK answered "miss" (exit 1): a verdict, not an error."""
    module = module_file(tmp_path)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.json").write_text("not json")
    res = invoke("explain", f"{module}:add", junk, ok=None)
    assert res.exit_code == 2 and "holds no readable book file" in res.output, res.output


def test_a_module_that_prints_or_exits_as_it_is_imported(tmp_path: Path) -> None:
    """Its print went to stdout, into `explain --json`'s document; its sys.exit() decided the
    command's exit status (0: read as a hit)."""
    module = module_file(tmp_path)
    chatty = tmp_path / "chatty.py"
    chatty.write_text(f"print('loading kernels')\nfrom {Path(module).stem} import add\n")
    res = invoke("explain", f"{chatty}:add", tmp_path / "nobook", "--json", ok=None)
    if res.exit_code != 2:  # no book there: a miss, with a JSON document on stdout
        json.loads(res.stdout)
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(0)\n")
    res = invoke("explain", f"{exits}:add", ok=None)
    assert res.exit_code == 2 and "called sys.exit(0)" in res.output, res.output


# ------------------------------------------------------------- pages of look-alike platforms

EXPLAINED = """
import tunebook, fakegpu
from small_kernels import add_kernel
bench = fakegpu.DeviceBench()
add = tunebook.autotune(bench.configs(), key=["n"], do_bench=bench)(add_kernel)
"""


def test_pages_that_differ_in_runtime_or_sm_count_are_told_apart_and_explained(
    book_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An H100 page, the same under another CUDA runtime, and one of a same-named GPU with
    fewer SMs: show labels them apart; explain, on a host of an H100 (GPU 0) and an A100
    (GPU 1), gives the SM count a hint and says which GPU it judged and how to judge the other."""
    import fakegpu

    fakegpu.install(["H100", "A100"], monkeypatch.setattr)
    bench = fakegpu.DeviceBench()
    kernel = tunebook.autotune(bench.configs(), key=["n"], do_bench=bench)(add_kernel)
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    doc = the_doc(book_dir)
    books = tmp_path / "books"
    for change in ({}, {"runtime": "cuda 12.6"}, {"sm_count": 114}):
        write_doc(books, replace(doc, platform={**doc.platform, **change}))
    shown = " ".join(invoke("show", books).output.split())
    for label in ("cuda 12.8, 132 SMs", "cuda 12.6, 132 SMs", "cuda 12.8, 114 SMs"):
        assert f"NVIDIA-H100-80GB-HBM3-90 ({label}, triton" in shown, shown

    (tmp_path / "explained.py").write_text(EXPLAINED)
    pythonpath = [fakegpu.SITE, str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "FAKEGPU": "H100,A100",
        "PYTHONPATH": os.pathsep.join(pythonpath),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tunebook", "explain", "explained:add", str(books)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    said = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SM count: book 114, here 132 another SKU or partition of this GPU model" in said, said
    assert (
        "GPU 0 (NVIDIA H100 80GB HBM3); this host has GPUs of other models: 1 (NVIDIA A100-SXM4-80GB)" in said
    )
    assert "tunebook explain explained:add --env CUDA_VISIBLE_DEVICES=1" in said
    assert "A book file matches this process on GPU 0" in said
