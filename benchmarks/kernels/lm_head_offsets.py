"""An lm_head prefill with more than 2^31 output elements through ``linear``, against cuBLAS.

The pointer kernel computes offsets such as ``rows * stride`` in 32 bits; the TMA kernel's
descriptors address in 64 bits. This checks, on one GPU with ~6 GB free, that a call past
2^31 elements takes the TMA kernel and matches cuBLAS on rows before and after the boundary
(BENCHMARKS.md, section 5). Runs in serve mode: it tunes nothing.

    TUNEBOOK_MODE=serve python benchmarks/kernels/lm_head_offsets.py
"""

import importlib

import _timing
import torch

linear = importlib.import_module("tunebook.kernels.linear")
tma = importlib.import_module("tunebook.kernels._linear_tma")

M, N, K = 20480, 128256, 4096  # Llama-3's vocabulary; 2.63e9 outputs
ROWS = [0, 1, 16743, 20479]  # 16743 * N is the first row past element 2^31


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    print(f"M*N = {M * N:,} (> 2^31: {M * N > 2**31}); takes the TMA kernel: {tma.usable(x, w, y)}")
    linear.linear(x, w, out=y)
    rows = torch.tensor(ROWS, device="cuda")
    ref = torch.nn.functional.linear(x[rows], w)
    err = (y[rows].float() - ref.float()).abs().max().item()
    finite = bool(y[-1].isfinite().all())
    print(f"rows {ROWS}: max abs error against cuBLAS {err:.4f}; last row finite: {finite}")


if __name__ == "__main__":
    _timing.study_out(__doc__, takes_out=False)
    main()
