"""Text <-> token ids, built from a GGUF file's metadata; the chat template; streaming text.

A GGUF file of a byte-level BPE model (``tokenizer.ggml.model = "gpt2"``) holds the
vocabulary (``tokens``), the merges, each token's type (3 = control, e.g. ``<|im_end|>``),
the pre-tokenizer's name (``tokenizer.ggml.pre``), the BOS/EOS ids and a Jinja chat
template. :meth:`Tokenizer.from_gguf` rebuilds it with Hugging Face ``tokenizers``:

* the pre-tokenizer llama.cpp names: ``smollm`` splits every digit on its own and then
  applies GPT-2's regex (as SmolLM2's ``tokenizer.json`` does); ``gpt2`` and unknown
  names get GPT-2's regex alone;
* control and user-defined tokens are special: ``<|im_start|>`` in a chat prompt is one
  token, never its characters;
* the chat template is rendered with Jinja2 in a sandbox, as transformers renders it.

:class:`TextStream` turns a growing list of ids into text deltas: a delta never ends in
the middle of a UTF-8 character, and stop strings end the text before they appear.
:class:`ByteTokenizer` stands in for models without a vocabulary (random weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..._optional import require

CONTROL, USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names -> the digit rule applied before GPT-2's byte-level regex.
_INDIVIDUAL_DIGITS = {"smollm"}


class TokenizerLike(Protocol):
    eos_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str: ...

    def fewest_tokens(self, text: str) -> int: ...


class Tokenizer:
    """A byte-level BPE tokenizer with its special tokens and chat template."""

    def __init__(
        self,
        backend: Any,
        *,
        eos_ids: frozenset[int],
        bos_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        special: Mapping[int, str],
    ) -> None:
        self.backend = backend
        self.eos_ids = eos_ids
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special = dict(special)
        self._template: Any = None
        self._longest: int | None = None

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        tk = require("tokenizers", feature="the GGUF tokenizer (tunebook.demo.llm)", extra="server")
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model={model!r}: only byte-level BPE ('gpt2') vocabularies are supported"
            )
        missing = [f for f in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") if f not in metadata]
        if missing:
            raise ValueError(f"the GGUF file's tokenizer lacks {', '.join(missing)}")
        tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
        types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        try:
            backend = tk.Tokenizer(
                tk.models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False)
            )
        except BaseException as exc:  # the Rust side panics (a PanicException, no Exception) on a bad merge
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ValueError(f"the GGUF file's tokenizer does not load: {exc}") from None
        byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if metadata.get("tokenizer.ggml.pre") in _INDIVIDUAL_DIGITS:
            backend.pre_tokenizer = tk.pre_tokenizers.Sequence(
                [tk.pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = tk.decoders.ByteLevel()
        special = {i: t for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)}
        backend.add_special_tokens(
            [tk.AddedToken(t, special=True, normalized=False) for t in special.values()]
        )
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        eos_ids = {int(eos)} if eos is not None else set()
        # <|endoftext|> ends a document in plain completions as <|im_end|> ends a chat turn.
        eos_ids |= {i for i, t in special.items() if t in ("<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")}
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        return cls(
            backend,
            eos_ids=frozenset(eos_ids),
            bos_id=int(bos) if bos is not None else None,
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
            special=special,
        )

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it are single tokens."""
        ids = list(self.backend.encode(text, add_special_tokens=False).ids)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on ``len(self.encode(text))`` that costs no tokenization: no token
        covers more UTF-8 bytes than the longest in the vocabulary (a byte-level token's
        characters stand for a byte each, so their UTF-8 length over-counts, which keeps the
        bound sound). A server refuses a prompt far past its context with it, before spending
        seconds of CPU tokenizing megabytes."""
        if self._longest is None:
            vocab = self.backend.get_vocab(with_added_tokens=True)
            self._longest = max((len(t.encode()) for t in vocab), default=1)
        return -(-len(text.encode(errors="surrogatepass")) // self._longest)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        return str(self.backend.decode(list(ids), skip_special_tokens=True))

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes one token stands for (a special token: its name's), which may be
        part of a character: what OpenAI's logprobs call a token's ``bytes``."""
        if token in self.special:
            return self.special[token].encode()
        piece = self.backend.id_to_token(token)
        if piece is None:
            return b""
        table = _byte_level_chars()
        # A character outside GPT-2's byte alphabet (a token added as text) stands for itself.
        return b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The model's chat template applied to ``messages``, ending where the assistant's
        answer starts. Raises ValueError if the model has no template or it rejects them."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions with a plain prompt")
        if self._template is None:
            jinja2 = require("jinja2", feature="chat templates (tunebook.demo.llm)", extra="server")
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ValueError(f"the chat template refused the messages: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateError as exc:
                raise ValueError(f"the model's chat template does not parse: {exc}") from exc
        return str(
            self._template.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self.special.get(self.bos_id, "") if self.bos_id is not None else "",
                eos_token=next((self.special[i] for i in sorted(self.eos_ids) if i in self.special), ""),
            )
        )


class ByteTokenizer:
    """Each UTF-8 byte is a token (ids 0..255); a larger id decodes to ``<id>``. For models
    without a vocabulary of their own (random weights): their text is noise anyway, but each
    token still streams as text, as a real vocabulary's would (an id that decoded to nothing
    would hold back its chunk, and a client timing its first token would wait for a byte).

    >>> t = ByteTokenizer()
    >>> t.encode("hé"), t.decode([104, 195, 169, 70000, 33])
    ([104, 195, 169], 'hé<70000>!')
    """

    eos_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def fewest_tokens(self, text: str) -> int:
        return len(text.encode(errors="surrogatepass"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if 0 <= token < 256 else f"<{token}>".encode()

    def decode(self, ids: Sequence[int]) -> str:
        text, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
            else:
                text += [run.decode(errors="replace"), f"<{i}>"]
                run.clear()
        return "".join([*text, run.decode(errors="replace")])

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return "".join(f"{m.get('role', '')}: {m.get('content', '')}\n" for m in messages) + "assistant: "


class TextStream:
    """Text deltas of a growing sequence of generated ids, cut where a stop string first occurs.

    Decoding is incremental (vLLM's way): each push decodes only the ids since the last
    complete character, so a step costs the same at token 2000 as at token 2.

    >>> s = TextStream(ByteTokenizer(), stop=["END"])
    >>> s.push([72, 105]), s.push([195]), s.push([169, 32]), s.push(list(b"xEND more")), s.stopped
    ('Hi', '', 'é ', 'x', True)
    """

    def __init__(self, tokenizer: TokenizerLike, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # what has been handed out
        self.pending = ""  # decoded, held back (a possible start of a stop string)
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to the last complete text, _seen
        self._read = 0
        self._seen = ""
        self._held = 0  # complete characters decoded past _seen, held with half a character

    @property
    def decoded(self) -> int:
        """How many complete characters the ids pushed so far decode to: where the text of
        the next id starts in the answer (its ``text_offset``). A character whose bytes are
        not all here yet does not count, so an id that completes it starts where it starts;
        past a stop string's start this runs past the text handed out.

        >>> s = TextStream(ByteTokenizer())
        >>> [(s.decoded, s.push([b]))[0] for b in "aé€b".encode()] + [s.decoded]
        [0, 1, 1, 2, 2, 2, 3, 4]
        """
        return len(self.text) + len(self.pending) + self._held

    def push(self, ids: Sequence[int]) -> str:
        """Add new ids; return the text they complete (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        return self._take(final=False)

    def _take(self, final: bool) -> str:
        """Decode the text the ids added since the last complete text, and release it; unless
        ``final``, wait while it ends in half a character (the rest of its bytes may come)."""
        full = self.tokenizer.decode(self.ids[self._prefix :])
        if len(full) <= len(self._seen) or (not final and full.endswith("\ufffd")):
            # The characters before the half one are complete (decoded, not yet released).
            self._held = max(len(full.rstrip("\ufffd")) - len(self._seen), 0)
            return ""
        self._held = 0
        self.pending += full[len(self._seen) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._seen = self.tokenizer.decode(self.ids[self._prefix : self._read])
        return self._release()

    def _release(self) -> str:
        # The text ends where the first stop string to occur begins (not the first of the list).
        cut: int | None = None  # in self.pending: where the earliest stop string begins
        for s in self.stop:
            window = self.text[len(self.text) - len(s) + 1 :] if len(s) > 1 else ""
            at = (window + self.pending).find(s)
            if at >= 0 and (cut is None or at - len(window) < cut):
                cut = at - len(window)
        if cut is not None:
            self.stopped = True
            # A stop string that began in text already handed out ends the text there.
            delta = self.pending[: max(cut, 0)]
            self.text += delta
            self.pending = ""
            return delta
        hold = max((_overlap(self.text + self.pending, s) for s in self.stop), default=0)
        hold = min(hold, len(self.pending))
        delta = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(delta) :]
        self.text += delta
        return delta

    def finish(self) -> str:
        """The text held back at the end: a partial stop string that never completed, and the
        bytes of a character that never completed (as ``decode`` shows them: U+FFFD), which
        are tokens the request generated and counted.

        >>> s = TextStream(ByteTokenizer())
        >>> s.push([65]), s.push([195]), s.finish(), s.text == ByteTokenizer().decode([65, 195])
        ('A', '', '\ufffd', True)
        """
        if self.stopped:
            return ""
        delta = self._take(final=True)  # a stop string may still complete in it
        if self.stopped:
            return delta
        rest, self.pending = self.pending, ""
        self.text += rest
        return delta + rest


def _overlap(text: str, stop: str) -> int:
    """The longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def token_bytes(tokenizer: TokenizerLike, token: int) -> bytes:
    """The bytes ``token`` stands for: the tokenizer's ``token_bytes`` where it has one, else
    its decoded text's (a character cut in two then shows as U+FFFD)."""
    exact = getattr(tokenizer, "token_bytes", None)
    return bytes(exact(token)) if exact is not None else tokenizer.decode([token]).encode()


_BYTE_LEVEL: dict[str, int] = {}


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> the byte it stands for: printable bytes
    stand for themselves, the others for chr(256 + n) in byte order."""
    if not _BYTE_LEVEL:
        printable = [
            *range(ord("!"), ord("~") + 1),
            *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1),
        ]
        others = [b for b in range(256) if b not in printable]
        _BYTE_LEVEL.update({chr(b): b for b in printable})
        _BYTE_LEVEL.update({chr(256 + n): b for n, b in enumerate(others)})
    return _BYTE_LEVEL
