"""Hugging Face transformers' ``LlamaForCausalLM`` with the engine's weights: the reference
the tests and benchmarks/decoder.py compare the Triton decoder with (transformers is in
the ``test`` extra, not the server's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..._optional import require
from .config import ModelConfig


def hf_config(config: ModelConfig) -> Any:
    """transformers' ``LlamaConfig`` for ``config``'s shapes, eager attention."""
    transformers = require("transformers", feature="the Hugging Face reference model", extra="test")
    return transformers.LlamaConfig(
        vocab_size=config.vocab,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.n_q_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_size,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_eps,
        tie_word_embeddings=config.tied,
        max_position_embeddings=config.max_position,
        attn_implementation="eager",
    )


def hf_model(config: ModelConfig, state_dict: Mapping[str, torch.Tensor] | None = None) -> Any:
    """``LlamaForCausalLM`` of ``config``'s shapes in eval mode, with ``state_dict``'s
    weights (HF names; layers past ``config.layers`` ignored), or its own random ones."""
    transformers = require("transformers", feature="the Hugging Face reference model", extra="test")
    model = transformers.LlamaForCausalLM(hf_config(config))
    if state_dict is not None:
        wanted = {
            k: v
            for k, v in state_dict.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < config.layers
        }
        result = model.load_state_dict(wanted, strict=False)
        allowed = {"lm_head.weight"} if config.tied else set()
        if set(result.missing_keys) - allowed or result.unexpected_keys:
            raise ValueError(f"the weights do not fit LlamaForCausalLM: {result}")
        if config.tied:
            model.tie_weights()
    return model.eval()


def hf_greedy(model: Any, prompt: list[int], tokens: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy continuation of one prompt (no end-of-text stop), and the logits of its
    first new token."""
    device = next(model.parameters()).device
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        first = model(ids).logits[0, -1].float().cpu()
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist(), first
