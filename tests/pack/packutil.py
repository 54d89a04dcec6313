"""Helpers shared by the kernel-pack tests: tolerances, seeded inputs, poisoned outputs,
the concrete configs a sweep runs, and the tune command run as a user runs it."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import tunebook

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Kernel output (in its dtype) against a float64 reference computed from the same inputs.
# One rounding of the output costs half an ulp on a GPU (2^-9 relative for bf16, 2^-12
# for fp16). Triton's interpreter truncates fp32 -> bf16 instead of rounding (a whole ulp),
# and fp32 sums differ from fp64 ones in the last bits; hence 2^-6 for bf16, 2^-10 for
# fp16.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.bfloat16: {"atol": 2**-6, "rtol": 2**-6},
    torch.float16: {"atol": 2**-10, "rtol": 2**-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "output") -> None:
    """``actual`` (the kernel's, in its dtype) against ``expected`` (float64); NaN fails."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.double(), expected.double(), **TOLERANCES[actual.dtype], msg=lambda m: f"{what}: {m}"
    )


def generator(nodeid: str) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per case, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(nodeid.encode()))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def poisoned(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An output buffer full of NaN: an element the kernel does not write fails the check."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype)


def sweep_configs(space: tunebook.Space, args: Mapping[str, Any], extra: int = 3) -> list[dict[str, Any]]:
    """Concrete configs worth running for ``args``: the first and last candidates, those
    with the smallest and largest value of every parameter, and ``extra`` seeded others."""
    cands = space.candidates(args=args)
    assert cands, f"no candidate configs for {dict(args)}"
    picks = [cands[0], cands[-1]]
    for name in space.params:
        picks.append(min(cands, key=lambda c: c[name]))
        picks.append(max(cands, key=lambda c: c[name]))
    picks += random.Random(0).sample(cands, min(extra, len(cands)))
    unique = {tuple(sorted(c.items())): c for c in picks}
    return list(unique.values())


def tune_command(*args: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> Any:
    """``python -m tunebook.kernels tune ARGS`` in a new process on the interpreter (its
    CompletedProcess, output captured as text)."""
    return subprocess.run(
        [sys.executable, "-m", "tunebook.kernels", "tune", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "TRITON_INTERPRET": "1"},
        timeout=timeout,
    )
