"""What the GEMM op tests share: tolerances, seeded inputs, poisoned outputs, the child-process check.

Tolerances, in one place: an output element may differ from the fp64 reference by
``rtol * |ref| + atol * max|ref|``. bf16 keeps 8 bits of mantissa (one rounding of the
output costs 2^-9 relative), fp16 11; the MoE's intermediate ``h`` is rounded once more.
fp32 runs with exact ("ieee") products; "tf32" gets the bf16-like bound.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
    torch.float32: (1e-5, 1e-5),
}
TF32_TOL = (5e-3, 5e-3)
# fused_moe rounds its intermediate h to x's dtype between the GEMMs (as vLLM does): twice the room.
MOE_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
    torch.float32: (1e-5, 1e-5),
}


def generator(*case: object) -> torch.Generator:
    """A generator seeded by the test case itself: fresh inputs per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def randn(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0
) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An output buffer full of NaN: an element the kernel forgets to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype)


def assert_close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol=None) -> None:
    rtol, atol = tol or TOL[dtype]
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    got = actual.double()
    assert not torch.isnan(got).any(), f"{int(torch.isnan(got).sum())} elements never written (NaN)"
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = (got - ref).abs()
    bound = rtol * ref.abs() + atol * max(scale, 1e-6)
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{int((err > bound).sum())} of {err.numel()} elements off; worst at flat index {worst}: "
        f"got {got.flatten()[worst].item()}, want {ref.flatten()[worst].item()} (scale {scale:.3g})"
    )


def moe_reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Token by token, expert by expert, in fp64; an expert id outside [0, E) adds nothing
    (vLLM's expert-parallel semantics)."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if not 0 <= e < w13.shape[0]:
                continue
            h = F.silu(w13[e, :inter] @ x[t]) * (w13[e, inter:] @ x[t])
            out[t] += float(topk_weights[t, j]) * (w2[e] @ h)
    return out
