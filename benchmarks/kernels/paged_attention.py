"""Benchmark ``tunebook.kernels.paged_attention_decode`` on LLM head layouts.

Per (head layout, batch, context length), ``batch`` sequences of ``context`` cached tokens
each, blocks of 16 tokens (``--block-size``) shuffled in the cache, bf16, timed in one run
(``_attention_bench`` says how):

* **tunebook**: the op with its tuned config (split-KV or not, as the tuner chose);
* **hand-picked**: the same kernel with the launch vLLM's Triton attention backend
  hard-codes at decode (16-key tiles, 16 softmax segments below 128 (sequence, KV head)
  programs, 4 warps, 3 stages);
* **sdpa**: ``torch.nn.functional.scaled_dot_product_attention`` on the same keys and
  values laid out contiguously (``[batch, NK, context, head]``, GQA through
  ``enable_gqa``): the ceiling PyTorch gives without paging. PyTorch picks the backend; on
  the H200 with torch 2.11 it runs cuDNN's fused attention (a 16x128x128 tile, one block per
  sequence and KV head: BENCHMARKS.md, section 5b, nineteenth session);
* **sdpa-flash** (GPU only): the same call held to the FlashAttention-2 backend;
* **copy** (GPU only): an SM copy kernel moving as many bytes as the op reads (half of them
  read, half written), no attention: what the memory system gives a call of this size,
  launch and ramp included. At one sequence of 8k tokens on one KV head the op reads 4 MB,
  which no kernel moves at the device copy bandwidth measured on 1 GiB.

Reported: microseconds, the bandwidth of reading the K/V cache (``kv GB/s`` = K and V
bytes / time) and its share of an SM copy kernel's bandwidth measured in the same run on
1 GiB (``of_copy``), and each variant's time over tunebook's (``copy/tunebook``: tunebook's
share of the bandwidth a copy of the same bytes reaches).

    python benchmarks/kernels/paged_attention.py --out DIR                    # Llama-3-8B, 70B TP4/TP8
    python benchmarks/kernels/paged_attention.py --out DIR --models llama-3-8b --batches 1,64 --contexts 2048
    python benchmarks/kernels/paged_attention.py --out DIR --mode serve --book src/tunebook/kernels/books
    python benchmarks/kernels/paged_attention.py --out DIR --block-size 64     # a server's other block size
    python benchmarks/kernels/paged_attention.py --out DIR --dry-run          # CPU, Triton's interpreter

At most 2^21 cached tokens per workload (one layer's cache of 256 sequences of 8k).
"""

from __future__ import annotations

import sys
from typing import Any

import _attention_bench as bench
import _timing
import torch

MODELS = "llama-3-8b,llama-3-70b-tp4,llama-3-70b-tp8"
BATCHES = "1,4,16,64,256"
CONTEXTS = "128,512,2048,8192,32768"
DRY_LAYOUT = {"n_q": 2, "n_kv": 1, "head_size": 16}


def jobs(opts: Any) -> Any:
    def make(models: Any) -> list[bench.Job]:
        page = opts.block_size or models.PAGE
        if opts.dry_run:
            return [bench.Job({**DRY_LAYOUT, "page": page, "context": 40}, 3, "tiny")]
        out = []
        for m in models.select_models(opts.models or MODELS):
            layout = {"n_q": m.n_q_heads, "n_kv": m.n_kv_heads, "head_size": m.head_size, "page": page}
            for context in (int(c) for c in opts.contexts.split(",")):
                for batch in (int(b) for b in opts.batches.split(",")):
                    if batch * models.cached_tokens(context, page) <= models.DECODE_MAX_TOKENS:
                        out.append(bench.Job({**layout, "context": context}, batch, m.name))
        return out

    return make


def baselines(w: Any) -> bench.Baselines:
    """SDPA on the same K/V gathered into contiguous [batch, NK, context, head] tensors."""
    t, context = w.tensors, w.shape["context"]
    batch, n_kv, hs = t["q"].shape[0], w.shape["n_kv"], w.shape["head_size"]

    def contiguous(cache: torch.Tensor) -> torch.Tensor:
        gathered = cache[t["block_table"].long()].reshape(batch, -1, n_kv, hs)[:, :context]
        return gathered.transpose(1, 2).contiguous()

    k, v = contiguous(t["k_cache"]), contiguous(t["v_cache"])
    q = t["q"][:, :, None, :]

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)[:, :, 0]

    if not q.is_cuda:
        return {"sdpa": sdpa}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return sdpa()

    # As many bytes moved (read and written) as the op reads: K and V of every sequence's context.
    copy = _timing.sm_copy(kv_bytes(w) // 2, q.device)
    return {"sdpa": sdpa, "sdpa-flash": sdpa_flash, "copy": copy}


def kv_bytes(w: Any) -> int:
    """The bytes of K and V a call reads: every sequence's whole context."""
    shape = w.shape
    return (
        2 * w.tokens * shape["context"] * shape["n_kv"] * shape["head_size"] * w.tensors["q"].element_size()
    )


def metric(w: Any, us: float) -> dict[str, float]:
    return {"gbps": kv_bytes(w) / (us * 1e-6) / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = bench.parser("paged_attention_decode", __doc__ or "")
    p.add_argument("--batches", default=BATCHES, help=f"comma-separated batch sizes (default {BATCHES})")
    p.add_argument(
        "--contexts", default=CONTEXTS, help=f"comma-separated context lengths (default {CONTEXTS})"
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="KV-cache block size, tokens a block (default 16, the shipped books')",
    )
    opts = bench.finish_parse(p, p.parse_args(argv), ("batches", "contexts"))
    if opts.block_size is not None and opts.block_size < 1:
        p.error(f"--block-size: expected a positive integer; found {opts.block_size}")
    return bench.main("paged_attention_decode", opts, jobs(opts), baselines, metric, ["gbps", "of_copy"])


if __name__ == "__main__":
    sys.exit(main())
