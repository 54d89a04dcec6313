"""An OpenAI-compatible HTTP front for the engine (Starlette on uvicorn).

Endpoints (the subset of OpenAI's API a chat client needs):

* ``GET /v1/models`` (and ``/v1/models/{id}``): the one model served;
* ``POST /v1/completions``: ``prompt`` (a string, or a list of token ids; or a batch of
  up to MAX_PROMPTS, a list of strings or of token-id lists: a choice each, in prompt
  order, a request each queued together: ``batch.py``), ``max_tokens``
  (default 16), ``temperature`` (default 1), ``top_p``, ``stop``, ``seed``, ``stream``,
  ``logprobs`` (0 to MAX_LOGPROBS alternatives: ``tokens``, ``token_logprobs``,
  ``top_logprobs``, ``text_offset``), ``echo`` (the prompt's text and, with ``logprobs``,
  its tokens' logprobs first; ``max_tokens`` may then be 0: a text scored);
* ``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template,
  ``max_completion_tokens`` or ``max_tokens`` (default: up to DEFAULT_CHAT_MAX_TOKENS and
  the model's length), and the same sampling fields; ``logprobs: true`` with
  ``top_logprobs`` (0 to MAX_LOGPROBS): ``logprobs.content``; ``stream`` sends
  ``chat.completion.chunk`` events (``stream_options.include_usage``: a last chunk with the
  usage), each with the logprobs of its tokens;
* ``GET /health``: 200 once the server serves (for probes);
* ``GET /stats``: not OpenAI's: the engine's steps and batch sizes, and
  ``tunebook.stats()`` (configs benchmarked, fallbacks: both 0 when the books answer).

A request the server cannot serve is answered with OpenAI's error object: 400 for a
malformed body or a field out of range (the message names the field, what was expected
and what was found), 404 for a model or a path it does not serve, 405 for a method (with
its ``Allow`` header), 413 for a body over ``--max-body-mb``, 503 once a shutdown has ended
the request (:func:`serve` says when), 500 if the engine failed a step or the server met an
error it did not expect (logged; the engine goes on with the next requests); never a crash.
Streams are server-sent events ending with ``data: [DONE]``. Every request goes to one engine whose
loop runs on a background thread, so concurrent requests share decode steps. A client
that disconnects (mid-stream, while waiting, or before a non-streamed answer is complete)
has its request (every prompt of a batch) aborted and its cache freed at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from ..._optional import require
from .batch import about_prompt, is_token_id, merged, prompt_list, together
from .engine import Engine, shown
from .logprob_texts import Echo, TokenTexts
from .request_fields import (
    BadRequest,
    chat_messages,
    count_text,
    echo_flag,
    error_body,
    include_usage,
    integer,
    of_prompt,
    sampling_params,
    stream_flag,
    text_field,
)
from .sampling import SamplingParams, TokenLogprobs
from .scheduler import Request

# Chat requests without max_tokens may generate up to this many tokens (and the model's
# remaining length): a runaway answer cannot hold the cache for long.
DEFAULT_CHAT_MAX_TOKENS = 512
# How long a shutdown (SIGTERM, Ctrl-C) waits for answers in flight before it ends them (a
# stream with an error event and [DONE], a whole answer with a 503).
GRACEFUL_SHUTDOWN_S = 10
# Then how long it waits for the engine's step in progress (a long prefill on the interpreter
# takes minutes): the process exits without it after that (the engine's thread is a daemon).
ENGINE_STOP_S = 2
# The largest request body read by default (--max-body-mb): a few MiB more than any context
# could use (SmolLM2's 8192 positions of its longest token, 162 bytes, JSON-escaped at 6
# characters a byte, are 8 MB). A larger body is refused with a 413 before it is read whole.
DEFAULT_MAX_BODY_MB = 12
# A body this large is parsed off the event loop (json.loads of megabytes takes a while).
PARSE_OFF_LOOP_BYTES = 1 << 20
log = logging.getLogger("tunebook.demo.llm")


# ------------------------------------------------------------------ the app


class Front:
    """The endpoints' logic over one engine, independent of the web framework's objects."""

    def __init__(self, engine: Engine, model_id: str) -> None:
        self.engine = engine
        self.model_id = model_id
        self.created = int(time.time())
        # Shutting down: the queues of the requests in flight, to end them when the grace
        # period is over (closed: every later request is refused too); forced: a second signal.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: set[asyncio.Queue[Any]] = set()
        self.shutting_down = self.closed = self.forced = False

    # ------------------------------------------------------------------ shutting down

    def begin_shutdown(self, force: bool = False) -> None:
        """A signal asked the server to stop (any thread, a signal handler included): the
        requests in flight get GRACEFUL_SHUTDOWN_S to finish, then are ended; ``force`` ends
        them now and stops waiting for the engine."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._begin_shutdown, force)

    def _begin_shutdown(self, force: bool) -> None:
        assert self.loop is not None
        if force:
            self.forced = True
            self.close()
        elif not self.shutting_down:
            self.loop.call_later(GRACEFUL_SHUTDOWN_S, self.close)
        self.shutting_down = True

    def close(self) -> None:
        """End every request in flight (their waits see SHUTDOWN) and refuse new ones."""
        self.closed = True
        for queue in self.queues:
            queue.put_nowait(SHUTDOWN)

    async def stop_engine(self) -> None:
        """Stop the engine's loop, waiting for its step in progress at most ENGINE_STOP_S
        (unless forced) without blocking the event loop, which a second Ctrl-C needs."""
        deadline = time.monotonic() + ENGINE_STOP_S
        while not self.engine.stop(timeout=0):
            if self.forced:
                log.warning("exiting without waiting for the engine's step in progress (a second signal)")
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "the engine's step in progress did not end within %s s; exiting without it", ENGINE_STOP_S
                )
                return
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ requests

    def check_model(self, body: Mapping[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise BadRequest(
                f"model {shown(model)} is not served here; this server serves {self.model_id!r}",
                "model",
                404,
                "model_not_found",
            )

    def completion_prompts(self, body: Mapping[str, Any]) -> list[tuple[list[int], str | None]]:
        """Each prompt of ``prompt`` (a batch's in order, every one checked before any is
        queued), as its token ids and the string it was sent as (None for token ids: an
        echo sends a string back as sent). A refusal names a batch's prompt by its index."""
        try:
            prompts = prompt_list(body.get("prompt"))
        except ValueError as exc:
            raise BadRequest(str(exc), "prompt") from None
        out: list[tuple[list[int], str | None]] = []
        for i, prompt in enumerate(prompts):
            name = "'prompt'" if len(prompts) == 1 else f"'prompt[{i}]'"
            if not prompt:
                raise BadRequest(f"{name} is empty: it needs at least one token", "prompt")
            if isinstance(prompt, str):
                try:
                    out.append((self.encode(text_field(prompt, name, "prompt"), "prompt"), prompt))
                except BadRequest as exc:
                    raise of_prompt(exc, i, len(prompts)) from None
            elif all(map(is_token_id, prompt)):
                out.append((prompt, None))  # every one an int (is_token_id); the engine copies them
            else:
                raise BadRequest(f"{name} must be a list of token ids; found {shown(prompt)}", "prompt")
        return out

    def completion_params(self, body: Mapping[str, Any], prompts: list[list[int]]) -> list[SamplingParams]:
        """Each prompt's sampling parameters: the request's, with a ``max_tokens`` that fits
        the prompt (a default one shrinks to fit each)."""
        least = 0 if echo_flag(body) else 1
        budgets = []
        for i, prompt in enumerate(prompts):
            try:
                budgets.append(self.max_tokens(body, prompt, 16, least))
            except BadRequest as exc:
                raise of_prompt(exc, i, len(prompts)) from None
        params = sampling_params(body, budgets[0])
        return [dataclasses.replace(params, max_tokens=n) if n != budgets[0] else params for n in budgets]

    def encode(self, text: str, param: str) -> list[int]:
        """``text``'s tokens. A text that cannot fit the context whatever its tokens is refused
        before it is tokenized (a 19.5 MB prompt took seconds of CPU only to be refused)."""
        fewest = self.engine.tokenizer.fewest_tokens(text)
        if fewest >= self.engine.max_model_len:
            raise self._prompt_too_long(f"at least {fewest}", param)
        return self.engine.tokenizer.encode(text)

    def _prompt_too_long(self, tokens: str, param: str, scored: bool = False) -> BadRequest:
        # Worded and coded as OpenAI and vLLM word it, the phrase and code client libraries
        # match to trim a conversation and retry (LiteLLM, LangChain).
        limit = self.engine.max_model_len
        need, most = ("nothing more (echo and max_tokens 0)", limit) if scored else ("at least 1", limit - 1)
        return BadRequest(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{tokens} tokens, and the answer needs {need}: shorten the prompt to at most "
            f"{most} tokens, or start the server with a larger --max-model-len",
            param,
            code="context_length_exceeded",
        )

    def max_tokens(
        self, body: Mapping[str, Any], prompt: list[int], default: int | None, least: int = 1
    ) -> int:
        """The answer's token budget; ``least`` 0 where the prompt is echoed (scored, as
        lm-evaluation-harness does, with nothing generated)."""
        limit = self.engine.max_model_len
        room = limit - len(prompt)
        # Both are checked; OpenAI's current field wins where both are given.
        given = {name: integer(body, name, None, least) for name in ("max_completion_tokens", "max_tokens")}
        asked = next((value for value in given.values() if value is not None), None)
        if room < 1 and not (asked == 0 and room == 0):  # a prefill alone may fill the context
            raise self._prompt_too_long(
                str(len(prompt)), "prompt" if "prompt" in body else "messages", scored=asked == 0
            )
        for name, value in given.items():
            if value is not None:
                if value > room:
                    raise BadRequest(
                        f"This model's maximum context length is {limit} tokens. However, you requested "
                        f"{count_text(len(prompt) + value)} tokens ({len(prompt)} in the prompt, "
                        f"{count_text(value)} for the answer as '{name}'): ask for at most {room}",
                        name,
                        code="context_length_exceeded",
                    )
                return value
        return min(default or room, room)

    def check_messages(self, messages: list[dict[str, str]]) -> None:
        """Refuse messages whose text alone cannot fit the context, before the chat template
        renders them (rendering adds text; it does not take any away)."""
        fewest = self.engine.tokenizer.fewest_tokens("".join(m["content"] for m in messages))
        if fewest >= self.engine.max_model_len:
            raise self._prompt_too_long(f"at least {fewest}", "messages")

    def submit(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        prefix: str = "cmpl",
        *,
        stream: bool = False,
    ) -> tuple[str, list[tuple[Request, asyncio.Queue[Any]]]]:
        """Queue a request for each prompt, all at once (a batch shares its steps); the
        answer's id and each request with the queue its updates arrive on, as ``(new text,
        finish_reason, the new tokens' TokenLogprobs)``, pushed from the engine's thread
        (SHUTDOWN when the server ends it). A ``stream`` takes its tokens' logprobs from the
        request as they come (its chunks carry them: the request keeps none); a whole answer
        leaves them in :attr:`Request.logprobs` (its updates carry none) and reads them at the
        end. Raises BadRequest (naming a batch's prompt) where the engine refuses a prompt,
        and none is queued; ShuttingDown once the server has ended its requests."""
        if self.closed:
            raise ShuttingDown
        loop = asyncio.get_running_loop()
        answer_id = f"{prefix}-{uuid.uuid4().hex[:24]}"

        def listener(queue: asyncio.Queue[Any]) -> Callable[[Request, list[int], str], None]:
            def on_update(request: Request, tokens: list[int], delta: str) -> None:
                # The engine appends a token's logprobs (where asked) before it tells: on its
                # thread, as this runs, so none is appended between these two lines.
                new: list[TokenLogprobs] = []
                if stream and request.logprobs:
                    new, request.logprobs = request.logprobs, []
                loop.call_soon_threadsafe(queue.put_nowait, (delta, request.finish_reason, new))

            return on_update

        made: list[tuple[Request, asyncio.Queue[Any]]] = []
        for i, (prompt, asked) in enumerate(zip(prompts, params)):
            queue: asyncio.Queue[Any] = asyncio.Queue()
            request_id = answer_id if len(prompts) == 1 else f"{answer_id}-{i}"
            try:
                made.append((self.engine.request(prompt, asked, listener(queue), request_id), queue))
            except ValueError as exc:
                raise of_prompt(BadRequest(str(exc), "prompt"), i, len(prompts)) from None
        self.engine.queue([request for request, _ in made])
        self.queues.update(queue for _, queue in made)
        return answer_id, made

    def stats(self) -> dict[str, Any]:
        import tunebook

        return {
            "engine": {
                **self.engine.describe(),
                "steps": self.engine.steps,
                "decode_batches": dict(sorted(self.engine.decode_batches.items())),
                "failures": dict(self.engine.failures),
            },
            "tunebook": tunebook.stats(),
        }


class EngineFailed(Exception):
    """The engine failed a step and ended every request in it (its error is logged)."""


class ShuttingDown(Exception):
    """The server is shutting down and ended (or refused) the request: a 503."""

    message = "the server is shutting down; the request was ended (retry it on a server that runs)"


SHUTDOWN = (None, "shutdown")  # what Front.close puts on the queue of each request in flight


async def _updates(
    request: Request, queue: asyncio.Queue[Any], front: Front, echo_first: bool = False
) -> AsyncIterator[tuple[str | None, list[TokenLogprobs]]]:
    """The request's text deltas, each with its new tokens' logprobs (where the request asked
    for them: an update may then bring tokens and no text), until it finishes; aborts it if
    the consumer goes away. Where ``echo_first``, a ``None`` delta first once its prefill
    has run (the prompt's turn to be sent). Raises EngineFailed if the engine ended it with
    an error, ShuttingDown if the server did."""
    engine = front.engine
    try:
        while True:
            update = await queue.get()
            if update is SHUTDOWN:
                raise ShuttingDown
            delta, reason, logprobs = update
            if echo_first and reason not in ("error", "abort"):
                echo_first = False
                yield None, []
            if delta or logprobs:
                yield delta, logprobs
            if reason == "error":
                # Its own step's failure (set before the engine told the queue), not the
                # engine's latest, which may be another request's.
                raise EngineFailed(f"the engine failed while generating: {request.error!r}")
            if reason is not None:
                return
    finally:
        front.queues.discard(queue)
        if not request.finished:
            engine.abort(request.id)


class ClientGone(Exception):
    """The client disconnected before its answer was complete (its request is aborted)."""


async def _answer(http: Any, requests: list[tuple[Request, asyncio.Queue[Any]]], front: Front) -> list[str]:
    """The whole texts of a non-streamed answer's requests; aborts them all if the client
    disconnects first (nothing else would notice: only a streamed response listens for it)
    or one of them fails (EngineFailed naming a batch's prompt)."""

    async def text(i: int, request: Request, queue: asyncio.Queue[Any]) -> str:
        try:
            return "".join([d async for d, _ in _updates(request, queue, front) if d])
        except EngineFailed as exc:
            raise EngineFailed(about_prompt(str(exc), i, len(requests))) from None

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    # An answer's cancellation aborts its request (_updates).
    texts = await together([text(i, *pair) for i, pair in enumerate(requests)], disconnected())
    if texts is None:
        raise ClientGone
    return texts


def _usage(requests: list[Request]) -> dict[str, int]:
    """The usage of an answer's requests, summed."""
    prompt, output = sum(len(r.prompt) for r in requests), sum(len(r.output) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def _finish(request: Request) -> str:
    return "length" if request.finish_reason == "length" else "stop"


def _sse(payload: Mapping[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(engine: Engine, model_id: str, max_body_mb: float = DEFAULT_MAX_BODY_MB) -> Any:
    """The Starlette application serving ``engine`` as ``model_id``, refusing request bodies
    over ``max_body_mb`` MiB. The engine's loop starts with the app and stops with it; the
    app's ``state.front`` is told of a shutdown by :func:`serve`."""
    require("starlette", feature="the LLM server (tunebook.demo.llm serve)", extra="server")
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    front = Front(engine, model_id)
    texts = TokenTexts(engine.tokenizer)
    max_body = int(max_body_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        front.loop = asyncio.get_running_loop()
        engine.start()
        try:
            yield
        finally:
            # Not engine.stop() on the event loop: it waited for a step of minutes, and
            # uvicorn's second Ctrl-C could not run.
            await front.stop_engine()

    def too_large(size: str) -> BadRequest:
        return BadRequest(
            f"the request body is {size} bytes, more than this server reads "
            f"({max_body} bytes: --max-body-mb {max_body_mb:g})",
            status=413,
            code="request_too_large",
        )

    async def raw_body(request: Any) -> bytes:
        """The body, read up to the limit: a larger one is refused as soon as it is known."""
        length = request.headers.get("content-length", "")
        if len(length) > 18 or (length.isdigit() and int(length) > max_body):
            raise too_large(length if len(length) <= 18 else f"{len(length)}-digit")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise too_large(f"more than {max_body}")
                chunks.append(chunk)
        except ClientDisconnect:  # gone mid-upload: nobody to answer
            raise ClientGone from None
        return b"".join(chunks)

    async def body_of(request: Any) -> dict[str, Any]:
        raw = await raw_body(request)
        try:
            # Megabytes of JSON take a while to parse: off the event loop, which serves every stream.
            body = (
                json.loads(raw)
                if len(raw) < PARSE_OFF_LOOP_BYTES
                else await asyncio.to_thread(json.loads, raw)
            )
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and integers past 4300 digits
            raise BadRequest(f"the request body must be a JSON object; it does not parse: {exc}") from None
        except RecursionError:
            raise BadRequest("the request body is nested too deeply to parse") from None
        if not isinstance(body, dict):
            raise BadRequest(f"the request body must be a JSON object; found {type(body).__name__}")
        front.check_model(body)
        return body

    async def models(request: Any) -> Any:
        card = {"id": model_id, "object": "model", "created": front.created, "owned_by": "tunebook"}
        return JSONResponse({"object": "list", "data": [card]})

    async def stats(request: Any) -> Any:
        return JSONResponse(front.stats())

    async def completions(request: Any) -> Any:
        body = await body_of(request)
        # Tokenizing large prompts takes seconds: off the event loop, which serves every stream.
        prompts = await asyncio.to_thread(front.completion_prompts, body)
        ids = [p for p, _ in prompts]
        params = front.completion_params(body, ids)
        echo, scored = params[0].echo, params[0].logprobs is not None
        stream = stream_flag(body)
        usage = include_usage(body, stream)
        answer_id, asked = front.submit(ids, params, stream=stream)
        reqs = [req for req, _ in asked]
        head = {"id": answer_id, "object": "text_completion", "created": int(time.time()), "model": model_id}

        def choice(i: int, text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

        def echoed(i: int) -> Echo:
            # After the prefill, which scored the prompt where asked (the engine's thread
            # sets them before it tells of the request's first token or end). A string
            # prompt comes back as it was sent (its tokens decode without special tokens).
            req = reqs[i]
            scores = req.prompt_logprobs.entries() if req.prompt_logprobs is not None else []
            return Echo.of(engine.tokenizer, req.prompt, scores, text=prompts[i][1])

        if stream:
            streamed = {**head, "usage": None} if usage else head

            def echo_chunk(i: int) -> tuple[str, int]:
                # Megabytes where a long prompt lists 20 alternatives a token: built and
                # rendered off the event loop, as a whole answer's are; then let go of.
                prompt_echo = echoed(i)
                reqs[i].prompt_logprobs = None
                logprobs = texts.completion([], prompt_echo) if scored else None
                return _sse({**streamed, "choices": [choice(i, prompt_echo.text, None, logprobs)]}), len(
                    prompt_echo.text
                )

            async def choice_events(i: int, req: Request, queue: asyncio.Queue[Any]) -> AsyncIterator[str]:
                shift = 0
                try:
                    async for delta, entries in _updates(req, queue, front, echo_first=echo):
                        if delta is None:  # the prefill is done: the prompt first
                            chunk, shift = await asyncio.to_thread(echo_chunk, i)
                            yield chunk
                            continue
                        logprobs = texts.completion(entries, None, shift) if entries else None
                        yield _sse({**streamed, "choices": [choice(i, delta, None, logprobs)]})
                except EngineFailed as exc:
                    raise EngineFailed(about_prompt(str(exc), i, len(reqs))) from None
                yield _sse({**streamed, "choices": [choice(i, "", _finish(req))]})

            async def events() -> AsyncIterator[str]:
                try:
                    async for chunk in merged([choice_events(i, *pair) for i, pair in enumerate(asked)]):
                        yield chunk
                    if usage:
                        yield _sse({**head, "choices": [], "usage": _usage(reqs)})
                except EngineFailed as exc:
                    yield _sse(error_body(str(exc), None, 500))
                except ShuttingDown as exc:
                    yield _sse(error_body(exc.message, None, 503))
                yield _sse("[DONE]")

            return _event_stream(events())
        answers = await _answer(request, asked, front)

        def whole() -> Any:
            choices = []
            for i, (req, text) in enumerate(zip(reqs, answers)):
                prompt_echo = echoed(i) if echo else None
                logprobs = texts.completion(req.logprobs, prompt_echo) if scored else None
                answer = prompt_echo.text + text if prompt_echo is not None else text
                choices.append(choice(i, answer, _finish(req), logprobs))
            return JSONResponse({**head, "choices": choices, "usage": _usage(reqs)})

        # An echoed prompt is decoded (and its logprobs built) off the event loop too.
        return await _respond(whole, params[0], off_loop=echo)

    async def chat(request: Any) -> Any:
        body = await body_of(request)
        messages = chat_messages(body, engine.max_model_len)
        front.check_messages(messages)  # before the template renders megabytes
        try:
            prompt = await asyncio.to_thread(
                lambda: front.encode(engine.tokenizer.chat_prompt(messages), "messages")
            )
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"the messages cannot be rendered and encoded: {exc}", "messages") from None
        params = sampling_params(body, front.max_tokens(body, prompt, DEFAULT_CHAT_MAX_TOKENS), chat=True)
        stream = stream_flag(body)
        usage = include_usage(body, stream)
        answer_id, [(req, queue)] = front.submit([prompt], [params], "chatcmpl", stream=stream)
        head = {"id": answer_id, "created": int(time.time()), "model": model_id}

        if stream:
            chunk = {**head, "object": "chat.completion.chunk"}
            streamed = {**chunk, "usage": None} if usage else chunk

            def delta(content: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
                return {
                    **streamed,
                    "choices": [
                        {"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": finish}
                    ],
                }

            async def events() -> AsyncIterator[str]:
                yield _sse(delta({"role": "assistant", "content": ""}, None))
                try:
                    async for text, entries in _updates(req, queue, front):
                        yield _sse(delta({"content": text}, None, texts.chat(entries) if entries else None))
                    yield _sse(delta({}, _finish(req)))
                    if usage:
                        yield _sse({**chunk, "choices": [], "usage": _usage([req])})
                except EngineFailed as exc:
                    yield _sse(error_body(str(exc), None, 500))
                except ShuttingDown as exc:
                    yield _sse(error_body(exc.message, None, 503))
                yield _sse("[DONE]")

            return _event_stream(events())
        [text] = await _answer(request, [(req, queue)], front)

        def whole() -> Any:
            message = {"role": "assistant", "content": text}
            logprobs = texts.chat(req.logprobs) if params.logprobs is not None else None
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": _finish(req)}
            return JSONResponse(
                {**head, "object": "chat.completion", "choices": [choice], "usage": _usage([req])}
            )

        return await _respond(whole, params)

    async def model(request: Any) -> Any:
        wanted = request.path_params["model"]
        if wanted != model_id:
            raise BadRequest(
                f"model {shown(wanted)} is not served here; this server serves {model_id!r}",
                "model",
                404,
                "model_not_found",
            )
        return JSONResponse(
            {"id": model_id, "object": "model", "created": front.created, "owned_by": "tunebook"}
        )

    def guarded(endpoint: Any) -> Any:
        async def handle(request: Any) -> Any:
            try:
                return await endpoint(request)
            except BadRequest as exc:
                body = error_body(exc.message, exc.param, exc.status, exc.code)
                return JSONResponse(body, status_code=exc.status)
            except EngineFailed as exc:
                return JSONResponse(error_body(str(exc), None, 500), status_code=500)
            except ClientGone:
                log.debug("%s %s: the client went away before its answer", request.method, request.url.path)
                return Response(status_code=499)  # nobody reads it: the client has gone
            except ShuttingDown as exc:
                return JSONResponse(error_body(exc.message, None, 503), status_code=503)
            except asyncio.CancelledError:  # uvicorn's grace period is over (a request not yet queued)
                uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python 3.11+
                if uncancel is not None:
                    uncancel()
                return JSONResponse(error_body(ShuttingDown.message, None, 503), status_code=503)
            except Exception as exc:  # never a bare 500 page: say what failed, in OpenAI's shape
                log.exception("request failed")
                message = f"the server failed on this request: {type(exc).__name__}: {exc}"
                return JSONResponse(error_body(message, None, 500), status_code=500)

        return handle

    async def http_error(request: Any, exc: Any) -> Any:  # Starlette's 404 and 405, as OpenAI errors
        what = "no such path" if exc.status_code == 404 else f"method {request.method} is not allowed"
        message = f"{what}: {request.method} {request.url.path}; see docs/llm-server.md for the endpoints"
        return JSONResponse(
            error_body(message, None, exc.status_code), status_code=exc.status_code, headers=exc.headers
        )  # with its headers: a 405's Allow

    async def health(request: Any) -> Any:  # what probes poll (vLLM's too): 200 once serving
        return Response(status_code=200)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(model), methods=["GET"]),
        Route("/stats", guarded(stats), methods=["GET"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
    ]
    # Browser front ends (Open WebUI and the like) call from another origin: allowed, as
    # vLLM's server allows every origin by default.
    middleware = [Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={HTTPException: http_error},
    )
    app.state.front = front
    return app


async def _respond(whole: Callable[[], Any], params: SamplingParams, off_loop: bool = False) -> Any:
    """A whole answer's response, built by ``whole``: off the event loop where it holds
    logprobs (8000 tokens of 20 alternatives are megabytes of JSON, a fraction of a second
    to build and serialise, which would stall every stream), as a large body is parsed, or
    where ``off_loop``."""
    return whole() if params.logprobs is None and not off_loop else await asyncio.to_thread(whole)


def _event_stream(events: AsyncIterator[str]) -> Any:
    """Server-sent events; a proxy must pass them on as they come, not buffer them."""
    from starlette.responses import StreamingResponse

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def serve(
    engine: Engine,
    model_id: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
) -> None:
    """Run the server until interrupted.

    A shutdown (SIGTERM, Ctrl-C) stops taking connections, gives the requests in flight
    GRACEFUL_SHUTDOWN_S to finish, ends the others (a stream with an error event and
    ``[DONE]``, a whole answer with a 503), then gives the engine's step in progress
    ENGINE_STOP_S. A second signal exits at once."""
    uvicorn = require("uvicorn", feature="the LLM server (tunebook.demo.llm serve)", extra="server")
    app = create_app(engine, model_id, max_body_mb)
    front: Front = app.state.front

    class Server(uvicorn.Server):  # type: ignore[name-defined]
        def handle_exit(self, sig: int, frame: Any) -> None:
            again = self.should_exit
            super().handle_exit(sig, frame)
            if again:  # uvicorn forces only a second SIGINT, and not its wait for the app's shutdown
                self.force_exit = True
            front.begin_shutdown(force=again)

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            # A forced exit makes uvicorn skip the app's shutdown (which a forced one makes quick),
            # unless the second signal came while it ran: then it is done, and not run twice.
            done = getattr(self.lifespan, "shutdown_event", None)
            if self.force_exit and (done is None or not done.is_set()):
                await self.lifespan.shutdown()

    # uvicorn's own grace period is a backstop for requests not yet queued (a body still
    # uploading): the app ends those queued at GRACEFUL_SHUTDOWN_S itself (uvicorn's
    # default waited for them: a CPU answer of 512 tokens held a SIGTERM for an hour).
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S + 1
    )
    server = Server(config)
    server.run()
    if not server.started:  # as uvicorn.run ends: it could not listen, or the app did not start
        sys.exit(3)
