"""A ``do_bench`` for the CPU interpreter, where Triton's own needs a GPU driver."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def host_clock(counter: list[int]) -> Callable[..., list[float]]:
    """Times one run after a warm-up on the host clock; counts each config it times in ``counter``."""

    def bench(kernel_call: Callable[[], Any], quantiles: Any = None) -> list[float]:
        counter[0] += 1
        kernel_call()
        start = time.perf_counter()
        kernel_call()
        ms = (time.perf_counter() - start) * 1e3
        return [ms, ms, ms]

    return bench
