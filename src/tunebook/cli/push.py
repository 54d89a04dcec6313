"""``tunebook push``: send a book's results into the fleet's Redis book.

The autotuner writes each key it tunes to the Redis book (``TUNEBOOK_REDIS_URL``) as it
tunes; keys tuned while Redis was down, or on a machine that had no URL set, reach the
fleet only through this command. It reads the books as ``merge`` does (the inputs first
combined by measurement), then merges each page into Redis by the fleet's own rule: what
Redis already holds stands per (key, config), as every host's writes do, so a push never
replaces a result the fleet holds; it adds the keys and configs Redis lacks (a faster added
config then wins, as when a host measures it). Miss counts are sent as far as Redis lacks
them, so pushing a book twice counts its misses once.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from .._book.records import Document
from ._common import err, out
from ._ticker import Ticker
from .merge import fail_if_skipped, read_books, skipped_inputs

# A push is a person's command, not a kernel call: it may wait for a busy server, where the
# store's defaults (50 ms) keep a serving process from ever waiting on the fleet.
_CONNECT_S, _READ_S, _REQUEST_S = 5.0, 10.0, 60.0
# Keys sent in one transaction: a large page is several small requests, each bounded.
_KEYS_A_REQUEST = 64


def _store(url: str) -> Any:
    from .._book.redis_store import RedisStore, redacted, url_problem

    try:
        problem = url_problem(url)
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    if problem is not None:
        raise click.ClickException(
            f"cannot use the Redis book at {redacted(url)}: {problem}; give a URL such as "
            "redis://book-host:6379/0"
        )
    return RedisStore(
        url, connect_timeout=_CONNECT_S, read_timeout=_READ_S, request_timeout=_REQUEST_S, keeps_unsent=False
    )


def _push(store: Any, name: str, doc: Document, sent: Ticker) -> tuple[int, int]:
    """(keys new to the fleet, keys sent) for one page; raises ClickException when Redis
    refuses. ``sent`` counts the keys sent, request by request (progress, and an interruption)."""
    identity = {"kernel": doc.kernel, "platform": doc.platform}
    names = sorted(doc.entries)
    new = 0
    for start in range(0, len(names), _KEYS_A_REQUEST):
        chunk = names[start : start + _KEYS_A_REQUEST]
        held = store.fetch(name, chunk, expected=identity)
        fleet = held.entries if held is not None and held.kernel.get("hash") == doc.kernel.get("hash") else {}
        # New to the fleet: a key it holds no result for (a recorded miss there is none).
        new += sum(1 for k in chunk if doc.entries[k].results and not (k in fleet and fleet[k].results))
        # Redis adds up the miss counts it is sent (each process sends its own once): the
        # part of ours it lacks, so that a second push of the same book adds nothing.
        part = Document(
            doc.kernel,
            doc.platform,
            {
                k: replace(doc.entries[k], misses=max(0, doc.entries[k].misses - fleet[k].misses))
                if k in fleet
                else doc.entries[k]
                for k in chunk
            },
        )
        if store.merge(name, part) is None:
            # The store logged the error itself, above.
            why = store.last_failure or (
                "it is unreachable" if not store.available else "it refused the write"
            )
            raise click.ClickException(
                f"could not write {name} to the Redis book at {store.shown}: {why} (the reason is "
                f"above); {start} of its {len(names)} keys were written. Nothing else was changed; "
                "run the command again once Redis answers"
            )
        sent.add(len(chunk))
    return new, len(names)


@click.command("push")
@click.argument("books", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--redis",
    "url",
    metavar="URL",
    help="The fleet's Redis book (default: TUNEBOOK_REDIS_URL), e.g. redis://book-host:6379/0.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be sent; send nothing.")
def command(books: tuple[Path, ...], url: str | None, dry_run: bool) -> None:
    """Send the results of BOOKS (default: TUNEBOOK_DIR) into the fleet's Redis book.

    Keys tuned while Redis was down, or on a machine without TUNEBOOK_REDIS_URL, reach the
    fleet this way. What Redis already holds stands per (key, config), as every host's own
    writes do: a push adds the keys and configs the fleet lacks (an added config that is
    faster then wins, as when a host measures it) and never replaces a result it holds.
    Exit status 1 if an input file was skipped (each is named; the rest is sent).
    """
    url = url or os.environ.get("TUNEBOOK_REDIS_URL") or None
    if not url:
        raise click.UsageError(
            "no Redis book named: pass --redis redis://HOST:6379/0 or set TUNEBOOK_REDIS_URL"
        )
    store = _store(url)  # a malformed URL, or no redis-py, before the books are read
    sources = books or (None,)  # None: TUNEBOOK_DIR
    merged, _, skipped = read_books(sources, sources, "sent")
    console = out()
    if dry_run:
        for name in sorted(merged):
            console.print(f"would send {escape(name)} ({len(merged[name].entries)} keys)")
        fail_if_skipped(skipped)
        return
    new_keys = 0
    sent = Ticker("push", sum(len(doc.entries) for doc in merged.values()), "keys sent")
    try:
        for name in sorted(merged):
            new, count = _push(store, name, merged[name], sent)
            new_keys += new
            console.print(f"sent {escape(name)} ({count} keys, {new} new to the fleet)")
    except KeyboardInterrupt:
        err().print(
            f"interrupted: {sent.done} of {sent.total} keys were sent to {escape(store.shown)}, each "
            "request an atomic merge; running the push again is safe (what the fleet holds stands)",
            highlight=False,
        )
        raise click.exceptions.Exit(130) from None
    pages = f"{len(merged)} page{'s' * (len(merged) != 1)}"
    console.print(
        f"pushed {pages} into {escape(store.shown)}: {new_keys} keys the fleet lacked"
        + skipped_inputs(skipped)
    )
    fail_if_skipped(skipped, "The rest was sent")
