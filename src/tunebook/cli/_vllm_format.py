"""``tunebook export/import --format vllm``: vLLM's tuned fused-MoE config files.

vLLM reads ``E={E},N={N},device_name={device}[,dtype={dtype}][,block_shape=[n,k]].json``
holding ``{"<M>": {"BLOCK_SIZE_M": .., "BLOCK_SIZE_N": .., "BLOCK_SIZE_K": ..,
"GROUP_SIZE_M": .., "num_warps": .., "num_stages": ..}, ...}`` and picks the entry of the
nearest batch size M. ``device`` is torch's device name with spaces as ``_`` (any H200
variant is ``NVIDIA_H200``).

**The mapping rule.** A book knows its kernel's key argument names (``kernel.key``); the
stored key is those values followed by the argument dtypes. Every vLLM field is bound to
a book name, by ``--map VLLM=BOOK`` or else by inference (case-insensitive):

* key fields, looked up among the key names: ``M`` <- M, num_tokens, batch_size;
  ``E`` <- E, num_experts; ``N`` <- N; ``dtype`` <- dtype (optional); ``block_shape`` <-
  block_shape (optional);
* config fields, looked up among the config's kwargs and options: ``BLOCK_SIZE_M`` <-
  BLOCK_SIZE_M, BLOCK_M; likewise N and K; ``GROUP_SIZE_M`` <- GROUP_SIZE_M, GROUP_M;
  ``num_warps``, ``num_stages`` <- the config's options.

``--const VLLM=VALUE`` supplies a field the kernel does not have (``--const E=8`` for a
dense kernel, ``--const GROUP_SIZE_M=1``). A field neither bound nor given is an error
naming it and the two fixes. Key positions bound to no field (another size, the dtypes)
must not make two entries collide on one (file, M): that is an error naming the position
that differs and the ``--where`` filter that picks one.

**Imports** carry a declared winner and no timing, which the schema (versions 1 and 2)
cannot say directly. Until it can (see docs/cli.md, "Imported results"), an import is written as its
own platform (``"backend": "imported"``, ``"timer": "imported:vllm"``; timers are part of
the platform, so imported and measured results never share a file and are never merged
or compared as timings) with one result per key whose ``ms`` is ``[0, 0, 0]``: with one
result per key, the value ranks nothing, and ``show``/``report`` print "imported" instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from .._tables import IMPORTED_PREFIX, device_label

KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "M": ("M", "num_tokens", "batch_size"),
    "E": ("E", "num_experts"),
    "N": ("N",),
    "dtype": ("dtype",),
    "block_shape": ("block_shape",),
}
OPTIONAL_KEY_FIELDS = ("dtype", "block_shape")
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "BLOCK_SIZE_M": ("BLOCK_SIZE_M", "BLOCK_M"),
    "BLOCK_SIZE_N": ("BLOCK_SIZE_N", "BLOCK_N"),
    "BLOCK_SIZE_K": ("BLOCK_SIZE_K", "BLOCK_K"),
    "GROUP_SIZE_M": ("GROUP_SIZE_M", "GROUP_M"),
    "num_warps": ("num_warps",),
    "num_stages": ("num_stages",),
}
# vLLM reads these as integers: a file name or config holding anything else is unreadable to it.
INTEGER_FIELDS = ("E", "N", "M", *CONFIG_FIELDS)
COMPILER_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# The fields vLLM's ROCm tables add, in their order there: kept by import, written by export.
ROCM_FIELDS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
# vLLM's newer files record the Triton they were tuned with beside the batch sizes; vLLM
# drops it on reading, and so do import and export's check of an existing file.
TRITON_VERSION_FIELD = "triton_version"
IMPORT_TIMER = IMPORT_HASH = f"{IMPORTED_PREFIX}vllm"  # what _tables.load recognizes as an import

NAME_PATTERN = re.compile(
    r"^E=(?P<E>\d+),N=(?P<N>\d+),device_name=(?P<device>[^,]+?)"
    r"(?:,dtype=(?P<dtype>[^,]+?))?(?:,block_shape=\[(?P<block>[\d, ]*)\])?(?P<rest>,[^/]*)?\.json$"
)


def parse_name(name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(fields of a vLLM config file name, None), or (None, what is wrong with it)."""
    match = NAME_PATTERN.match(name)
    if match is None:
        return None, (
            "not a vLLM config file name; expected "
            "E=<int>,N=<int>,device_name=<name>[,dtype=<str>][,block_shape=[<int>,<int>]].json"
        )
    if match["rest"]:
        return None, (
            f"unsupported name part {match['rest']!r} (tunebook imports "
            "E, N, device_name, dtype and block_shape)"
        )
    block = block_shape_list(match["block"]) if match["block"] is not None else None
    if block is not None and len(block) != 2:  # vLLM names files block_shape=[n,k] only
        return None, f"block_shape=[{match['block']}] is not two integers [n,k], as vLLM writes it"
    return {
        "E": int(match["E"]),
        "N": int(match["N"]),
        "device": match["device"],
        "dtype": match["dtype"],
        "block_shape": f"[{','.join(map(str, block))}]" if block else None,
    }, None


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def name_problems(fields: dict[str, Any], device: str) -> list[str]:
    """Why a file named from ``fields`` (E, N, M, dtype) and ``device`` would not read back."""
    problems = [f"{f}={fields[f]!r} is not an integer" for f in ("E", "N", "M") if not is_integer(fields[f])]
    for name, value in (("dtype", fields.get("dtype")), ("device name", device)):
        if value and (any(c in str(value) for c in ",/\\") or _UNPRINTABLE.search(str(value))):
            problems.append(f"{name} {value!r} contains ',', '/', '\\' or a control character")
    if problem := device_problem(str(device), control=False):
        problems.append(problem)
    # A book's device name is untrusted text: the file name it makes must be one short path
    # component, written inside the output directory and nowhere else.
    length = len(f"E={fields['E']},N={fields['N']},device_name={device},dtype={fields.get('dtype')}".encode())
    if length > 200:
        problems.append(f"the file name would be {length} bytes long (file systems allow 255)")
    return problems


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def device_problem(device: str, *, control: bool = True) -> str | None:
    """Why ``device`` names no GPU (empty, dots, blanks; with ``control``, a control character),
    or None. Export and import refuse the same names."""
    if device.strip(". \t") == "":
        return f"device name {device!r} is empty, dots or blanks only"
    if control and _UNPRINTABLE.search(device):
        return f"device name {device!r} contains a control character"
    return None


def scalar(text: str) -> Any:
    """``"8"`` -> 8, ``"true"`` -> True, anything else stays a string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, int | float | bool) or value is None else text


def vllm_device_name(device: str) -> str:
    """As vLLM names the device in file names."""
    return device_label(device)


def vllm_file_name(E: Any, N: Any, device: str, dtype: Any = None, block_shape: Any = None) -> str:
    dtype_part = f",dtype={dtype}" if dtype else ""
    shape = block_shape_list(block_shape)
    shape_part = f",block_shape=[{','.join(map(str, shape))}]" if shape and all(shape) else ""
    return f"E={E},N={N},device_name={vllm_device_name(device)}{dtype_part}{shape_part}.json"


def block_shape_list(value: Any) -> list[int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(v) for v in re.findall(r"\d+", str(value))]


def lookup(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {n.lower(): n for n in names}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None
