"""On real GPUs: bad configs are isolated, and `tunebook tune` spreads work over the GPUs.

1. ``isolate=True`` in this process, on a kernel whose candidate configs include one that
   makes an illegal memory access, one that trips a device-side assert and one that hangs:
   each is recorded as failed with its reason, a good config wins and computes the right
   answer, and this process's CUDA context still works afterwards.
2. ``TUNEBOOK_MODE=serve`` records misses for several keys of a GEMM; then
   ``tunebook tune --misses`` tunes them with one worker per visible GPU; afterwards a serve
   process answers every key with 0 fallbacks and 0 configs benchmarked.

    python benchmarks/gpu_isolation.py [--out DIR]
    python benchmarks/gpu_isolation.py --interpret --out /tmp/iso   # CPU mode, ~30 s

Needs CUDA GPUs (2 or more to exercise several workers). Prints a summary last and writes
DIR/gpu_isolation.json (default $OUT or ./bench-out). ``--interpret`` runs both parts on
the CPU through Triton's interpreter (1024 elements, the 4 small GEMM configs, 2 keys, one
worker, a hang timeout of 10 s): there the illegal access kills the worker with SIGSEGV
instead of a CUDA error, the device-side assert is left out (the interpreter never runs
``tl.device_assert``) and no CUDA context is checked; it checks the script and tunebook's
isolation, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as harness

# The children learn CPU mode from TRITON_INTERPRET, which harness.child_env sets explicitly.
MODULE = '''
import os, torch, triton, triton.language as tl, tunebook
CPU = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if CPU else "cuda"

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

# Triton's interpreter never runs tl.device_assert: in CPU mode MODE 2 would be a plain copy.
MODES = (0, 1, 3, 0) if CPU else (0, 1, 2, 3, 0)
copy = tunebook.autotune(
    [triton.Config({"BLOCK": 1024 if i else 256, "MODE": mode}) for i, mode in enumerate(MODES)],
    key=["n"], isolate=True, isolate_timeout=10 if CPU else 30,
)(_copy_kernel)

from tunebook.demo.matmul import _matmul_kernel, gemm_configs, small_configs
CONFIGS = small_configs() if CPU else gemm_configs(
    block_m=(64, 128), block_n=(64, 128), block_k=(64,), stages=(3, 4), warps=(4,)
)
gemm = tunebook.autotune(CONFIGS, key=["M", "N", "K"])(_matmul_kernel)
DTYPE = torch.float32 if CPU else torch.float16
NK = 32 if CPU else 2048  # N = K of the GEMM


def sync():
    if not CPU:
        torch.cuda.synchronize()
'''


ISOLATE = """
import json, torch, triton, tunebook, gpukern
from gpukern import DEVICE
n = 1 << 10 if gpukern.CPU else 1 << 20
x = torch.randn(n, device=DEVICE)
out = torch.empty_like(x)
flag = torch.zeros(1, device=DEVICE, dtype=torch.int32)
t0 = __import__("time").perf_counter()
gpukern.copy[lambda m: (triton.cdiv(n, m["BLOCK"]),)](x, flag, out, n)
gpukern.sync()
seconds = __import__("time").perf_counter() - t0
ok = bool(torch.equal(out, x))
healthy = float((torch.ones(4, device=DEVICE) * 2).sum().item()) == 8.0  # the context still works
page = gpukern.copy.page(); page.refresh(force=True)
entry = next(iter(page.entries.values()))
print(json.dumps({"correct": ok, "healthy": healthy, "seconds": seconds,
                  "best": gpukern.copy.best_config.kwargs,
                  "results": {cid: r.error for cid, r in entry.results.items()}}))
"""

SERVE = """
import json, torch, tunebook, gpukern
from gpukern import DEVICE, DTYPE, NK
from tunebook.demo.matmul import matmul
for m in json.loads(__import__("os").environ["MS"]):
    a = torch.randn(m, NK, device=DEVICE, dtype=DTYPE)
    b = torch.randn(NK, NK, device=DEVICE, dtype=DTYPE)
    c = matmul(gpukern.gemm, a, b)
    assert torch.allclose(c.float(), a.float() @ b.float(), rtol=2e-2, atol=2e-1)
tunebook._misses.flush()
print(json.dumps(tunebook.stats()))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    harness.add_out_argument(parser)
    parser.add_argument("--interpret", action="store_true", help="CPU mode: Triton's interpreter, tiny sizes")
    args = parser.parse_args()
    out_dir = harness.out_dir(args.out)

    work = Path(tempfile.mkdtemp(prefix="tunebook-gpuiso-"))
    (work / "gpukern.py").write_text(MODULE)
    env = harness.child_env(interpret=args.interpret, scratch=work, path=[work])
    out: dict[str, Any] = harness.platform_header(interpret=args.interpret)
    if args.interpret:
        out["gpus"] = 0
    else:
        import torch

        out["gpus"] = torch.cuda.device_count()

    iso = harness.run_child(["-c", ISOLATE], env=env, timeout=500)
    out["isolate"] = iso
    print(f"[isolate] {json.dumps(iso)}", flush=True)

    ms = [3, 24] if args.interpret else [3, 24, 100, 300, 700, 1500, 3000, 5000]
    serve_env = {**env, "TUNEBOOK_MODE": "serve", "MS": json.dumps(ms)}
    served = harness.run_child(["-c", SERVE], env=serve_env, timeout=500)
    print(f"[serve, untuned] {json.dumps(served)}", flush=True)
    t0 = time.perf_counter()
    # Not run_child: the CLI prints no JSON, and its exit status is a result here.
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
    again = harness.run_child(["-c", SERVE], env=serve_env, timeout=500)
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
    (out_dir / "gpu_isolation.json").write_text(json.dumps(out, indent=1))

    gpus = f"{out['gpus']} x " if out["gpus"] else ""
    print(f"\n=== {gpus}{harness.header_line(out)}")
    print(
        f"isolate=True: correct={iso['correct']} context healthy={iso['healthy']} best={iso['best']} "
        f"in {iso['seconds']:.1f} s"
    )
    rows = [(cid[:60], "ok" if err is None else err[:110]) for cid, err in sorted(iso["results"].items())]
    print(harness.table(rows, ("config", "recorded")))
    print(
        f"tunebook tune --misses: rc={tune.returncode}, {tune_s:.1f} s for {len(ms)} keys; serve afterwards: "
        f"fallbacks={again['fallbacks']} benchmarked={again['benchmarked']} hits={again['hits']}"
    )


if __name__ == "__main__":
    main()
