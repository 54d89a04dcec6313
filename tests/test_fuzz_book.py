"""Untrusted books: reading one never runs code, never raises, and never launches a foreign config.

* A book is JSON, parsed by ``json.loads`` and validated field by field; anything else
  (pickle, YAML tags, Python source) is rejected without being executed.
* ``read_document`` returns a Document or None; ``Document.from_json`` returns a Document
  or raises BookFormatError. Checked with hypothesis on structured near-books and on byte
  mutations of a valid book, and on the corpus in tests/data/fuzz_corpus (every input
  found interesting so far, replayed on every run). ``bug-*`` inputs pin known bugs of
  records.py as strict xfails: they start passing, and must be unmarked, once fixed.
* A file over ``MAX_BOOK_BYTES`` is skipped without being read.
* A stored config reaches a launch only by its id naming one of the kernel's declared
  configs; the declared Config object is launched, never the stored record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tunebook
from conftest import as_format1, book_files
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook import _launch
from tunebook._book import BookFormatError, Document, files, read_document
from tunebook._book.records import config_id, config_record

CORPUS = Path(__file__).resolve().parent / "data" / "fuzz_corpus"
MARKER = Path("/tmp/tunebook-fuzz-marker-executed")  # what the code-carrying inputs would create
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Inputs that once broke the loader (fixed; kept as reject-* files): non-finite numbers
# (NaN, Infinity, 1e400), integers too large for a float or for int(), and config values
# that are objects. A new bug found by fuzzing goes here as "bug-<name>.json": <issue>.
KNOWN_BUGS: dict[str, int] = {}


def _read_safely(path: Path) -> Document | None:
    """read_document's contract, plus: what reads can be written back (merge-on-write needs it)."""
    doc = read_document(path)
    assert doc is None or isinstance(doc, Document)
    if doc is not None:
        text = doc.dumps()
        assert Document.from_json(json.loads(text)).dumps() == text
    return doc


# --------------------------------------------------------------------------- corpus


def _corpus(prefix: str) -> list[Any]:
    params = []
    for path in sorted(CORPUS.glob(f"{prefix}-*")):
        bug = KNOWN_BUGS.get(path.name)
        marks = [pytest.mark.xfail(strict=True, reason=f"known bug {bug}, see KNOWN_BUGS")] if bug else []
        params.append(pytest.param(path, id=path.name, marks=marks))
    return params


def test_corpus_is_complete() -> None:
    names = {p.name for p in CORPUS.iterdir()}
    assert set(KNOWN_BUGS) <= names
    bugs = {n for n in names if n.startswith("bug-")}
    assert bugs == set(KNOWN_BUGS), "every bug-* input must be listed in KNOWN_BUGS"
    assert all(n.split("-")[0] in ("accept", "reject", "bug") for n in names), names


@pytest.mark.parametrize("path", _corpus("accept"))
def test_corpus_accepted(path: Path) -> None:
    assert _read_safely(path) is not None


@pytest.mark.parametrize("path", _corpus("reject"))
def test_corpus_rejected_without_running_anything(path: Path) -> None:
    MARKER.unlink(missing_ok=True)
    with pytest.warns(files.BookWarning):
        assert _read_safely(path) is None
    assert not MARKER.exists(), "reading a book executed code"


def test_oversized_book_is_skipped_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.json"
    path.write_bytes((CORPUS / "accept-valid.json").read_bytes())
    monkeypatch.setattr(files, "MAX_BOOK_BYTES", path.stat().st_size - 1)

    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError("an oversized book was read")

    monkeypatch.setattr(Path, "read_text", refuse)
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.warns(files.BookWarning, match="limit"):
        assert read_document(path) is None


# --------------------------------------------------------------------------- hypothesis

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**500), 10**500)  # beyond float range: once a crash, now rejected
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=24,
)
finite_numbers = st.integers(0, 2**31) | st.floats(0, 1e6)


@st.composite
def near_books(draw: st.DrawFn) -> Any:
    """A valid book in which any field may be replaced by arbitrary JSON (NaN, huge integers
    and objects included: the loader must reject what it cannot write back)."""
    junk = json_values
    config_junk = json_values

    def field(valid: Any, pool: st.SearchStrategy[Any] = junk) -> Any:
        return draw(pool) if draw(st.integers(0, 5)) == 0 else valid

    entries = {}
    for _ in range(draw(st.integers(0, 3))):
        results = {}
        for _ in range(draw(st.integers(0, 3))):
            kwargs = field(
                {
                    "BLOCK": field(draw(st.sampled_from([16, 32, 64])), config_junk),
                    draw(st.text(max_size=4)): 1,
                }
            )
            record = field({"kwargs": kwargs, "num_warps": field(draw(st.integers(1, 8)), config_junk)})
            failed = draw(st.booleans())
            ms = field(None if failed else [draw(finite_numbers) for _ in range(3)])
            result = {
                "config": record,
                "ms": ms,
                "error": field("OutOfResources" if failed else None),
                "at": field("2026-11-21T05:00:00Z"),
            }
            well_formed = isinstance(record, dict) and isinstance(record.get("kwargs"), dict)
            cid = config_id(record) if well_formed and draw(st.integers(0, 9)) else draw(st.text())
            results[cid] = field(result)
        key = field([draw(st.integers(1, 4096)), "torch.float16"])
        entry = {
            "key": key,
            "results": field(results),
            "tuning_seconds": field(draw(finite_numbers)),
            "tuned_at": field(""),
            "winner": field(None),
        }
        entries[draw(st.text(max_size=10))] = field(entry)
    return {
        "format": field("tunebook-book"),
        "version": field(1),
        "kernel": field({"name": "k", "hash": field("abc"), "key": ["n"]}),
        "platform": field({"backend": "cpu"}),
        "entries": field(entries),
    }


@pytest.mark.once  # the parser, pure Python, fuzzed with derandomized inputs: the same on any Triton
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::tunebook._book.BookWarning")
@FUZZ
@given(st.one_of(near_books(), json_values))
def test_from_json_returns_a_document_or_raises_book_format_error(data: Any) -> None:
    try:
        doc = Document.from_json(data)
    except BookFormatError:
        return
    assert isinstance(doc, Document)


@pytest.mark.once  # the parser, pure Python, fuzzed with derandomized inputs: the same on any Triton
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::tunebook._book.BookWarning")
@FUZZ
@given(near_books())
def test_what_validates_can_be_written_and_read_back(data: Any) -> None:
    try:
        doc = Document.from_json(data)
    except BookFormatError:
        return
    # Writing is stable (tuning_seconds is rounded to the microsecond on the first write).
    text = doc.dumps()
    assert Document.from_json(json.loads(text)).dumps() == text


def _valid_book_bytes() -> bytes:
    return (CORPUS / "accept-valid.json").read_bytes()


_mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]),
    st.integers(0, 10**6),
    st.binary(min_size=1, max_size=8),
)


@pytest.mark.once  # the parser, pure Python, fuzzed with derandomized inputs: the same on any Triton
@pytest.mark.filterwarnings("ignore::tunebook._book.BookWarning")
@FUZZ
@given(st.lists(_mutation, min_size=1, max_size=6))
def test_read_document_survives_byte_mutations(
    tmp_path_factory: pytest.TempPathFactory, mutations: list[tuple[str, int, bytes]]
) -> None:
    data = bytearray(_valid_book_bytes())
    for op, at, chunk in mutations:
        i = at % (len(data) + 1)
        if op == "flip" and data:
            data[i % len(data)] ^= chunk[0] or 1
        elif op == "insert":
            data[i:i] = chunk
        elif op == "delete":
            del data[i : i + len(chunk)]
        elif op == "truncate":
            del data[i:]
        else:  # splice a piece of the book elsewhere: duplicated keys, braces, numbers
            data[i:i] = data[at % max(len(data), 1) :][: len(chunk) * 4]
    path = tmp_path_factory.mktemp("mut") / "book.json"
    path.write_bytes(bytes(data))
    doc = read_document(path)
    assert doc is None or isinstance(doc, Document)


# --------------------------------------------------------------------------- foreign configs

TABLE = {16: 0.3, 32: 0.2, 64: 0.25}


def _tuner(replay: Replay, books: tuple[Path, ...] = ()) -> Any:
    return tunebook.autotune(
        block_configs(*TABLE), key=["n"], do_bench=replay, pre_hook=replay.pre_hook, books=books
    )(add_kernel)


def _plant_foreign_winners(path: Path) -> None:
    """Add configs the kernel never declared, all far faster, and name one the winner."""
    doc = read_document(path)
    assert doc is not None
    raw = json.loads(path.read_text())
    foreign = [
        config_record({"BLOCK": 7}, {"num_warps": 4, "num_stages": 3}),  # a value not declared
        config_record({"BLOCK": 16, "EVIL": 1}, {"num_warps": 4, "num_stages": 3}),  # a kwarg not declared
        config_record(
            {"BLOCK": 16}, {"num_warps": 4, "num_stages": 3, "maxnreg": 1}
        ),  # an option not declared
    ]
    for entry in raw["entries"].values():
        for record in foreign:
            entry["results"][config_id(record)] = {"config": record, "ms": [1e-6, 1e-6, 1e-6], "error": None}
        entry["winner"] = config_id(foreign[0])
    # And a key only foreign configs were measured for.
    only_foreign = dict(
        next(iter(raw["entries"].values())), key=[96, "torch.float32", "torch.float32", "torch.float32"]
    )
    only_foreign["results"] = {config_id(r): {"config": r, "ms": [1e-6] * 3, "error": None} for r in foreign}
    raw["entries"][json.dumps(only_foreign["key"], separators=(",", ":"))] = only_foreign
    path.write_text(json.dumps(raw))
    planted = read_document(path)
    assert planted is not None and len(planted.entries) == 2  # the crafted book itself is valid


@pytest.mark.parametrize("mode", ["tune", "serve"])
@pytest.mark.parametrize("layer", ["writable", "shipped"])
def test_undeclared_stored_configs_are_never_launched(
    mode: str, layer: str, book_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real tuning run writes a genuine book for key n=64; then it is tampered with.
    _tuner(Replay(TABLE))[grid_1d(64)](*vectors(64)[:3], 64)
    (page,) = book_files(book_dir)
    path = as_format1(page)  # tampered as one file (format 1, still read)
    _plant_foreign_winners(path)
    books: tuple[Path, ...] = ()
    if layer == "shipped":
        shipped = tmp_path / "shipped"
        shipped.mkdir()
        path.rename(shipped / path.name)
        books = (shipped,)

    launched: list[dict[str, Any]] = []
    real_run = add_kernel.run

    def spy(*args: Any, **kwargs: Any) -> Any:
        launched.append({k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        return real_run(*args, **kwargs)

    monkeypatch.setattr(add_kernel, "run", spy)
    monkeypatch.setenv("TUNEBOOK_MODE", mode)
    tuner = _tuner(Replay(TABLE), books)
    for n in (64, 96):
        x, y, out = vectors(n, seed=n)
        tuner[grid_1d(n)](x, y, out, n)
        assert bool((out == x + y).all())
        assert tuner.best_config.kwargs["BLOCK"] in TABLE
    assert launched, "the spy saw no launch"
    # as launches pass them: without the options equal to the backend's defaults
    declared = [_launch.lean_options(c.all_kwargs(), tuner.option_defaults()) for c in block_configs(*TABLE)]
    for kwargs in launched:
        assert {k: v for k, v in kwargs.items() if k in declared[0]} in declared, kwargs
        assert "EVIL" not in kwargs and "maxnreg" not in kwargs and not math.isclose(kwargs["BLOCK"], 7)


def test_a_page_whose_identity_json_cannot_write_back_is_refused() -> None:
    # Python's parser reads Infinity and NaN; a strict writer refuses them. Such a page would
    # be read and then fail every write (found by the fuzzer above).
    for where in ("kernel", "platform"):
        data = json.loads(_valid_book_bytes())
        data[where]["extra"] = [float("inf")]
        with pytest.raises(BookFormatError, match=f"'{where}' holds a value JSON cannot write"):
            Document.from_json(data)
