"""Compile the attention kernels, fused_moe's alignment kernel and the decode study's
variants (TMA, whose device-side tensor descriptors the interpreter accepts in forms the
compiler rejects, and the chunked 3-D merge) for an NVIDIA GPU without one: does each build,
what does ptxas say about its registers, spills and shared memory, and how deep does the
software pipeline of its loops go (``pipeline_depths``)?

Triton's interpreter runs the kernels' logic on a CPU but never compiles them, so code that
the GPU compiler rejects (a layout it cannot lower, a tile ``tl.dot`` refuses) and configs
that spill registers only show up on a GPU. This compiles chosen configs to a cubin with the
ptxas bundled in Triton's wheel, marking pointers and strides 16-divisible as a launch
specializes them (without that, loads are not vectorized and the register counts mislead),
and reads the resource usage with cuobjdump.

    python benchmarks/kernels/compile_check.py                 # a few configs per kernel, sm_90
    python benchmarks/kernels/compile_check.py --arch 80 --kernels decode
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # compiled JIT functions, not interpreted ones

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# (layout, kernel meta-parameters, num_warps, num_stages) to compile, per kernel.
DECODE = [
    ((32, 8, 128), {"BLOCK_N": 16, "SPLITS": 16}, 4, 3),  # the hand-picked launch
    ((32, 8, 128), {"BLOCK_N": 64, "SPLITS": 1}, 4, 2),
    ((8, 1, 128), {"BLOCK_N": 128, "SPLITS": 8}, 8, 1),
    ((9, 3, 64), {"BLOCK_N": 256, "SPLITS": 4}, 8, 2),
    # Tuned on the H200 once pipelined tiles could hold up to 256 values a thread (BENCHMARKS 5b)
    ((32, 8, 128), {"BLOCK_N": 64, "SPLITS": 4}, 2, 2),
    ((32, 8, 128), {"BLOCK_N": 32, "SPLITS": 1}, 1, 2),
    ((8, 1, 128), {"BLOCK_N": 128, "SPLITS": 1}, 4, 2),
    # warp slices: 4 softmax states, one a warp, 16 keys each a step
    ((32, 8, 128), {"BLOCK_N": 16, "SPLITS": 1, "SLICES": 4}, 4, 3),
    ((8, 1, 128), {"BLOCK_N": 32, "SPLITS": 8, "SLICES": 4}, 4, 3),
    # the two-level merge past 16 splits, as the page serves one sequence of 8k-32k tokens
    ((8, 1, 128), {"BLOCK_N": 128, "SPLITS": 64}, 8, 1),
    ((16, 2, 128), {"BLOCK_N": 16, "SPLITS": 64, "SLICES": 4}, 4, 3),
    ((8, 1, 128), {"BLOCK_N": 128, "SPLITS": 32}, 4, 3),
    # the merge in a kernel of its own (the split programs only store their partials)
    ((16, 2, 128), {"BLOCK_N": 16, "SPLITS": 64, "SLICES": 4, "MERGE_KERNEL": 1}, 4, 3),
    # ... signalling the merge kernel's programmatic dependent launch, as on an H100/H200
    ((16, 2, 128), {"BLOCK_N": 64, "SPLITS": 8, "MERGE_KERNEL": 1, "PDL": 1}, 4, 1),
]
VARLEN = [
    (
        (32, 8, 128),
        {"BLOCK_M": 128, "BLOCK_N": 128, "CAUSAL": True, "HAS_PREFIX": False},
        8,
        1,
    ),  # hand-picked
    ((32, 8, 128), {"BLOCK_M": 128, "BLOCK_N": 64, "CAUSAL": True, "HAS_PREFIX": True}, 8, 3),
    ((32, 8, 128), {"BLOCK_M": 64, "BLOCK_N": 64, "CAUSAL": True, "HAS_PREFIX": False}, 4, 3),
    ((9, 3, 64), {"BLOCK_M": 64, "BLOCK_N": 32, "CAUSAL": False, "HAS_PREFIX": True}, 4, 2),
]
CACHE = [((8, 128), {"BLOCK_T": 1, "BLOCK_H": 8}, 4, 1), ((3, 64), {"BLOCK_T": 4, "BLOCK_H": 2}, 1, 1)]
# The decode study's TMA variant (decode_structures.py): blocks per loop step, splits.
TMA = [
    ((32, 8, 128), {"PAGES": 4, "SPLITS": 4}, 4, 3),
    ((8, 1, 128), {"PAGES": 2, "SPLITS": 4}, 4, 3),
    ((9, 3, 64), {"PAGES": 2, "SPLITS": 2}, 2, 2),
]

# The study's "vm" variant (flat grid, merge of CHUNK splits a step; CHUNK as merge_chunk picks it).
VM = [
    ((32, 8, 128), {"BLOCK_N": 64, "SPLITS": 16, "MERGE_G": 4, "CHUNK": 16}, 4, 2),
    ((8, 1, 128), {"BLOCK_N": 128, "SPLITS": 64, "MERGE_G": 8, "CHUNK": 8}, 4, 1),
    ((9, 3, 64), {"BLOCK_N": 64, "SPLITS": 8, "MERGE_G": 4, "CHUNK": 8}, 2, 2),
]

# fused_moe's alignment (_moe_align.py): (E, ALIGN) and the tile sizes moe_align derives.
ALIGN = [((8, 16), {}, 4, 3), ((256, 64), {}, 4, 3), ((1023, 128), {}, 4, 3), ((5, 4), {}, 4, 3)]


def compile_one(
    jit: Any,
    pointer_types: dict[str, str],
    consts: dict[str, Any],
    num_warps: int,
    num_stages: int,
    arch: int,
) -> tuple[float, Any]:
    """Compile ``jit`` with ``consts`` fixed (a constexpr parameter they leave out takes its
    default); other arguments are i32 (fp32 for the softmax
    scale) unless ``pointer_types`` names them."""
    # A constexpr parameter left out takes its default, as a launch would (an unnamed one was
    # read as an i32 argument: Triton 3.4 then traced branches the default turns off).
    defaults = {
        p.name: p.default for p in jit.params if p.is_constexpr and p.default is not inspect.Parameter.empty
    }
    consts = {**defaults, **consts}
    signature = {}
    for name in jit.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        else:
            signature[name] = pointer_types.get(name, "fp32" if name == "qk_scale" else "i32")
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(jit.arg_names)
        if name not in consts and (signature[name].startswith("*") or "stride" in name)
    }
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": num_warps, "num_stages": num_stages}
    )
    t0 = time.perf_counter()
    kernel = triton.compile(
        ASTSource(jit, signature, constexprs=consts, attrs=attrs), target=target, options=options.__dict__
    )
    return time.perf_counter() - t0, kernel


def usage(kernel: Any) -> dict[str, int]:
    """Registers, spill (stack) bytes and static shared memory from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", text))
    return {"registers": int(found.get("REG", -1)), "spill_bytes": int(found.get("STACK", -1))}


def pipeline_depths(kernel: Any) -> list[int]:
    """How many copies of each tile a loop's software pipeline keeps in shared memory (the
    leading dimension of every allocation of copies in the TTGIR), one entry per buffer.

    An asynchronously copied tile feeding a loop's math gets ``num_stages - 1`` copies when
    the pipeliner can fetch ahead. One copy whatever ``num_stages`` asks means it waits for
    each tile before its math: nothing of the next tile is in flight. That is what Triton
    3.4-3.9 does when a tile's addresses come from a load in the same loop, e.g. through
    a block table (BENCHMARKS.md, section 5b, nineteenth session)."""
    text = kernel.asm["ttgir"]
    shapes = re.findall(r"local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x(\d+)x", text)
    # A leading dimension of 16 or more is a tile's rows (e.g. an output staging tile), not
    # a count of copies: pipelines run a few stages deep.
    return [int(depth) for depth, _ in shapes if int(depth) < 16]


def _decode(layout: tuple[int, ...], meta: dict[str, Any]) -> dict[str, Any]:
    nq, nk, hs = layout
    return {
        "NQ": nq,
        "NK": nk,
        "HEAD_SIZE": hs,
        "PAGE": 16,
        "BLOCK_G": 16,
        "BLOCK_D": hs,
        "DOT": "native",
        **meta,
    }


def _decode_pack(layout: tuple[int, ...], meta: dict[str, Any]) -> dict[str, Any]:
    from tunebook.kernels._attention import table_chunk

    chunk, slots = table_chunk(16)
    merge_g = triton.next_power_of_2(layout[0] // layout[1])
    tables = {"CHUNK": chunk, "TABLE_SLOTS": slots}
    return _decode(layout, {**tables, "PDL": 0, "MERGE_G": merge_g, **meta})


def _vm(layout: tuple[int, ...], meta: dict[str, Any]) -> dict[str, Any]:
    flags = {"EVEN_D": False, "PREFETCH": False, "TRANS_K": False, "EVICT": False, "FLAT": True}
    flags |= {"UNROLL": False, "EARLY": False}
    return _decode(layout, {**flags, **meta})


def _varlen(layout: tuple[int, ...], meta: dict[str, Any]) -> dict[str, Any]:
    nq, nk, hs = layout
    paged = meta["HAS_PREFIX"]
    return {
        "NQ": nq,
        "NK": nk,
        "HEAD_SIZE": hs,
        "PAGE": 16 if paged else 0,
        "BLOCK_D": hs,
        "DOT": "native",
        **meta,
    }


def _cache(layout: tuple[int, ...], meta: dict[str, Any]) -> dict[str, Any]:
    nk, hs = layout
    return {"NK": nk, "HEAD_SIZE": hs, "PAGE": 16, "BLOCK_D": hs, **meta}


def _align(layout: tuple[int, ...], meta: dict[str, Any]) -> dict[str, Any]:
    from tunebook.kernels._moe_align import align_meta

    return {**align_meta(*layout), **meta}


def kernels() -> dict[str, tuple[Any, dict[str, str], list[Any], Callable[..., dict[str, Any]]]]:
    from tunebook.kernels._moe_align import _moe_align_kernel
    from tunebook.kernels.paged_attention_decode import _paged_attention_decode_kernel
    from tunebook.kernels.reshape_and_cache import _reshape_and_cache_kernel
    from tunebook.kernels.varlen_attention import _varlen_attention_kernel

    bf16 = "*bf16"
    decode_ptrs = {"q_ptr": bf16, "k_cache_ptr": bf16, "v_cache_ptr": bf16, "out_ptr": bf16}
    decode_ptrs |= {
        "ws_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "table_ptr": "*i32",
        "lens_ptr": "*i32",
        "lock_ptr": "*i32",
    }
    varlen_ptrs = {n: bf16 for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "kc_ptr", "vc_ptr")}
    varlen_ptrs |= {n: "*i32" for n in ("cu_q_ptr", "cu_k_ptr", "table_ptr", "prefix_ptr")}
    cache_ptrs = {n: bf16 for n in ("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr")} | {
        "slot_ptr": "*i64"
    }
    align_ptrs = {"ids_ptr": "*i64"} | {
        n: "*i32" for n in ("sorted_ids_ptr", "chunk_expert_ptr", "num_padded_ptr")
    }
    import decode_structures  # beside this script

    return {
        "decode": (_paged_attention_decode_kernel.fn, decode_ptrs, DECODE, _decode_pack),
        "tma": (decode_structures._study_tma_kernel, decode_ptrs, TMA, _decode),
        "vm": (decode_structures._study_kernel, decode_ptrs, VM, _vm),
        "varlen": (_varlen_attention_kernel.fn, varlen_ptrs, VARLEN, _varlen),
        "cache": (_reshape_and_cache_kernel.fn, cache_ptrs, CACHE, _cache),
        "align": (_moe_align_kernel, align_ptrs, ALIGN, _align),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    p.add_argument(
        "--kernels",
        default="decode,tma,vm,varlen,cache,align",
        help="comma-separated: decode, tma and vm (the decode study's variants), varlen, cache, align",
    )
    p.add_argument("--first", action="store_true", help="only the first config of each kernel")
    args = p.parse_args(argv)
    table = kernels()
    print(f"sm_{args.arch}, Triton {triton.__version__}")
    for name in args.kernels.split(","):
        jit, pointers, configs, consts_of = table[name]
        for layout, meta, warps, stages in configs[:1] if args.first else configs:
            seconds, kernel = compile_one(jit, pointers, consts_of(layout, meta), warps, stages, args.arch)
            found = usage(kernel)
            depths = pipeline_depths(kernel)
            print(
                f"{name:7s} {layout} {meta} warps={warps} stages={stages}: {found['registers']} registers, "
                f"{found['spill_bytes']} spill bytes, {kernel.metadata.shared} B shared, "
                f"tile copies {depths or 'none'}, {seconds:.1f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
