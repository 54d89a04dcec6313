"""``tunebook.demo.llm``: a Llama-family LLM server whose every compute kernel is Triton.

Not part of the library: a demonstration of what it is for. A decoder (``decoder``)
runs on the pack's kernels (``tunebook.kernels``: GEMMs, RMSNorm, RoPE, SwiGLU, paged
and varlen attention, KV-cache writes), served from the shipped books in ``serve`` mode,
over a paged KV cache (``kv_cache``), with continuous batching (``scheduler``), sampling
(``sampling``), CUDA graphs for decode steps (``graphs``), an engine loop (``engine``)
and an OpenAI-compatible HTTP front (``server``). The real model is SmolLM2-135M-Instruct
from a GGUF file (``loading``, ``tokenizer``); random weights of Llama-3-8B's shapes
serve speed measurements.

    python -m tunebook.demo.llm generate "What is the capital of France?"
    python -m tunebook.demo.llm serve --port 8000

docs/llm-server.md describes it, what still runs outside Triton, and how it is measured.
"""
