"""On a GPU: a decode step of the Triton engine launches no cuBLAS, cuDNN or FlashAttention
kernel (PyTorch's profiler lists every CUDA kernel of the step). Skipped on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

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


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a GPU: the interpreter launches no CUDA kernels to profile",
)
def test_a_decode_step_launches_no_vendor_kernel() -> None:
    from torch.profiler import ProfilerActivity, profile

    from tunebook.demo.llm.config import SMOLLM2_135M
    from tunebook.demo.llm.engine import Engine
    from tunebook.demo.llm.loading import random_weights
    from tunebook.demo.llm.sampling import SamplingParams
    from tunebook.demo.llm.tokenizer import ByteTokenizer

    weights = random_weights(SMOLLM2_135M, torch.bfloat16, "cuda")
    engine = Engine(weights, ByteTokenizer(), max_batch=8, max_model_len=256, cuda_graphs=False)
    requests = [engine.submit([1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True)) for _ in range(4)]
    engine.step()  # the prefill
    engine.step()  # a first decode step: compiles
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert names, "the profiler saw no CUDA kernel"
    vendor = sorted({n for n in names if any(v in n.lower() for v in VENDOR_KERNELS)})
    assert not vendor, f"non-Triton compute kernels in a decode step: {vendor}"
    assert any("_linear_kernel" in n for n in names) and any(
        "_paged_attention_decode_kernel" in n for n in names
    )
    assert all(len(r.output) == 2 for r in requests)
