"""How ``check=`` compares two tensors: a piece at a time, in their own bits where it can.

* **Pieces.** :func:`pieces` cuts a tensor into flat pieces of at most :data:`CHUNK`
  elements, by its shape alone, so that two tensors of one shape and any strides match piece
  for piece and a non-contiguous one is never copied whole. Every temporary is a piece's.
* **Bits.** :func:`unchanged` (did a run leave a tensor as it was?) compares raw bits, and
  one-byte floats (float8) are read in their bytes, never widened; NaN is NaN whatever its
  encoding (:func:`nan_bytes`).
* **Mismatches.** :class:`Mismatches` gathers what a comparison within tolerances finds,
  piece by piece, counting a complex element once.

>>> import torch
>>> nan_a, nan_b = torch.tensor([0x7D, 0x7F], dtype=torch.uint8).view(torch.float8_e5m2)
>>> unchanged(nan_a.reshape(1), nan_b.reshape(1))  # two NaN encodings of float8_e5m2
True
>>> [p.tolist() for p in pieces(torch.arange(6).reshape(2, 3).t(), size=4)]
[[0, 3, 1, 4], [2, 5]]
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

# Elements compared at a time, so that the comparison's fp32 temporaries stay a few
# hundred MB whatever the size of the argument.
CHUNK = 1 << 24


class Mismatches:
    """What one argument's comparison found, gathered piece by piece: how many elements are
    wrong, the largest error, NaN on one side only, and the first wrong element's values.
    A complex element counts once, wrong if either part is."""

    def __init__(self) -> None:
        self.count = 0
        self.nan_got = 0
        self.nan_ref = 0
        self.max_err = -1.0  # over the mismatches with no NaN on either side
        self.first = -1
        self.got = self.ref = ""
        self._seen = 0  # elements before the next piece

    def add(self, g: Any, r: Any, exact: bool, rtol: float, atol: float) -> None:
        import torch

        complex_ = g.dtype.is_complex
        if complex_:
            g, r = torch.view_as_real(g), torch.view_as_real(r)
        nan_g, nan_r = isnan(g), isnan(r)
        if exact:
            wrong = (raw_bits(g) != raw_bits(r)) & ~(nan_g & nan_r)
        else:
            wide = torch.float64 if g.dtype == torch.float64 else torch.float32
            gw, rw = g.to(wide), r.to(wide)
            # g == r covers equal infinities; an infinite reference would make the
            # tolerance infinite, so only finite references get one.
            close = torch.isfinite(rw) & ((gw - rw).abs() <= atol + rtol * rw.abs())
            wrong = ~((gw == rw) | (nan_g & nan_r) | close)
        if complex_:
            wrong, nan_g, nan_r = wrong.any(-1), nan_g.any(-1), nan_r.any(-1)
        start, self._seen = self._seen, self._seen + wrong.numel()
        if not bool(wrong.any()):
            return
        self.count += int(wrong.sum())
        self.nan_got += int((wrong & nan_g & ~nan_r).sum())
        self.nan_ref += int((wrong & nan_r & ~nan_g).sum())
        bad = wrong & ~nan_g & ~nan_r
        if bool(bad.any()) and (not g.dtype.is_floating_point or widens(g.dtype)):
            err = (widened(g[bad]) - widened(r[bad])).abs()
            self.max_err = max(self.max_err, float(err.max()))
        if self.first < 0:
            at = int(wrong.nonzero()[0, 0])
            self.first = start + at
            self.got, self.ref = shown(g[at]), shown(r[at])


def unchanged(a: Any, b: Any) -> bool:
    """Bit-for-bit equal but for NaN payloads: did the run leave this tensor as it was?

    A piece at a time, in the tensors' own bits: never widened (float8 as float32, whole,
    took 1.5 GiB more for two 128 MiB arguments), at most three bool masks of a piece."""
    import torch

    for pa, pb in zip(pieces(a), pieces(b)):
        if pa.dtype.is_complex:
            pa, pb = torch.view_as_real(pa), torch.view_as_real(pb)
        differ = raw_bits(pa) != raw_bits(pb)
        if not bool(differ.any()):
            continue
        # Only NaN may differ: payloads and signs, or two NaN encodings of float8_e5m2. In
        # place, so that a piece never holds more than three masks.
        nan = isnan(pa)
        nan &= isnan(pb)
        differ &= nan.logical_not_()
        if bool(differ.any()):
            return False
    return True


def pieces(t: Any, size: int = 0) -> Iterator[Any]:
    """``t``'s elements in row-major order, in flat pieces of at most ``size`` elements
    (default :data:`CHUNK`).

    Where they fall depends on the shape alone, so that two tensors of one shape give
    matching pieces whatever their strides; a piece of a non-contiguous tensor is a copy of
    at most ``size`` elements (``reshape(-1)`` of the whole would copy it all).
    """
    size = size or CHUNK
    if t.dim() <= 1:
        flat = t.reshape(-1)  # a view: one dimension has a stride
        for start in range(0, flat.numel(), size):
            yield flat[start : start + size]
        return
    row = t[0].numel()
    if row >= size:
        for sub in t:
            yield from pieces(sub, size)
        return
    step = size // row
    for start in range(0, t.size(0), step):
        yield t[start : start + step].reshape(-1)


def element_dtype(dtype: Any) -> Any:
    """What an element is compared as: a complex dtype's parts' dtype, else itself."""
    return dtype.to_real() if dtype.is_complex else dtype


def exact_dtype(dtype: Any) -> bool:
    """Compared bit for bit: integers, bool, a float with no mantissa bits (eps 1:
    ``float8_e8m0fnu``, a power of two, where a ratio of 2 is the smallest error there is),
    and a float PyTorch does no arithmetic on (``float4_e2m1fn_x2``, two values a byte)."""
    import torch

    if not dtype.is_floating_point:
        return True
    return not widens(dtype) or torch.finfo(dtype).eps >= 1


@functools.lru_cache(maxsize=32)
def widens(dtype: Any) -> bool:
    """Whether PyTorch converts ``dtype`` to float64 (not ``float4_e2m1fn_x2``)."""
    import torch

    try:
        torch.empty(1, dtype=dtype).to(torch.float64)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def largest(ref: Any) -> float:
    """The largest finite magnitude in ``ref``; at least the dtype's tiniest normal, so that an
    all-zero reference does not demand more than exact zeros."""
    import torch

    part = element_dtype(ref.dtype)
    top = float(torch.finfo(part).tiny)
    for r in pieces(ref):
        if r.dtype.is_complex:
            r = torch.view_as_real(r)
        r = widened(r, torch.float64 if part == torch.float64 else torch.float32).abs()
        r = r[torch.isfinite(r)]
        if r.numel():
            top = max(top, float(r.max()))
    return top


_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def raw_bits(t: Any) -> Any:
    """A float tensor's raw bits, as an integer tensor of its element size (a view; no copy);
    any other tensor as it is."""
    import torch

    if not t.dtype.is_floating_point:
        return t
    return t.view(getattr(torch, _INT_OF_SIZE[t.element_size()]))


def isnan(t: Any) -> Any:
    """Where ``t`` is NaN (nowhere for integers); one-byte floats read from their bytes."""
    import torch

    if not t.dtype.is_floating_point:
        return torch.zeros_like(t, dtype=torch.bool)
    if t.element_size() > 1:
        return torch.isnan(t)
    bits = raw_bits(t)
    nan = torch.zeros_like(bits, dtype=torch.bool)
    for low, high in nan_bytes(t.dtype):
        hit = bits >= low
        hit &= bits <= high
        nan |= hit
    return nan


@functools.lru_cache(maxsize=32)
def nan_bytes(dtype: Any) -> list[tuple[int, int]]:
    """The byte values a one-byte float ``dtype`` reads as NaN, as runs ``(low, high)``: one
    value per sign for float8_e4m3fn, three for float8_e5m2, 0x80 alone for the fnuz
    variants, 0xFF for float8_e8m0fnu (read from PyTorch's own conversion, so that a new
    format needs no entry here)."""
    import torch

    if not widens(dtype):  # float4_e2m1fn_x2: no NaN either
        return []
    nan = torch.arange(256, dtype=torch.uint8).view(dtype).float().isnan().tolist()
    runs: list[tuple[int, int]] = []
    for value in (v for v in range(256) if nan[v]):
        if runs and runs[-1][1] == value - 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def widened(t: Any, wide: Any = None) -> Any:
    """``t`` as float64 (or ``wide``), to take differences and magnitudes in."""
    import torch

    return t.to(wide or torch.float64)


def shown(x: Any) -> str:
    """One element (a complex one as its two parts) as a message shows it; one PyTorch cannot
    convert as its byte."""
    if x.dtype.is_floating_point and not widens(x.dtype):
        return f"byte 0x{int(raw_bits(x)):02x}"
    values = widened(x).tolist() if x.dtype.is_floating_point else x.tolist()
    if isinstance(values, list):  # a complex element's parts
        return str(complex(*values))
    return f"{values:.6g}" if isinstance(values, float) else str(values)
