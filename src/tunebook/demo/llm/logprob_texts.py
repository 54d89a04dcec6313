"""Logprobs as the OpenAI API shows them: tokens named by their text, values JSON can hold,
and a completion's echoed prompt.

A token is named by its text, or ``bytes:`` and its bytes where they are part of a character
(:func:`token_text`); a log-probability that is not finite is sent as ``LOWEST_LOGPROB``
(JSON has no -Infinity). :class:`TokenTexts` builds /v1/completions' ``logprobs`` object and
chat's ``logprobs.content``; :class:`Echo` is the prompt a completion echoes (``echo: true``):
its text, where each of its tokens starts in it, and (where asked) each token's logprob
after the tokens before it.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .sampling import TokenLogprobs
from .tokenizer import TokenizerLike, token_bytes

# A log-probability that is not a finite number (a token of probability 0) is sent as this,
# as vLLM clamps it: JSON has no -Infinity.
LOWEST_LOGPROB = -9999.0


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else LOWEST_LOGPROB


def token_text(raw: bytes) -> str:
    r"""How logprobs name a token of bytes ``raw``: its text where they are UTF-8 on their
    own, else (part of a character) ``bytes:`` and the bytes, as OpenAI's completions name
    such a token, printable ASCII as itself and any other byte as ``\xNN``: distinct byte
    strings never share a name, as U+FFFD made every part of a character look alike.

    >>> token_text(" é".encode()), token_text(b" \xe2\x9d"), token_text(b"\\\xff")
    (' é', 'bytes: \\xe2\\x9d', 'bytes:\\x5c\\xff')
    """
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


class TokenTexts:
    """Token ids as logprobs show them: a token's text (:func:`token_text`) and its bytes,
    remembered (the same alternatives come back). Whole answers build theirs on worker
    threads, streams on the event loop: a lookup that misses (a race) computes it again."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        self.known: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        known = self.known.get(token)
        if known is None:
            raw = token_bytes(self.tokenizer, token)
            if len(self.known) > 65536:
                self.known.clear()
            known = self.known[token] = (token_text(raw), list(raw))
        return known

    def completion(
        self, entries: list[TokenLogprobs], echo: Echo | None = None, shift: int = 0
    ) -> dict[str, Any]:
        """/v1/completions' ``logprobs`` for ``entries``: each ``top_logprobs`` holds the
        alternatives and the sampled token, as OpenAI and vLLM list them (up to logprobs +
        1); a name already listed keeps its first value, the likeliest (two ids of the same
        bytes; the sampled token among the alternatives). ``text_offset``: where each
        token's text starts in the answer (:attr:`TokenLogprobs.text_offset`, plus ``shift``,
        or the echoed prompt's length: the text before them). With ``echo``, the prompt's
        tokens come first, the first with no logprob (``null``: nothing comes before it)."""
        out: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        if echo is not None:
            out["tokens"].append(self(echo.ids[0])[0])
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(0)
            for entry, offset in zip(echo.entries, echo.offsets[1:]):
                self._add(out, entry, offset)
            shift = len(echo.text)
        for entry in entries:
            self._add(out, entry, entry.text_offset + shift)
        return out

    def _add(self, out: dict[str, list[Any]], entry: TokenLogprobs, offset: int) -> None:
        text = self(entry.token)[0]
        alternatives: dict[str, float] = {}
        for i, p in entry.top:
            alternatives.setdefault(self(i)[0], _logprob(p))
        alternatives.setdefault(text, _logprob(entry.logprob))
        out["tokens"].append(text)
        out["token_logprobs"].append(_logprob(entry.logprob))
        out["top_logprobs"].append(alternatives)
        out["text_offset"].append(offset)

    def chat(self, entries: list[TokenLogprobs]) -> dict[str, Any]:
        """Chat's ``logprobs``: ``content``, a token each, with its ``top_logprobs``."""

        def one(token: int, logprob: float) -> dict[str, Any]:
            text, raw = self(token)
            return {"token": text, "logprob": _logprob(logprob), "bytes": raw}

        content = [
            {**one(e.token, e.logprob), "top_logprobs": [one(i, p) for i, p in e.top]} for e in entries
        ]
        return {"content": content}


@dataclass(frozen=True)
class Echo:
    """The prompt a completion echoes: its ``ids``, its ``text``, where each id's text starts
    in it (``offsets``, in characters, as the answer's tokens' ``text_offset``), and
    ``entries``: the logprobs of ``ids[1:]`` (empty where none were asked)."""

    ids: list[int]
    text: str
    offsets: list[int]
    entries: list[TokenLogprobs]

    @classmethod
    def of(
        cls,
        tokenizer: TokenizerLike,
        ids: Sequence[int],
        entries: list[TokenLogprobs],
        text: str | None = None,
    ) -> Echo:
        """Each id's bytes through one incremental UTF-8 decoder, noting where it starts: after
        the characters that came out, and those the bytes held back become unless the id
        goes on with them (it begins with a continuation byte). So a token ending inside a
        character starts where the character does, and one that completes it too (as
        :attr:`TextStream.decoded` counts), and a byte that never forms a character is one
        replacement character. Linear in the prompt whatever its bytes (decoding it as an
        answer is, re-reading a character that never completes, quadratic: a client's prompt
        of lone lead bytes took seconds). Special tokens, which the tokenizer's ``decode``
        leaves out, have no width. ``text``: the prompt as sent, where it was a string (else
        the ids decoded).

        >>> from .tokenizer import ByteTokenizer
        >>> e = Echo.of(ByteTokenizer(), list("aé!".encode()), [])
        >>> e.text, e.offsets
        ('aé!', [0, 1, 1, 2])
        >>> Echo.of(ByteTokenizer(), [0xE2, 0xE2, 65], []).offsets  # two lone lead bytes, then "A"
        [0, 1, 2]
        """
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        special = getattr(tokenizer, "special", {})
        parts: list[str] = []
        offsets: list[int] = []
        decoded = 0
        for token in ids:
            raw = b"" if token in special else token_bytes(tokenizer, token)
            held = decoder.getstate()[0]
            goes_on = bool(held) and raw[:1] != b"" and 0x80 <= raw[0] < 0xC0
            offsets.append(decoded + (0 if goes_on or not held else len(held.decode(errors="replace"))))
            part = decoder.decode(raw)
            parts.append(part)
            decoded += len(part)
        parts.append(decoder.decode(b"", final=True))
        return cls(list(ids), "".join(parts) if text is None else text, offsets, entries)
