"""``tunebook.kernels``: LLM-serving ops as Triton kernels tuned through tunebook.

Ops (one module each, Liger-Kernel's layout; docs/kernels.md has the math, keys and spaces):

* :func:`rms_norm` — RMSNorm over the last dimension, optionally fused with the residual add.
* :func:`silu_and_mul` — SwiGLU's ``silu(x[..., :d]) * x[..., d:]``.
* :func:`rotary_embedding` — RoPE of queries and keys (neox or gptj style, partial rotary);
  :func:`cos_sin_cache` builds the table it reads.
* :func:`linear` — ``x @ weight.T (+ bias)``, decode (split-K) to prefill sizes.
* :func:`fused_moe` — top-k routed experts: grouped GEMM, SiLU-and-mul, grouped GEMM,
  weighted sum.
* :func:`paged_attention_decode` — one query token per sequence over a paged KV cache
  (GQA, split-KV flash-decoding chosen by the tuner).
* :func:`varlen_attention` — packed causal prefill (GQA), optionally on top of a prefix in
  the paged KV cache (chunked prefill, prefix caching).
* :func:`reshape_and_cache` — write new tokens' keys and values into the paged KV cache.

Every kernel is tuned per key (the token count bucketed onto 1, 2, 4, ..., 8192; the other
sizes exactly; the dtypes) and remembered in a book. Books tuned on the GPUs we measured
ship read-only in the package, in ``tunebook/kernels/books/`` (:data:`BOOKS_DIR`): with
``TUNEBOOK_MODE=serve`` a key they hold runs its tuned config with zero benchmarking, a
key they lack runs the winner of its nearest tuned key (a neighbouring bucket), and one
with nothing comparable in them runs the op's hand-picked config. A server calls :func:`open_books` as it
starts, so that its first request does not open them. This package imports torch; ``import
tunebook`` alone does not import it.

Example (on a CPU too, with ``TRITON_INTERPRET=1``)::

    import torch
    from tunebook.kernels import cos_sin_cache, rms_norm, rotary_embedding, silu_and_mul

    x = torch.randn(4, 64)
    y, h = rms_norm(x, torch.ones(64), eps=1e-6, residual=torch.zeros(4, 64))
    gated = silu_and_mul(torch.randn(4, 2 * 96))                    # [4, 96]
    cache = cos_sin_cache(rotary_dim=16, max_position=128)
    q, k = rotary_embedding(torch.randn(4, 2, 16), torch.randn(4, 1, 16), torch.arange(4), cache)

Each op's function has its module's name (``tunebook.kernels.rms_norm`` is the function);
reach a module's private kernel with ``from tunebook.kernels.rms_norm import _rms_norm_kernel``.
"""

from __future__ import annotations

import sys

from .._errors import MissingDependency
from .._optional import require


def _run_as_main() -> bool:
    """Whether this process is ``python -m tunebook.kernels ...`` (runpy imports the package first)."""
    argv = list(getattr(sys, "orig_argv", []))
    return "-m" in argv and argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["tunebook.kernels"]


# torch is not a dependency of tunebook itself; the pack needs it (the [kernels] extra).
try:
    require(
        "torch",
        feature="tunebook.kernels",
        extra="kernels",
        hint="On a machine without a GPU, install PyTorch's CPU build first "
        "(e.g. pip install torch==2.13.0).",
    )
except MissingDependency as exc:
    if _run_as_main():  # the command line: the message and its install line, not a traceback
        raise SystemExit(f"error: {exc}") from None
    raise

from ._common import BOOKS_DIR, open_books  # noqa: E402  (after the check: these import torch)
from .fused_moe import fused_moe  # noqa: E402
from .linear import linear  # noqa: E402
from .paged_attention_decode import paged_attention_decode  # noqa: E402
from .reshape_and_cache import reshape_and_cache  # noqa: E402
from .rms_norm import rms_norm  # noqa: E402
from .rotary_embedding import cos_sin_cache, rotary_embedding  # noqa: E402
from .silu_and_mul import silu_and_mul  # noqa: E402
from .varlen_attention import varlen_attention  # noqa: E402

__all__ = [
    "BOOKS_DIR",
    "cos_sin_cache",
    "fused_moe",
    "linear",
    "open_books",
    "paged_attention_decode",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "varlen_attention",
]
