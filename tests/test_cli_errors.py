"""The command line's answers to a person's mistakes and to a hostile file system.

Every error is one line that names the path or value, says what was expected and how to
fix it, and exits non-zero; never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from test_cli import _moe_doc, invoke, module_file, python_m_tunebook, the_doc, tune_add, write_doc
from test_persistence import read_only

# The command line: last Triton only (test_cli.py says why).
pytestmark = pytest.mark.once


def one_error_line(res: object, *needles: str, status: int = 1) -> str:
    """The single line a failed command printed; it names every needle. ``status``: 2 for
    explain and diff, whose 1 is an answer (a miss; books that differ)."""
    output = res.output  # type: ignore[attr-defined]
    assert res.exit_code == status, output  # type: ignore[attr-defined]
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], output
    return lines[0]


# --------------------------------------------------------------------------- file system


def test_writing_into_a_read_only_directory_is_one_line(book_dir: Path, tmp_path: Path) -> None:
    tune_add()
    write_doc(tmp_path / "moe", _moe_doc())
    invoke(
        "export", "--format", "vllm", tmp_path / "moe", "-o", tmp_path / "v", "--kernel", "fused_moe_kernel"
    )
    (vllm_file,) = (tmp_path / "v").iterdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        for args in (
            ["merge", book_dir, "-o", ro],
            ["merge", book_dir, "-o", ro / "sub"],
            ["import", "--format", "vllm", vllm_file, "--kernel", "moe", "-o", ro],
            ["export", "--format", "vllm", tmp_path / "moe", "-o", ro, "--kernel", "fused_moe_kernel"],
            ["report", book_dir, "-o", ro / "report.html"],
            ["report", book_dir, "-o", ro / "sub" / "report.html"],
        ):
            line = one_error_line(invoke(*args, ok=None), str(ro), "-o")
            assert "cannot write" in line


def test_reading_and_deleting_errors_are_one_line(book_dir: Path, tmp_path: Path, monkeypatch) -> None:
    tune_add()
    doc = the_doc(book_dir)
    old = write_doc(book_dir, replace(doc, kernel={**doc.kernel, "hash": "1" * 64}))
    with read_only(book_dir):
        one_error_line(invoke("prune", "--keep", module_file(tmp_path), ok=None), str(old), "permissions")
    assert old.exists()

    def refuse(self: Path) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    one_error_line(invoke("show", book_dir, ok=None), f"{book_dir}: Permission denied", "permissions")


# ------------------------------------------------------------------------------- options


def test_numeric_options_are_range_checked(book_dir: Path, tmp_path: Path) -> None:
    module = module_file(tmp_path)
    for args, option, expected in (
        (["tune", "--misses", module, "--workers", "-3"], "--workers", "x>=1"),
        (["tune", "--misses", module, "--workers", "0"], "--workers", "x>=1"),
        (["tune", "--misses", module, "--timeout", "-1"], "--timeout", "x>0"),
        (["tune", "--misses", module, "--timeout", "0"], "--timeout", "x>0"),
        (["diff", book_dir, book_dir, "--threshold", "-1"], "--threshold", "x>=0"),
        (["diff", book_dir, book_dir, "--threshold", "nan"], "--threshold", "nan is not a relative change"),
        (["explain", f"{module}:add", "--keys", "-1"], "--keys", "x>=0"),
    ):
        res = invoke(*args, ok=None)
        assert res.exit_code == 2 and f"Invalid value for '{option}'" in res.output, res.output
        assert expected in res.output, res.output


# -------------------------------------------------------------- nothing there, or nothing matched


def test_show_and_report_fail_when_nothing_matches_and_list_what_exists(
    book_dir: Path, tmp_path: Path
) -> None:
    tune_add()
    for args in (["show", "--kernel", "nosuch"], ["show", "--json", "--kernel", "nosuch"]):
        one_error_line(invoke(*args, ok=None), "no book file for kernel nosuch", "kernels there: add_kernel")
    report = tmp_path / "r.html"
    res = invoke("report", "-o", report, "--kernel", "nosuch", ok=None)
    assert res.exit_code == 1 and "kernels there: add_kernel" in res.output and not report.exists()
    res = invoke("export", "--format", "vllm", "-o", tmp_path / "v", "--kernel", "nosuch", ok=None)
    assert res.exit_code == 1 and "kernels there: add_kernel" in res.output


def test_show_fails_on_files_that_are_not_books(tmp_path: Path) -> None:
    junk = tmp_path / "notes.json"
    junk.write_text('{"hello": "world"}')
    res = invoke("show", junk, ok=None)
    assert res.exit_code == 1 and "no readable book file" in res.output and "notes.json" in res.output
    only_corrupt = tmp_path / "corrupt"
    only_corrupt.mkdir()
    (only_corrupt / "x.json").write_text("{not json")
    for args in (["show", only_corrupt], ["show", "--json", only_corrupt]):
        res = invoke(*args, ok=None)
        assert res.exit_code == 1 and "no readable book file" in res.output and "x.json" in res.output


def test_before_anything_is_tuned_show_says_so_and_where_it_looked(book_dir: Path, monkeypatch) -> None:
    line = one_error_line(invoke("show", ok=None), "nothing tuned yet", str(book_dir), "TUNEBOOK_DIR")
    assert "neither a directory nor a file" not in line
    monkeypatch.delenv("TUNEBOOK_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(book_dir.parent / "cache"))
    one_error_line(
        invoke("show", ok=None), "nothing tuned yet", str(book_dir.parent / "cache"), "TUNEBOOK_DIR"
    )


def test_a_tunebook_dir_that_is_a_file_is_named_as_such(tmp_path: Path, monkeypatch) -> None:
    """It was read as a book file and reported as a JSONDecodeError."""
    not_a_dir = tmp_path / "book.txt"
    not_a_dir.write_text("notes")
    monkeypatch.setenv("TUNEBOOK_DIR", str(not_a_dir))
    one_error_line(invoke("show", ok=None), f"TUNEBOOK_DIR is {not_a_dir}, a file, not a directory")


def test_explain_says_a_given_book_is_missing(tmp_path: Path) -> None:
    one_error_line(
        invoke("explain", f"{module_file(tmp_path)}:add", tmp_path / "nonexistent", ok=None),
        f"no book at {tmp_path / 'nonexistent'}",
        "no such file or directory",
        status=2,
    )
    # diff too: its 1 means the books differ, so a mistyped path must not read as that
    one_error_line(
        invoke("diff", tmp_path / "nonexistent", tmp_path / "other", ok=None),
        f"no book at {tmp_path / 'nonexistent'}",
        status=2,
    )


def test_tune_misses_with_a_kernel_target_says_what_misses_takes(tmp_path: Path) -> None:
    res = invoke("tune", "--misses", f"{module_file(tmp_path)}:add", ok=None)
    assert res.exit_code == 2 and "--misses takes modules" in res.output and "--keys" in res.output


def test_tune_misses_of_a_module_without_kernels_says_so(tmp_path: Path) -> None:
    """Not "nothing to tune" and exit 0, as when every miss is tuned: a parent package or a
    sibling module's name tunes nothing, and the user must hear it."""
    (tmp_path / "nokernels.py").write_text("VALUE = 1\n")
    one_error_line(
        invoke("tune", "--misses", tmp_path / "nokernels.py", ok=None),
        "defines no @tunebook.autotune kernel at module level",
        "--misses names the modules that define the kernels",
    )


# ----------------------------------------------------------------------------- vLLM export


def test_export_refuses_file_names_its_own_import_rejects(tmp_path: Path) -> None:
    doc = _moe_doc()
    dense = replace(doc, kernel={**doc.kernel, "key": ["num_tokens", "N", "E_unused"]})
    write_doc(tmp_path / "book", dense)
    common = ["export", "--format", "vllm", tmp_path / "book", "-o", tmp_path / "out", "--kernel"]
    common.append("fused_moe_kernel")
    res = invoke(*common, "--const", "E=eight", ok=None)
    assert res.exit_code == 2 and "--const E=eight" in res.output and "integer" in res.output, res.output
    res = invoke(*common, "--const", "E=8", "--const", "dtype=fp8,w8a8", ok=None)
    assert res.exit_code == 1 and "dtype" in res.output and "','" in res.output, res.output
    res = invoke(*common, "--const", "E=8", "--const", "GROUP_SIZE_M=big", ok=None)
    assert res.exit_code == 2 and "--const GROUP_SIZE_M=big" in res.output, res.output
    assert not (tmp_path / "out").exists()
    # what it does write, its import reads back
    invoke(*common, "--const", "E=8", "--const", "dtype=fp8_w8a8")
    (written,) = (tmp_path / "out").iterdir()
    invoke("import", "--format", "vllm", written, "--kernel", "moe", "-o", tmp_path / "back")


def test_messages_off_a_terminal_are_not_wrapped(book_dir: Path, tmp_path: Path) -> None:
    """A log file or CI output is read and copied from: a wrapped line splits the path."""
    tune_add()
    corrupt = book_dir / ("a-long-file-name-" * 6 + ".json")
    corrupt.write_text("{not json")
    proc = python_m_tunebook("show", book_dir)
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "skipped" in line]
    assert str(corrupt) in line and "JSONDecodeError" in line
    assert all(len(line) < 250 for line in proc.stdout.splitlines()[3:])  # tables are as wide as they need


# ------------------------------------------------------------------- cheap checks come first


def test_book_arguments_are_checked_before_the_module_is_imported(tmp_path: Path) -> None:
    """Importing a user's module imports torch (seconds): a mistyped BOOK must fail at once."""
    marker = tmp_path / "imported"
    module = tmp_path / "slow_mod.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\n")
    missing = tmp_path / "nope"
    one_error_line(invoke("prune", missing, "--keep", module, ok=None), f"no book at {missing}")
    one_error_line(invoke("explain", f"{module}:k", missing, ok=None), f"no book at {missing}", status=2)
    assert not marker.exists()


def test_a_module_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    module = tmp_path / "broken_mod.py"
    module.write_text("import math\n\nraise ValueError('no GPU here')\n")
    line = one_error_line(
        invoke("explain", f"{module}:k", ok=None), "ValueError: no GPU here", "broken_mod.py:3", status=2
    )
    assert "python" in line  # how to see the whole traceback


def test_a_module_that_launches_a_kernel_without_a_gpu_is_told_of_the_interpreter(tmp_path: Path) -> None:
    """A program that calls its kernel as it is imported (the guide's quick start), explained
    on a machine without a GPU: Triton's own words ("0 active drivers") were all it said."""
    module = tmp_path / "quickstart.py"
    module.write_text("raise RuntimeError('0 active drivers ([]). There should only be one.')\n")
    for command in (("explain", f"{module}:add_kernel"), ("tune", f"{module}:add_kernel", "--keys", "n=8")):
        one_error_line(
            invoke(*command, ok=None),
            "RuntimeError: 0 active drivers",
            "Triton found no GPU; on a machine without one, set TRITON_INTERPRET=1",
            f"python {module}",
            status=2 if command[0] == "explain" else 1,
        )


def test_a_book_file_locked_by_another_process_is_one_line(
    book_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from filelock import FileLock

    from tunebook.cli import _common

    tune_add()
    invoke("merge", book_dir, "-o", tmp_path / "out")
    lock = sorted((tmp_path / "out").glob("*/.tunebook/locks/*.lock"))[0]
    monkeypatch.setattr(_common, "LOCK_TIMEOUT_S", 0.1)
    with FileLock(str(lock)):  # a tuning run writing that key
        line = one_error_line(
            invoke("merge", book_dir, "-o", tmp_path / "out", ok=None), "could not be acquired"
        )
    assert "Another process holds it" in line and "writable" not in line


# ----------------------------------------------------------------------------- hostile books


def _hostile_books(tmp_path: Path) -> tuple[Path, Path]:
    """A directory with a good book plus one file holding a 5,000-digit integer, and another
    whose platform holds NaN; the good book's path."""
    books = tmp_path / "hostile"
    good = write_doc(books, _moe_doc())
    text = good.read_text()
    (books / "huge-int.json").write_text(text.replace('"arch": "90"', '"arch": ' + "9" * 5000, 1))
    (books / "nan-platform.json").write_text(text.replace('"arch": "90"', '"arch": NaN', 1))
    os.mkfifo(books / "fifo.json")
    os.symlink("/dev/zero", books / "zero.json")
    return books, good


def test_every_command_skips_hostile_files_with_their_reason(tmp_path: Path) -> None:
    books, good = _hostile_books(tmp_path)
    for args in (["show", books], ["show", "--json", books], ["diff", books, good.parent]):
        res = invoke(*args, ok=None)
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    res = invoke("show", books)
    for name, reason in (
        ("huge-int.json", "beyond 64 bits"),
        ("nan-platform.json", "NaN"),
        ("fifo.json", "named pipe"),
        ("zero.json", "character device"),
    ):
        assert name in res.output and reason in res.output, (name, res.output)
    merged = tmp_path / "merged"
    res = invoke("merge", books, "-o", merged, ok=None)
    # The readable book is merged; the 4 skipped inputs fail the merge, each named.
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "4 input file(s) skipped" in res.output and list(merged.iterdir()), res.output
    report = tmp_path / "r.html"
    invoke("report", books, "-o", report)
    invoke(
        "export",
        "--format",
        "vllm",
        books,
        "-o",
        tmp_path / "v",
        "--kernel",
        "fused_moe_kernel",
        "--const",
        "E=8",
    )


def test_export_never_writes_outside_its_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for device in ("../escape/NVIDIA", "/etc/x", "a" * 300, "NVIDIA\x00H200", ".."):
        doc = _moe_doc()
        doc = replace(doc, platform={**doc.platform, "device": device})
        books = tmp_path / f"b{abs(hash(device))}"
        write_doc(books, doc)
        (tmp_path / "escape").mkdir(exist_ok=True)
        res = invoke(
            "export",
            "--format",
            "vllm",
            books,
            "-o",
            out,
            "--kernel",
            "fused_moe_kernel",
            "--const",
            "E=8",
            ok=None,
        )
        assert "Traceback" not in res.output, (device, res.output)
        assert not list((tmp_path / "escape").iterdir()), device
        written = [p for p in tmp_path.rglob("E=*") if p.is_file()]
        assert all(p.parent == out for p in written), (device, written)


def test_no_lock_file_lies_beside_a_page_a_user_would_ship(book_dir: Path, tmp_path: Path) -> None:
    # Issue 9, item 15: lock files beside every book file would be shipped with a book. Locks
    # live under each page's hidden .tunebook/ folder, whatever wrote the book.
    tune_add()
    invoke("merge", book_dir, "-o", tmp_path / "merged")
    for book in (book_dir, tmp_path / "merged"):
        shipped = [p for p in book.rglob("*") if ".tunebook" not in p.relative_to(book).parts]
        assert shipped and not [p for p in shipped if p.suffix == ".lock"], shipped
        assert all(p.suffix == ".json" or p.is_dir() for p in shipped), shipped
