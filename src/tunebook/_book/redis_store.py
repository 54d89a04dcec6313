"""A book shared by a fleet, kept in Redis (optional extra: ``pip install 'tunebook[redis]'``).

One Redis hash per book file, at ``tunebook:book:<file name>``: the field ``meta`` holds
the document's ``{"kernel": ..., "platform": ...}`` and every other field is one entry,
named by its key text and holding the entry's JSON exactly as a book file holds it. A
request reads and writes the fields of the keys it is about (HMGET, HSET), so it costs
one key's bytes whatever the size of the book.

Contract:

* **Never raises to the caller, never stalls it.** Every Redis error or timeout (connect
  and read timeouts default to 50 ms) makes ``fetch`` / ``merge`` return None. Each call
  is bounded as a whole, not per socket read: at most ``request_timeout`` seconds (default
  0.25) and ``max_reply_bytes`` received (default: a book file's limit), so a peer that
  keeps sending (an endless reply, a huge value trickled in) costs a bounded wait and
  bounded memory, and counts as an outage. The first
  failure of an outage is logged once (logger ``"tunebook"``), and the store then does not
  touch the network for ``retry_after_s`` (a circuit breaker), so a dead Redis costs a
  kernel call a clock read, not a timeout. After that the next call probes again and, if
  Redis answers, the store resumes and logs that it did. The time budget is
  TUNEBOOK_REDIS_TIMEOUT_S for the process's shared store (connect and read timeouts a
  fifth of it). Only an unreachable or silent server is an outage: a reply past the byte
  budget, or a merge that kept meeting other writers, fails that request alone.
* **What a merge could not send is held and sent again** (:mod:`redis_outbox`):
  by the next request that finds Redis answering once ``retry_after_s`` has passed, by a
  daemon thread while anything is held (hits never ask the store), and at exit (at most
  EXIT_FLUSH_S; what stays unsent is a BookWarning naming ``tunebook push``).
* **Merges are atomic on the server and lose nothing.** ``merge`` runs an optimistic
  transaction (WATCH the hash, read it, merge in Python with :meth:`Document.merged_over`,
  MULTI/EXEC the changed fields) and retries when another writer got in between (each try
  its own request, with jittered pauses, for up to _CONFLICT_S), so the
  rule is the one a book file follows: what is already stored stands per (key, config id).
* **What is read is validated** like a book file (:meth:`Document.from_json`); a field that
  does not validate is skipped with one warning, and the next merge of it keeps it aside in
  ``<hash key>:corrupt-keys`` (as ``<field>@<time>-<pid>-<n>``) and writes over it. A hash
  whose ``meta`` is unreadable is skipped by a reader that does not say which identity it
  expects; one that does (the autotuner: the hash's name is its kernel's and platform's)
  reads its keys anyway, and the next merge rewrites ``meta`` from the news it writes. A
  value under the hash's name that is no page of the writer's kernel version (a ``meta``
  naming another kernel hash, or not a hash at all) is renamed aside whole by the next
  merge, to ``<hash key>:foreign-<time>-<pid>-<n>``, as a foreign page directory is.
* **Thread- and process-safe.** redis-py's connection pool is thread-safe and resets itself
  in a forked child; the breaker's state is guarded by a lock.

Example (needs a running redis-server)::

    store = RedisStore("redis://127.0.0.1:6379/0")
    store.merge("add--abc--cuda--def.json", doc)   # -> the stored document, or None
    store.fetch("add--abc--cuda--def.json")        # -> Document | None
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import json
import logging
import os
import random
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

from .. import _settings
from .._errors import BookFormatError
from .._forksafe import lock_for, renew_lock
from .._jsonio import strict_loads
from .._optional import install_line, require
from .._warnings import warn_once
from .files import MAX_BOOK_BYTES
from .records import FORMAT, VERSION, Document, Entry
from .redis_outbox import Outbox

log = logging.getLogger("tunebook")

INSTALL_HINT = install_line("redis")
KEY_PREFIX = "tunebook:book:"
_META = "meta"
# Optimistic transactions retry when another writer touched the same book meanwhile; fleet
# writes are rare (one per newly tuned key), so a few tries settle all but pathological races.
_MAX_TRIES = 64
# A merge that keeps meeting other writers gives up after this long (each try is a request of
# its own, with the whole request budget): the result then waits in the store's outbox.
_CONFLICT_S = 2.0
# The most the interpreter's exit waits to send what an outage or contention held back.
EXIT_FLUSH_S = 5.0


class _Contended(Exception):
    """A merge met other writers at every try until its conflict budget ran out: the server
    answers (no outage); the result is held and sent again later."""


# What a server answers when the URL's settings are wrong, not when it is in trouble.
_SETTING_ERRORS = ("DB index is out of range", "NOAUTH", "WRONGPASS", "invalid password")
# What a server answers when it is set up so that it cannot hold the book: each is said as a
# BookWarning once, with the fix (a log line, which nobody sees by default, said nothing while
# every result stayed local and the outbox retried every few seconds).
_SERVER_SETUP_ERRORS = {  # redis-py's exception class -> what to do
    "ReadOnlyError": "it is a read-only replica; point TUNEBOOK_REDIS_URL at the primary",
    "OutOfMemoryError": "it is full (maxmemory, with a policy that evicts nothing); raise its "
    "maxmemory, or give the book a server of its own",
}


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``: messages and logs never carry it."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _check_db(url: str) -> None:
    """A database number redis-py would not read as one (``/abc`` was database 0, silently)."""
    parts = urllib.parse.urlsplit(url)
    path = "" if parts.scheme == "unix" else parts.path.strip("/")  # a socket's path is a file
    db = urllib.parse.parse_qs(parts.query).get("db", [path])[0]
    if db and not db.isdigit():
        raise ValueError(f"the database {db!r} is not a number (redis://host:6379/0 names database 0)")


def url_problem(url: str) -> str | None:
    """Why redis-py would not take ``url`` (None: it would), for a command line to say before
    it opens a store (whose own word for it is a warning that names TUNEBOOK_REDIS_URL)."""
    redis = _import_redis()
    try:
        redis.Redis.from_url(url)  # parses; connects only at the first request
        _check_db(url)
    except ValueError as exc:
        return str(exc)
    return None


def _import_redis() -> Any:
    redis = require("redis", feature="tunebook's shared fleet book (TUNEBOOK_REDIS_URL)", extra="redis")
    importlib.import_module("redis.backoff")
    importlib.import_module("redis.retry")
    return redis


# ----------------------------------------------------------------------- budgets
#
# redis-py's socket_timeout bounds each read, not a request: a peer that sends a byte every
# 40 ms, or an endless reply, keeps a call waiting (150 s and 2.5 GB were seen). So every
# store call runs under a budget of time and bytes, kept per thread, which the sockets of
# this store's connections charge on every read.

_budget = threading.local()


class _OverBudget(OSError):
    """A reply ran past the call's byte budget: redis-py drops the connection (ConnectionError)."""


def _charge(received: int) -> None:
    left = getattr(_budget, "bytes_left", None)
    if left is not None:
        _budget.bytes_left = left - received
        if _budget.bytes_left < 0:
            _budget.over = True  # the reply's size, not the server's health: no outage (_guarded)
            raise _OverBudget(f"the reply ran past {_budget.bytes_limit} bytes; not a book")


class _BudgetSocket:
    """A connected socket whose reads stop at the calling thread's deadline and byte budget."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._timeout = sock.gettimeout()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, value: float | None) -> None:
        self._timeout = value
        self._sock.settimeout(value)

    def _arm(self) -> None:
        deadline = getattr(_budget, "deadline", None)
        if deadline is None:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request ran past its time budget")  # socket.timeout, to redis-py
        self._sock.settimeout(remaining if self._timeout is None else min(self._timeout, remaining))

    def recv(self, *args: Any) -> bytes:
        self._arm()
        data: bytes = self._sock.recv(*args)
        _charge(len(data))
        return data

    def recv_into(self, *args: Any) -> int:
        self._arm()
        n: int = self._sock.recv_into(*args)
        _charge(n)
        return n


def _budgeted(connection_class: Any) -> type:
    """``connection_class`` whose sockets charge the calling thread's budget."""

    def _connect(self: Any) -> Any:
        return _BudgetSocket(connection_class._connect(self))

    return type(f"Budgeted{connection_class.__name__}", (connection_class,), {"_connect": _connect})


# HSCAN's COUNT: fields a step of a bounded listing asks for (Redis may return a few more).
_SCAN_STEP = 512

# A listing by HKEYS (a server before Redis 7.4, which has no HSCAN NOVALUES) reads every
# name of the page, names only: ~45 bytes a key, ~4 us a key to parse here (200,000 keys took
# 0.32 s). It runs once per page and process, and gets this many request budgets of time.
_HKEYS_BUDGETS = 4


def _hscan_takes_no_values(client: Any) -> bool:
    """Whether this redis-py's ``hscan`` can ask for names only (``no_values``, redis-py 5.1)."""
    try:
        return "no_values" in inspect.signature(client.hscan).parameters
    except (TypeError, ValueError):
        return False


# One store per (process, URL): every page of a process shares its connection pool and,
# above all, its breaker, so an outage is detected, logged and waited out once, not once
# per kernel. Keyed by pid too, so a forked child builds its own instead of inheriting
# a lock or breaker state from its parent.
_shared_stores: dict[tuple[int, str], RedisStore | None] = {}
_shared_lock = threading.Lock()
renew_lock(globals(), "_shared_lock", threading.Lock)


def shared_store(url: str) -> RedisStore | None:
    """This process's store for the Redis book at ``url``; None if redis-py is missing.

    A missing redis-py is reported once (with the ``pip install`` line) and the book goes
    on without its shared layer: a deployment mistake must not fail kernel calls.
    """
    cache_key = (os.getpid(), url)
    with _shared_lock:
        if cache_key not in _shared_stores:
            try:
                timeout = _settings.redis_timeout_s()
                _shared_stores[cache_key] = RedisStore(
                    url, connect_timeout=timeout / 5, read_timeout=timeout / 5, request_timeout=timeout
                )
            except ImportError as exc:
                warn_once(
                    f"redis-import:{url}",
                    # the install line ends the message, on a line of its own, ready to copy
                    "tunebook: TUNEBOOK_REDIS_URL is set but the shared book cannot be used; carrying on "
                    "with the local book only. %s",
                    exc,
                )
                _shared_stores[cache_key] = None
        return _shared_stores[cache_key]


# Every store of this process, for the exit's last try at sending what outages held back.
_live: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def send_unsent_at_exit(timeout_s: float = EXIT_FLUSH_S) -> int:
    """At the interpreter's exit: try once (at most ``timeout_s`` in all) to send the results
    outages or contention held back, and say how many stay unsent and how to send them.
    Returns that number."""
    deadline = time.monotonic() + timeout_s
    left = 0
    for store in list(_live):
        if store.unsent_results():
            unsent = store.send_unsent(probe=True, deadline=deadline)
            if unsent:
                left += unsent
                warn_once(  # a BookWarning: the fleet lacks them until a person acts
                    f"redis:{store.url}:unsent-at-exit",
                    "tunebook: %d result%s tuned by this process did not reach the Redis book at %s "
                    "(%s); they are in the local book: send them with `tunebook push` (it reads "
                    "TUNEBOOK_DIR and TUNEBOOK_REDIS_URL; --redis URL to name another)",
                    unsent,
                    "s" * (unsent != 1),
                    store.shown,
                    store.last_failure or "not sent",
                )
    return left


atexit.register(send_unsent_at_exit)


class RedisStore:
    """Book files kept in Redis, shared by every process that points at the same server.

    ``clock`` exists for tests of the breaker; it must be monotonic. ``keeps_unsent``: hold
    what a merge could not send and send it again later (False: a command that reports the
    failure itself, ``tunebook push``).
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 0.05,
        read_timeout: float = 0.05,
        request_timeout: float = 0.25,
        max_reply_bytes: int = MAX_BOOK_BYTES,
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        keeps_unsent: bool = True,
    ) -> None:
        redis = _import_redis()  # the only exception the store lets out: a missing extra
        self.url = url
        self.shown = redacted(url)  # what messages print: never the password
        self.retry_after_s = retry_after_s
        self.request_timeout = max(request_timeout, connect_timeout, read_timeout)
        self.max_reply_bytes = max_reply_bytes
        self._clock = clock
        self._lock = lock_for(self, threading.Lock)  # renewed in a forked child (_forksafe)
        self._open_until: float | None = None  # breaker open (Redis deemed down) until then
        # what a merge could not send is this store's to send again (Layer.push reads it)
        self.keeps_unsent = keeps_unsent
        self.conflicts = 0  # merges retried because another writer got in first (for reports)
        # What merges could not send (an outage, contention), sent again later (redis_outbox.py)
        self.outbox = Outbox(self._send_held, lambda: self.available, clock, retry_after_s)
        self._names_by: str | None = None  # how this server lists names: "novalues" or "hkeys"
        self.last_failure = ""  # why the last failed request failed, in words (for the CLI)
        # Connection-level failures open the breaker; a server that answers with an error
        # (a wrong type at our key, a read-only replica) is up, and only this call fails.
        self._down: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._timeouts: tuple[type[BaseException], ...] = (redis.TimeoutError, TimeoutError)
        self._response_error: type[BaseException] = redis.ResponseError
        self._refused: type[BaseException] = redis.AuthenticationError  # a ConnectionError too
        self._watch_error: type[BaseException] = redis.WatchError
        try:
            _check_db(url)
            self._client: Any = redis.Redis.from_url(
                url,
                socket_connect_timeout=connect_timeout,
                socket_timeout=read_timeout,
                # redis-py retries with backoff by default; the breaker is our retry policy,
                # and a kernel call must never wait out someone else's backoff.
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
                retry_on_timeout=False,
            )
            pool = self._client.connection_pool
            pool.connection_class = _budgeted(pool.connection_class)
        except ValueError as exc:  # a malformed URL: this store stays off, the kernel runs on
            self._client = None
            # A BookWarning too, as a missing redis-py or a TUNEBOOK_PATH entry that does not
            # exist: a typo in the setting, not an outage, and no later message would tell.
            warn_once(
                f"redis:{url}:url",
                "tunebook: ignoring the Redis book at %r (TUNEBOOK_REDIS_URL): %s; the fleet book is "
                "off in this process. Fix the URL (e.g. redis://book-host:6379/0) or unset it",
                self.shown,
                exc,
            )

        _live.add(self)

    def __repr__(self) -> str:
        return f"RedisStore({self.shown!r})"

    # ------------------------------------------------------------------ public

    def fetch(
        self,
        file_name: str,
        keys: Collection[str] | None = None,
        *,
        max_names: int | None = None,
        expected: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Document | None:
        """The stored document for ``file_name`` (only ``keys``, when given; ``keys=()``: its
        index, of at most ``max_names`` names); None if absent, unreadable or Redis is down.
        One request: HGETALL, HMGET of the keys and ``meta``, or ``meta`` and HLEN then HKEYS
        (a hash of at most ``max_names`` keys) or HSCAN until ``max_names`` names came.
        ``expected``: the identity the caller opened ``file_name`` for, taken where ``meta``
        is unreadable (the hash's name is that identity's: its kernel id and platform id)."""
        return self._guarded(
            lambda client: self._read(client, KEY_PREFIX + file_name, file_name, keys, max_names, expected)
        )

    def merge(self, file_name: str, doc: Document) -> Document | None:
        """Merge ``doc`` into the stored one (stored results stand); return the result or None.

        None: not sent now. The news is then held (with what was held for ``file_name``
        before, which every merge of the file sends along) and sent again later: see
        :meth:`send_unsent`."""
        held = self.outbox.take(file_name)
        news = doc.merged_over(held) if held is not None else doc
        result = self._guarded(lambda client: self._merge(client, KEY_PREFIX + file_name, file_name, news))
        if result is None and self._client is not None and self.keeps_unsent:
            self.outbox.hold(file_name, news)
        return result

    def held(self, file_name: str) -> dict[str, Entry]:
        """What merges could not send of ``file_name`` yet, by key text (its outbox holds it)."""
        return self.outbox.held(file_name)

    def unsent(self, file_name: str | None = None) -> frozenset[str]:
        """The key texts held for ``file_name`` (every file's, as ``file:key``, when None)."""
        return frozenset(self.held(file_name)) if file_name is not None else self.outbox.keys()

    def unsent_results(self) -> int:
        """How many results (key, config) this process holds for Redis, unsent."""
        return self.outbox.results()

    def send_unsent(self, *, probe: bool = False, deadline: float | None = None) -> int:
        """Send what merges held back (:class:`Outbox`); the results still unsent after it."""
        return self.outbox.send(probe=probe, deadline=deadline)

    def _send_held(self, file_name: str, news: Document, probe: bool, deadline: float | None) -> bool:
        call = functools.partial(
            self._merge, key=KEY_PREFIX + file_name, file_name=file_name, news=news, deadline=deadline
        )
        return self._guarded(call, probe=probe) is not None

    @property
    def available(self) -> bool:
        """False while the breaker is open (Redis failed less than ``retry_after_s`` ago)."""
        with self._lock:
            return self._client is not None and (
                self._open_until is None or self._clock() >= self._open_until
            )

    # ------------------------------------------------------------------ breaker

    def _guarded(self, call: Callable[[Any], Document | None], *, probe: bool = False) -> Document | None:
        """``call`` under the request's budgets and the breaker (``probe``: even while it is
        open). Only a server that cannot be reached, or does not answer in time, is an outage
        (the breaker opens); a reply past the byte budget, or a merge that kept meeting other
        writers, fails this request alone."""
        with self._lock:
            if self._client is None:
                return None
            was_open = self._open_until is not None
            if was_open and not probe and self._clock() < self._open_until:  # type: ignore[operator]
                return None
        try:
            _budget.deadline = time.monotonic() + self.request_timeout
            _budget.bytes_left = _budget.bytes_limit = self.max_reply_bytes
            _budget.over = False
            result = call(self._client)
        except _Contended:
            self.last_failure = "other writers kept changing the page"
            if self.keeps_unsent:  # else the caller (tunebook push) reports it, with what to do
                self._warn(
                    "contended",
                    "tunebook: gave up merging into the Redis book at %s after %.0f s of contended "
                    "tries (many processes writing one page at once); the result stays in the local "
                    "book and is sent again later",
                    self.shown,
                    _CONFLICT_S,
                )
            return None
        except self._down as exc:
            if getattr(_budget, "over", False):  # the server answered, with more than a book holds
                self.last_failure = f"a reply ran past {self.max_reply_bytes} bytes"
                self._warn(
                    "oversize",
                    "tunebook: a reply of the Redis book at %s ran past %d bytes (larger than any book "
                    "file may be); that request is skipped, the book stays in use",
                    self.shown,
                    self.max_reply_bytes,
                )
                return None
            with self._lock:
                first = self._open_until is None
                self._open_until = self._clock() + self.retry_after_s
            if isinstance(exc, self._refused):  # up, but not ours to use: a setting's mistake
                self.last_failure = "authentication failed"
                self._warn(
                    "refused",
                    "tunebook: the Redis book at %s refused tunebook's credentials (%s: %s); carrying on "
                    "with the local book. Fix the user and password in TUNEBOOK_REDIS_URL "
                    "(redis://USER:PASSWORD@host:6379/0)",
                    self.shown,
                    type(exc).__name__,
                    exc,
                    warn=True,
                )
                return None
            if isinstance(exc, self._timeouts):
                self.last_failure = f"it did not answer within {self.request_timeout:g} s"
                how = f"did not answer within {self.request_timeout:g} s (TUNEBOOK_REDIS_TIMEOUT_S)"
            else:
                self.last_failure = "it is unreachable"
                how = "is unreachable"
            if first:
                log.warning(
                    "tunebook: the Redis book at %s %s (%s: %s); carrying on with the local "
                    "book and trying Redis again every %.0f s",
                    self.shown,
                    how,
                    type(exc).__name__,
                    exc,
                    self.retry_after_s,
                )
            else:
                log.debug("tunebook: the Redis book at %s still %s: %s", self.shown, how, exc)
            return None
        except Exception as exc:  # the contract: nothing from the shared book reaches a kernel call
            setup = _SERVER_SETUP_ERRORS.get(type(exc).__name__)
            setting = setup is not None or any(text in str(exc) for text in _SETTING_ERRORS)
            self.last_failure = f"{type(exc).__name__}: {exc}"
            self._warn(  # a wrong db, a missing password or a server that cannot hold the book: a BookWarning
                f"error:{type(exc).__name__}:{str(exc)[:24]}",
                "tunebook: the Redis book at %s failed (%s: %s); carrying on with the local book%s",
                self.shown,
                type(exc).__name__,
                exc,
                f": {setup}" if setup else ". Fix TUNEBOOK_REDIS_URL" if setting else "",
                warn=setting,
            )
            return None
        finally:
            _budget.deadline = _budget.bytes_left = None
            _budget.over = False
        if was_open:
            with self._lock:
                reopened = self._open_until is not None
                self._open_until = None
            if reopened:
                log.info("tunebook: the Redis book at %s is reachable again", self.shown)
        self.outbox.send_if_due()
        return result

    def _warn(self, tag: str, message: str, *args: object, warn: bool = False) -> None:
        # Logged, not a BookWarning, unless the setting is wrong (``warn``): the fleet book is an
        # optional layer, and its outages are reported by the breaker (once per outage) already.
        warn_once(f"redis:{self.url}:{tag}", message, *args, warn=warn)

    # ------------------------------------------------------------------ documents

    def _read(
        self,
        client: Any,
        key: str,
        file_name: str,
        keys: Collection[str] | None,
        max_names: int | None,
        expected: Mapping[str, Mapping[str, Any]] | None,
    ) -> Document | None:
        if keys is None:
            return self._load(client.hgetall(key), file_name, expected)
        if not keys:
            with client.pipeline(transaction=False) as pipe:
                pipe.hget(key, _META)
                pipe.hlen(key)
                meta, size = pipe.execute()
            doc = self._load({_META.encode(): meta} if meta is not None else {}, file_name, expected)
            if doc is None:
                return None
            names = self._names(client, key, size, max_names)
            index = frozenset(n.decode("utf-8", "replace") for n in names if n != _META.encode())
            return Document(doc.kernel, doc.platform, {}, index)
        return self._load(self._fields(client, key, keys), file_name, expected)

    def _names(self, client: Any, key: str, size: int, max_names: int | None) -> list[bytes]:
        """The field names of the hash at ``key`` (``size`` fields, ``meta`` included), names
        only, never the values: all of them (HKEYS) when they are at most ``max_names`` keys,
        else ``max_names`` of them, the same for every client of the hash in one state: the
        first in HSCAN's order, by HSCAN NOVALUES (Redis 7.4; HSCAN without it sends every
        value too, and a page of large entries ran past the reply's byte budget), or, on an
        older server, the first in sorted order (every name is read by HKEYS: see _HKEYS_BUDGETS)."""
        if max_names is None or size <= max_names + 1:
            return self._hkeys(client, key)
        meta = _META.encode()
        if self._names_by != "hkeys" and _hscan_takes_no_values(client):
            names: list[bytes] = []
            cursor = 0
            try:
                while True:
                    cursor, fields = client.hscan(
                        key, cursor, count=min(_SCAN_STEP, max_names), no_values=True
                    )
                    names += [n for n in fields if n != meta]
                    if len(names) >= max_names or not cursor:
                        self._names_by = "novalues"
                        return names[:max_names]
            except self._response_error:  # a server before 7.4: "syntax error", asked once
                if self._names_by == "novalues":
                    raise
        self._names_by = "hkeys"  # sorted: HKEYS' order moves while the server rehashes the hash
        return sorted(n for n in self._hkeys(client, key) if n != meta)[:max_names]

    def _hkeys(self, client: Any, key: str) -> list[bytes]:
        deadline = time.monotonic() + _HKEYS_BUDGETS * self.request_timeout
        _budget.deadline = max(_budget.deadline or 0.0, deadline)
        return list(client.hkeys(key))

    def _fields(
        self, client: Any, key: str, keys: Collection[str], *, measured: bool = False
    ) -> dict[bytes, bytes]:
        """``meta`` and the fields of ``keys`` that are stored, as HGETALL would give them,
        but for a field larger than a reply may carry (``max_reply_bytes``), which is left
        unread and said once: one such field failed every read of its key, and every merge
        into it, for good (a smaller one that is no entry is read, and kept aside as corrupt).
        ``measured``: measure the fields before reading them (a merge,
        which then writes over such a field); else only once a reply ran past the budget."""
        names = [_META, *keys]
        if measured:
            names = self._not_oversized(client, key, names)
        try:
            values = client.hmget(key, names) if names else []
        except self._down:
            if measured or not getattr(_budget, "over", False):
                raise
            _budget.over, _budget.bytes_left = False, self.max_reply_bytes  # a new read
            names = self._not_oversized(client, key, names)
            values = client.hmget(key, names) if names else []
        return {n.encode(): v for n, v in zip(names, values) if v is not None}

    def _not_oversized(self, client: Any, key: str, names: list[str]) -> list[str]:
        """``names`` but those whose stored value is larger than a reply may carry (HSTRLEN,
        one request a field: a merge's few keys, or a read that already failed)."""
        kept = []
        for name in names:
            size = int(client.hstrlen(key, name))
            if size <= self.max_reply_bytes:
                kept.append(name)
                continue
            self._warn(
                f"oversized:{key}:{name}",
                "tunebook: the Redis book at %s holds %s's entry for key %s of %d bytes, more than "
                "a reply may carry (%d): it is left unread, and the key's next result tuned "
                "replaces it",
                self.shown,
                key,
                name,
                size,
                self.max_reply_bytes,
                warn=True,
            )
        return kept

    def _load(
        self, fields: dict[bytes, bytes], file_name: str, expected: Mapping[str, Mapping[str, Any]] | None
    ) -> Document | None:
        """A stored hash as a validated Document; None if empty or its meta is unreadable
        (and no identity is ``expected``)."""
        return self._parse(fields, file_name, expected)[0]

    def _parse(
        self, fields: dict[bytes, bytes], file_name: str, expected: Mapping[str, Mapping[str, Any]] | None
    ) -> tuple[Document | None, list[bytes], bool]:
        """(the stored hash as a validated Document, or None if it is empty or its ``meta`` is
        unreadable and no identity is ``expected``; the fields of keys that could not be
        read; whether ``meta`` was readable). An unreadable key's field is left out of the
        document, never the hash's other keys (warned once each way)."""
        if not fields:
            return None, [], False
        meta_ok = True
        # ValueError covers BookFormatError, bad JSON and bad UTF-8; OverflowError an integer
        # beyond float range in a timing.
        unreadable = (ValueError, OverflowError, RecursionError)
        try:
            meta = strict_loads(fields.get(_META.encode(), b"null"))
            if not isinstance(meta, dict):
                raise BookFormatError("the 'meta' field is missing or not an object")
            doc = Document.from_json(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "kernel": meta.get("kernel"),
                    "platform": meta.get("platform"),
                    "entries": {},
                }
            )
        except unreadable as exc:
            if expected is None:
                self._warn(
                    f"read:{file_name}",
                    "tunebook: skipping the Redis book %s at %s: %s",
                    file_name,
                    self.shown,
                    exc,
                )
                return None, [], False
            # Its keys stand without it: the caller asked for this name, which is its kernel's
            # and platform's (their ids), and the next merge rewrites the meta field.
            self._warn(
                f"read:{file_name}",
                "tunebook: the 'meta' field of the Redis book %s at %s is unreadable (%s); its keys "
                "were read as the kernel and platform this process asked for, and the next write "
                "rewrites it",
                file_name,
                self.shown,
                exc,
            )
            doc = Document(dict(expected["kernel"]), dict(expected["platform"]), {})
            meta_ok = False
        entries: dict[str, Entry] = {}
        bad: list[bytes] = []
        for name, value in fields.items():
            if name == _META.encode():
                continue
            try:
                text = name.decode("utf-8")
                entries[text] = Entry.from_json(strict_loads(value), f"entries[{text!r}]")
            except unreadable as exc:
                bad.append(name)
                self._warn(
                    f"read:{file_name}:key",
                    "tunebook: skipping the unreadable key %s of the Redis book %s at %s: %s",
                    name.decode("utf-8", "replace"),
                    file_name,
                    self.shown,
                    exc,
                )
        return replace(doc, entries=entries), bad, meta_ok

    def _merge(
        self, client: Any, key: str, file_name: str, news: Document, deadline: float | None = None
    ) -> Document | None:
        give_up = time.monotonic() + _CONFLICT_S
        if deadline is not None:
            give_up = min(give_up, deadline)
        for tries in range(_MAX_TRIES):
            with client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    # Something else under our name (a string another tool set; a hash whose
                    # meta names another kernel version, as a short id's collision or a copy
                    # would leave) is no page of this kernel: every host would skip it and
                    # tune again forever. It is renamed aside whole, as a foreign page
                    # directory is, and the news starts a new hash.
                    foreign = pipe.type(key) not in (b"hash", b"none")
                    # The touched keys only; the news names the identity this hash is for: a
                    # hash whose meta is unreadable keeps its keys, and gets its meta rewritten.
                    fields = {} if foreign else self._fields(pipe, key, news.entries, measured=True)
                    identity = {"kernel": news.kernel, "platform": news.platform}
                    stored, bad, meta_ok = self._parse(fields, file_name, identity)
                    if stored is not None and stored.kernel.get("hash") != news.kernel.get("hash"):
                        foreign = True
                    if foreign:  # kept whole under the new name: none of its fields is copied
                        fields, stored, bad, meta_ok = {}, None, [], False
                    merged = news.merged_over(stored)
                    pipe.multi()
                    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{random.getrandbits(32):08x}"
                    if foreign:
                        pipe.rename(key, f"{key}:foreign-{stamp}")
                    if not meta_ok and _META.encode() in fields:
                        bad.append(_META.encode())  # kept aside for a person, as a page.json is
                    for name in bad:  # one unreadable field: kept aside, the news replaces it
                        pipe.hset(
                            f"{key}:corrupt-keys", f"{name.decode('utf-8', 'replace')}@{stamp}", fields[name]
                        )
                    changed = {k: merged.entries[k] for k in news.entries}
                    mapping = {
                        k: json.dumps(e.to_json(), sort_keys=True, allow_nan=False)
                        for k, e in changed.items()
                    }
                    if not meta_ok:
                        mapping[_META] = json.dumps(
                            {"kernel": merged.kernel, "platform": merged.platform},
                            sort_keys=True,
                            allow_nan=False,
                        )
                    if mapping:
                        pipe.hset(key, mapping=mapping)
                    pipe.execute()
                    if foreign:
                        self._warn(
                            f"foreign:{file_name}",
                            "tunebook: kept the Redis book %s at %s aside as %s: it held no page of "
                            "this kernel version (another kernel's, or not a hash)",
                            file_name,
                            self.shown,
                            f"{key}:foreign-{stamp}",
                        )
                    return replace(merged, entries=changed)
                except self._watch_error:
                    # Another writer got in first: the server answers, and this is no outage.
                    # Each try is a request of its own (its own time and byte budget), after a
                    # jittered, growing pause that de-synchronises the writers that collided.
                    self.conflicts += 1
                    pause = random.uniform(0, min(0.05, 0.001 * 2**tries))
                    if time.monotonic() + pause >= give_up:
                        break
                    time.sleep(pause)
                    _budget.deadline = time.monotonic() + self.request_timeout
                    _budget.bytes_left = self.max_reply_bytes
        raise _Contended(file_name)
