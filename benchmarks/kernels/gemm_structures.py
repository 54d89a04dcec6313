"""Which GEMM kernel structure reaches cuBLAS at prefill sizes: the study behind linear's TMA kernel.

Six structures at the same fixed configs (no tuning), bf16, Llama-3-8B layers, CUDA-graph
replays interleaved across all of them and cuBLAS (``_gemm_timing``); prints, per shape, each
structure's best config as a ratio to cuBLAS (BENCHMARKS.md, section 5):
  cur      the pack's pointer kernel, _linear_kernel (masked K loads, wrapped rows)
  nomask   same loop, no K mask (K % BLOCK_K == 0)
  tma      device-side tensor descriptors (TMA loads, TMA store)
  tmaws    tma with warp_specialize on the K loop
  pers     persistent tma (one program per SM), tiles in GROUP_M order
  persf    persistent tma, flattened loops (tl.range flatten=True): what linear ships

    python benchmarks/kernels/gemm_structures.py OUT_DIR      # one GPU with TMA, ~40 s
"""

import importlib
import json
import os

import _timing
import torch
import triton
import triton.language as tl
from _gemm_timing import Variant, time_variants

from tunebook.kernels._gemm_common import dot_mode
from tunebook.kernels._linear_tma import _tile_of  # the grouped tile order every structure shares

pack_linear = importlib.import_module("tunebook.kernels.linear")


def _alloc(size, alignment, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


@triton.jit
def k_nomask(x, w, y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    tile_m, tile_n = _tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rows = tile_m * BM + tl.arange(0, BM)
    cols = tile_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    xp = x + (rows % M)[:, None] * K + ks[None, :]
    wp = w + (cols % N)[None, :] * K + ks[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K // BK):
        acc = tl.dot(tl.load(xp), tl.load(wp), acc)
        xp += BK
        wp += BK
    tl.store(
        y + rows[:, None] * N + cols[None, :],
        acc.to(y.dtype.element_ty),
        mask=(rows[:, None] < M) & (cols[None, :] < N),
    )


@triton.jit
def k_tma(
    x,
    w,
    y,
    M,
    N,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    WS: tl.constexpr,
):
    tile_m, tile_n = _tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)
    xd = tl.make_tensor_descriptor(x, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    wd = tl.make_tensor_descriptor(w, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    yd = tl.make_tensor_descriptor(y, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS):
        a = xd.load([tile_m * BM, k * BK])
        b = wd.load([tile_n * BN, k * BK])
        acc = tl.dot(a, b.T, acc)
    yd.store([tile_m * BM, tile_n * BN], acc.to(y.dtype.element_ty))


@triton.jit
def k_pers(
    x,
    w,
    y,
    M,
    N,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    xd = tl.make_tensor_descriptor(x, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    wd = tl.make_tensor_descriptor(w, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    yd = tl.make_tensor_descriptor(y, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for t in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=FLATTEN):
        tile_m, tile_n = _tile_of(t, M, N, BM, BN, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            a = xd.load([tile_m * BM, k * BK])
            b = wd.load([tile_n * BN, k * BK])
            acc = tl.dot(a, b.T, acc)
        yd.store([tile_m * BM, tile_n * BN], acc.to(y.dtype.element_ty))


CONFIGS = [  # BM, BN, BK, GROUP_M, warps, stages
    (128, 256, 64, 8, 8, 3),
    (128, 256, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    (128, 128, 64, 8, 8, 4),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 128, 8, 8, 3),
    (64, 256, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (256, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 3),
]
SHAPES = [  # name, M, N, K
    ("qkv", 4096, 6144, 4096),
    ("o", 4096, 4096, 4096),
    ("gate_up", 4096, 28672, 4096),
    ("down", 4096, 4096, 14336),
    ("qkv", 1024, 6144, 4096),
    ("down", 1024, 4096, 14336),
    ("qkv", 256, 6144, 4096),
    ("o", 256, 4096, 4096),
]


def make_fns(x, w, y, cfg, M, N, K, c, grid, pgrid, sms):
    bm, bn, bk, g, nw, ns = c
    spare = torch.empty(1, dtype=torch.float32, device=x.device)  # split-K buffers, unused at SPLIT_K=1
    lock = torch.zeros(1, dtype=torch.int32, device=x.device)
    pointer_args = (x, w, w, y, spare, lock, M, N, K, K, 1, K, 1, N, 1, False, dot_mode(x.dtype))
    return {
        # The pointer kernel itself: linear() would route these sizes to the TMA kernel now.
        "cur": lambda: pack_linear._linear_kernel.fn[grid](
            *pointer_args, **{k: cfg[k] for k in pack_linear.META}, num_warps=nw, num_stages=ns
        ),
        "nomask": lambda: k_nomask[grid](x, w, y, M, N, K, bm, bn, bk, g, num_warps=nw, num_stages=ns),
        "tma": lambda: k_tma[grid](x, w, y, M, N, K, bm, bn, bk, g, False, num_warps=nw, num_stages=ns),
        "tmaws": lambda: k_tma[grid](x, w, y, M, N, K, bm, bn, bk, g, True, num_warps=nw, num_stages=ns),
        "pers": lambda: k_pers[pgrid](
            x, w, y, M, N, K, bm, bn, bk, g, sms, False, num_warps=nw, num_stages=ns
        ),
        "persf": lambda: k_pers[pgrid](
            x, w, y, M, N, K, bm, bn, bk, g, sms, True, num_warps=nw, num_stages=ns
        ),
    }


def main(out):
    triton.set_allocator(_alloc)  # device-side tensor descriptors need launch-time scratch
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    errors = {}
    for name, M, N, K in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        ref = torch.nn.functional.linear(x, w)
        variants = {"cublas": Variant(lambda x=x, w=w: torch.nn.functional.linear(x, w))}
        for c in CONFIGS:
            bm, bn, bk, g, nw, ns = c
            tag = f"{bm}x{bn}x{bk}w{nw}s{ns}"
            y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, SPLIT_K=1, num_warps=nw, num_stages=ns)
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            pgrid = (min(sms, grid[0]),)
            fns = make_fns(x, w, y, cfg, M, N, K, c, grid, pgrid, sms)
            for kind, fn in fns.items():
                key = f"{kind}:{tag}"
                try:
                    y.zero_()
                    fn()
                    torch.cuda.synchronize()
                    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    if err > 2e-2:
                        raise RuntimeError(f"wrong result, rel err {err:.3g}")
                    variants[key] = Variant(fn)
                except Exception as e:  # a structure that fails to compile is reported, not fatal
                    errors.setdefault(key, f"{type(e).__name__}: {str(e)[:300]}")
        res = time_variants(variants, repeats=11)
        base = res["cublas"]["us"]
        flops = 2 * M * N * K
        best = {}
        for key, r in res.items():
            kind = key.split(":")[0]
            if kind not in best or r["us"] < res[best[kind]]["us"]:
                best[kind] = key
        row = {
            "layer": name,
            "M": M,
            "N": N,
            "K": K,
            "cublas_us": round(base, 1),
            "cublas_tflops": round(flops / base / 1e6, 0),
        }
        for kind, key in best.items():
            row[kind] = f"{base / res[key]['us']:.2f} {key.split(':', 1)[-1]}"
        rows.append(row)
        with open(os.path.join(out, f"gemm_{name}_{M}.json"), "w") as f:
            json.dump({"shape": [M, N, K], "results": res}, f, indent=1)
        print(json.dumps(row), flush=True)
    with open(os.path.join(out, "gemm_errors.json"), "w") as f:
        json.dump(errors, f, indent=1)
    print("errors:", len(errors), "first:", list(errors.items())[:4])
    print("== ratio to cuBLAS (higher is better), best config per kind")
    kinds = ["cur", "nomask", "tma", "tmaws", "pers", "persf"]
    for r in rows:
        print(
            f"{r['layer']:8s} M={r['M']:5d} cublas {r['cublas_us']:8.1f}us {r['cublas_tflops']:.0f}TF | "
            + " | ".join(f"{k} {r.get(k, '-')}" for k in kinds)
        )


if __name__ == "__main__":
    main(_timing.study_out(__doc__) or "")
