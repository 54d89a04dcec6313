"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.

Over the last dimension (size ``N``), in fp32::

    rms_norm(x, w, eps)              y = x / sqrt(mean(x^2) + eps) * w
    rms_norm(x, w, eps, residual=r)  h = round(x + r);  y = h / sqrt(mean(h^2) + eps) * w
                                     returns (y, h)

``round`` is the conversion to the residual's dtype: ``y`` is the norm of exactly the ``h``
that is returned (as in Hugging Face's decoder layers, which add in the activation dtype
and normalize that). ``y`` is converted to ``x``'s dtype once, at the end; Hugging Face's
Llama instead rounds ``x * rstd`` to the activation dtype before multiplying by ``w``, so
outputs differ from it by up to one rounding.

``h`` is a new tensor (or ``residual_out``), never written into ``residual``: vLLM's
``fused_add_rms_norm`` updates in place, but tuning reruns the kernel on the call's own
arguments, which would add ``x`` into the residual once per measurement.

Kernel: each program normalizes ``ROWS`` rows. With ``BLOCK_N >= N`` (one pass) the rows
stay in registers; with ``BLOCK_N < N`` it loops over the row twice (sum of squares, then
scale), ``num_stages`` deep. The key is the row count bucketed onto serving batch sizes,
``N`` exactly, whether a residual is fused, and the dtypes.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import triton
import triton.language as tl

import tunebook

from . import _common as c

_OP = "rms_norm"


def _feasible(cfg: dict[str, Any]) -> bool:
    # Whether a config is the one-pass or the loop variant depends on N: the rule that
    # keeps num_stages to loops is in _fits_call.
    return c.threads_fit(cfg["ROWS"] * cfg["BLOCK_N"], cfg["num_warps"])


def _fits_call(cfg: dict[str, Any], args: Any) -> bool:
    one_pass = c.pow2_at_least(args["N"])
    if cfg["BLOCK_N"] > max(one_pass, 64):
        return False  # only masked-off lanes beyond the one-pass block (the smallest block always fits)
    if cfg["BLOCK_N"] >= one_pass and cfg["num_stages"] != 1:
        return False  # no loop: num_stages changes nothing
    if cfg["BLOCK_N"] < min(one_pass, 256):
        return False  # a loop of tiny blocks: all overhead
    return cfg["ROWS"] <= c.bucket_of(args["n_rows"])


SPACE = tunebook.Space(
    BLOCK_N=[2**i for i in range(6, 17)],  # 64 .. 65536
    ROWS=[1, 2, 4, 8, 16],
    num_warps=[1, 2, 4, 8, 16, 32],
    num_stages=[1, 2, 3],
    constraints=[_feasible],
    arg_constraints=[_fits_call],
)


def hand_picked(key: dict[str, Any]) -> dict[str, int]:
    """Liger-Kernel's config: one row per program, the whole row in one block."""
    block = c.pow2_at_least(key["N"])
    return {"BLOCK_N": block, "ROWS": 1, "num_warps": c.liger_num_warps(block), "num_stages": 1}


@triton.jit
def _input_block(x_rows, r_rows, h_rows, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """A block of x in fp32; with a residual, h = x + r, stored in h's dtype and returned."""
    x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = x + tl.load(r_rows + cols, mask=mask, other=0.0).to(tl.float32)
        h = h.to(h_rows.dtype.element_ty)
        tl.store(h_rows + cols, h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit
def _store_block(y_rows, w_ptr, cols, mask, x, rstd, N: tl.constexpr):
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(y_rows + cols, (x * rstd[:, None] * w).to(y_rows.dtype.element_ty), mask=mask)


@c.autotune(_OP, SPACE, key=[c.token_bucket("n_rows"), "N", "HAS_RESIDUAL"], hand_picked=hand_picked)
@triton.jit
def _rms_norm_kernel(
    x_ptr,
    x_stride,
    r_ptr,
    r_stride,
    w_ptr,
    y_ptr,
    y_stride,
    h_ptr,
    h_stride,
    n_rows,
    eps,
    N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows[:, None] < n_rows
    rows = rows.to(tl.int64)  # row * stride can pass 2^31 at long prefills
    x_rows = x_ptr + rows[:, None] * x_stride
    r_rows = r_ptr + rows[:, None] * r_stride
    y_rows = y_ptr + rows[:, None] * y_stride
    h_rows = h_ptr + rows[:, None] * h_stride
    if BLOCK_N >= N:  # one pass: the rows stay in registers
        cols = tl.arange(0, BLOCK_N)[None, :]
        mask = row_mask & (cols < N)
        x = _input_block(x_rows, r_rows, h_rows, cols, mask, HAS_RESIDUAL)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        _store_block(y_rows, w_ptr, cols, mask, x, rstd, N)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in tl.range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            x = _input_block(x_rows, r_rows, h_rows, cols, row_mask & (cols < N), HAS_RESIDUAL)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # the second pass reads h back; other threads may have written it
        for start in tl.range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            mask = row_mask & (cols < N)
            if HAS_RESIDUAL:
                x = tl.load(h_rows + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
            _store_block(y_rows, w_ptr, cols, mask, x, rstd, N)


@c.graph_break
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension; with ``residual``, fused with the add before it.

    ``x``: ``[..., N]`` float16/bfloat16/float32; rows may be strided. ``weight``: ``[N]``,
    any of those dtypes. ``residual``: ``x``'s shape. Returns ``y`` (``x``'s dtype), or
    ``(y, h)`` with ``h = x + residual`` in ``residual``'s dtype. ``out`` / ``residual_out``
    receive ``y`` / ``h`` instead of new tensors; they must not overlap any input.

    >>> import torch
    >>> from tunebook.kernels import rms_norm
    >>> x = torch.randn(3, 64)
    >>> y, h = rms_norm(x, torch.ones(64), residual=torch.zeros(3, 64))
    >>> torch.allclose(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-5)
    True
    """
    return _rms_norm(x, weight, eps, residual, out, residual_out)


def _rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    out: torch.Tensor | None,
    residual_out: torch.Tensor | None,
    config: dict[str, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm`, launched with ``config`` (a dict of BLOCK_N, ROWS, num_warps,
    num_stages) instead of the tuned one when given: tests and benchmarks use it."""
    c.check_float(_OP, "x", x)
    c.check_float(_OP, "weight", weight)
    if x.dim() < 1 or x.shape[-1] == 0:
        c.fail(_OP, f"x must have a non-empty last dimension to normalize over; found shape {tuple(x.shape)}")
    n = x.shape[-1]
    if weight.shape != (n,):
        c.fail(_OP, f"weight must have shape ({n},) to match x's last dimension; found {tuple(weight.shape)}")
    if residual is not None:
        c.check_float(_OP, "residual", residual)
        if residual.shape != x.shape:
            c.fail(_OP, f"residual must have x's shape {tuple(x.shape)}; found {tuple(residual.shape)}")
    elif residual_out is not None:
        c.fail(_OP, "residual_out is only written when residual is given")
    c.check_same_device(_OP, x=x, weight=weight, residual=residual, out=out, residual_out=residual_out)
    if not _is_number(eps) or not 0 <= eps < math.inf:
        shown = repr(eps) if _is_number(eps) else f"a {type(eps).__name__}"
        c.fail(
            _OP,
            f"eps must be a finite number >= 0; found {shown} "
            "(the residual comes after eps, or as residual=)",
        )
    inputs = {"x": x, "weight": weight, "residual": residual}
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        c.check_out(_OP, "out", out, x.shape, x.dtype, inputs)
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=residual.dtype, device=x.device)
        else:
            c.check_out(_OP, "residual_out", residual_out, x.shape, residual.dtype, {**inputs, "out": out})
    if x.numel() == 0:
        return out if residual is None else (out, residual_out)  # type: ignore[return-value]

    x2 = c.rows_view(x, n)
    y2 = c.out_rows(_OP, "out", out, n)
    if residual is not None:
        r2 = c.rows_view(residual, n)
        h2 = c.out_rows(_OP, "residual_out", residual_out, n)  # type: ignore[arg-type]
    else:
        r2, h2 = x2, y2  # never read or written: HAS_RESIDUAL is off
    n_rows = x2.shape[0]
    args = (
        x2,
        x2.stride(0),
        r2,
        r2.stride(0),
        weight.contiguous(),
        y2,
        y2.stride(0),
        h2,
        h2.stride(0),
        n_rows,
        float(eps),
        n,
        residual is not None,
    )
    if config is None:
        _rms_norm_kernel[lambda meta: (c.cdiv(n_rows, meta["ROWS"]),)](*args)
    else:
        _rms_norm_kernel.fn[(c.cdiv(n_rows, config["ROWS"]),)](*args, **config)
    return out if residual is None else (out, residual_out)  # type: ignore[return-value]


def _is_number(value: object) -> bool:
    """A real number (numpy's included), not a bool: what ``eps`` may be."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
