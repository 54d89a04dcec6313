"""A batch: the engine requests of one /v1/completions request of several prompts, answered
as one.

``prompt`` may be a list of strings or of token-id lists (OpenAI's legacy completions and
vLLM take it so; lm-evaluation-harness's ``local-completions`` sends one when its
``batch_size`` is over 1). The server makes each prompt an engine request of its own, queues
them together (they share prefills and decode steps) and answers their ``choices`` in prompt
order. This module reads a batch (:func:`prompt_list`: what ``prompt`` holds, and the limit,
MAX_PROMPTS) and waits for its requests: :func:`together` for every prompt's whole answer,
:func:`merged` interleaving their streams. In both the first failure ends the others,
and so does a client gone: ending a prompt's answer (cancelling it, or closing its stream)
runs its cleanup, which in the server aborts its request.

>>> import asyncio
>>> async def after(s: float, x: str) -> str:
...     await asyncio.sleep(s)
...     return x
>>> asyncio.run(together([after(0.02, "a"), after(0.01, "b")], asyncio.sleep(1)))
['a', 'b']
>>> async def letters(word: str, s: float):
...     for c in word:
...         await asyncio.sleep(s)
...         yield c
>>> async def both() -> str:
...     return "".join([c async for c in merged([letters("ab", 0.05), letters("XY", 0.075)])])
>>> asyncio.run(both())
'aXbY'
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from .engine import shown

T = TypeVar("T")

# The most prompts one request may hold. Past the engine's --max-batch (default 64) they wait
# in its queue as so many concurrent requests would; the bound keeps one body (up to
# --max-body-mb) from queueing thousands of requests and tokenizing thousands of texts at
# once. lm-evaluation-harness's local-completions sends its batch_size prompts a request.
MAX_PROMPTS = 256


def is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompt_list(prompt: Any) -> list[Any]:
    """``prompt`` as a list of prompts: a string or a list of token ids is one; a list of
    strings or of token-id lists is a batch (of MAX_PROMPTS at most; its prompts are each
    checked by the server). A list mixing strings and token-id lists is refused, as OpenAI
    refuses it. Raises ValueError with the server's 400 message.

    >>> prompt_list("Hi"), prompt_list([1, 2]), prompt_list([[1, 2], [3]]), prompt_list(["a", ""])
    (['Hi'], [[1, 2]], [[1, 2], [3]], ['a', ''])
    >>> prompt_list(["a", [1, 2]])
    Traceback (most recent call last):
    ValueError: 'prompt' mixes strings and token-id lists; send a batch of one kind ...
    """
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(map(is_token_id, prompt))):
        return [prompt]
    # Past the limit only a list of prompts (a long list of ids with one stray value is a
    # malformed prompt, not a batch of a thousand).
    if (
        isinstance(prompt, list)
        and len(prompt) > MAX_PROMPTS
        and all(isinstance(p, str | list) for p in prompt)
    ):
        raise ValueError(
            f"'prompt' holds {len(prompt)} prompts; this server takes at most {MAX_PROMPTS} a request: "
            "send the others in further requests"
        )
    if isinstance(prompt, list) and prompt:
        for kind in (str, list):
            if all(isinstance(p, kind) for p in prompt):
                return prompt
        if all(isinstance(p, str | list) for p in prompt):
            raise ValueError(
                "'prompt' mixes strings and token-id lists; send a batch of one kind (a list of strings, "
                "or a list of token-id lists), as OpenAI takes it"
            )
    raise ValueError(
        "'prompt' must be a non-empty string, a list of token ids, or a batch of either (a list of "
        f"strings or of token-id lists); found {shown(prompt)}"
    )


def about_prompt(message: str, i: int, n: int) -> str:
    """``message`` about prompt ``i`` of ``n``: it names the prompt where they are a batch."""
    return message if n == 1 else f"prompt[{i}]: {message}"


async def together(answers: Sequence[Awaitable[T]], gone: Awaitable[Any]) -> list[T] | None:
    """Every answer's result, in order, once all are in; None where ``gone`` (a client that
    disconnected) completes first. The first answer to raise ends the others, and its
    exception is raised. Whatever ends the wait cancels every answer still running (its
    cleanup runs) and waits for it."""
    tasks = [asyncio.ensure_future(a) for a in answers]
    watcher = asyncio.ensure_future(gone)
    try:
        while True:
            await asyncio.wait([*tasks, watcher], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if all(task.done() for task in tasks):
                return [task.result() for task in tasks]
            if watcher.done():
                return None
    finally:
        for task in (*tasks, watcher):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif not task.cancelled():
                task.exception()  # retrieved: a second failure is not logged as never seen


_END = object()  # a stream's last item in merged's queue


async def merged(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Every stream's items, each as it comes, until all have ended. The first stream to
    raise ends the others and its exception is raised here; closing this ends them all (a
    stream ended is a task cancelled while it reads: its generator's cleanup runs). One
    stream is read as it is, with no task between it and its reader."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    out: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()

    async def drain(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                out.put_nowait((item, None))
        except Exception as exc:  # raised to merged's reader; a cancellation is not
            out.put_nowait((_END, exc))
        else:
            out.put_nowait((_END, None))

    tasks = [asyncio.ensure_future(drain(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item, error = await out.get()
            if error is not None:
                raise error
            if item is _END:
                running -= 1
            else:
                yield item
    finally:
        # Not awaited: a reader cancelled by its framework (anyio cancels every await after
        # a client's disconnect) could not; each task runs its stream's cleanup by itself.
        for task in tasks:
            task.cancel()
