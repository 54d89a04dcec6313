"""Choosing the next token from logits: greedy, or temperature and nucleus (top-p) sampling.

A temperature below ``GREEDY_BELOW`` is greedy (argmax; the lowest id wins a tie, as
``torch.argmax`` does): dividing by a tinier one overflows (vLLM's rule, its sampling
eps). Otherwise the logits are divided by the temperature, the smallest set of tokens
whose probabilities sum to at least ``top_p`` is kept (the most likely token always), and
a token is drawn from it. Rows with a ``seed`` draw from their own generator, so the same
request with the same seed gets the same tokens; the others share the engine's.

These are PyTorch operations on the GPU (argmax, softmax, sort, cumsum, multinomial): the
part of a step that is not the pack's kernels, a few small launches per step.

>>> logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
>>> sample(logits, [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.01)]).tolist()
[1, 0]
"""

from __future__ import annotations

from collections.abc import Sequence
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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1; found {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100]; found {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; found {self.top_p}")

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
