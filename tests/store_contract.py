"""What every book store is tested with: documents to merge, and each store's way to be made,
broken and planted with garbage (tests/test_stores.py runs the one contract over them all)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunebook._book import Document, Entry, Result, config_id, config_record

FILE = "add_kernel--0123456789abcdef--cpu--fedcba9876543210.json"
KERNEL = {"name": "add_kernel", "hash": "abc", "key": ["n"]}


def doc(
    key: int, timings: dict[int, float], seconds: float = 1.0, stamp: str = "2026-11-21T05:00:00Z"
) -> Document:
    """A document holding one key of ``add_kernel``, with a timing per BLOCK."""
    results = {}
    for block, ms in timings.items():
        record = config_record({"BLOCK": block}, {"num_warps": 4})
        results[config_id(record)] = Result(record, (ms, ms, ms), None, stamp)
    entry = Entry((key, "torch.float32"), results, seconds, stamp, stamp, "0.1.0")
    return Document(KERNEL, {"backend": "cpu", "id": "p"}, {json.dumps([key, "torch.float32"]): entry})


@dataclass
class StoreKind:
    """How the contract suite gets one kind of store.

    ``make()`` a working store; ``broken()`` one that cannot write (a read-only directory,
    a server nobody listens on); ``plant(raw)`` puts undecodable bytes where ``FILE`` is
    kept; ``child`` is Python source, with ``{spec}`` formatted in, that builds the same
    store in another process as ``store``.
    """

    name: str
    make: Callable[[], Any]
    broken: Callable[[], Any]
    plant: Callable[[bytes], None]
    child: str
    spec: str


def _plant_files(books: Path, raw: bytes) -> None:
    """Garbage where a directory keeps FILE: as a format-1 file, and as its page's page.json."""
    page = books / FILE.removesuffix(".json")
    page.mkdir(parents=True, exist_ok=True)
    (books / FILE).write_bytes(raw)
    (page / "page.json").write_bytes(raw)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every regular file under ``directory``, by relative path: what a store left on disk."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def directory_kind(root: Path) -> StoreKind:
    from tunebook._book import DirectoryStore

    books = root / "books"
    blocked = root / "a-file"
    blocked.write_text("not a directory")
    return StoreKind(
        "directory",
        make=lambda: DirectoryStore(books),
        broken=lambda: DirectoryStore(
            blocked / "books"
        ),  # under a regular file: never writable, even as root
        plant=lambda raw: _plant_files(books, raw),
        child="from tunebook._book import DirectoryStore\nstore = DirectoryStore({spec!r})",
        spec=str(books),
    )


def redis_kind(url: str, dead_url: str) -> StoreKind:
    from tunebook._book.redis_store import KEY_PREFIX, RedisStore

    def plant(raw: bytes) -> None:
        import redis

        redis.Redis.from_url(url).hset(KEY_PREFIX + FILE, mapping={"meta": raw, "[64]": b"[]"})

    patient = {"connect_timeout": 2.0, "read_timeout": 2.0}
    return StoreKind(
        "redis",
        make=lambda: RedisStore(url, **patient),
        broken=lambda: RedisStore(dead_url, connect_timeout=0.2, read_timeout=0.2),
        plant=plant,
        child="from tunebook._book.redis_store import RedisStore\n"
        "store = RedisStore({spec!r}, read_timeout=2.0, connect_timeout=2.0)",
        spec=url,
    )
