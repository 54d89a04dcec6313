"""What every op of the pack shares: where its books live, how token counts are bucketed,
how its kernels are named in a book, and the checks its wrappers make.

Each op module decorates its kernels through :func:`autotune`, so the options below are
set in one place:

* ``books=shipped_books`` — the books shipped inside the package (read-only; none with
  ``TUNEBOOK_KERNELS_SHIPPED_BOOKS=0``, read when a kernel's book is first opened, as
  ``TUNEBOOK_DIR`` and ``TUNEBOOK_PATH`` are);
* ``name="tunebook.kernels.<op>"`` — the kernel's name in the book (its pages are named
  ``tunebook-kernels-<op>--...``);
* ``use_cuda_graph=True``, ``rep=20`` — these kernels run for 2-30 us; timed one launch at
  a time their medians are launch noise (docs/kernels.md: one RMSNorm config read 5.1-14.1 us
  across five samples on an H200), so candidates are timed as CUDA-graph replays of many
  launches. 20 ms of launches per sample (Triton's own default for graphs; tunebook's is
  100 ms) is thousands of launches here, and measures each contender in a fifth of the time;
* ``fallback=`` with ``prefer_nearest=True`` — in ``serve`` mode, a key the book lacks runs
  the winner of its nearest tuned key (a neighbouring batch or context bucket), and where
  the book holds nothing for the kernel the op's hand-picked config (Liger-Kernel's rule),
  not whatever config happens to come first in the space.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch

import tunebook
from tunebook import _compat, _settings

BOOKS_DIR = Path(__file__).resolve().parent / "books"
# TUNEBOOK_KERNELS_SHIPPED_BOOKS=0 leaves the shipped books out (read when a kernel's book is
# first opened): a benchmark that must tune every key afresh, or a user who distrusts them.
SHIPPED_BOOKS_ENV = "TUNEBOOK_KERNELS_SHIPPED_BOOKS"

# Token (row) counts a server sees are bucketed onto powers of two: a bucket covers
# (2^(k-1), 2^k] and is tuned once. The edges stop at 8192, not at infinity as "pow2"
# would: every larger batch (long chunked prefills) maps onto the 8192 bucket, so a book
# tuned over 1..8192 answers every token count. For these memory-bound kernels the best
# config stops changing long before that: 8192 rows are ~60 waves of programs on a 132-SM
# GPU.
TOKEN_BUCKETS: tuple[int, ...] = tuple(2**i for i in range(14))  # 1, 2, 4, ..., 8192

# Pack-wide tuning budget (configs measured per key). Read when the op modules are
# imported, since autotune options are fixed when a kernel is decorated. Unset: tunebook's
# default for large spaces (10% of the candidates, 64 to 500), and a decided search in a
# read-only book (the shipped ones) answers tune mode whatever budget it had (where a call
# has more than 64 candidates; fewer are measured whole). Set, it is a
# budget the kernels declare: a key whose search measured fewer configs than that, in any
# book, is unfinished in tune mode and searched on (_policy.decide).
MAX_CONFIGS_ENV = "TUNEBOOK_KERNELS_MAX_CONFIGS"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# How many tile elements each thread may hold. Past ~32 fp32 values per thread Triton
# spills registers; below 2, lanes idle (or load 2-byte scalars), so more warps than that
# only add configs to time. One warp is always allowed: a tiny tile has nothing better.
MAX_PER_THREAD = 32
MIN_PER_THREAD = 2


def token_bucket(name: str) -> tunebook.Bucket:
    """A key name whose values are bucketed onto :data:`TOKEN_BUCKETS`."""
    return tunebook.bucket(name, TOKEN_BUCKETS)


_BUCKET = token_bucket("n")


def bucket_of(n: int) -> int:
    """The bucket edge a token count maps to (what arg constraints compare against, so that
    every call in a bucket has the same candidates).

    >>> bucket_of(1), bucket_of(3), bucket_of(8192), bucket_of(100_000)
    (1, 4, 8192, 8192)
    """
    return int(_BUCKET.apply(n))


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``: what ``triton.cdiv`` computes. On the host the
    pack uses this one: ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
    functions in Triton 3.5+, about 2 us a call (each argument unwrapped), and a launch's
    grid and checks called them two to four times a call.

    >>> cdiv(1000, 128), cdiv(1024, 128), cdiv(0, 16)
    (8, 8, 0)
    """
    return -(-a // b)


def pow2_at_least(value: int) -> int:
    """The smallest power of two >= ``value`` (1 for values <= 1), on the host: see :func:`cdiv`.

    >>> pow2_at_least(1), pow2_at_least(5), pow2_at_least(64), pow2_at_least(65)
    (1, 8, 64, 128)
    """
    return 1 if value <= 1 else 1 << (int(value) - 1).bit_length()


def threads_fit(elements: int, num_warps: int) -> bool:
    """Whether a tile of ``elements`` suits ``num_warps`` warps (see MAX_PER_THREAD).

    >>> threads_fit(4096, 8), threads_fit(4096, 1), threads_fit(64, 4), threads_fit(64, 1)
    (True, False, False, True)
    """
    per_thread = elements / (32 * num_warps)
    return per_thread <= MAX_PER_THREAD and (num_warps == 1 or per_thread >= MIN_PER_THREAD)


def liger_num_warps(block: int) -> int:
    """Liger-Kernel's (and Unsloth's) ``calculate_settings`` rule for a one-row block."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def shipped_books() -> list[Path]:
    """The read-only books every kernel of the pack consults: ``[BOOKS_DIR]``, or none with
    ``TUNEBOOK_KERNELS_SHIPPED_BOOKS=0`` (``books=`` takes this function: it is called when a
    kernel's book is first opened, so the setting may change until the first kernel call)."""
    raw = os.environ.get(SHIPPED_BOOKS_ENV, "").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return [BOOKS_DIR]
    if raw in ("0", "false", "no", "off"):
        return []
    raise tunebook.ConfigurationError(
        f"{SHIPPED_BOOKS_ENV}={raw!r} is not a switch; expected 1 (the default: use the books shipped "
        "with the pack) or 0 (leave them out). Unset it to use the default."
    )


def max_configs() -> int | None:
    raw = os.environ.get(MAX_CONFIGS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise tunebook.ConfigurationError(
            f"{MAX_CONFIGS_ENV}={raw!r} is not a positive integer (configs measured per key, read when "
            "the pack is imported). Unset it to use tunebook's budget."
        )
    return value


def closest_config(configs: Sequence[Any], preferred: Mapping[str, int]) -> Any:
    """The config nearest to ``preferred`` (log2 distance summed over its parameters).

    The preferred config is usually among the candidates; where a constraint removed it
    (e.g. a tiny test shape), the nearest feasible one stands in. Ties go to the earlier.
    """

    def level(v: int) -> float:
        return math.log2(v) if v >= 1 else -1.0  # a flag's 0 one step from its 1

    def distance(config: Any) -> float:
        values = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
        return sum(abs(level(values[k]) - level(v)) for k, v in preferred.items())

    return min(configs, key=distance)


def autotune(
    op: str,
    space: tunebook.Space,
    key: Sequence[str],
    hand_picked: Callable[[dict[str, Any]], Mapping[str, int]],
    inputs: Callable[[dict[str, Any]], Any] | None = None,
    rule: Callable[[dict[str, Any]], Mapping[str, int]] | None = None,
    post_hook: Callable[..., Any] | None = None,
) -> Callable[[Any], tunebook.Autotuner]:
    """``tunebook.autotune`` with the pack's options (module docstring).

    ``hand_picked(named_key) -> config dict`` is the op's conventional config for a key
    (``named_key`` maps the key's argument names to the call's values); ``serve`` mode
    falls back to it where the book remembers nothing comparable (a bucket the book lacks
    takes its nearest tuned key's winner first: ``prefer_nearest``). ``rule``, where given,
    replaces it there: the op's own first guess, where a structure the conventional launch
    lacks is known to win. Either is measured first in every search (``fallback=``), so a
    neighbour search that starts from the hints also tries the rule's structure.
    ``inputs`` rebuilds a call for offline tuning where random tensors of the recorded
    layout would not do (block tables, lengths): ``tunebook.autotune``'s. ``post_hook``
    (Triton's) runs after every measured launch, inside its timing: an op that launches a
    second kernel after its tuned one (paged_attention_decode's merge) has it timed there.
    """
    names = [str(k) for k in key]

    def fallback(key_values: tuple[Any, ...], configs: list[Any]) -> Any:
        return closest_config(configs, (rule or hand_picked)(dict(zip(names, key_values))))

    return tunebook.autotune(
        configs=space,
        key=list(key),
        rep=20,
        use_cuda_graph=True,
        books=shipped_books,
        name=f"tunebook.kernels.{op}",
        max_configs=max_configs(),
        fallback=fallback,
        prefer_nearest=True,
        inputs=inputs,
        post_hook=post_hook,
    )


def kernels() -> list[tunebook.Autotuner]:
    """Every autotuned kernel of the pack: those of each op module (every public module of
    the package is an op; a kernel kept in a private module is named in its op's module)."""
    package = Path(__file__).parent
    ops = [m.name for m in pkgutil.iter_modules([str(package)]) if not m.name.startswith("_")]
    modules = [importlib.import_module(f"tunebook.kernels.{op}") for op in ops]
    return [v for m in modules for v in vars(m).values() if isinstance(v, tunebook.Autotuner)]


def open_books() -> int:
    """Open this platform's page of the book for every kernel of the pack now; returns how
    many kernels. A server calls it as it starts: a kernel's first call otherwise hashes the
    kernel's source and what it calls and imports the book's code, ~10 ms a kernel, in the
    first request (each key is still read at its own first call). With ``TUNEBOOK_MODE=off``
    no kernel reads a book, and none is opened: 0."""
    if _settings.mode() == "off":
        return 0
    found = kernels()
    for kernel in found:
        try:
            kernel.page()
        except RuntimeError as exc:  # Triton's own words where it finds no GPU driver
            if "active drivers" not in str(exc):
                raise
            raise tunebook.ConfigurationError(
                f"tunebook.kernels.open_books(): Triton found no GPU ({exc}). On a machine without one, "
                "set TRITON_INTERPRET=1 before importing tunebook.kernels to run the pack in Triton's "
                "CPU interpreter"
            ) from None
    return len(found)


# ----------------------------------------------------------------------- torch.compile

_Op = TypeVar("_Op", bound=Callable[..., Any])
_is_compiling = torch.compiler.is_compiling
_EAGER: dict[Callable[..., Any], Callable[..., Any]] = {}


def graph_break(op: _Op) -> _Op:
    """``op`` (a public op of the pack) as a graph break for ``torch.compile``: Dynamo does not
    trace into it (its checks, the autotuner and Triton's launcher are not traceable) but
    calls it as it is, between the graphs it compiles before and after the call.

    ``torch.compiler.disable(op)`` does that, but applied here it would import
    ``torch._dynamo`` (about 1.2 s) with the pack, and it costs ~0.5 us a call. So the
    disabled op is made only when Dynamo traces a call (``torch.compiler.is_compiling()``,
    which Dynamo reads as True and eager code as False); an eager call pays that test and
    one more Python call, ~0.25 us (docs/kernels.md)."""

    @functools.wraps(op)
    def compile_aware(*args: Any, **kwargs: Any) -> Any:
        if _is_compiling():
            return _eager(op)(*args, **kwargs)
        return op(*args, **kwargs)

    return compile_aware  # type: ignore[return-value]


def _eager(op: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(op)``, made once (``torch._dynamo`` is loaded when it is asked)."""
    disabled = _EAGER.get(op)
    if disabled is None:
        disabled = _EAGER[op] = torch.compiler.disable(op, reason=f"{op.__name__} launches Triton kernels")
    return disabled


# ----------------------------------------------------------------------- input checks


def launch(
    kernel: Any,
    grid: Callable[[Any], tuple[int, ...]],  # of the config (its meta-parameters)
    args: Sequence[Any],
    config: Mapping[str, Any] | None,
) -> None:
    """Launch an op's kernel on ``args``: through its autotuner (the book's config), or with an
    explicit ``config`` (the op's ``config=`` argument: benchmarks, hand-picked launches) on the
    kernel's plain jit function, the config's meta-parameters and options as keywords."""
    if config is None:
        kernel[grid](*args)
    else:
        kernel.fn[grid(config)](*args, **config)


def fail(op: str, what: str, error: type[Exception] = ValueError) -> NoReturn:
    raise error(f"tunebook.kernels.{op}: {what}")


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_read_in_capture(op: str, device: torch.device, missing: str) -> None:
    """A length the op would read from the GPU, asked for inside a CUDA graph capture: the
    read waits for the GPU, which a capture refuses with an opaque error ("operation failed
    due to a previous error during capture") that poisons the capture. Say what to pass."""
    if capturing(device):
        fail(
            op,
            f"{missing} is needed while a CUDA graph is being captured: reading it from the GPU "
            f"would wait for the GPU, which a capture refuses; pass {missing}= (an upper bound will do)",
        )


def check_indices_on_cpu(
    op: str,
    name: str,
    t: torch.Tensor,
    low: int | None,
    high: int,
    why: str,
    used: torch.Tensor | None = None,
    inclusive: bool = False,
) -> None:
    """On the CPU (Triton's interpreter), every index of ``t`` a kernel follows (``used``: a
    mask of those; default all) is in ``[low, high)`` (``low`` None: no lower bound; the
    message then names the bound as ``at most high - 1`` where ``inclusive``: a count, not
    an index).

    There an index past its tensor reads or writes the process's own memory: a corrupted
    heap, a crash much later or no sign at all. The check costs no wait on the CPU; on a GPU
    it would wait for the device, so there (as in vLLM) indices are not checked.
    """
    if t.device.type != "cpu" or t.numel() == 0:
        return
    bad = t >= high if low is None else (t < low) | (t >= high)
    if used is not None:
        bad &= used
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        where = f"{name}[{', '.join(map(str, at))}]"
        bounds = f"below {high}" if low is None else f"in [{low}, {high})"
        if low is None and inclusive:
            bounds = f"at most {high - 1}"
        fail(op, f"{where} = {int(t[at])} must be {bounds} ({why})")


def check_float(op: str, name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor; found {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        fail(op, f"{name} must be float16, bfloat16 or float32; found {t.dtype}")


def check_device(op: str, device: torch.device, name: str = "the tensors are") -> None:
    """Triton can launch on ``device`` (``name``: the tensors on it, and a verb): a GPU
    (``cuda``, ROCm's too), or the CPU under ``TRITON_INTERPRET=1``.

    Without the interpreter, a CPU tensor would reach Triton's launcher, which fails with
    "0 active drivers" on a machine without a GPU (and a pointer error on one with a GPU).
    A ``meta`` tensor has no memory at all (its data_ptr() is 0: two of them read as sharing
    memory), and other devices have no Triton backend here.
    """
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if _compat.interpreting():
            return
        fail(
            op,
            f"{name} on the CPU, but Triton runs kernels on a GPU; move them to one (e.g. "
            "x.cuda()), or set TRITON_INTERPRET=1 before importing tunebook.kernels to run them in "
            "Triton's CPU interpreter",
        )
    fail(
        op,
        f"{name} on {device}, where no kernel can run: the pack runs on a CUDA (or ROCm) GPU, or on "
        "the CPU under TRITON_INTERPRET=1 (a meta tensor has no memory to read); move them to one",
    )


def check_tensors(op: str, **values: Any) -> None:
    """Each given value is a torch tensor or None; anything else (a list passed as ``out=``)
    is a TypeError that names it, before any of its attributes is read (that was an
    AttributeError on ``.device``)."""
    for name, t in values.items():
        if t is not None and not isinstance(t, torch.Tensor):
            fail(op, f"{name} must be a torch tensor or None; found {type(t).__name__}", TypeError)


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """All given tensors are tensors (:func:`check_tensors`) on one device, and it is one
    Triton can launch on."""
    check_tensors(op, **tensors)
    present = {n: t for n, t in tensors.items() if t is not None}
    devices = {str(t.device) for t in present.values()}
    if len(devices) > 1:
        found = ", ".join(f"{n} on {t.device}" for n, t in present.items())
        fail(op, f"all tensors must be on one device; found {found}")
    if present:
        name, first = next(iter(present.items()))
        if first.device.type != "cuda":  # (the phrase is built only for a message)
            which = f"{name} is" if len(present) == 1 else f"{name} and the others are"
            check_device(op, first.device, which)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory ``t`` may touch."""
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
    start = t.data_ptr()
    return (start, start + extent * t.element_size())


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share memory: certainly when they start at the same address,
    when one is contiguous and the other's first or last element lies in its byte range, or
    when both are sets of rows (unit column stride) with one row stride whose rows meet (two
    column slices of one buffer: ``x[:, :d]`` and ``x[:, d:]`` do not, ``x`` and ``x[:, d:]``
    do). Other strided views whose ranges interleave are given the benefit of the doubt, as
    ATen gives it for in-place ops: an exact check would cost a pass over their elements."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr():
        return True
    (lo_a, hi_a), (lo_b, hi_b) = _span(a), _span(b)
    if not (lo_a < hi_b and lo_b < hi_a):
        return False
    # a contiguous tensor holds every byte of its range: the other's first or last byte in it
    if a.is_contiguous() and (lo_a <= lo_b < hi_a or lo_a <= hi_b - 1 < hi_a):
        return True
    if b.is_contiguous() and (lo_b <= lo_a < hi_b or lo_b <= hi_a - 1 < hi_b):
        return True
    rows_a, rows_b = _rows(a), _rows(b)
    if rows_a is None or rows_b is None or a.element_size() != b.element_size():
        return False
    return _rows_meet(rows_a, rows_b, (b.data_ptr() - a.data_ptr()) // a.element_size())


def _rows(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``t`` as (rows, row length, row stride) in elements, if its elements are rows of
    consecutive elements at one stride apart (a 2-D view of it needs no copy); else None."""
    width = t.shape[-1] if t.dim() else 1
    if t.dim() and t.stride(-1) != 1 and width > 1:
        return None
    try:
        rows = t.view(-1, width)
    except RuntimeError:
        return None
    return rows.shape[0], width, rows.stride(0) if rows.shape[0] > 1 else 0


def _rows_meet(a: tuple[int, int, int], b: tuple[int, int, int], delta: int) -> bool:
    """Whether rows ``a`` (starting at element 0) and rows ``b`` (starting at element
    ``delta``), at one row stride, share an element: for some k (a's row index minus b's,
    both in range) k * stride lies in [delta - (a's row length - 1), delta + b's row length - 1]."""
    (rows_a, width_a, stride_a), (rows_b, width_b, stride_b) = a, b
    stride = stride_a if rows_a > 1 else stride_b  # a single row fits any stride
    if rows_a > 1 and rows_b > 1 and stride_a != stride_b:
        return False  # rows at two strides: the benefit of the doubt
    lo, hi = delta - (width_a - 1), delta + (width_b - 1)  # k * stride must land in [lo, hi]
    if stride == 0:  # one row each
        return lo <= 0 <= hi
    k_min = max(-(-lo // stride), -(rows_b - 1))
    k_max = min(hi // stride, rows_a - 1)
    return k_min <= k_max


def check_out(
    op: str, name: str, out: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, inputs: Mapping[str, Any]
) -> None:
    """``out`` (a tensor: every op has run :func:`check_tensors` on it) must have the result's
    shape and dtype, no element written twice (:func:`check_written`) and share no memory
    with an input.

    In-place updates are refused because tuning reruns the kernel on the call's own
    arguments: an in-place update would be applied once per measurement.
    """
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        fail(
            op,
            f"{name} must have shape {tuple(shape)} and dtype {dtype}; found {tuple(out.shape)} {out.dtype}",
        )
    check_written(op, name, out)
    for other_name, other in inputs.items():
        if isinstance(other, torch.Tensor) and may_overlap(out, other):
            fail(
                op,
                f"{name} shares memory with {other_name}; in-place updates are not supported (tuning "
                "reruns the kernel on the same arguments). Pass a separate tensor, or none.",
            )


def check_written(op: str, name: str, t: torch.Tensor) -> None:
    """A tensor a kernel writes has no element that two of its indices name: no dimension of
    size > 1 at stride 0 (an ``expand``-ed tensor), which is what
    ``torch._debug_has_internal_overlap`` answers "yes" for (other overlaps it cannot tell
    cheaply either; they are given the benefit of the doubt, as ATen gives them). Written
    so, the rows of the result would overwrite each other, silently."""
    if 0 in t.stride() and t.numel() > 1:
        for size, stride in zip(t.shape, t.stride()):
            if stride == 0 and size > 1:
                fail(
                    op,
                    f"{name} has elements that share memory (shape {tuple(t.shape)}, strides "
                    f"{tuple(t.stride())}: an expanded tensor?), so the values written into it would "
                    "overwrite each other; pass a tensor of its own memory (e.g. torch.empty, or .clone())",
                )


# The kernels compute some element offsets (an index times a stride) in 32 bits: Triton
# passes a stride that fits in 32 bits as an int32, and a program or head index is one.
INT32_MAX = 2**31 - 1


def check_offsets(op: str, products: Sequence[tuple[str, str, int, int]], fix: str) -> None:
    """Refuse a call where an offset a kernel computes in 32 bits could pass ``2^31 - 1``:
    ``products`` are (tensor, what its index counts, count, stride), each offset being an
    index below ``count`` times ``stride`` (a stride past ``2^31 - 1`` is passed as a 64-bit
    integer, and its products are 64-bit). Wrapped, such an offset reads or writes memory
    gigabytes away from the tensor, silently. ``fix`` says what layout to pass instead."""
    for name, what, count, stride in products:
        offset = (count - 1) * stride
        if offset > INT32_MAX >= stride:
            fail(
                op,
                f"{name}'s last {what} starts at element offset {offset:,} ({count - 1} x its stride "
                f"{stride:,}), past 2^31 - 1 = {INT32_MAX:,}: the kernel computes that offset in 32 bits, "
                f"where it would wrap to memory outside {name}; {fix}",
            )


def rows_view(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as 2-D rows of ``width`` elements, each row contiguous, without copying when
    its layout allows (strided rows are fine; a strided last dimension is copied)."""
    rows = t.reshape(-1, width)
    if width > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def out_rows(op: str, name: str, out: torch.Tensor, width: int) -> torch.Tensor:
    """An output as 2-D rows, always a view: the kernel must write into ``out`` itself."""
    try:
        rows = out.view(-1, width)
    except RuntimeError:
        rows = None
    if rows is None or (width > 1 and rows.stride(1) != 1):
        fail(
            op,
            f"{name} must be viewable as rows of {width} contiguous elements (stride {tuple(out.stride())} "
            "is not); pass a contiguous tensor",
        )
    return rows
