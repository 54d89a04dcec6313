"""Requests and continuous batching: who prefills, who decodes, at every step.

A request waits until its whole cache fits: the scheduler reserves the blocks of
``min(prompt + max_tokens, max_model_len)`` tokens when it admits it (``kv_cache``: no
preemption, ever). Each step is either

* a **prefill** of the waiting requests that fit (first come, first served, up to
  ``max_batch`` running and ``max_prefill_tokens`` prompt tokens in one pack), which also
  samples their first tokens, or
* a **decode** of every running request, one token each.

Prefills go first, except right after a prefill that ran while other requests were
decoding: the next step is then a decode. So a request that the next prefill can take
waits for at most one decode step (besides the step in progress) before its prefill, and a
running request waits for at most one prefill step between two of its tokens, however fast
new requests arrive. Requests join and leave the decode batch between steps (continuous
batching). A finished or aborted request gives its blocks back at once.

>>> from .kv_cache import BlockAllocator
>>> s = Scheduler(BlockAllocator(9), block_size=4, max_batch=2, max_model_len=16)
>>> a = s.add(Request("a", [1, 2, 3], SamplingParams(max_tokens=5)))   # 8 tokens: 2 blocks
>>> b = s.add(Request("b", [1] * 9, SamplingParams(max_tokens=20)))    # 16 tokens: 4 blocks
>>> c = s.add(Request("c", [1], SamplingParams(max_tokens=1)))
>>> kind, batch = s.schedule(); kind, [r.id for r in batch]             # c waits: max_batch
('prefill', ['a', 'b'])
>>> s.schedule()[0]
'decode'
>>> s.finish(a, "stop"); [r.id for r in s.schedule()[1]]               # a's blocks went back
['c']
>>> s.finish(c, "length"); d = s.add(Request("d", [1], SamplingParams(max_tokens=1)))
>>> kind, batch = s.schedule(); kind, [r.id for r in batch]   # b waited through c's prefill: b first
('decode', ['b'])
>>> kind, batch = s.schedule(); kind, [r.id for r in batch]   # then d's prefill
('prefill', ['d'])
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .kv_cache import BlockAllocator, blocks_for
from .sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort", "error")
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation: its prompt, parameters, output so far, and what it owns."""

    id: str
    prompt: list[int]
    params: SamplingParams
    # Called from the engine's thread after each step that changed the request:
    # (request, new token ids, new text). The request's finish_reason is set when it ends.
    on_update: Callable[[Request, list[int], str], None] | None = None
    output: list[int] = field(default_factory=list)
    text: str = ""
    blocks: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: Any = None  # a seeded torch.Generator, or None
    error: BaseException | None = None  # what ended it with "error": its own step's failure
    # Each output token's TokenLogprobs where params.logprobs is set (appended with it,
    # before on_update is told). A listener may take them as they come (the server's streams
    # do, keeping a long request's memory bounded): then it holds those not yet taken.
    logprobs: list[Any] = field(default_factory=list)
    stream: Any = None  # the TextStream that turns its ids into text (engine-owned)
    # Where params.prompt_logprobs is set: each prompt token's after the first, a
    # sampling.PromptLogprobs (its prefill sets it, before on_update is told of its first
    # token or its end); None otherwise.
    prompt_logprobs: Any = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context(self) -> int:
        return len(self.prompt) + len(self.output)


def new_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_ids)}"


class Scheduler:
    """The waiting queue, the running batch and the block reservations (module docstring).
    ``add`` and ``abort`` may be called from any thread; the rest from the engine's."""

    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        block_size: int,
        max_batch: int,
        max_model_len: int,
        max_prefill_tokens: int = 8192,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max(max_prefill_tokens, max_model_len)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._aborted: set[str] = set()
        self._decode_due = False  # the next step decodes (module docstring); engine thread only
        self._lock = threading.Lock()

    def budget(self, request: Request) -> int:
        """Tokens a request may reach: its prompt plus max_tokens, within max_model_len."""
        return min(len(request.prompt) + request.params.max_tokens, self.max_model_len)

    def add(self, request: Request) -> Request:
        """Queue a request. Raises ValueError if it can never run (:meth:`check`)."""
        self.add_all([request])
        return request

    def add_all(self, requests: list[Request]) -> None:
        """Queue several requests together: each is checked first (none is queued if one
        can never run), then all join the queue at once, so the next schedule sees all or
        none of them (a client's batch shares its prefill where the limits allow)."""
        for request in requests:
            self.check(request)
        with self._lock:
            self.waiting.extend(requests)

    def check(self, request: Request) -> None:
        """Raises ValueError if ``request`` can never run (empty or too long a prompt, or
        more cache than the whole cache holds)."""
        n = len(request.prompt)
        if n == 0:
            raise ValueError("the prompt is empty: it needs at least one token")
        # A prompt scored with nothing generated (max_tokens 0) may fill the context.
        if n > self.max_model_len or (n == self.max_model_len and request.params.max_tokens > 0):
            raise ValueError(
                f"the prompt has {n} tokens; this server's max_model_len is {self.max_model_len}, "
                "which must leave room for at least one new token"
            )
        need = blocks_for(self.budget(request), self.block_size)
        if need > self.allocator.num_blocks - 1:
            raise ValueError(
                f"the request needs {need} cache blocks of {self.block_size} tokens and the cache holds "
                f"{self.allocator.num_blocks - 1}; ask for fewer max_tokens"
            )

    def abort(self, request_id: str) -> None:
        """End a request at the next step (any thread)."""
        with self._lock:
            self._aborted.add(request_id)

    def take_waiting(self) -> list[Request]:
        """Remove every waiting request and return them (under the lock: a request added
        meanwhile is either taken here or stays queued, never dropped unseen)."""
        with self._lock:
            taken, self.waiting = list(self.waiting), deque()
        return taken

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    def take_aborted(self) -> list[Request]:
        """Remove aborted requests from the queues; returns them (unfinished, blocks freed)."""
        with self._lock:
            ids, self._aborted = self._aborted, set()
            gone = [r for r in self.waiting if r.id in ids]
            self.waiting = deque(r for r in self.waiting if r.id not in ids)
        gone += [r for r in self.running if r.id in ids]
        self.running = [r for r in self.running if r.id not in ids]
        for r in gone:
            self._release(r)
        return gone

    def schedule(self) -> tuple[str, list[Request]] | None:
        """The next step: ``("prefill", admitted)``, ``("decode", running)`` or None."""
        decode_due, self._decode_due = self._decode_due, False
        if decode_due and self.running:
            return "decode", list(self.running)
        admitted: list[Request] = []
        tokens = 0
        with self._lock:
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                request = self.waiting[0]
                if admitted and tokens + len(request.prompt) > self.max_prefill_tokens:
                    break
                blocks = self.allocator.allocate(blocks_for(self.budget(request), self.block_size))
                if blocks is None:
                    break  # first come, first served: later requests wait behind it
                self.waiting.popleft()
                request.blocks = blocks
                admitted.append(request)
                tokens += len(request.prompt)
        if admitted:
            # Those running wait through this prefill; they decode next, before any other
            # prefill, so that new requests arriving at every step cannot stall them.
            self._decode_due = bool(self.running)
            self.running.extend(admitted)
            return "prefill", admitted
        if self.running:
            return "decode", list(self.running)
        return None

    def finish(self, request: Request, reason: str) -> None:
        """Mark a running request finished and give its blocks back."""
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        self._release(request)

    def _release(self, request: Request) -> None:
        if request.blocks:
            self.allocator.release(request.blocks)
            request.blocks = []
