"""Replayable descriptions of kernel calls, so a key can be tuned without the application.

A *call description* is plain JSON stored with a recorded miss::

    {"args": [{"tensor": {"shape": [4096, 4096], "stride": [4096, 1], "dtype": "torch.float16",
                          "device": "cuda"}},
              {"value": 4096}, {"none": true}, ...],
     "kwargs": {"ACTIVATION": {"value": "relu"}},
     "grids": {"<config id>": [256, 1, 1], ...}}

Tensors are described by shape, strides, dtype and device type, never by contents; scalars
by value; a Triton dtype passed as a constexpr (``tl.float16``) by its name, as an opaque
value of a form older readers accept (``{"opaque": "triton_dtype:fp16"}``: they cannot
rebuild it, as before, but they read the key file). ``grids`` holds the launch grid every
candidate config would have used (the grid callable is evaluated at miss time), since the
callable itself cannot be stored.

Rebuilding (``build_args``) makes tensors of that layout filled with random values
(floating and complex) or zeros (integers and bools). For a kernel that checks its results
(``check=``), integers are small random values instead and bools random: on zeros, any op
with f(0) = 0 agrees with any other, and the check would pass a wrong config. The integers
stay below 16 and below every dimension (of 2 or more) of the call's tensors, so an index
into one of them stays in bounds; arguments named in ``zeroed`` (locks, semaphores) keep
zeros. Without a check they stay zeros: the one index always in bounds, and the lock value
a kernel that spins on a lock expects. A kernel whose arguments need valid contents (index
tables, block tables, lengths) registers an ``inputs=`` factory with the autotuner; it
receives the description and returns ``(args, kwargs)``.

Descriptions come from books, which are untrusted: ``validate`` bounds every size and
accepts only the shapes above, and rebuilding never evaluates anything from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from ._errors import NoRecordedGrid
from ._jsonio import is_scalar

MAX_DIMS = 8
MAX_ARGS = 256
MAX_GRIDS = 4096
MAX_ELEMENTS = 1 << 34  # 16 Gi elements: larger than any single tensor a GPU holds today


def describe_value(value: Any) -> dict[str, Any]:
    if value is None:
        return {"none": True}
    if hasattr(value, "shape") and hasattr(value, "stride") and hasattr(value, "dtype"):
        device = getattr(value, "device", None)
        return {
            "tensor": {
                "shape": [int(d) for d in value.shape],
                "stride": [int(s) for s in value.stride()],
                "dtype": str(value.dtype),
                "device": getattr(device, "type", str(device)) if device is not None else "cpu",
            }
        }
    if is_scalar(value):
        return {"value": value}
    if type(value).__name__ == "dtype" and type(value).__module__.startswith("triton.language"):
        return {"opaque": TRITON_DTYPE + str(value.name)}  # exactly tl.dtype: pointer types are subclasses
    return {"opaque": type(value).__name__}  # replayable only through an inputs= factory


def describe_call(
    args: Sequence[Any], kwargs: Mapping[str, Any], grids: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Any]:
    desc: dict[str, Any] = {
        "args": [describe_value(a) for a in args],
        "kwargs": {k: describe_value(v) for k, v in kwargs.items()},
    }
    if grids:
        desc["grids"] = {cid: [int(x) for x in g] for cid, g in grids.items()}
    return desc


def evaluate_grids(
    grid: Any, nargs: Mapping[str, Any], kwargs: Mapping[str, Any], configs: Mapping[str, Any]
) -> dict[str, list[int]]:
    """The grid each candidate would launch with; {} if the grid cannot be evaluated."""
    out: dict[str, list[int]] = {}
    for cid, config in list(configs.items())[:MAX_GRIDS]:
        try:
            g = grid({**nargs, **kwargs, **config.all_kwargs()}) if callable(grid) else grid
            dims = [int(x) for x in g]
        except Exception:  # a grid that depends on something we cannot see: not replayable
            return {}
        out[cid] = dims + [1] * (3 - len(dims))
    return out


def validate(desc: Any, where: str) -> str | None:
    """Why ``desc`` is not a call description we can rebuild, or None if it is."""
    if not isinstance(desc, dict):
        return f"{where}: must be an object"
    args, kwargs = desc.get("args"), desc.get("kwargs", {})
    if not isinstance(args, list) or len(args) > MAX_ARGS:
        return f"{where}: 'args' must be a list of at most {MAX_ARGS} values"
    if not isinstance(kwargs, dict) or len(kwargs) > MAX_ARGS or not all(isinstance(k, str) for k in kwargs):
        return f"{where}: 'kwargs' must be an object of at most {MAX_ARGS} values"
    total = 0
    for i, item in enumerate([*args, *kwargs.values()]):
        reason = _validate_value(item)
        if reason:
            return f"{where}: argument {i}: {reason}"
        body = item.get("tensor") if isinstance(item, dict) else None
        if body is not None:
            total += _span(body["shape"], body["stride"])
    if total > MAX_ELEMENTS:
        return f"{where}: its tensors together are larger than any tunebook will allocate"
    grids = desc.get("grids", {})
    if not isinstance(grids, dict) or len(grids) > MAX_GRIDS:
        return f"{where}: 'grids' must be an object of at most {MAX_GRIDS} grids"
    for g in grids.values():
        if not (
            isinstance(g, list)
            and 1 <= len(g) <= 3
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31 for x in g)
        ):
            return f"{where}: each grid must be 1 to 3 non-negative integers"
    return None


def _validate_value(item: Any) -> str | None:
    if not isinstance(item, dict) or len(item) != 1:
        return "must be an object with one of 'tensor', 'value', 'none', 'opaque'"
    ((kind, body),) = item.items()
    if kind == "none":
        return None if body is True else "'none' must be true"
    if kind == "value":
        return None if is_scalar(body) else "'value' must be a JSON scalar"
    if kind == "opaque":
        return None if isinstance(body, str) and len(body) < 200 else "'opaque' must be a short string"
    if kind != "tensor" or not isinstance(body, dict):
        return f"unknown kind {kind!r}"
    shape, stride = body.get("shape"), body.get("stride")
    if not (isinstance(shape, list) and isinstance(stride, list) and len(shape) == len(stride) <= MAX_DIMS):
        return "a tensor needs 'shape' and 'stride' lists of equal length (at most 8)"
    if not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 40 for x in [*shape, *stride]
    ):
        return "shapes and strides must be non-negative integers"
    # What building it allocates is its storage span, which strides can make far larger
    # than its element count.
    if math.prod(shape) > MAX_ELEMENTS or _span(shape, stride) > MAX_ELEMENTS:
        return "the tensor is larger than any tunebook will allocate"
    if not isinstance(body.get("dtype"), str) or not str(body["dtype"]).startswith("torch."):
        return "'dtype' must name a torch dtype"
    if not isinstance(body.get("device", "cpu"), str):
        return "'device' must be a string"
    return None


def _torch_dtype(name: str) -> Any:
    import torch

    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a call description")
    return dtype


def build_value(
    item: Mapping[str, Any], device: str | None, generator: Any, integers: int | None = None
) -> Any:
    """One argument. ``integers``: None for integer and bool tensors of zeros, else integers
    drawn from ``range(integers)`` and random bools."""
    ((kind, body),) = item.items()
    if kind == "none":
        return None
    if kind == "value":
        return body
    if kind == "opaque" and isinstance(body, str) and body.startswith(TRITON_DTYPE):
        return _triton_dtype(body.removeprefix(TRITON_DTYPE))
    if kind == "opaque":
        raise ValueError(
            f"an argument of type {body} cannot be rebuilt from a description; register an inputs= "
            "factory with the autotuner to build this kernel's arguments"
        )
    import torch

    dtype = _torch_dtype(body["dtype"])
    where = device or body.get("device", "cpu")
    shape, stride = tuple(body["shape"]), tuple(body["stride"])
    t = torch.empty_strided(shape, stride, dtype=dtype, device=where)
    # Random, not zeros: zeros run faster than real data on some GPUs. A view whose elements
    # share memory (fewer storage elements than elements: a stride of 0, as expand makes)
    # cannot be written through: its storage is filled instead.
    span = _span(shape, stride)
    filled = t.as_strided((span,), (1,)) if span < math.prod(shape) else t
    if dtype.is_complex:
        filled.copy_(torch.randn(filled.shape, generator=generator, dtype=torch.complex64))
    elif dtype.is_floating_point:
        filled.copy_(torch.randn(filled.shape, generator=generator, dtype=torch.float32).to(dtype))
    elif integers is None:
        filled.zero_()
    else:  # drawn as int64, converted by the copy (randint has no unsigned or bool dtypes)
        high = 2 if dtype == torch.bool else integers
        filled.copy_(torch.randint(0, high, filled.shape, generator=generator))
    return t


def _span(shape: Sequence[int], stride: Sequence[int]) -> int:
    """The elements a tensor of these strides spans in its storage (0 when it has none)."""
    return 0 if 0 in shape else 1 + sum((d - 1) * st for d, st in zip(shape, stride))


TRITON_DTYPE = "triton_dtype:"  # an opaque value's prefix: a Triton dtype, by name


def _triton_dtype(name: str) -> Any:
    import triton.language as tl

    d = tl.dtype
    if name not in (*d.SINT_TYPES, *d.UINT_TYPES, *d.FP_TYPES):  # checked here: Triton only asserts
        raise ValueError(f"unknown Triton dtype {name!r} in a call description")
    return tl.dtype(name)


def build_args(
    desc: Mapping[str, Any],
    *,
    device: str | None = None,
    seed: int = 0,
    random_integers: bool = False,
    names: Sequence[str] = (),
    zeroed: Collection[str] = (),
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fresh arguments laid out as described (see the module docstring).

    ``random_integers``: integer and bool tensors get small random values, not zeros, but
    for the arguments named in ``zeroed`` (``names``: the positional arguments' names).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    bound = integer_bound(desc) if random_integers else None

    def build(name: str | None, item: Mapping[str, Any]) -> Any:
        return build_value(item, device, generator, None if name in zeroed else bound)

    positional = [*names, *[None] * (len(desc["args"]) - len(names))]
    args = tuple(build(name, a) for name, a in zip(positional, desc["args"]))
    kwargs = {k: build(k, v) for k, v in desc.get("kwargs", {}).items()}
    return args, kwargs


SMALL_INTEGERS = 16  # random integers' bound: small enough for any integer dtype and most indices


def integer_bound(desc: Mapping[str, Any]) -> int:
    """Random integers are drawn below this: 16, and every dimension of 2 or more of the
    call's tensors, so that an index into one of them stays in bounds (expert ids into the
    experts' weights [E, N, K]). Dimensions of 1 are left out (a broadcast, a single row:
    rarely what an index points into); with only those, integers are zeros."""
    dims = [
        d
        for item in [*desc["args"], *desc.get("kwargs", {}).values()]
        if isinstance(item, dict) and "tensor" in item
        for d in item["tensor"]["shape"]
        if d > 1
    ]
    return min([SMALL_INTEGERS, *dims]) if dims else 1


def grid_from(
    desc: Mapping[str, Any], identify: Callable[[Mapping[str, Any]], str | None]
) -> Callable[..., Any]:
    """A grid callable that looks up the recorded grid of the config being launched."""
    grids = {cid: tuple(g) for cid, g in desc.get("grids", {}).items()}
    # Configs that share meta-parameters (differing only in num_warps, num_stages...) share
    # a grid: the grid callable never sees those options.
    by_meta = {cid.split("|", 1)[0]: g for cid, g in grids.items()}

    def grid(meta: Mapping[str, Any]) -> tuple[int, ...]:
        cid = identify(meta)
        found = grids.get(cid) if cid is not None else None
        if found is None and cid is not None:
            found = by_meta.get(cid.split("|", 1)[0])
        if found is None:
            raise NoRecordedGrid(
                f"no recorded grid for config {cid}; the call was recorded with other configs"
            )
        return found

    return grid
