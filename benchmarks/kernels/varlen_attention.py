"""Benchmark ``tunebook.kernels.varlen_attention`` (causal prefill of packed sequences).

Per (head layout, longest sequence, cached prefix): ``--tokens`` tokens packed in
sequences of mixed lengths (the longest, a quarter, a half and three quarters of it, in
turn), each on top of ``prefix`` tokens in the paged cache (none for a plain prefill),
bf16, timed in one run (``_attention_bench`` says how):

* **tunebook**: the op with its tuned config;
* **hand-picked**: the same kernel with vLLM's prefix-prefill launch (128x128 tiles, 8 warps,
  one stage);
* **sdpa**: ``torch.nn.functional.scaled_dot_product_attention`` once per sequence on the
  same data, flash backend (``sdpa-flash``; with a prefix: the prefix gathered contiguously
  before timing, a bottom-right causal mask, whichever backend takes it: ``sdpa``).

Reported: microseconds, TFLOP/s (``4 * head * query heads`` per visible (query, key) pair)
and each variant's time over tunebook's.

    python benchmarks/kernels/varlen_attention.py --out DIR                   # Llama-3-8B, 70B TP8
    python benchmarks/kernels/varlen_attention.py --out DIR --models qwen2.5-7b --shapes 2048:0,512:3584
    python benchmarks/kernels/varlen_attention.py --out DIR --dry-run         # CPU, Triton's interpreter
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import _attention_bench as bench
import torch

MODELS = "llama-3-8b,llama-3-70b-tp8"
SHAPES = "512:0,2048:0,8192:0,512:3584,2048:6144"  # longest sequence : cached prefix
DRY_LAYOUT = {"n_q": 2, "n_kv": 1, "head_size": 16}


def jobs(opts: Any) -> Any:
    def make(models: Any) -> list[bench.Job]:
        if opts.dry_run:
            return [bench.Job({**DRY_LAYOUT, "seqlen": 20, "prefix": 18}, 24, "tiny")]
        out = []
        for m in models.select_models(opts.models or MODELS):
            layout = {"n_q": m.n_q_heads, "n_kv": m.n_kv_heads, "head_size": m.head_size}
            for pair in opts.shapes.split(","):
                seqlen, prefix = (int(x) for x in pair.split(":"))
                for tokens in (int(t) for t in opts.tokens.split(",")):
                    out.append(bench.Job({**layout, "seqlen": seqlen, "prefix": prefix}, tokens, m.name))
        return out

    return make


def _per_sequence(w: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Each sequence's q, k, v as [1, heads, len, head] (prefix keys first) and, with a
    prefix, its bottom-right causal mask [len_q, len_k] (None: plain causal)."""
    t, prefix = w.tensors, w.shape["prefix"]
    cu = t["cu_seqlens"].tolist()
    parts = []
    for b in range(len(cu) - 1):
        q, k, v = (t[n][cu[b] : cu[b + 1]] for n in ("q", "k", "v"))
        mask = None
        if prefix:
            blocks = t["block_table"][b].long()
            k = torch.cat([t["k_cache"][blocks].flatten(0, 1)[:prefix], k])
            v = torch.cat([t["v_cache"][blocks].flatten(0, 1)[:prefix], v])
            rows = torch.arange(q.shape[0], device=q.device)[:, None] + prefix
            mask = torch.arange(k.shape[0], device=q.device)[None, :] <= rows
        parts.append((q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask))
    return parts


def baselines(w: Any) -> bench.Baselines:
    """SDPA per sequence: the flash backend for plain prefills (GQA through ``enable_gqa``,
    or K/V repeated per query head beforehand where this PyTorch's flash kernel refuses
    it); with a prefix, K/V repeated and an explicit mask, whichever backend takes it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parts = _per_sequence(w)
    out = torch.empty_like(w.tensors["out"])
    cu = w.tensors["cu_seqlens"].tolist()
    group = w.shape["n_q"] // w.shape["n_kv"]

    def runner(parts: list[Any], gqa: bool, backends: list[Any] | None) -> Any:
        def sdpa() -> torch.Tensor:
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                for b, (q, k, v, mask) in enumerate(parts):
                    o = torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
                    )
                    out[cu[b] : cu[b + 1]] = o[0].transpose(0, 1)
            return out

        return sdpa

    def repeated(parts: list[Any]) -> list[Any]:
        return [(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), m) for q, k, v, m in parts]

    if not out.is_cuda:
        return {"sdpa": runner(parts, True, None)}
    if w.shape["prefix"]:
        return {"sdpa": runner(repeated(parts), False, None)}
    flash = runner(parts, True, [SDPBackend.FLASH_ATTENTION])
    try:
        flash()
        return {"sdpa-flash": flash}
    except RuntimeError:
        return {"sdpa-flash-kv-repeated": runner(repeated(parts), False, [SDPBackend.FLASH_ATTENTION])}


def metric(w: Any, us: float) -> dict[str, float]:
    return {"tflops": w.flops / (us * 1e-6) / 1e12}


def main(argv: list[str] | None = None) -> int:
    p = bench.parser("varlen_attention", __doc__ or "")
    p.add_argument("--shapes", default=SHAPES, help=f"longest:prefix pairs (default {SHAPES})")
    p.add_argument("--tokens", default="8192", help="packed tokens per call (default 8192)")
    opts = bench.finish_parse(p, p.parse_args(argv), ("tokens",))
    return bench.main("varlen_attention", opts, jobs(opts), baselines, metric, ["tflops"])


if __name__ == "__main__":
    sys.exit(main())
