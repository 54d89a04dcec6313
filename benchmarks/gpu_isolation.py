"""On real GPUs: bad configs are isolated, and `tunebook tune` spreads work over the GPUs.

1. ``isolate=True`` in this process, on a kernel whose candidate configs include one that
   makes an illegal memory access, one that trips a device-side assert and one that hangs:
   each is recorded as failed with its reason, a good config wins and computes the right
   answer, and this process's CUDA context still works afterwards.
2. ``TUNEBOOK_MODE=serve`` records misses for several keys of a GEMM; then
   ``tunebook tune --misses`` tunes them with one worker per visible GPU; afterwards a serve
   process answers every key with 0 fallbacks and 0 configs benchmarked.

    python benchmarks/gpu_isolation.py [--out DIR]

Needs CUDA GPUs (2 or more to exercise several workers). Prints a summary last and writes
DIR/gpu_isolation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

MODULE = '''
import torch, triton, triton.language as tl, tunebook

@triton.jit(debug=True)
def _copy_kernel(x_ptr, flag_ptr, out_ptr, n, BLOCK: tl.constexpr, MODE: tl.constexpr):
    """out = x, except in the planted bad modes."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if MODE == 1:  # an illegal memory access: far outside any allocation
        x = tl.load(x_ptr + offs + (1 << 42))
    elif MODE == 2:  # a device-side assert
        tl.device_assert(offs < 0, "planted device-side assert")
        x = tl.load(x_ptr + offs, mask=mask)
    elif MODE == 3:  # a hang: wait for a flag nobody sets
        while tl.load(flag_ptr, volatile=True) == 0:
            pass
        x = tl.load(x_ptr + offs, mask=mask)
    else:
        x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x, mask=mask)

copy = tunebook.autotune(
    [triton.Config({"BLOCK": 256, "MODE": 0}), triton.Config({"BLOCK": 1024, "MODE": 1}),
     triton.Config({"BLOCK": 1024, "MODE": 2}), triton.Config({"BLOCK": 1024, "MODE": 3}),
     triton.Config({"BLOCK": 1024, "MODE": 0})],
    key=["n"], isolate=True, isolate_timeout=30,
)(_copy_kernel)

from tunebook.demo.matmul import _matmul_kernel, gemm_configs
CONFIGS = gemm_configs(block_m=(64, 128), block_n=(64, 128), block_k=(64,), stages=(3, 4), warps=(4,))
gemm = tunebook.autotune(CONFIGS, key=["M", "N", "K"])(_matmul_kernel)
'''


def run(code: str, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=500)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


ISOLATE = """
import json, torch, triton, tunebook, gpukern
n = 1 << 20
x = torch.randn(n, device="cuda")
out = torch.empty_like(x)
flag = torch.zeros(1, device="cuda", dtype=torch.int32)
t0 = __import__("time").perf_counter()
gpukern.copy[lambda m: (triton.cdiv(n, m["BLOCK"]),)](x, flag, out, n)
torch.cuda.synchronize()
seconds = __import__("time").perf_counter() - t0
ok = bool(torch.equal(out, x))
healthy = float((torch.ones(4, device="cuda") * 2).sum().item()) == 8.0  # the context still works
page = gpukern.copy.page(); page.refresh(force=True)
entry = next(iter(page.entries.values()))
print(json.dumps({"correct": ok, "healthy": healthy, "seconds": seconds,
                  "best": gpukern.copy.best_config.kwargs,
                  "results": {cid: r.error for cid, r in entry.results.items()}}))
"""

SERVE = """
import json, torch, tunebook, gpukern
from tunebook.demo.matmul import matmul
for m in json.loads(__import__("os").environ["MS"]):
    a = torch.randn(m, 2048, device="cuda", dtype=torch.float16)
    b = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
    c = matmul(gpukern.gemm, a, b)
    assert torch.allclose(c.float(), a.float() @ b.float(), rtol=2e-2, atol=2e-1)
tunebook._misses.flush()
print(json.dumps(tunebook.stats()))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    work = Path(tempfile.mkdtemp(prefix="tunebook-gpuiso-"))
    (work / "gpukern.py").write_text(MODULE)
    env = {
        **os.environ,
        "PYTHONPATH": f"{work}{os.pathsep}{SRC}",
        "TUNEBOOK_DIR": str(work / "book"),
        "TRITON_CACHE_DIR": str(work / "cache"),
    }
    env.pop("TRITON_INTERPRET", None)
    out: dict = {"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name()}

    iso = run(ISOLATE, env)
    out["isolate"] = iso
    print(f"[isolate] {json.dumps(iso)}", flush=True)

    ms = [3, 24, 100, 300, 700, 1500, 3000, 5000]
    served = run(SERVE, {**env, "TUNEBOOK_MODE": "serve", "MS": json.dumps(ms)})
    print(f"[serve, untuned] {json.dumps(served)}", flush=True)
    t0 = time.perf_counter()
    tune = subprocess.run(
        [sys.executable, "-m", "tunebook", "tune", "--misses", "gpukern"],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
        cwd=work,
    )
    tune_s = time.perf_counter() - t0
    print(tune.stdout[-2000:], tune.stderr[-2000:], flush=True)
    again = run(SERVE, {**env, "TUNEBOOK_MODE": "serve", "MS": json.dumps(ms)})
    print(f"[serve, after tune] {json.dumps(again)}", flush=True)
    out.update(
        {
            "serve_before": served,
            "tune_rc": tune.returncode,
            "tune_s": tune_s,
            "tune_stdout": tune.stdout[-4000:],
            "serve_after": again,
        }
    )
    (args.out / "gpu_isolation.json").write_text(json.dumps(out, indent=1))

    print(f"\n=== {out['gpus']} x {out['gpu']}")
    print(
        f"isolate=True: correct={iso['correct']} context healthy={iso['healthy']} best={iso['best']} "
        f"in {iso['seconds']:.1f} s"
    )
    for cid, err in sorted(iso["results"].items()):
        print(f"  {cid[:60]:60s} {'ok' if err is None else err[:110]}")
    print(
        f"tunebook tune --misses: rc={tune.returncode}, {tune_s:.1f} s for {len(ms)} keys; serve afterwards: "
        f"fallbacks={again['fallbacks']} benchmarked={again['benchmarked']} hits={again['hits']}"
    )


if __name__ == "__main__":
    main()
