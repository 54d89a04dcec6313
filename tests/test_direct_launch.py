"""A hit's direct launch (``tunebook._compat.direct``): the compiled kernel's own launcher,
called without ``JITFunction.run``, must launch exactly what ``run`` would and hand back to
``run`` whenever the two could differ.

The launch itself needs a GPU: the GPU test runs in a child process without the
interpreter and is skipped on machines without one (BENCHMARKS.md records its runs on the
H200). What the interpreter can check (when the direct launch is off, and why) runs here.
"""

from __future__ import annotations

import pytest
import torch

import tunebook
from conftest import run_python
from small_kernels import add_kernel, block_configs, grid_1d, vectors
from tunebook._compat import direct
from tunebook._errors import ConfigurationError


def test_under_the_interpreter_hits_keep_tritons_launch_and_say_why():
    assert "InterpretedFunction" in (direct.available(add_kernel) or "")
    assert direct.direct_run(add_kernel, add_kernel.run, {"BLOCK": 64}) is None
    kernel = tunebook.autotune(block_configs(32, 64), key=["n"])(add_kernel)
    for seed in range(3):
        x, y, out = vectors(100, seed=seed)
        kernel[grid_1d(100)](x, y, out, 100)
        torch.testing.assert_close(out, x + y)
    assert tunebook.stats()["hits"] == 2


def test_the_switch_turns_it_off_and_a_typo_is_an_error_that_names_the_values(monkeypatch):
    monkeypatch.setenv("TUNEBOOK_DIRECT_LAUNCH", "0")
    assert direct.available(add_kernel) == "TUNEBOOK_DIRECT_LAUNCH=0"
    monkeypatch.setenv("TUNEBOOK_DIRECT_LAUNCH", "fasle")
    with pytest.raises(ConfigurationError, match=r"TUNEBOOK_DIRECT_LAUNCH='fasle'.*expected one of 1, 0"):
        direct.available(add_kernel)


def _plain_python_kernel(x_ptr, n, BLOCK):  # a JITFunction's source; never compiled here
    pass


class _StandIn:
    """Triton's side of a launch, recorded: the driver's device and stream, the binder
    (pointer and integer alignment decide the specialization, as Triton's does), ``run``
    and the compiled kernel's C launcher."""

    def __init__(self, monkeypatch):
        import sys

        from triton.runtime.jit import JITFunction

        self.fn = JITFunction(_plain_python_kernel)
        self.runs, self.launches = [], []
        stand_in = self

        class Kernel:
            function, packed_metadata = "function", "metadata"

            @property
            def run(self):
                return lambda *a: stand_in.launches.append(a)

        self.kernel = Kernel()

        def binder(x_ptr, n, BLOCK=None, **options):
            spec = [("*fp32", "D" if x_ptr % 16 == 0 else None), ("i32", "D" if n % 16 == 0 else None)]
            return {"x_ptr": x_ptr, "n": n, "BLOCK": BLOCK}, [*spec, ("constexpr", BLOCK)], options

        self.fn.device_caches = {0: ({}, {}, None, None, binder)}

        class Active:
            get_current_device = staticmethod(lambda: 0)
            get_current_stream = staticmethod(lambda device: 7)

        class Driver:
            active = Active()

        monkeypatch.setattr(sys.modules["triton.runtime.driver"], "driver", Driver())

    def run(self, *args, grid, warmup, **kwargs):
        self.runs.append((args, kwargs))
        return self.kernel


def test_the_launcher_calls_tritons_launcher_and_hands_back_to_run_when_it_must(monkeypatch):
    """The generated launcher's logic, on the CPU, with a stand-in for Triton's side (the GPU
    test below checks the real one): ``run`` once per specialization, the C launcher's
    arguments in Triton's order with no metadata and no hooks, and ``run`` again for a launch
    hook, a pre-run hook, a changed global and replaced caches."""
    from triton import knobs

    t = _StandIn(monkeypatch)
    monkeypatch.setattr(direct, "available", lambda fn: None)
    launch = direct.direct_run(t.fn, t.run, {"BLOCK": 64, "num_warps": 2})
    assert launch is not None
    for _ in range(3):
        assert launch((32, 1024), (4,)) is t.kernel
    assert len(t.runs) == 1 and t.runs[0] == ((32, 1024), {"BLOCK": 64, "num_warps": 2})
    assert t.launches == [(4, 1, 1, 7, "function", "metadata", None, None, None, 32, 1024, 64)] * 2
    launch((33, 1024), lambda meta: (meta["BLOCK"], 2))  # unaligned: a new specialization
    launch((33, 1024), lambda meta: (meta["BLOCK"], 2))
    assert len(t.runs) == 2 and t.launches[-1][:3] == (64, 2, 1)

    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "calls"):
        monkeypatch.setattr(hook, "calls", [print])
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", print)
    launch((32, 1024), (4,))
    assert len(t.runs) == 3
    monkeypatch.undo()
    monkeypatch.setattr(direct, "available", lambda fn: None)
    t = _StandIn(monkeypatch)
    launch = direct.direct_run(t.fn, t.run, {"BLOCK": 64})
    launch((32, 1024), (4,))
    t.fn.pre_run_hooks.append(print)
    launch((32, 1024), (4,))
    t.fn.pre_run_hooks.clear()
    launch((32, 1024), (4,))
    assert len(t.runs) == 2 and len(t.launches) == 1
    scope = {"FACTOR": 2}
    t.fn.used_global_vals = {("FACTOR", id(scope)): (2, scope)}
    launch((32, 1024), (4,))
    scope["FACTOR"] = 3  # Triton's run raises here; the launcher must leave it to run
    launch((32, 1024), (4,))
    assert len(t.runs) == 3 and len(t.launches) == 2
    t.fn.used_global_vals = {}
    t.fn.device_caches = {0: t.fn.device_caches[0]}  # replaced (a source update): learned again
    launch((32, 1024), (4,))
    launch((32, 1024), (4,))
    assert len(t.runs) == 4 and len(t.launches) == 3


# The GPU child's kernels live in a file: Triton reads a kernel's source from its module.
_GPU_KERNELS = """
import triton
import triton.language as tl

FACTOR = tl.constexpr(2.0)


@triton.jit
def scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * FACTOR, mask=mask)


@triton.jit
def add_rows_kernel(x_ptr, y_ptr, out_ptr, rows, cols, stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (r < rows) & (c < cols)
    offs = r * stride + c
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)
"""

_GPU_CHILD = r"""
import json
import torch
import triton
import triton.language as tl
from triton import knobs

import gpu_kernels
import tunebook
from tunebook._compat import direct

runs = []
def counting(fn):
    def run(*args, **kwargs):
        runs.append(fn)
        return fn.run(*args, **kwargs)
    return run

def fresh(n, offset=0, dtype=torch.float32):
    x = torch.randn(n + offset, device="cuda", dtype=dtype)[offset:]
    out = torch.full((n + offset,), float("nan"), device="cuda", dtype=dtype)[offset:]
    return x, out

report = {}
scale = gpu_kernels.scale_kernel
launch = direct.direct_run(scale, counting(scale), {"BLOCK": 256, "num_warps": 2})
report["available"] = direct.available(scale)
report["built"] = launch is not None

# Remembered after the first call of a specialization; every later call is direct.
ok = True
for i in range(20):
    x, out = fresh(1000)
    launch((x, out, 1000), (triton.cdiv(1000, 256),))
    ok &= torch.equal(out, x * 2)
report["same_layout"] = {"ok": ok, "runs": len(runs)}

# Another specialization (an unaligned pointer; an n that is a multiple of 16): run() once each.
runs.clear()
ok = True
for n, offset in [(1000, 1), (1000, 1), (1024, 0), (1024, 0), (1000, 0)]:
    x, out = fresh(n, offset)
    launch((x, out, n), lambda meta: (triton.cdiv(n, meta["BLOCK"]),))  # a callable grid too
    ok &= torch.equal(out, x * 2)
report["new_specializations"] = {"ok": ok, "runs": len(runs)}

# Another stream: launched on the current stream.
runs.clear()
stream = torch.cuda.Stream()
x, out = fresh(1 << 20)
with torch.cuda.stream(stream):
    launch((x, out, 1 << 20), (triton.cdiv(1 << 20, 256),))
stream.synchronize()
report["other_stream"] = {"ok": torch.equal(out, x * 2), "runs": len(runs)}

# A launch hook (a profiler): honoured, through run().
runs.clear()
seen = []
hook = lambda metadata: seen.append(metadata.get()["name"] if metadata is not None else None)
chain = hasattr(knobs.runtime.launch_enter_hook, "calls")
if chain:
    knobs.runtime.launch_enter_hook.add(hook)
else:
    knobs.runtime.launch_enter_hook = hook
x, out = fresh(1000)
launch((x, out, 1000), (4,))
if chain:
    knobs.runtime.launch_enter_hook.remove(hook)
else:
    knobs.runtime.launch_enter_hook = None
launch((x, out, 1000), (4,))
report["launch_hook"] = {"ok": torch.equal(out, x * 2), "runs": len(runs), "seen": seen}

# A pre-run hook: honoured, through run().
runs.clear()
pre = []
scale.add_pre_run_hook(lambda *a, **k: pre.append(1))
launch((x, out, 1000), (4,))
scale.pre_run_hooks.clear()
report["pre_run_hook"] = {"runs": len(runs), "called": len(pre)}

# A global the kernel reads changed: Triton's own error, not a stale kernel.
runs.clear()
gpu_kernels.FACTOR = tl.constexpr(3.0)
try:
    launch((x, out, 1000), (4,))
    report["global_changed"] = "launched"
except RuntimeError as exc:
    report["global_changed"] = str(exc)
gpu_kernels.FACTOR = tl.constexpr(2.0)

# A 2-D grid, two constexprs and launch options, fp16, strided rows.
rows_k = gpu_kernels.add_rows_kernel
runs.clear()
options = {"BLOCK_R": 16, "BLOCK_C": 64, "num_warps": 4, "num_stages": 2}
two_d = direct.direct_run(rows_k, counting(rows_k), options)
ok = True
for seed in range(3):
    a = torch.randn(100, 300, device="cuda", dtype=torch.float16)
    b = torch.randn(100, 300, device="cuda", dtype=torch.float16)
    o = torch.full_like(a, float("nan"))
    two_d((a, b, o, 100, 300, 300), (triton.cdiv(100, 16), triton.cdiv(300, 64)))
    ok &= torch.equal(o, a + b)
report["two_d"] = {"ok": ok, "runs": len(runs)}

# Through tunebook.autotune: every hit right, with the direct launch and without.
configs = [triton.Config({"BLOCK_R": 8, "BLOCK_C": c}) for c in (32, 64, 128)]
compiled = len(rows_k.device_caches[torch.cuda.current_device()][0])
ok = True
for switch in ("1", "0"):
    import os
    os.environ["TUNEBOOK_DIRECT_LAUNCH"] = switch
    tuned = tunebook.autotune(configs, key=["rows", "cols"])(rows_k)
    for rows, cols in [(50, 300), (64, 256), (50, 300), (64, 256)] * 3:
        a = torch.randn(rows, cols, device="cuda")
        b = torch.randn(rows, cols, device="cuda")
        o = torch.full_like(a, float("nan"))
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, meta["BLOCK_C"]))
        tuned[grid](a, b, o, rows, cols, cols)
        ok &= torch.equal(o, a + b)
report["autotune"] = {"ok": ok, "stats": tunebook.stats()}
# Measured, first launched and hit with the same options: one kernel a (config, specialization).
report["compiled"] = len(rows_k.device_caches[torch.cuda.current_device()][0]) - compiled
torch.cuda.synchronize()
print(json.dumps(report))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches on a GPU (run on the GPU machine)")
def test_on_a_gpu_the_direct_launch_launches_what_run_would_and_hands_back_when_it_must(tmp_path):
    (tmp_path / "gpu_kernels.py").write_text(_GPU_KERNELS)
    env = {"TRITON_INTERPRET": "0", "TUNEBOOK_DIR": str(tmp_path / "book")}
    r = run_python(_GPU_CHILD, env=env, cwd=tmp_path)
    assert r["available"] is None and r["built"]
    assert r["same_layout"] == {"ok": True, "runs": 1}  # the first call only
    assert r["new_specializations"] == {"ok": True, "runs": 2}  # (1000, unaligned) and 1024
    assert r["other_stream"] == {"ok": True, "runs": 0}
    assert r["launch_hook"] == {"ok": True, "runs": 1, "seen": ["scale_kernel"]}
    assert r["pre_run_hook"] == {"runs": 1, "called": 1}
    assert "FACTOR" in r["global_changed"] and "changed" in r["global_changed"]
    assert r["two_d"] == {"ok": True, "runs": 1}
    # Tuned once (2 keys x 3 configs), then served: 10 hits a switch at least.
    assert r["autotune"]["ok"] and r["autotune"]["stats"]["benchmarked"] == 6
    assert r["autotune"]["stats"]["hits"] >= 2 * 10
    assert r["compiled"] == 3 * 2  # 3 configs x 2 specializations, each compiled once


_PACK_CHILD = r"""
import json
import torch
import torch.nn.functional as F

import tunebook
from pack.gemm_reference import moe_reference
from tunebook.kernels import fused_moe, linear, rms_norm, silu_and_mul

torch.manual_seed(0)
bf16 = dict(device="cuda", dtype=torch.bfloat16)

m = 16
x = torch.randn(m, 4096, **bf16)
w = torch.randn(4096, **bf16)
gate_up = torch.randn(m, 2 * 14336, **bf16)
weight = torch.randn(6144, 4096, **bf16) * 4096**-0.5
e, inter = 8, 7168
w13 = torch.randn(e, 2 * inter, 4096, **bf16) * 4096**-0.5
w2 = torch.randn(e, 4096, inter, **bf16) * inter**-0.5
weights, ids = torch.topk(torch.randn(m, e, device="cuda").softmax(-1), 2)
cases = {  # op, its output's shape, the call, the reference (fp64)
    "rms_norm": ((m, 4096), lambda out: rms_norm(x, w, 1e-6, out=out),
                 lambda: x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
                 * w.double()),
    "silu_and_mul": ((m, 14336), lambda out: silu_and_mul(gate_up, out=out),
                     lambda: F.silu(gate_up[:, :14336].double()) * gate_up[:, 14336:].double()),
    "linear": ((m, 6144), lambda out: linear(x, weight, out=out), lambda: x.double() @ weight.double().T),
    "fused_moe": ((m, 4096), lambda out: fused_moe(x, w13, w2, weights, ids, out=out),
                  lambda: moe_reference(x, w13, w2, weights, ids)),
}
report = {}
for name, (shape, call, reference) in cases.items():
    expected = reference()
    errors = []
    for _ in range(3):  # the first call (the book's answer, through run()), then two hits
        out = torch.full(shape, float("nan"), **bf16)
        call(out)
        torch.cuda.synchronize()
        errors.append(float(((out.double() - expected).abs().max() / expected.abs().max()).item()))
    report[name] = errors
report["stats"] = tunebook.stats()
print(json.dumps(report))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches on a GPU (run on the GPU machine)")
def test_on_a_gpu_the_packs_hits_write_what_pytorch_computes(tmp_path):
    """The pack's ops in serve mode, on shipped books where this GPU has them: each call
    writes into a poisoned output, the first through Triton's run, the next two directly."""
    r = run_python(
        _PACK_CHILD, env={"TRITON_INTERPRET": "0", "TUNEBOOK_MODE": "serve", "TUNEBOOK_DIR": str(tmp_path)}
    )
    for op in ("rms_norm", "silu_and_mul", "linear", "fused_moe"):
        assert len(r[op]) == 3 and all(e < 2e-2 for e in r[op]), (op, r[op])  # bf16; NaN fails
    assert r["stats"]["benchmarked"] == 0 and r["stats"]["hits"] + r["stats"]["fallbacks"] >= 8


def test_a_typo_in_the_switch_stops_the_decoration_not_a_later_launch(monkeypatch):
    monkeypatch.setenv("TUNEBOOK_DIRECT_LAUNCH", "maybe")
    with pytest.raises(ConfigurationError, match="TUNEBOOK_DIRECT_LAUNCH"):
        tunebook.autotune(block_configs(32, 64), key=["n"])(add_kernel)


def test_a_tool_that_wraps_tritons_launch_is_not_bypassed(monkeypatch):
    """A tracer or sanitizer that replaces ``JITFunction.run`` (on the class or on one
    kernel) sees every launch: the hits keep going through it."""
    import functools

    from triton.runtime.jit import JITFunction

    fn = JITFunction(_plain_python_kernel)
    assert direct.available(fn) is None  # the switch on, a plain jit function, this Triton
    original = JITFunction.run

    @functools.wraps(original)
    def traced(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", traced)
    assert "wrapped" in (direct.available(fn) or "")
    monkeypatch.setattr(JITFunction, "run", original)
    assert direct.available(fn) is None
    monkeypatch.setattr(fn, "run", lambda *a, **k: None, raising=False)
    assert "wrapped" in (direct.available(fn) or "")
