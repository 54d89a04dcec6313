"""The shape of a Llama-family decoder, and the two models the demo knows by name.

A :class:`ModelConfig` is everything the decoder, the KV cache and the benchmarks need to
know about a model: its sizes, its RoPE base, its RMSNorm epsilon, whether the output
projection is the embedding (tied), and its special tokens. A GGUF file yields one
(``loading.read_gguf``); :data:`PRESETS` holds the shapes used for random-weight runs.

>>> SMOLLM2_135M.head_size, SMOLLM2_135M.q_size, SMOLLM2_135M.kv_size
(64, 576, 192)
>>> round(LLAMA3_8B.parameters() / 1e9, 2)
8.03
>>> SMOLLM2_135M.cut(2).layers
2
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab: int
    hidden: int
    layers: int
    n_q_heads: int
    n_kv_heads: int
    head_size: int
    intermediate: int  # the SwiGLU width (gate and up each)
    rope_theta: float
    rms_eps: float
    tied: bool  # the output projection is the token embedding
    max_position: int  # positions the RoPE table covers (the model's trained context)
    bos_id: int | None = None
    eos_id: int | None = None

    def __post_init__(self) -> None:
        sizes = ("vocab", "hidden", "layers", "n_q_heads", "n_kv_heads", "head_size", "intermediate")
        for size in sizes:  # a GGUF file's metadata can say 0 (the modulo below then raised)
            if getattr(self, size) < 1:
                raise ValueError(f"{self.name}: {size} is {getattr(self, size)}; it must be at least 1")
        if self.n_q_heads % self.n_kv_heads:
            raise ValueError(
                f"{self.name}: {self.n_q_heads} query heads do not share {self.n_kv_heads} KV heads evenly "
                "(grouped-query attention needs n_q_heads % n_kv_heads == 0)"
            )
        if self.head_size % 2:
            raise ValueError(f"{self.name}: RoPE needs an even head size; found {self.head_size}")

    @property
    def q_size(self) -> int:
        return self.n_q_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_size

    def parameters(self) -> int:
        """Weights in the model, the output projection counted once when tied."""
        attn = self.hidden * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head

    def cut(self, layers: int) -> ModelConfig:
        """The same model with only its first ``layers`` layers (tests on the CPU interpreter)."""
        if not 1 <= layers <= self.layers:
            raise ValueError(f"{self.name} has {self.layers} layers; cannot keep {layers}")
        if layers == self.layers:
            return self
        return dataclasses.replace(self, name=f"{self.name}[:{layers} layers]", layers=layers)


SMOLLM2_135M = ModelConfig(
    name="smollm2-135m",
    vocab=49152,
    hidden=576,
    layers=30,
    n_q_heads=9,
    n_kv_heads=3,
    head_size=64,
    intermediate=1536,
    rope_theta=100000.0,
    rms_eps=1e-5,
    tied=True,
    max_position=8192,
    bos_id=1,
    eos_id=2,
)

LLAMA3_8B = ModelConfig(
    name="llama-3-8b",
    vocab=128256,
    hidden=4096,
    layers=32,
    n_q_heads=32,
    n_kv_heads=8,
    head_size=128,
    intermediate=14336,
    rope_theta=500000.0,
    rms_eps=1e-5,
    tied=False,
    max_position=8192,
    bos_id=128000,
    eos_id=128009,
)

# Test shapes: small enough that Triton's CPU interpreter runs a step in a fraction of a
# second (random weights only).
TINY = ModelConfig(
    name="tiny",
    vocab=512,
    hidden=64,
    layers=2,
    n_q_heads=4,
    n_kv_heads=2,
    head_size=16,
    intermediate=128,
    rope_theta=10000.0,
    rms_eps=1e-5,
    tied=False,
    max_position=2048,
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SMOLLM2_135M, LLAMA3_8B, TINY)}
