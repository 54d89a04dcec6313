"""An OpenAI-compatible HTTP front for the engine (Starlette on uvicorn).

Endpoints (the subset of OpenAI's API a chat client needs):

* ``GET /v1/models``: the one model served;
* ``POST /v1/completions``: ``prompt`` (a string, or a list of token ids), ``max_tokens``
  (default 16), ``temperature`` (default 1), ``top_p``, ``stop``, ``seed``, ``stream``;
* ``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template,
  ``max_tokens`` or ``max_completion_tokens`` (default: up to the model's length), and
  the same sampling fields; ``stream`` sends ``chat.completion.chunk`` events;
* ``GET /stats``: not OpenAI's: the engine's steps and batch sizes, and
  ``tunebook.stats()`` (configs benchmarked, fallbacks: both 0 when the books answer).

A request the server cannot serve is answered with OpenAI's error object: 400 for a
malformed body or a field out of range (the message names the field, what was expected
and what was found), 404 for a model it does not serve, 500 if the engine failed a step
(its error is logged; the engine goes on with the next requests); never a crash. Streams are
server-sent events ending with ``data: [DONE]``. Every request goes to one engine whose
loop runs on a background thread, so concurrent requests share decode steps. A client
that disconnects (mid-stream or while waiting) has its request aborted and its cache
freed at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ..._optional import require
from .engine import Engine
from .sampling import SamplingParams
from .scheduler import Request

# Chat requests without max_tokens may generate up to this many tokens (and the model's
# remaining length): a runaway answer cannot hold the cache for long.
DEFAULT_CHAT_MAX_TOKENS = 512


class BadRequest(Exception):
    """A request the server refuses: status, message, and the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, param: str | None, status: int) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "model_not_found" if status == 404 else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ------------------------------------------------------------------ request fields


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}]; found {value!r}", name)
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be in [{lo}, {hi}]; found {value}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, default: int | None, lo: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer >= {lo}; found {value!r}", name)
    if value < lo:
        raise BadRequest(f"'{name}' must be >= {lo}; found {value}", name)
    return int(value)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise BadRequest(f"'stop' must be a string or a list of up to 4 strings; found {stop!r}", "stop")


# Fields this server does not implement, and the values that ask for nothing.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None,),
    "functions": (None,),
    "logit_bias": (None,),
}


def sampling_params(body: Mapping[str, Any], max_tokens: int) -> SamplingParams:
    """The request's sampling fields, checked (``max_tokens`` already resolved)."""
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise BadRequest(f"'n' must be 1 (one choice per request) on this server; found {n}", "n")
    for name, allowed in _UNSUPPORTED.items():
        value = body.get(name)
        if value not in allowed and not (value == {} or value == []):
            raise BadRequest(
                f"'{name}' is not supported by this server; leave it out (found {value!r})", name
            )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        # top_p = 0 keeps the most likely token alone, as a tiny nucleus does.
        top_p=max(_number(body, "top_p", 1.0, 0.0, 1.0), 1e-9),
        seed=_integer(body, "seed", None, 0),
        stop=_stop(body),
    )


def _stream_flag(body: Mapping[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false; found {stream!r}", "stream")
    return stream


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"'messages' must be a non-empty list of messages; found {messages!r}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(
                f"messages[{i}] must be an object with a role of system, user, assistant or developer; "
                f"found {m!r}",
                "messages",
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string; found {content!r}", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


# ------------------------------------------------------------------ the app


class Front:
    """The endpoints' logic over one engine, independent of the web framework's objects."""

    def __init__(self, engine: Engine, model_id: str) -> None:
        self.engine = engine
        self.model_id = model_id
        self.created = int(time.time())

    def check_model(self, body: Mapping[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise BadRequest(
                f"model {model!r} is not served here; this server serves {self.model_id!r}", "model", 404
            )

    def completion_prompt(self, body: Mapping[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("'prompt' is empty: it needs at least one token", "prompt")
            return self.engine.tokenizer.encode(prompt)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            return [int(t) for t in prompt]
        raise BadRequest(
            "'prompt' must be a non-empty string or a list of token ids (one prompt per request); "
            f"found {prompt!r}",
            "prompt",
        )

    def max_tokens(self, body: Mapping[str, Any], prompt: list[int], default: int | None) -> int:
        room = self.engine.max_model_len - len(prompt)
        if room < 1:
            raise BadRequest(
                f"the prompt has {len(prompt)} tokens; this server's limit is {self.engine.max_model_len} "
                "including the answer",
                "prompt" if "prompt" in body else "messages",
            )
        for name in ("max_tokens", "max_completion_tokens"):
            value = _integer(body, name, None, 1)
            if value is not None:
                if value > room:
                    raise BadRequest(
                        f"'{name}'={value} and the prompt's {len(prompt)} tokens exceed this server's "
                        f"{self.engine.max_model_len} tokens; ask for at most {room}",
                        name,
                    )
                return value
        return min(default or room, room)

    def submit(self, prompt: list[int], params: SamplingParams) -> tuple[Request, asyncio.Queue[Any]]:
        """Queue a request; its updates arrive on the returned queue as
        ``(new text, finish_reason)`` pairs, pushed from the engine's thread."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def on_update(request: Request, tokens: list[int], delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (delta, request.finish_reason))

        try:
            request = self.engine.submit(
                prompt, params, on_update, request_id=f"cmpl-{uuid.uuid4().hex[:24]}"
            )
        except ValueError as exc:
            raise BadRequest(str(exc), "prompt") from None
        return request, queue

    def stats(self) -> dict[str, Any]:
        import tunebook

        return {
            "engine": {
                **self.engine.describe(),
                "steps": self.engine.steps,
                "decode_batches": dict(sorted(self.engine.decode_batches.items())),
            },
            "tunebook": tunebook.stats(),
        }


class EngineFailed(Exception):
    """The engine failed a step and ended every request in it (its error is logged)."""


async def _updates(request: Request, queue: asyncio.Queue[Any], engine: Engine) -> AsyncIterator[str]:
    """The request's text deltas until it finishes; aborts it if the consumer goes away.
    Raises EngineFailed if the engine ended it with an error."""
    try:
        while True:
            delta, reason = await queue.get()
            if delta:
                yield delta
            if reason == "error":
                raise EngineFailed(f"the engine failed while generating: {engine.error!r}")
            if reason is not None:
                return
    finally:
        if not request.finished:
            engine.abort(request.id)


def _usage(request: Request) -> dict[str, int]:
    return {
        "prompt_tokens": len(request.prompt),
        "completion_tokens": len(request.output),
        "total_tokens": request.context,
    }


def _finish(request: Request) -> str:
    return "length" if request.finish_reason == "length" else "stop"


def _sse(payload: Mapping[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(engine: Engine, model_id: str) -> Any:
    """The Starlette application serving ``engine`` as ``model_id``. The engine's loop
    starts with the app and stops with it."""
    require("starlette", feature="the LLM server (tunebook.demo.llm serve)", extra="server")
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    front = Front(engine, model_id)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    async def body_of(request: Any) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body must be a JSON object; it does not parse: {exc}") from None
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
        prompt = front.completion_prompt(body)
        params = sampling_params(body, front.max_tokens(body, prompt, 16))
        stream = _stream_flag(body)
        req, queue = front.submit(prompt, params)
        head = {"id": req.id, "object": "text_completion", "created": int(time.time()), "model": model_id}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if stream:

            async def events() -> AsyncIterator[str]:
                try:
                    async for delta in _updates(req, queue, engine):
                        yield _sse({**head, "choices": [choice(delta, None)]})
                    yield _sse({**head, "choices": [choice("", _finish(req))]})
                except EngineFailed as exc:
                    yield _sse(error_body(str(exc), None, 500))
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join([d async for d in _updates(req, queue, engine)])
        return JSONResponse({**head, "choices": [choice(text, _finish(req))], "usage": _usage(req)})

    async def chat(request: Any) -> Any:
        body = await body_of(request)
        messages = _messages(body)
        try:
            prompt = engine.tokenizer.encode(engine.tokenizer.chat_prompt(messages))
        except ValueError as exc:
            raise BadRequest(str(exc), "messages") from None
        params = sampling_params(body, front.max_tokens(body, prompt, DEFAULT_CHAT_MAX_TOKENS))
        stream = _stream_flag(body)
        req, queue = front.submit(prompt, params)
        head = {"id": req.id, "created": int(time.time()), "model": model_id}

        if stream:
            chunk = {**head, "object": "chat.completion.chunk"}

            def delta(content: dict[str, Any], finish: str | None) -> dict[str, Any]:
                return {**chunk, "choices": [{"index": 0, "delta": content, "finish_reason": finish}]}

            async def events() -> AsyncIterator[str]:
                yield _sse(delta({"role": "assistant", "content": ""}, None))
                try:
                    async for text in _updates(req, queue, engine):
                        yield _sse(delta({"content": text}, None))
                    yield _sse(delta({}, _finish(req)))
                except EngineFailed as exc:
                    yield _sse(error_body(str(exc), None, 500))
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join([d async for d in _updates(req, queue, engine)])
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": _finish(req)}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": _usage(req)})

    def guarded(endpoint: Any) -> Any:
        async def handle(request: Any) -> Any:
            try:
                return await endpoint(request)
            except BadRequest as exc:
                return JSONResponse(error_body(exc.message, exc.param, exc.status), status_code=exc.status)
            except EngineFailed as exc:
                return JSONResponse(error_body(str(exc), None, 500), status_code=500)

        return handle

    routes = [
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/stats", guarded(stats), methods=["GET"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def serve(engine: Engine, model_id: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until interrupted."""
    uvicorn = require("uvicorn", feature="the LLM server (tunebook.demo.llm serve)", extra="server")
    uvicorn.run(create_app(engine, model_id), host=host, port=port, log_level="info")
