"""What the GEMM kernels of the pack (``linear``, ``fused_moe``) share.

* where their shipped books live and how they are named in a book,
* the serving batch sizes their keys are bucketed to,
* the static limits their config spaces respect (shared memory, accumulator registers),
* ``nearest_config``: the declared config closest to a wanted one, which is how a
  hand-written rule (the serve-mode fallback, vLLM's default) becomes a config of the Space,
* per-device scratch buffers that are allocated once and reused across calls,
* ``too_far``: whether a call's tensors reach past the offsets the kernels compute in 32 bits.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import triton
import triton.language as tl

from .._compat import interpreting
from .._forksafe import lock_for
from ._common import TOKEN_BUCKETS, bucket_of, fail, pow2_at_least

# The pack's books, names and serving buckets (_common.py): every power of two from decode
# to a long prefill; M=3 -> 4, M=100 -> 128, everything above 8192 shares 8192.
M_EDGES: tuple[int, ...] = TOKEN_BUCKETS
NAME_PREFIX = "tunebook.kernels."

# Per-block shared memory an sm_90 (H100/H200) block may use; smaller GPUs reject the
# largest tiles at compile time, which the tuner records as a failure and never retries.
SMEM_BYTES = 232_448
# A thread's accumulator share: more than 128 fp32 values per thread spills registers.
MAX_ACC_PER_THREAD = 128


# The kernels compute a row's element offset (row index x row stride) in 32 bits, as their
# tuned books' sources do; a call whose tensors reach further runs in parts (the op's
# wrapper splits it), so that no part's offsets wrap.
OFFSET_LIMIT = 2**31 - 1


def span(t: Any) -> int:
    """The largest element offset inside tensor ``t`` from its first element (0 if empty).

    Asked on every GEMM call: a plain loop (a generator and ``numel()`` cost 3x as much)."""
    total = 0
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        total += (size - 1) * stride
    return total


def too_far(*tensors: Any) -> bool:
    """Whether one of ``tensors`` reaches past ``OFFSET_LIMIT`` elements."""
    for t in tensors:
        if t is not None and span(t) > OFFSET_LIMIT:
            return True
    return False


def reaches_past(elements: int) -> bool:
    """Whether a contiguous buffer of ``elements`` reaches past ``OFFSET_LIMIT``."""
    return elements - 1 > OFFSET_LIMIT


def dot_mode(dtype: Any, fp32_precision: str = "ieee") -> str:
    """How ``mma`` multiplies tiles of ``dtype``: "native", "ieee" (exact fp32) or "upcast".

    "upcast" exists for the CPU interpreter only: its ``tl.dot`` multiplies bf16 tiles as
    their raw 16-bit integers (Triton 3.4-3.9), so there bf16 tiles are widened to fp32 first.
    """
    name = str(dtype)
    if name == "torch.float32":
        return "ieee" if fp32_precision == "ieee" else "native"
    if name == "torch.bfloat16" and interpreting():
        return "upcast"
    return "native"


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr):
    """acc += a @ b, the products as ``dot_mode`` chose."""
    if DOT == "ieee":
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == "upcast":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def bucket_m(m: int) -> int:
    """The M bucket edge a batch of ``m`` tokens is tuned and served under."""
    return bucket_of(m)


def smem_estimate(block_m: int, block_n: int, block_k: int, num_stages: int, elem_bytes: int = 2) -> int:
    """Bytes of shared memory a pipelined tile loop holds: one A and one B tile per stage."""
    return num_stages * (block_m * block_k + block_k * block_n) * elem_bytes


def acc_per_thread(block_m: int, block_n: int, num_warps: int) -> float:
    return block_m * block_n / (32 * num_warps)


def _distance(candidate: Mapping[str, Any], wanted: Mapping[str, Any]) -> float:
    """Log2 distance over the numeric parameters both name; a missing one counts as far."""
    total = 0.0
    for name, want in wanted.items():
        have = candidate.get(name)
        if have is None:
            total += 8.0
        elif isinstance(want, int | float) and isinstance(have, int | float) and want > 0 and have > 0:
            total += abs(math.log2(have) - math.log2(want))
        elif have != want:
            total += 8.0
    return total


def check_launch_values(
    op: str, config: Mapping[str, Any], powers_of_two: Sequence[str], counts: Sequence[str]
) -> None:
    """An explicit config's values as a launch takes them: the names in ``powers_of_two``
    (tile sizes, ``num_warps``: Triton's tensors and warp groups) powers of two, those in
    ``counts`` whole numbers of at least 1; names the config leaves out are not checked
    (``num_stages`` is Triton's to check).
    Unchecked, ``GROUP_M=-1`` wrote out of bounds (a crash on the interpreter, an illegal
    address on a GPU), ``SPLIT_K=0`` launched nothing and returned ``out`` as it was, and a
    tile of 12 failed deep in Triton."""
    for name in [*powers_of_two, *counts]:
        if name not in config:
            continue
        value = config[name]
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        pow2 = name in powers_of_two
        if not whole or value < 1 or (pow2 and value & (value - 1)):
            need = "a power of two" if pow2 else "a whole number of at least 1"
            fail(op, f"config's {name} must be {need}; found {value!r}")


def config_values(config: Any) -> dict[str, Any]:
    """A triton.Config (or a plain dict) as one flat dict of meta-parameters and options."""
    if isinstance(config, Mapping):
        return dict(config)
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def nearest_config(configs: Iterable[Any], wanted: Mapping[str, Any]) -> Any:
    """The config among ``configs`` closest to ``wanted`` (first declared wins ties).

    >>> nearest_config([{"B": 16}, {"B": 64}, {"B": 256}], {"B": 100})
    {'B': 64}
    """
    best, best_d = None, math.inf
    for config in configs:
        d = _distance(config_values(config), wanted)
        if d < best_d:
            best, best_d = config, d
    return best


class Scratch:
    """Per-device buffers reused across calls, grown on demand, never shrunk.

    Callers on one device share them: two launches that use the same buffer must not run
    concurrently on different CUDA streams. A buffer that grows is reallocated, and a CUDA
    graph captured before holds the freed one: run the largest shape once before capturing
    any graph, or size a kernel's request for its largest call (paged_attention_decode).
    """

    def __init__(self, name: str, zeroed: bool) -> None:
        self.name = name
        self.zeroed = zeroed
        self._buffers: dict[Any, Any] = {}
        self._lock = lock_for(self, threading.Lock)  # renewed in a forked child (tunebook._forksafe)

    def get(self, device: Any, numel: int, dtype: Any, tag: Any = None) -> Any:
        """A buffer of at least ``numel`` elements; ``tag`` keeps a buffer apart per use (a
        head layout), so that one use's growth never moves another's."""
        import torch

        key = (device, dtype, tag)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            with self._lock:
                buf = self._buffers.get(key)
                if buf is None or buf.numel() < numel:
                    size = pow2_at_least(max(numel, 1024))
                    alloc = torch.zeros if self.zeroed else torch.empty
                    buf = self._buffers[key] = alloc(size, dtype=dtype, device=device)
        return buf
