"""Choosing the next token from logits: greedy, or temperature and nucleus (top-p) sampling.

A temperature below ``GREEDY_BELOW`` is greedy (argmax; the lowest id wins a tie, as
``torch.argmax`` does): dividing by a tinier one overflows (vLLM's rule, its sampling
eps). Otherwise the logits are divided by the temperature, the smallest set of tokens
whose probabilities sum to at least ``top_p`` is kept (the most likely token always), and
a token is drawn from it. Rows with a ``seed`` draw from their own generator, so the same
request with the same seed gets the same tokens; the others share the engine's.

These are PyTorch operations on the GPU (argmax, softmax, sort, cumsum, multinomial): the
part of a step that is not the pack's kernels, a few small launches per step.

A request with ``logprobs`` set (0 or more alternatives) also gets, for each token it
samples, :func:`token_logprobs`: the log-probability of that token and of the
``logprobs`` most likely ones under the model's own distribution, ``log_softmax`` of the
raw logits, before temperature and top-p (vLLM's default, its ``raw_logprobs``), so the
numbers do not depend on how the token was drawn. They are computed only over the rows
that asked, after the step's logits are made (after a CUDA graph's replay), in one
transfer; rows that did not ask cost nothing. A request with ``prompt_logprobs`` set gets
the same for each token of its prompt after the first, from the prefill's logits of the
token before it (:func:`prompt_token_logprobs`): what a scorer reads (``echo`` on
/v1/completions, as lm-evaluation-harness asks for the log-likelihood of a text).

>>> logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
>>> sample(logits, [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.01)]).tolist()
[1, 0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. ``max_tokens``: tokens to generate at most; ``stop``:
    strings that end the text (cut before them); ``ignore_eos``: keep going past the
    model's end-of-text tokens (benchmarks)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    # Each sampled token's log-probability and its ``logprobs`` most likely alternatives'
    # (0: its own alone); None: none computed.
    logprobs: int | None = None
    # The same for each prompt token after the first (None: none computed).
    prompt_logprobs: int | None = None
    # The prompt is part of the answer (/v1/completions' echo): ``max_tokens`` may then be 0,
    # a prefill alone (what a scorer asks; with prompt_logprobs, the prompt scored).
    echo: bool = False

    def __post_init__(self) -> None:
        least = 0 if self.echo else 1
        if self.max_tokens < least:
            raise ValueError(f"max_tokens must be at least {least}; found {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100]; found {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; found {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be at least 0 (or None); found {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generator: torch.Generator | None = None,
    seeded: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` ``[n, vocab]``; ``seeded[i]`` is row i's own
    generator (None: ``generator``)."""
    logits = logits.float()
    out = torch.argmax(logits, dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    own = [i for i in rows if seeded is not None and seeded[i] is not None]
    shared = [i for i in rows if i not in own]
    if shared:
        index = torch.tensor(shared, device=logits.device)
        out[index] = _draw(logits[index], [params[i] for i in shared], generator)
    for i in own:
        assert seeded is not None
        out[i] = _draw(logits[i : i + 1], [params[i]], seeded[i])[0]
    return out


def _draw(
    logits: torch.Tensor, params: Sequence[SamplingParams], gen: torch.Generator | None
) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    probs = torch.softmax(logits.float() / temps, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p: the first always stays.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # A row the division still overflowed (inf logits from the model) takes its argmax
    # rather than failing the step, and with it every request in the batch.
    bad = ~torch.isfinite(probs).all(dim=-1)
    if bool(bad.any()):
        probs = torch.where(
            bad[:, None], torch.nn.functional.one_hot(logits.argmax(-1), probs.shape[-1]).to(probs), probs
        )
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability, and its step's most likely tokens' (``top``:
    ``(id, logprob)`` pairs, most likely first); ``text_offset``: where the token's text
    starts in the answer, in characters (set by the engine as it decodes the token)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    text_offset: int = 0


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, wanted: Sequence[int | None]
) -> list[TokenLogprobs | None]:
    """For each row ``i`` of ``logits`` ``[n, vocab]`` whose ``wanted[i]`` is not None, the
    log-probability of ``tokens[i]`` and of the ``wanted[i]`` most likely ids, from
    ``log_softmax`` of the raw logits (module docstring); None for the other rows, which
    cost nothing.

    >>> logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    >>> a, b = token_logprobs(logits, torch.tensor([1, 0]), [1, None])
    >>> a.token, round(a.logprob, 4), [(i, round(p, 4)) for i, p in a.top], b
    (1, -0.1698, [(1, -0.1698)], None)
    """
    rows = [i for i, k in enumerate(wanted) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(wanted)
    if not rows:
        return out
    k = min(max(int(wanted[i] or 0) for i in rows), logits.shape[-1])
    index = torch.tensor(rows, device=logits.device)
    table = _table(logits[index], tokens[index], k).tolist()  # one transfer for every row that asked
    for row, i in zip(table, rows):
        out[i] = _entry(row, k, min(int(wanted[i] or 0), k))
    return out


def _table(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows, 2 + 2k]``: each row's token, its logprob, the ``k`` largest logprobs and their
    ids (ids below 2**24: exact in float32), on the logits' device: the caller takes it to
    the host in one transfer."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = tokens.to(device=logits.device, dtype=torch.int64)
    parts = [chosen.to(lp.dtype)[:, None], lp.gather(1, chosen[:, None])]
    if k:
        values, ids = torch.topk(lp, k, dim=-1)
        parts += [values, ids.to(lp.dtype)]
    return torch.cat(parts, dim=1)


def _entry(row: Sequence[float], k: int, n: int) -> TokenLogprobs:
    """A row of :func:`_table` (of ``k`` alternatives) as a token's logprobs with ``n`` of them."""
    token, logprob = int(row[0]), row[1]
    top = [(int(t), p) for t, p in zip(row[2 + k : 2 + k + n], row[2 : 2 + n])]
    return TokenLogprobs(token, logprob, _sampled_first_among_ties(top, token, logprob))


# Prompt rows whose logits are made at once when a prompt is scored: a row is a vocabulary
# of logits (128,256 for Llama 3), so 8,192 prompt tokens at once would be 4 GB in fp32.
PROMPT_ROWS = 512


@dataclass(frozen=True)
class PromptLogprobs:
    """A scored prompt's logprobs as the engine keeps them: a table of a few floats a token
    on the host (:func:`_table`), made into :class:`TokenLogprobs` only by :meth:`entries`,
    where the answer is built (a Python object per token of an 8,000-token prompt took the
    engine's thread 45-200 ms, which every decode step waited for)."""

    tables: tuple[torch.Tensor, ...] = ()
    k: int = 0

    def entries(self) -> list[TokenLogprobs]:
        """Each scored token's logprobs, in the prompt's order (its tokens after the first)."""
        return [_entry(row, self.k, self.k) for table in self.tables for row in table.tolist()]


def prompt_token_logprobs(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    states: torch.Tensor,
    prompt: Sequence[int],
    k: int,
    rows: int | None = None,
) -> PromptLogprobs:
    """For each token ``prompt[i]`` after the first, its log-probability (and the ``k`` most
    likely ids') given the tokens before it: ``states[i - 1]`` (the final hidden state of
    the token before) through ``logits_of`` (the model's head), ``rows`` (PROMPT_ROWS) rows at
    a time.

    >>> states = 9 * torch.eye(3)  # a head that is the identity: each state is its logits
    >>> scores = prompt_token_logprobs(lambda x: x, states, [0, 1, 2], 0)
    >>> [(e.token, round(e.logprob, 3)) for e in scores.entries()]
    [(1, -9.0), (2, -9.0)]
    """
    rows = rows or PROMPT_ROWS  # read at the call: a setting a test or a server may change
    targets = torch.tensor(list(prompt[1:]), dtype=torch.int64, device=states.device)
    tables = []
    for start in range(0, len(prompt) - 1, rows):
        end = min(start + rows, len(prompt) - 1)
        logits = logits_of(states[start:end])
        k = min(k, logits.shape[-1])
        tables.append(_table(logits, targets[start:end], k))
    # One transfer for the whole prompt, not one wait for the GPU a chunk.
    return PromptLogprobs((torch.cat(tables).cpu(),) if tables else (), k)


def _sampled_first_among_ties(
    top: list[tuple[int, float]], token: int, logprob: float
) -> tuple[tuple[int, float], ...]:
    """``top`` with the sampled token first among the ids of its value: argmax (greedy) and
    topk may break a tie apart, and a client reads greedy's token as the top alternative.

    >>> _sampled_first_among_ties([(4, -0.7), (9, -0.7), (1, -2.0)], 9, -0.7)
    ((9, -0.7), (4, -0.7), (1, -2.0))
    >>> _sampled_first_among_ties([(4, -0.7), (5, -0.7)], 9, -0.7)  # tied, past the top 2
    ((9, -0.7), (4, -0.7))
    """
    for j, (t, p) in enumerate(top):
        if p == logprob:
            if t != token:
                rest = [entry for entry in top if entry[0] != token]
                top = [*rest[:j], (token, logprob), *rest[j:]][: len(top)]
            break
    return tuple(top)
