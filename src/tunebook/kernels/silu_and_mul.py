"""SwiGLU's gate: SiLU of the first half of the last dimension times the second half.

For ``x`` of shape ``[..., 2d]``, in fp32, converted to ``x``'s dtype at the end::

    a = x[..., :d]    b = x[..., d:]
    out = silu(a) * b = a / (1 + exp(-a)) * b            shape [..., d]

This is vLLM's ``silu_and_mul`` (the gate and up projections fused into one GEMM, gate
first). Liger-Kernel's SwiGLU rounds ``silu(a)`` to the activation dtype before multiplying;
here nothing is rounded before the end.

Kernel: a program covers ``ROWS`` rows and ``LOOP`` consecutive blocks of ``BLOCK_D``
columns, one block per iteration of a loop ``num_stages`` deep. ``LOOP = 1`` with
``BLOCK_D >= d`` is Liger-Kernel's one-row-per-program launch; ``LOOP > 1`` walks a row
the way vLLM's CUDA kernel does. The key is the row count bucketed onto serving batch
sizes, ``d`` exactly, and the dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

import tunebook

from . import _common as c

_OP = "silu_and_mul"


def _feasible(cfg: dict[str, Any]) -> bool:
    if cfg["LOOP"] == 1 and cfg["num_stages"] != 1:
        return False  # one iteration: nothing to pipeline, the same kernel timed again
    return c.threads_fit(cfg["ROWS"] * cfg["BLOCK_D"], cfg["num_warps"])


def _fits_call(cfg: dict[str, Any], args: Any) -> bool:
    span, row = cfg["BLOCK_D"] * cfg["LOOP"], c.pow2_at_least(args["D"])
    if span > max(row, 64):
        return False  # masked-off work beyond the padded row (the smallest block always fits)
    if cfg["ROWS"] > 1 and span < row:
        return False  # rows are grouped to fill a program that a short row cannot; a long one can
    return cfg["ROWS"] <= c.bucket_of(args["n_rows"])


SPACE = tunebook.Space(
    BLOCK_D=[2**i for i in range(6, 16)],  # 64 .. 32768
    ROWS=[1, 2, 4, 8],
    LOOP=[1, 2, 4],
    num_warps=[1, 2, 4, 8, 16, 32],
    num_stages=[1, 2, 3],
    constraints=[_feasible],
    arg_constraints=[_fits_call],
)


def hand_picked(key: dict[str, Any]) -> dict[str, int]:
    """Liger-Kernel's SwiGLU launch: one row per program, the whole row in one block."""
    block = c.pow2_at_least(key["D"])
    return {"BLOCK_D": block, "ROWS": 1, "LOOP": 1, "num_warps": c.liger_num_warps(block), "num_stages": 1}


@c.autotune(_OP, SPACE, key=[c.token_bucket("n_rows"), "D"], hand_picked=hand_picked)
@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    x_stride,
    y_ptr,
    y_stride,
    n_rows,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    LOOP: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows[:, None] < n_rows
    rows = rows.to(tl.int64)  # row * stride can pass 2^31 at long prefills
    x_rows = x_ptr + rows[:, None] * x_stride
    y_rows = y_ptr + rows[:, None] * y_stride
    first = tl.program_id(1) * (BLOCK_D * LOOP)
    for i in tl.range(0, LOOP):
        cols = first + i * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
        mask = row_mask & (cols < D)
        a = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_rows + D + cols, mask=mask, other=0.0).to(tl.float32)
        y = a / (1.0 + tl.exp(-a)) * b
        tl.store(y_rows + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@c.graph_break
def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of shape ``[..., 2d]``; returns ``[..., d]``.

    ``x``: float16/bfloat16/float32; rows may be strided (e.g. a slice of a wider
    projection). ``out`` receives the result instead of a new tensor; it must not overlap
    ``x``.

    >>> import torch
    >>> from tunebook.kernels import silu_and_mul
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(silu_and_mul(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:], atol=1e-6)
    True
    """
    return _silu_and_mul(x, out)


def _silu_and_mul(
    x: torch.Tensor, out: torch.Tensor | None, config: dict[str, int] | None = None
) -> torch.Tensor:
    """:func:`silu_and_mul`, launched with ``config`` (BLOCK_D, ROWS, LOOP, num_warps,
    num_stages) instead of the tuned one when given: tests and benchmarks use it."""
    c.check_float(_OP, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        c.fail(
            _OP, f"x's last dimension must be 2*d with d >= 1 (gate, then up); found shape {tuple(x.shape)}"
        )
    d = x.shape[-1] // 2
    shape = (*x.shape[:-1], d)
    c.check_same_device(_OP, x=x, out=out)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        c.check_out(_OP, "out", out, shape, x.dtype, {"x": x})
    if out.numel() == 0:
        return out
    x2 = c.rows_view(x, 2 * d)
    y2 = c.out_rows(_OP, "out", out, d)
    n_rows = x2.shape[0]
    args = (x2, x2.stride(0), y2, y2.stride(0), n_rows, d)
    if config is None:
        _silu_and_mul_kernel[
            lambda meta: (c.cdiv(n_rows, meta["ROWS"]), c.cdiv(d, meta["BLOCK_D"] * meta["LOOP"]))
        ](*args)
    else:
        grid = (c.cdiv(n_rows, config["ROWS"]), c.cdiv(d, config["BLOCK_D"] * config["LOOP"]))
        _silu_and_mul_kernel.fn[grid](*args, **config)
    return out
