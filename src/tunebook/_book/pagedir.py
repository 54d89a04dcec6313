"""Book pages on disk, format 2: one directory per page, one small file per key.

::

    <book dir>/<page name>/              <kernel>--<kernel id>--<platform>--<platform id>
        page.json                        {"format": "tunebook-page", "version": 2, "kernel", "platform"}
        <key name>.json                  one entry: {"format": "tunebook-entry", "version": 2,
                                           "kernel": <kernel hash>, "platform": <platform id>, <entry>}
        .tunebook/locks/<key name>.lock  a writer's lock on one key, held for one small write
        .tunebook/pending/<key name>.<time>-<pid>-<n>.json
                                         news a writer could not fold in while the lock was busy
        .tunebook/tmp/                   writes in progress (<file>.<random>.tmp)
    <book dir>/.<page name>.creating-<random>/
                                         a page being created, renamed into place whole

A key's name is its key text, readable and reversible: ``[4096,128,"torch.float16"]`` is
``4096,128,'torch.float16'.json`` (brackets dropped, ``"`` written ``'``, anything outside
``[A-Za-z0-9,._+=@-]`` percent-encoded); a name that would pass 200 bytes is ``#<sha256>.json``.

Contract (tests/test_stores.py, tests/test_book_scale.py):

* **Reading one key costs one key.** A hit never reads; a miss reads its key's file (and
  the page's, a few hundred bytes), never the page's other keys.
* **No writer waits on another for long, and nothing is lost.** A write takes the lock of
  its key only, for one read and one atomic write of that key (~1 ms). If the lock is busy
  for ``KEY_LOCK_WAIT_S`` (a holder stopped by SIGSTOP, a debugger, a frozen container),
  the writer leaves its news in ``.tunebook/pending/`` instead and returns at once;
  readers fold pending news in (what the key's file holds stands over it), and the next
  writer that holds the lock writes it into the key's file and deletes it. The key's file
  lists the news it holds (``folded``): news is counted once, even where its folder was
  killed before deleting it.
* **A page appears whole** (``ensure_page``): never a page directory without page.json.
* **Every file read is checked**: strict JSON, bounded size, a regular file only, and it
  must be this page's (kernel hash, platform id, and the key its name says), else it is
  skipped with one warning.
* Writes are atomic (temp, fsync, rename, directory fsync) and fail soft, as format 1's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .._errors import BookFormatError
from .._jsonio import key_text as text_of
from .._jsonio import strict_loads
from .._warnings import warn_once, warn_unreadable
from .files import Unusable, atomic_write_text, fsync_dir, log, read_regular_file
from .records import NEWER, Entry, check_format, check_identity

PAGE_FORMAT = "tunebook-page"
ENTRY_FORMAT = "tunebook-entry"
VERSION = 2
PAGE_FILE = "page.json"
HIDDEN = ".tunebook"
MAX_ENTRY_BYTES = 16 * 1024 * 1024  # one key; an entry of 10^4 results is ~2 MB
MAX_PAGE_BYTES = 1024 * 1024
KEY_LOCK_WAIT_S = 0.2  # a key's write holds its lock ~1 ms; past this the news goes to pending/
_SAFE = ",.-_+=@"
_counter = itertools.count()


def page_dir_name(file_name: str) -> str:
    """The directory of the page a format-1 file name names: the name without ``.json``."""
    return file_name[: -len(".json")] if file_name.endswith(".json") else file_name


def key_file_name(key_text: str) -> str:
    """The file name of a key (see the module docstring).

    >>> key_file_name('[4096,128,"torch.float16"]')
    "4096,128,'torch.float16'.json"
    >>> key_text_of(key_file_name('[4096,128,"torch.float16"]'))
    '[4096,128,"torch.float16"]'
    """
    inner = key_text[1:-1] if key_text.startswith("[") and key_text.endswith("]") else key_text
    try:
        name = urllib.parse.quote(inner, safe=_SAFE).replace("%22", "'") + ".json"
    except UnicodeEncodeError:  # a lone surrogate (from a file name that is not UTF-8): hashed
        name = ""
    if not name or len(name.encode()) > 200 or name.startswith(".") or name == PAGE_FILE:
        return "#" + hashlib.sha256(key_text.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".json"
    return name


def key_text_of(file_name: str) -> str | None:
    """The key text a key's file name says; None for a hashed name (read the file) or no key."""
    if not file_name.endswith(".json") or file_name.startswith(("#", ".")) or file_name == PAGE_FILE:
        return None
    if not file_name.isascii():  # our names are ASCII (percent-encoded): not one of ours; read it
        return None
    inner = file_name[: -len(".json")]
    if "%" not in inner:  # the usual name: nothing was percent-encoded, only " written '
        return "[" + inner.replace("'", '"') + "]"
    return "[" + urllib.parse.unquote(inner.replace("'", "%22")) + "]"


# --------------------------------------------------------------------------- reading


def _load(path: Path, limit: int) -> Any:
    """The JSON at ``path``; None if absent; raises Unusable or a ValueError with the reason."""
    raw = read_regular_file(path, limit)
    return None if raw is None else strict_loads(raw.decode("utf-8"))


def _warn(path: Path, reason: object) -> None:
    warn_unreadable(path, reason)


def read_page_file(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the page's ``{"kernel", "platform"}``, None), or (None, why page.json is unusable), or
    (None, None) if it is absent. Warns of nothing: the caller knows what it can do without it."""
    path = directory / PAGE_FILE
    try:
        data = _load(path, MAX_PAGE_BYTES)
        if data is None:
            return None, None
        check_format(data, PAGE_FORMAT, VERSION, VERSION)
        kernel, platform = data.get("kernel"), data.get("platform")
        check_identity(kernel, platform)
        return {"kernel": kernel, "platform": platform}, None
    except (Unusable, ValueError, OverflowError, RecursionError) as exc:
        return None, str(exc) or type(exc).__name__


def repair_hint(directory: Path) -> str:
    """How a person rewrites a page's page.json (the exact fix; docs/book-format.md)."""
    return (
        f"call the kernel once with TUNEBOOK_DIR={os.path.abspath(directory.parent)} (it reads the "
        "keys without page.json and writes a new one; nothing is re-benchmarked), or copy page.json "
        "from another copy of this book"
    )


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The page's ``{"kernel", "platform"}``; None if there is no page or it is unusable (warned).

    For a reader that does not know which page it asked for (the command line, a sibling
    search): a key's file records its kernel's hash and platform id, not the kernel's key
    names or the platform itself, so without page.json its keys are not served."""
    meta, why = read_page_file(directory)
    if why is not None:
        warn_once(
            f"read:{directory / PAGE_FILE}",
            "tunebook: skipping the page %s: its page.json is unreadable (%s), and nothing else names "
            "the kernel and platform its key files are for. The key files are intact: to rewrite it, %s.",
            directory,
            why,
            repair_hint(directory),
        )
    return meta


def name_ids(directory_name: str) -> tuple[str, str] | None:
    """(kernel id, platform id) that a page directory's name carries (see pages.book_file_name),
    or None if it is not a page's name."""
    found = _PAGE_NAME.fullmatch(directory_name)
    return (found["kernel"], found["platform"]) if found else None


# <kernel name>--<kernel id>--<platform slug>--<platform id>: both ids are 16 hex digits, and
# neither slug holds "--<16 hex digits>--" in practice (kernel names are cut at 60 characters).
_PAGE_NAME = re.compile(r".+--(?P<kernel>[0-9a-f]{16})--.+--(?P<platform>[0-9a-f]{16})")


def _entry_of(path: Path, meta: Mapping[str, Any], key_text: str | None) -> tuple[str, Entry] | None:
    """(key text, entry) of one key file of this page; None if absent or unusable (warned)."""
    found = _key_file(path, meta, key_text)
    return None if found is None else (found[0], found[1])


def _key_file(
    path: Path, meta: Mapping[str, Any], key_text: str | None
) -> tuple[str, Entry, frozenset[str]] | None:
    """(key text, entry, the ids of the pending news it holds: ``folded``) of one key file
    (or pending news file) of this page; None if absent or unusable (warned)."""
    try:
        data = _load(path, MAX_ENTRY_BYTES)
        if data is None:
            return None
        check_format(data, ENTRY_FORMAT, VERSION, VERSION)
        for field in ("kernel", "platform"):
            if not isinstance(data.get(field), str):  # a damaged file, not another version's
                raise BookFormatError(f"its '{field}' field is missing or not a string")
        if data.get("kernel") != meta["kernel"]["hash"]:
            raise BookFormatError("it belongs to another kernel version")
        if data.get("platform") != meta["platform"].get("id", ""):
            raise BookFormatError("it belongs to another platform")
        entry = Entry.from_json(data, "the file")  # its path is said before the reason
        actual = text_of(entry.key)
        if key_text is not None and _parsed(key_text) != list(entry.key):
            raise BookFormatError(f"it holds key {actual}, not the key {key_text} its name says")
        folded = data.get("folded")
        ids = frozenset(i for i in folded if isinstance(i, str)) if isinstance(folded, list) else frozenset()
        return key_text or actual, entry, ids
    except (Unusable, ValueError, OverflowError, RecursionError) as exc:
        _warn(path, exc)
        return None


def _parsed(key_text: str) -> Any:
    try:
        return json.loads(key_text)
    except ValueError:
        return None


def _stem(name: str) -> str:
    return name[: -len(".json")]


def _pending(directory: Path, name: str) -> list[Path]:
    try:
        names = os.listdir(directory / HIDDEN / "pending")
    except OSError:
        return []
    # <key name>.<time>-<pid>-<n>.json, matched whole: a prefix would take the news of other
    # keys whose names start with this one's (key [1,2] and key [1,2.5]), and merge_key
    # deletes what it folds in.
    own = re.compile(re.escape(_stem(name)) + _PENDING_STAMP)
    return [directory / HIDDEN / "pending" / n for n in sorted(names) if own.fullmatch(n)]


_PENDING_STAMP = r"\.(\d+-\d+-\d+)\.json"  # a news file's id: <time>-<pid>-<n>


def _news_id(path: Path) -> str:
    """The id of a pending news file (its ``<time>-<pid>-<n>``), which a key's file that
    holds its news lists in ``folded``."""
    found = re.search(_PENDING_STAMP + "$", path.name)
    return found[1] if found else path.name


def _news(pending: list[Path], meta: Mapping[str, Any], key_text: str) -> list[tuple[str, Entry]]:
    """(id, entry) of each of the key's pending news files that is still there, oldest first."""
    found = []
    for path in pending:
        news = _entry_of(path, meta, key_text)
        if news is not None:
            found.append((_news_id(path), news[1]))
    return found


def read_key(directory: Path, meta: Mapping[str, Any], key_text: str) -> Entry | None:
    """The page's entry for ``key_text``: its file with pending news folded under it."""
    return _read_key(directory, meta, key_text, _pending(directory, key_file_name(key_text)))


def _read_key(directory: Path, meta: Mapping[str, Any], key_text: str, pending: list[Path]) -> Entry | None:
    news, found = _news_then_file(directory, meta, key_text, pending)
    if found is None:
        return _folded(None, news)
    return _folded(found[1], news, found[2])


def _news_then_file(
    directory: Path, meta: Mapping[str, Any], key_text: str, pending: list[Path]
) -> tuple[list[tuple[str, Entry]], tuple[str, Entry, frozenset[str]] | None]:
    """(the key's pending news, its file) as one view: news that the file holds is either
    listed in its ``folded`` or gone from pending/.

    The pending news first, then the key's file. A writer writes the key's file with the
    news in it and only then deletes the news: a news file gone when it is read was in a
    key's file written before this read of it. Read the other way round, the news could be
    deleted between the two reads, after the old key's file was read: in neither view.
    The file lists the news it holds (``folded``), which is skipped: read in this order, a
    reader meets both (a writer killed before it deleted the news, or a write between the
    two reads), and a count (``misses``) must not add them twice. A news file read, then
    gone, that the file does not list was folded in between the two reads, and the file
    read may be a later write that no longer lists it (it lists only the news pending when
    it was written): the two are read again (at most three times, as ``merge_key`` does).
    """
    name = key_file_name(key_text)
    for _ in range(3):
        news = _news(pending, meta, key_text)
        found = _key_file(directory / name, meta, key_text)
        if not news:  # the usual case: nothing pending, nothing to count twice
            break
        now = _pending(directory, name)
        held = found[2] if found is not None else frozenset()
        still = {_news_id(path) for path in now}
        if all(news_id in still or news_id in held for news_id, _ in news):
            break
        pending = now
    return news, found


def _folded(entry: Entry | None, news: list[tuple[str, Entry]], done: Collection[str] = ()) -> Entry | None:
    """``entry`` with the key's pending ``news`` folded in under it (``entry`` stands; older
    news over newer), but for the news whose id is in ``done``: already in ``entry``."""
    for news_id, item in news:
        if news_id not in done:
            entry = item.merged_over(entry)
    return entry


def read_keys(directory: Path, meta: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Entry]:
    found = {}
    for text in keys:
        entry = read_key(directory, meta, text)
        if entry is not None:
            found[text] = entry
    return found


def _named_key(name: str) -> str | None:
    """The key text of ``name`` if it is the name this tunebook gives that key (one read of
    the directory's listing tells a key's own file from a copy, a renamed or hand-made one,
    or a name that is not UTF-8, whose key only its content says); None otherwise."""
    text = key_text_of(name)
    if text is None or not isinstance(_parsed(text), list) or key_file_name(text) != name:
        return None
    return text


def list_keys(directory: Path, meta: Mapping[str, Any], limit: int | None = None) -> set[str]:
    """Every key text the page holds (names only; a file under a name that is not the one
    its key is given, and pending news, are read), or with ``limit``, those among the first
    ``limit`` names of the page's directory and then of its pending news, in the file
    system's order (the same for every reader of one directory in one state): a
    nearest-key search reads a bounded part of a page."""
    pending = directory / HIDDEN / "pending"
    listed = itertools.chain(
        ((directory, n) for n in _scan(directory)), ((pending, n) for n in _scan(pending))
    )
    texts: set[str] = set()
    for where, name in itertools.islice(listed, limit):
        if not name.endswith(".json") or name.startswith(".") or (where == directory and name == PAGE_FILE):
            continue
        text = _named_key(name) if where == directory else None  # pending: <key name>.<stamp>.json
        if text is None:
            found = _entry_of(where / name, meta, None)
            if found is not None:
                texts.add(found[0])
        else:
            texts.add(text)
    return texts


def key_files(directory: Path, meta: Mapping[str, Any]) -> dict[str, list[str]]:
    """Every key of the page with the names of its other files: those that hold it under a
    name that is not the one tunebook gives it (``<name> (copy).json``, a name that is not
    UTF-8, a hand-made one), which only a reading of each file finds. A key known only from
    its own file or its pending news has none. O(page): for the command line."""
    found: dict[str, list[str]] = {}
    for name in sorted(_scan(directory)):
        if not name.endswith(".json") or name.startswith(".") or name == PAGE_FILE:
            continue
        text = _named_key(name)
        if text is not None:
            found.setdefault(text, [])
            continue
        held = _entry_of(directory / name, meta, None)
        if held is not None:
            others = found.setdefault(held[0], [])
            if key_file_name(held[0]) != name:
                others.append(name)
    for name in _scan(directory / HIDDEN / "pending"):
        if name.endswith(".json") and not name.startswith("."):
            held = _entry_of(directory / HIDDEN / "pending" / name, meta, None)
            if held is not None:
                found.setdefault(held[0], [])
    return found


def read_key_files(
    directory: Path, meta: Mapping[str, Any], key_text: str, others: Iterable[str]
) -> Entry | None:
    """The key's entry from its own file, its other files (``key_files``) and its pending
    news: its own file stands over its other files, and they over the news."""
    if not others:  # the usual case: the key's own file and its news
        return read_key(directory, meta, key_text)
    news, own = _news_then_file(directory, meta, key_text, _pending(directory, key_file_name(key_text)))
    entry = own[1] if own is not None else None
    for name in others:
        held = _entry_of(directory / name, meta, None)
        if held is not None and held[0] == key_text:
            entry = held[1].merged_over(entry)
    return _folded(entry, news, own[2] if own is not None else ())


def _scan(directory: Path) -> Iterator[str]:
    """The names in ``directory``, in the file system's order (none if it cannot be read).
    os.scandir reads a directory in batches, so a caller that stops early reads only part
    of a large one, where os.listdir reads it all."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                yield entry.name
    except OSError:
        return


def read_all(directory: Path, meta: Mapping[str, Any]) -> dict[str, Entry]:
    """Every entry of the page (O(page): for the command line and tools, never a kernel call),
    a key's files under other names included (``key_files``)."""
    found = {}
    for text, others in sorted(key_files(directory, meta).items()):
        entry = read_key_files(directory, meta, text, others)
        if entry is not None:
            found[text] = entry
    return found


# --------------------------------------------------------------------------- writing


def entry_text(entry: Entry, meta: Mapping[str, Any], news: bool = False, folded: Iterable[str] = ()) -> str:
    """One key's file: format, version, whose it is, then the entry, one line per result.
    ``news``: a pending write, which keeps what it ``reopens`` (a key's file never does).
    ``folded``: the ids of the pending news files this write holds (see ``merge_key``)."""
    data = entry.to_json()
    if news and entry.reopens:
        data["reopens"] = entry.reopens
    if folded:
        data["folded"] = sorted(folded)
    head = {
        "format": ENTRY_FORMAT,
        "version": VERSION,
        "kernel": meta["kernel"]["hash"],
        "platform": meta["platform"].get("id", ""),
        **{k: v for k, v in data.items() if k != "results"},
    }
    lines = ["{" + json.dumps(head, sort_keys=True, allow_nan=False)[1:-1] + ', "results": {']
    results = list(data["results"].items())
    for i, (cid, result) in enumerate(results):
        sep = "," if i < len(results) - 1 else ""
        lines.append(f" {json.dumps(cid)}: {json.dumps(result, sort_keys=True, allow_nan=False)}{sep}")
    lines.append("}}")
    return "\n".join(lines) + "\n"


class LeaveAlone(OSError):
    """A file that is not this tunebook's to replace (a newer tunebook's, too large, unreadable
    just now); the message says which."""


def _make_room(path: Path, fmt: str) -> None:
    """Before ``path``, which exists but cannot be used, is replaced: leave a file we must not
    replace (raise LeaveAlone: a newer tunebook's, too large, unreadable just now), else keep
    it aside as ``<name>.corrupt-<time>-<pid>`` (out of the *.json namespace) for a person."""
    try:
        data = _load(path, MAX_ENTRY_BYTES)
    except Unusable as exc:
        if not exc.replaceable:
            raise LeaveAlone(f"{path}: {exc}") from None
        data = None
    except (ValueError, OverflowError, RecursionError):
        data = None
    version = data.get("version") if isinstance(data, dict) and data.get("format") == fmt else None
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise LeaveAlone(f"{path} was {NEWER} (book format {version})")
    _keep_aside(path)


def _keep_aside(path: Path) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.replace(path, aside)
        log.warning("tunebook: kept the unreadable book file %s aside as %s", path, aside)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?[])", r"[\1]", name)


def _hidden(directory: Path, sub: str) -> Path:
    """``.tunebook/<sub>`` of a page, created; refuses one planted as a symbolic link."""
    hidden = directory / HIDDEN
    for path in (hidden, hidden / sub):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise NotADirectoryError(f"{path} is not a directory (a link or a file was planted there)")
    return hidden / sub


def _write(path: Path, text: str, tmp_dir: Path) -> None:
    """Atomically replace ``path``; the temp file lives in the page's hidden tmp/ directory."""
    atomic_write_text(path, text, tmp_dir=tmp_dir)


def _page_text(meta: Mapping[str, Any]) -> str:
    data = {"format": PAGE_FORMAT, "version": VERSION, "kernel": meta["kernel"], "platform": meta["platform"]}
    return json.dumps(data, sort_keys=True, allow_nan=False, indent=1) + "\n"


def ensure_page(directory: Path, meta: Mapping[str, Any]) -> None:
    """Create the page (its directory and page.json) unless it is there for this kernel.

    A new page appears whole (``_create``): a writer killed while it makes one leaves no
    page without its page.json. (Older tunebooks made the directory, then wrote page.json;
    such an empty page is read as one without keys, and a writer writes its page.json.)
    A page of another kernel under this name is kept aside, as format 1 keeps such a file.
    """
    text = _page_text(meta)
    if not os.path.lexists(directory) and _create(directory, text):
        return
    present = read_page_file(directory)[0]  # an unreadable one is kept aside below, and logged
    if present is None and os.path.lexists(directory / PAGE_FILE):
        # Another process may have created it since it was read (an atomic rename): read it
        # again before keeping it aside as unreadable.
        present = read_page_file(directory)[0]
        if present is None:
            _make_room(directory / PAGE_FILE, PAGE_FORMAT)
    if present is not None and present["kernel"].get("hash") == meta["kernel"]["hash"]:
        return
    if present is not None:
        aside = directory.with_name(
            f"{directory.name}.foreign-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        )
        with contextlib.suppress(OSError):
            os.replace(directory, aside)
            log.warning("tunebook: kept the foreign book %s aside as %s", directory, aside)
        if not os.path.lexists(directory) and _create(directory, text):
            return
    _write(directory / PAGE_FILE, text, _hidden(directory, "tmp"))


def _create(directory: Path, page_text: str) -> bool:
    """Make the page ``directory`` with its page.json in one step: built beside it under a
    dotted name (``.<page>.creating-<random>``, which every reader skips, older ones too),
    then renamed to its own. It takes only the book directory's write permission, as a
    page's own mkdir does: a book shared by several users (mode 1777, or a group's) holds
    no directory of one user that another must write into. False where a page appeared
    there meanwhile (another process made it first): ours goes."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name[:200]}{CREATING}{os.urandom(6).hex()}")
    staging.mkdir()  # the mode an ordinary new directory gets: a page is shared
    try:
        _write(staging / PAGE_FILE, page_text, _hidden(staging, "tmp"))
        try:
            os.rename(staging, directory)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return False
        fsync_dir(directory.parent)
        return True
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)


CREATING = ".creating-"
# A page being created (``_create``), or one of those a clean-up renamed to delete it
# (``remove_leftovers``): in the book directory, beside the pages.
_CREATION = re.compile(r"\..+\.creating-[0-9a-f]{12}")

# A write takes milliseconds: what sits in a page's tmp/ (or is a page being created) for
# this long is a killed writer's. A live write's temp file is never this old.
LEFTOVER_AGE_S = 3600.0


def stale_leftovers(directory: Path, older_than_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """What writers killed mid-write left in the page ``directory``'s ``.tunebook/tmp/``
    (temp files), unchanged for ``older_than_s``. They only take space (no reader looks there)."""
    return _stale(directory / HIDDEN / "tmp", lambda name: True, older_than_s)


def stale_creations(book: Path, older_than_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """The pages whose creation was killed (``.<page>.creating-<random>`` directories in the
    book directory ``book``), unchanged for ``older_than_s``. No reader looks at them."""
    return [p for p in _stale(book, _CREATION.fullmatch, older_than_s) if p.is_dir() and not p.is_symlink()]


def sweep_creations(book: Path) -> int:
    """Delete the pages whose creation was killed an hour ago or more in the book directory
    ``book`` (``stale_creations``, ``remove_leftovers``); how many went. One listing of the
    book directory: a command that writes many pages (``merge``, ``import``) calls it once."""
    return remove_leftovers(stale_creations(book))


def _stale(where: Path, wanted: Callable[[str], object], older_than_s: float) -> list[Path]:
    now = time.time()
    found = []
    for name in _scan(where):
        if wanted(name):
            with contextlib.suppress(OSError):
                if now - os.lstat(where / name).st_mtime > older_than_s:
                    found.append(where / name)
    return sorted(found)


def remove_leftovers(paths: Iterable[Path]) -> int:
    """Delete ``paths`` (from ``stale_leftovers`` or ``stale_creations``); how many went.

    Each is renamed to a name of its own first (``.doomed.creating-<random>``, a leftover
    too where its removal is cut short): its writer, alive after all (stopped for an hour,
    or a clock ahead of the file server's), that renames it into place now finds it gone
    and its write is refused and offered again. Removed under its old name, the removal
    went on inside the live page it had become (rmtree works through open directories)."""
    removed = 0
    for path in paths:
        doomed = path.with_name(f".doomed{CREATING}{os.urandom(6).hex()}")
        try:
            os.rename(path, doomed)
        except OSError:  # gone, or moved by its writer: not ours to remove
            continue
        with contextlib.suppress(OSError):
            if doomed.is_dir() and not doomed.is_symlink():
                shutil.rmtree(doomed)
            else:
                doomed.unlink()
            removed += 1
    return removed


def is_empty_page(directory: Path) -> bool:
    """Whether the page ``directory`` holds nothing: no page.json, no key file (nor any other
    name a person could care for), no pending news. What an older tunebook killed while it
    created the page left; readers read it as a page without keys."""
    if any(name != HIDDEN for name in _scan(directory)):
        return False
    return not any(name.endswith(".json") for name in _scan(directory / HIDDEN / "pending"))


def _holds(path: Path, text: str) -> bool:
    """Whether the file at ``path`` is ``text`` already (a merge of a book into itself, or of
    news it has, rewrote every key file: 42 s of fsyncs for two 10,000-key books)."""
    try:
        raw = read_regular_file(path, MAX_ENTRY_BYTES)
    except (Unusable, OSError):
        return False
    return raw is not None and raw == text.encode("utf-8")


def remove_keys(directory: Path, key_texts: Iterable[str], lock_wait_s: float) -> None:
    """Remove these keys' files (and news pending for them) from the page, each under its
    lock: for the command line, which decided they go (a re-import of a file whose new
    version no longer lists them)."""
    from filelock import FileLock

    for text in key_texts:
        name = key_file_name(text)
        with FileLock(str(_hidden(directory, "locks") / f"{_stem(name)}.lock"), timeout=lock_wait_s):
            for path in [directory / name, *_pending(directory, name)]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def merge_key(directory: Path, meta: Mapping[str, Any], key_text: str, news: Entry) -> Entry:
    """Merge ``news`` into the key's file (what it holds stands); the entry as it now stands.

    Holds the key's lock for one read and one write; if another process holds it past
    KEY_LOCK_WAIT_S, the news goes to pending/ and the reader's view is returned at once.
    Raises OSError when nothing could be written (LeaveAlone where the file must stay as it
    is: a newer tunebook's, or the key grown past MAX_ENTRY_BYTES).

    The file written lists the ids of the pending news it folded in (``folded``), which are
    deleted after it: a writer killed in between leaves news that every reader and the next
    writer know is in the file already, so a count (``misses``) is not added twice.
    """
    from filelock import FileLock, Timeout  # deferred: keeps `import tunebook` light

    name = key_file_name(key_text)
    path = directory / name
    lock = FileLock(str(_hidden(directory, "locks") / f"{_stem(name)}.lock"), timeout=KEY_LOCK_WAIT_S)
    try:
        with lock:
            for stale in _hidden(directory, "tmp").glob(f"{glob_escape(name)}.*.tmp"):
                with contextlib.suppress(OSError):  # a writer of this key died mid-write
                    stale.unlink()
            if os.path.lexists(path) and _entry_of(path, meta, key_text) is None:
                _make_room(path, ENTRY_FORMAT)
            # Pending news that appears while this writer reads was visible before this write
            # is: fold it in too (it stands under this news), so that no reader sees a value
            # of it that this write then overturns. Left: news pending during the write itself.
            for _ in range(3):
                listed = _pending(directory, name)
                stored = _read_key(directory, meta, key_text, listed)
                if _pending(directory, name) == listed:
                    break
            merged = news.merged_over(stored)
            text = entry_text(merged, meta, folded=map(_news_id, listed))
            _fits(path, key_text, text, merged)
            _write(path, text, _hidden(directory, "tmp"))
            for done in listed:  # now in the key's file
                with contextlib.suppress(OSError):
                    done.unlink()
            return merged
    except Timeout:
        pending = _hidden(directory, "pending")
        stamp = f"{time.time_ns()}-{os.getpid()}-{next(_counter)}"
        text = entry_text(news, meta, news=True)
        _fits(path, key_text, text, news)
        _write(pending / f"{name[: -len('.json')]}.{stamp}.json", text, _hidden(directory, "tmp"))
        stored = read_key(directory, meta, key_text)
        return stored if stored is not None else news


def _fits(path: Path, key_text: str, text: str, entry: Entry) -> None:
    """Raise LeaveAlone unless ``text`` (what would be written for the key) is within the
    size every reader of a key's file accepts: past it, the key would read as nothing."""
    size = len(text.encode("utf-8"))
    if size > MAX_ENTRY_BYTES:
        raise LeaveAlone(too_large(path, key_text, size, len(entry.results)))


def too_large(path: Path, key_text: str, size: int, configs: int) -> str:
    # Not trimmed to fit: a process may have decided on any stored result ("what is stored
    # stands"), and a result dropped would be measured again by the next search of the key.
    return (
        f"{path}: key {key_text} would be {size} bytes, over the {MAX_ENTRY_BYTES}-byte limit every "
        f"reader of a key's file enforces, with its {configs} configs; it was not written (what it "
        "held before stands and is read as before; no stored result is dropped to make room, as a "
        "process may have chosen its winner from any of them). Keep fewer configs for this key: tune "
        "it with a shorter config list, or merge fewer books into it"
    )


def merge_entries(
    directory: Path,
    meta: Mapping[str, Any],
    entries: Mapping[str, Entry],
    written: dict[str, Entry] | None = None,
) -> tuple[dict[str, Entry], dict[str, LeaveAlone]]:
    """``merge_key`` for each entry: (the entries as they now stand, the keys whose file must
    be left alone, and why). A key left alone (a newer tunebook's file, say) does not stop
    the others. Raises OSError (LeaveAlone for the page's own page.json) at the first key
    whose write fails; ``written``, where given, is filled as the keys are written, so that
    a caller whose call raised knows which keys were written before (a serve-mode miss
    record offered again would count their misses twice)."""
    ensure_page(directory, meta)
    merged: dict[str, Entry] = {} if written is None else written
    left: dict[str, LeaveAlone] = {}
    for text, entry in entries.items():
        try:
            merged[text] = merge_key(directory, meta, text, entry)
        except LeaveAlone as exc:
            left[text] = exc
    return merged, left


def replace_page(
    directory: Path,
    meta: Mapping[str, Any],
    entries: Mapping[str, Entry],
    lock_wait_s: float,
    fold: Callable[[Entry, Entry], Entry] | None = None,
    done: Callable[[str, bool], None] | None = None,
) -> list[str]:
    """Write ``entries`` into the page as the command line decided them. Each key's file is
    replaced atomically under its lock (filelock's Timeout, a TimeoutError, past
    ``lock_wait_s``), and ``done(key text, changed)`` called once it is written, ``changed``
    False where the key's files already held what was decided (nothing rewritten, nothing
    folded in).

    ``fold(decided, found)``: what is on disk is read again under the key's lock and folded
    in (``merge``: the caller read the page long before, and another merge or a live
    autotuner may have written the key since; without this, its results were overwritten).
    It is applied to the key's file as it is now and to each other file of the key (a copy,
    a name that is not UTF-8: see ``key_files``), which then goes, its content being in the
    key's file. Without ``fold`` (an import that replaces keys) the entry stands as decided,
    and a key's other files go with the file it replaces (the readers of whole books would
    fold them back in). Either way news pending for the key (a
    live autotuner's) is folded in under the entry, which stands.

    Nothing else is removed: a key file the caller did not hold stays, and an unreadable
    one is kept aside. A key is not written, its file left as it is, where that file is a
    newer tunebook's (the caller could not read it), or where what would be written passes
    ``MAX_ENTRY_BYTES`` (no reader would read it back): returns why, one line a key left so.
    """
    from filelock import FileLock

    ensure_page(directory, meta)
    tmp = _hidden(directory, "tmp")
    # What writers killed long ago left in the page's tmp/. (Pages whose creation was killed,
    # in the book directory, are the command's to sweep, once: ``sweep_creations``; swept
    # here, a merge of 1,000 pages listed the book directory 1,000 times.)
    remove_leftovers(stale_leftovers(directory))
    own = {key_file_name(text): text for text in entries}
    others: dict[str, list[Path]] = {}
    unreadable: list[str] = []
    for name in sorted(_scan(directory)):  # each file not a written key's own, read once
        if not name.endswith(".json") or name.startswith(".") or name == PAGE_FILE or name in own:
            continue
        found = _entry_of(directory / name, meta, None)
        if found is None:
            unreadable.append(name)
        elif found[0] in entries and key_file_name(found[0]) != name:
            others.setdefault(found[0], []).append(directory / name)
    left_alone: list[str] = []
    for text, entry in entries.items():
        name = key_file_name(text)
        path = directory / name
        with FileLock(str(_hidden(directory, "locks") / f"{_stem(name)}.lock"), timeout=lock_wait_s):
            for stale in tmp.glob(f"{glob_escape(name)}.*.tmp"):
                with contextlib.suppress(OSError):  # a writer of this key died mid-write
                    stale.unlink()
            listed = _pending(directory, name)
            # Before the key's file (_news_then_file); under the key's lock, no writer folds
            # the news in between the two reads.
            news = _news(listed, meta, text)
            current = _key_file(path, meta, text) if os.path.lexists(path) else None
            if current is None and os.path.lexists(path):
                try:
                    _make_room(path, ENTRY_FORMAT)  # an unreadable file: kept aside
                except LeaveAlone as exc:
                    left_alone.append(str(exc))
                    continue
            done_ids = current[2] if current is not None else frozenset()
            decided = entry
            if fold is not None:
                # The key as readers see it now (written since read, perhaps), its pending
                # news folded in once; the caller read it with the same news in it, and
                # ``fold`` (merge's rule: the larger of two counts) keeps that news once:
                # folded in again on top, a book merged into itself added its misses twice.
                seen = _folded(current[1] if current is not None else None, news, done_ids)
                decided = fold(entry, seen) if seen is not None else entry
            folded: list[Path] = []
            for other in others.get(text, []):
                held = _entry_of(other, meta, None)
                if held is not None and held[0] == text:  # replaced as the key's file is, or folded
                    decided = fold(decided, held[1]) if fold is not None else decided
                    folded.append(other)
            final = decided if fold is not None else _folded(decided, news, done_ids)
            assert final is not None
            wanted = entry_text(final, meta, folded=map(_news_id, listed))
            size = len(wanted.encode("utf-8"))
            if size > MAX_ENTRY_BYTES:
                left_alone.append(too_large(path, text, size, len(final.results)))
                continue
            rewrite = not _holds(path, wanted)  # an unchanged key costs a read, not an fsync
            if rewrite:
                _write(path, wanted, tmp)
            changed = rewrite or bool(listed or folded)
            for done_path in [*listed, *folded]:  # now in the key's file
                with contextlib.suppress(OSError):
                    done_path.unlink()
        if done is not None:
            done(text, changed)
    for name in unreadable:
        if os.path.lexists(directory / name) and _entry_of(directory / name, meta, None) is None:
            with contextlib.suppress(LeaveAlone):  # a newer tunebook's file is left as it is
                _make_room(directory / name, ENTRY_FORMAT)
    return left_alone
