"""On a GPU: a decode step of the Triton engine launches no cuBLAS, cuDNN or FlashAttention
kernel (PyTorch's profiler lists every CUDA kernel of the step). Skipped on a CPU.

Random weights of SmolLM2-135M's shapes: no model file is needed, only torch, triton and
the demo's own modules. The step runs in a child process: the suite's conftest sets
``TRITON_INTERPRET=1`` for every test (it must, before Triton is imported), and under the
interpreter no CUDA kernel runs at all. The child is this file run as a script."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# The LLM demo: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once

VENDOR_KERNELS = (
    "gemm",
    "gemv",
    "cublas",
    "cutlass",
    "cudnn",
    "flash",
    "sm90_xmma",
    "nvjet",
    "fmha",
    "efficient_attention",
)


def profile_a_decode_step(device: str = "cuda", layers: int | None = None) -> dict[str, Any]:
    """Four sequences prefilled, one decode step to compile, then one decode step under the
    profiler (eager, no CUDA graph: a replay would hide the kernels' names). Returns the
    CUDA kernels' names and the tokens each sequence has."""
    from torch.profiler import ProfilerActivity, profile

    from tunebook.demo.llm.config import SMOLLM2_135M
    from tunebook.demo.llm.engine import Engine
    from tunebook.demo.llm.loading import random_weights
    from tunebook.demo.llm.sampling import SamplingParams
    from tunebook.demo.llm.tokenizer import ByteTokenizer

    config = SMOLLM2_135M if layers is None else SMOLLM2_135M.cut(layers)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weights = random_weights(config, dtype, device)
    engine = Engine(weights, ByteTokenizer(), max_batch=8, max_model_len=256, cuda_graphs=False)
    requests = [engine.submit([1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True)) for _ in range(4)]
    engine.step()  # the prefill
    engine.step()  # a first decode step: compiles
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
        engine.step()
        if device == "cuda":
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"kernels": names, "tokens": [len(r.output) for r in requests], "ops": engine.ops.name}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a CPU runs no CUDA kernel to profile")
def test_a_decode_step_launches_no_vendor_kernel(tmp_path: Path) -> None:
    import subprocess

    import tunebook

    # The child imports the tunebook this process imported; it serves from the shipped
    # books (or the hand-picked configs) and tunes nothing, as the server does.
    source = str(Path(tunebook.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TUNEBOOK_MODE": "serve", "TUNEBOOK_DIR": str(tmp_path / "book")}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert proc.returncode == 0, f"the profiling process failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    names = result["kernels"]
    assert names, "the profiler saw no CUDA kernel"
    vendor = sorted({n for n in names if any(v in n.lower() for v in VENDOR_KERNELS)})
    assert not vendor, f"non-Triton compute kernels in a decode step: {vendor}"
    assert any("_linear_kernel" in n for n in names) and any(
        "_paged_attention_decode_kernel" in n for n in names
    ), f"the pack's kernels are missing from the step: {sorted(set(names))}"
    # A token from the prefill, one from each decode step.
    assert result["ops"] == "triton" and result["tokens"] == [3, 3, 3, 3]


if __name__ == "__main__":
    # The child of the test above; `python tests/llm/test_gpu_profile.py cpu 1` runs the
    # same steps on the CPU interpreter (one layer; no CUDA kernel to list): a smoke check.
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else None
    print(json.dumps(profile_a_decode_step(device, layers)))
