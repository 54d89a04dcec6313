"""The fields of a request body, read and checked as OpenAI's API defines them: what the
server's endpoints take (``server.py``), each refused with a :class:`BadRequest` that names
the field, what was expected and what was found."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .batch import about_prompt
from .engine import shown
from .sampling import SamplingParams

# The most alternatives a token's logprobs list (/v1/completions' logprobs, chat's
# top_logprobs): vLLM's default --max-logprobs, OpenAI's chat limit (its completions' is 5).
MAX_LOGPROBS = 20


def count_text(n: int) -> str:
    """A count as a message writes it (a client may send thousands of digits)."""
    return str(n) if n.bit_length() <= 64 else "more than 2**64"


class BadRequest(Exception):
    """A request the server refuses: status, message, and the field at fault."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, param: str | None, status: int, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ------------------------------------------------------------------ request fields


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}]; found {shown(value)}", name)
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be in [{lo}, {hi}]; found {value}", name)
    return float(value)


def integer(
    body: Mapping[str, Any], name: str, default: int | None, lo: int, hi: int | None = None
) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer >= {lo}; found {shown(value)}", name)
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise BadRequest(f"'{name}' must be {bound}; found {shown(value)}", name)
    return int(value)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise BadRequest(f"'stop' must be a string or a list of up to 4 strings; found {shown(stop)}", "stop")


# Fields this server does not implement, and the values that ask for nothing.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None,),
    "functions": (None,),
    "logit_bias": (None,),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "tool_choice": (None, "none", "auto"),
}


def sampling_params(body: Mapping[str, Any], max_tokens: int, *, chat: bool = False) -> SamplingParams:
    """The request's sampling fields, checked (``max_tokens`` already resolved), for
    /v1/chat/completions where ``chat``, else /v1/completions."""
    n = integer(body, "n", 1, 1)
    if n != 1:
        raise BadRequest(f"'n' must be 1 (one choice per prompt) on this server; found {n}", "n")
    for name, allowed in _UNSUPPORTED.items():
        value = body.get(name)
        if value not in allowed and not (value == {} or value == []):
            raise _unsupported(name, value)
    echo = echo_flag(body)
    if chat and echo:
        raise BadRequest("'echo' is a /v1/completions field: a chat answer never repeats the prompt", "echo")
    logprobs = _chat_logprobs(body) if chat else _completion_logprobs(body)
    return SamplingParams(
        logprobs=logprobs,
        # An echoed prompt lists its tokens' logprobs with the answer's.
        prompt_logprobs=logprobs if echo else None,
        echo=echo,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        # top_p = 0 keeps the most likely token alone, as a tiny nucleus does.
        top_p=max(_number(body, "top_p", 1.0, 0.0, 1.0), 1e-9),
        # OpenAI takes any 64-bit integer; torch's generators take [0, 2**64)
        seed=_seed(body),
        stop=_stop(body),
    )


def _completion_logprobs(body: Mapping[str, Any]) -> int | None:
    """/v1/completions' ``logprobs``: how many alternatives each token lists (0: the sampled
    token's own logprob alone, as OpenAI and vLLM read it); None where not asked."""
    top = body.get("top_logprobs")
    if top is not None and top != 0:  # chat's field: the count is logprobs itself here
        raise BadRequest(
            "'top_logprobs' is a chat field; on /v1/completions 'logprobs' is the count of "
            f"alternatives (found {shown(top)})",
            "top_logprobs",
        )
    value = body.get("logprobs")
    if value is None or value is False:
        return None
    return _alternatives(value, "logprobs")


def _alternatives(value: Any, name: str) -> int:
    """``value`` of field ``name``, a count of alternatives a token lists, checked."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise BadRequest(
            f"'{name}' must be an integer in [0, {MAX_LOGPROBS}] (the most alternatives this server "
            f"lists per token is {MAX_LOGPROBS}); found {shown(value)}",
            name,
        )
    return value


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """Chat's ``logprobs`` flag (0 and 1 read as false and true) and ``top_logprobs``: the
    count of alternatives each token lists, or None where not asked."""
    flag = body.get("logprobs")
    if not (flag is None or isinstance(flag, bool) or (isinstance(flag, int) and flag in (0, 1))):
        raise BadRequest(f"'logprobs' must be true or false; found {shown(flag)}", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        top = _alternatives(top, "top_logprobs")
    if not flag:
        if top:
            raise BadRequest(
                f"'top_logprobs' ({top}) needs 'logprobs': true; set it, or leave 'top_logprobs' out",
                "top_logprobs",
            )
        return None
    return int(top or 0)


def _unsupported(name: str, value: Any) -> BadRequest:
    return BadRequest(f"'{name}' is not supported by this server; leave it out (found {shown(value)})", name)


def _seed(body: Mapping[str, Any]) -> int | None:
    seed = integer(body, "seed", None, -(2**63), 2**64 - 1)
    return None if seed is None else seed % 2**64


def include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    """``stream_options.include_usage``: a last chunk carrying the usage, as OpenAI sends.
    Only with ``stream: true``, as OpenAI and vLLM refuse it otherwise."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise BadRequest(
            "'stream_options' is only allowed when 'stream' is true; leave it out or set 'stream': true",
            "stream_options",
        )
    include = options.get("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(include, bool):
        raise BadRequest(
            f"'stream_options' must be an object like {{\"include_usage\": true}}; found {shown(options)}",
            "stream_options",
        )
    return include


def text_field(text: str, where: str, param: str) -> str:
    """``text`` if it can be encoded (JSON allows a lone surrogate, UTF-8 does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(
            f"{where} holds an unpaired surrogate ({text[exc.start : exc.end]!a}) at character {exc.start}, "
            "which is not text; send valid Unicode",
            param,
        ) from None
    return text


def _flag(body: Mapping[str, Any], name: str) -> bool:
    """A true-or-false field (absent or null: false)."""
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false; found {shown(value)}", name)
    return value


def echo_flag(body: Mapping[str, Any]) -> bool:
    """/v1/completions' ``echo``: the answer's text (and logprobs) start with the prompt's."""
    return _flag(body, "echo")


def of_prompt(exc: BadRequest, i: int, n: int) -> BadRequest:
    """``exc``, about prompt ``i`` of ``n``: named where they are a batch."""
    return BadRequest(about_prompt(exc.message, i, n), exc.param, exc.status, exc.code)


def stream_flag(body: Mapping[str, Any]) -> bool:
    return _flag(body, "stream")


def chat_messages(body: Mapping[str, Any], most: int | None = None) -> list[dict[str, str]]:
    """The checked messages; more than ``most`` (the context's tokens: each message takes at
    least one) are refused before any is read."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            f"'messages' must be a non-empty list of messages; found {shown(messages)}", "messages"
        )
    if most is not None and len(messages) > most:
        raise BadRequest(
            f"'messages' holds {len(messages)} messages; this model's context of {most} tokens cannot "
            "hold them (each takes at least one token)",
            "messages",
            code="context_length_exceeded",
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(
                f"messages[{i}] must be an object with a role of system, user, assistant or developer; "
                f"found {shown(m)}",
                "messages",
            )
        content = m.get("content")
        if content is None and m["role"] == "assistant":  # a replayed turn that only called tools
            content = ""
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            texts = [p.get("text") for p in content]
            if not all(isinstance(t, str) for t in texts):
                raise BadRequest(f"messages[{i}].content: a text part's 'text' must be a string", "messages")
            content = "\n".join(texts)  # as vLLM joins them
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string; found {shown(content)}", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": text_field(content, f"messages[{i}].content", "messages")})
    return out
