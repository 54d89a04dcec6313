"""Run a real library's autotuned ops on the CPU interpreter and say what happened.

    python tests/adoption/run_ops.py LIBRARY MODE OUT_DIR

LIBRARY is ``fla`` (fla-core) or ``liger`` (liger-kernel), installed unmodified, or
``thirdparty`` (thirdparty.py beside this file: kernels written as libraries write them). MODE:

* ``triton`` — unpatched: Triton's own autotuner. The interpreter has no GPU timer, so
  Triton's ``Autotuner.do_bench`` is given the host clock here (and only here).
* ``patch-before-import`` — ``tunebook.patch()``, then import the library: its
  ``@triton.autotune`` kernels are tunebook autotuners; its Autotuner subclasses (fla's
  ``CachedAutotuner``) are adopted.
* ``patch-after-import`` — import the library, then ``tunebook.patch()``: every kernel
  was decorated before the patch and is adopted.
* ``hook`` — nothing here: the ``TUNEBOOK_PATCH=1`` start-up hook must have patched.

The outputs go to ``OUT_DIR/outputs.pt``; the last line of stdout is a JSON object with
tunebook's counters, each used kernel's class and who served it, and (patch modes) what
happened after ``tunebook.unpatch()``: a new key of an adopted kernel, tuned by Triton.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostclock
import torch

LIBRARY, MODE, OUT = [*sys.argv[1:4], "", "", ""][:3]
PREFIX = {"fla": "fla", "liger": "liger_kernel", "thirdparty": "thirdparty"}.get(LIBRARY, "")
triton_benchmarked = [0]  # configs timed by Triton's own autotuner (host clock)


def give_triton_a_host_clock() -> None:
    """Triton's Autotuner times configs with the GPU driver's benchmarker, which the
    interpreter lacks; the unpatched runs here time them on the host clock instead."""
    from triton.runtime.autotuner import Autotuner

    clock = hostclock.host_clock(triton_benchmarked)
    Autotuner.do_bench = property(lambda self: clock)


# ---------------------------------------------------------------------------- the ops


def fla_ops() -> dict[str, Callable[[], Any]]:
    from fla.modules.activations.ops import logsigmoid_fwd, sigmoid_fwd
    from fla.modules.l2norm import l2norm_bwd, l2norm_fwd
    from fla.modules.layernorm import rms_norm
    from fla.ops.utils.cumsum import chunk_global_cumsum, chunk_local_cumsum

    def l2norm_both() -> Any:
        y, rstd = l2norm_fwd(torch.randn(2, 16, 64))  # CachedAutotuner (a Triton subclass)
        return y, rstd, l2norm_bwd(y, rstd, torch.randn(2, 16, 64))

    return {
        "l2norm": l2norm_both,
        "l2norm_row": lambda: l2norm_fwd(torch.randn(4, 1024)),  # @triton.autotune
        "sigmoid": lambda: sigmoid_fwd(torch.randn(8, 64)),
        "logsigmoid": lambda: logsigmoid_fwd(torch.randn(8, 64)),
        # heuristics stacked above a CachedAutotuner; a key of five names
        "chunk_local_cumsum": lambda: chunk_local_cumsum(torch.randn(1, 32, 2), chunk_size=16),
        "chunk_global_cumsum": lambda: chunk_global_cumsum(torch.randn(1, 32, 2)),
        "rms_norm": lambda: rms_norm(torch.randn(8, 64), torch.randn(64), None),  # keyword launch, 5 keys
    }


def fla_new_key() -> Any:
    from fla.modules.l2norm import l2norm_fwd

    return l2norm_fwd(torch.randn(2, 16, 32))  # another D: a new key of the CachedAutotuner


def liger_ops() -> dict[str, Callable[[], Any]]:
    from liger_kernel.ops.experimental.mm_int8int2 import matmul
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    def moe() -> Any:
        tokens, hidden, inter, experts, top_k = 4, 32, 32, 2, 1
        x = torch.randn(tokens, hidden)
        gate_up = torch.randn(experts, 2 * inter, hidden) * 0.1
        down = torch.randn(experts, hidden, inter) * 0.1
        index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).int()
        return LigerFusedMoEFunction.apply(x, gate_up, down, index, torch.ones(tokens, top_k))

    return {
        "mm_int8int2": lambda: matmul(
            torch.randint(-8, 8, (16, 512), dtype=torch.int8),
            torch.randint(0, 255, (128, 32), dtype=torch.uint8),
        ),
        "fused_moe": moe,  # the up-projection + SwiGLU and the down-projection kernels
    }


def liger_new_key() -> Any:
    from liger_kernel.ops.experimental.mm_int8int2 import matmul

    return matmul(
        torch.randint(-8, 8, (16, 512), dtype=torch.int8), torch.randint(0, 255, (128, 64), dtype=torch.uint8)
    )


# ---------------------------------------------------------------------------- reporting


def autotuners() -> dict[str, Any]:
    """Every Triton autotuner (tunebook's or Triton's) at module level in the library."""
    from triton.runtime.autotuner import Autotuner

    found: dict[str, Any] = {}
    for name, module in list(sys.modules.items()):
        if name != PREFIX and not name.startswith(PREFIX + "."):
            continue
        for attr, value in list(vars(module).items()):
            inner = value
            for _ in range(8):  # under triton.heuristics layers
                if isinstance(inner, Autotuner):
                    found[f"{name}.{attr}"] = inner
                    break
                inner = getattr(inner, "fn", None)
    return found


def served_by(tuner: Any) -> str:
    import tunebook

    if isinstance(tuner, tunebook.Autotuner):
        return "tunebook"
    if vars(tuner).get("_tunebook_autotuner"):
        return "adopted"
    return "triton"


def used_kernels() -> dict[str, dict[str, Any]]:
    return {
        name: {
            "class": f"{type(t).__module__}.{type(t).__qualname__}",
            "served_by": served_by(t),
            "keys": len(t.cache),
            "best_config": str(t.best_config),
            "cache_type": type(t.cache).__name__,
        }
        for name, t in autotuners().items()
        if t.cache
    }


def main() -> None:
    if MODE == "triton":
        give_triton_a_host_clock()
    elif MODE == "patch-before-import":
        import tunebook

        tunebook.patch()
    if LIBRARY == "fla":
        import fla  # noqa: F401

        ops, new_key = fla_ops(), fla_new_key
    elif LIBRARY == "liger":
        import liger_kernel.ops  # noqa: F401

        ops, new_key = liger_ops(), liger_new_key
    else:
        import thirdparty

        ops, new_key = {"all": thirdparty.ops}, thirdparty.new_key
    if MODE == "patch-after-import":
        import tunebook

        tunebook.patch()
    import triton

    patched = triton.runtime.autotuner.Autotuner.run.__module__ == "tunebook._patch"
    outputs: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name, op in ops.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        outputs[name] = op()
        seconds[name] = round(time.perf_counter() - start, 3)
    out = Path(OUT)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(outputs, out / "outputs.pt")
    report: dict[str, Any] = {
        "mode": MODE,
        "patched": patched,
        "seconds": seconds,
        "kernels": used_kernels(),
        "triton_benchmarked": triton_benchmarked[0],
    }
    if LIBRARY == "thirdparty":
        report["host_clock_timed"] = sys.modules["thirdparty"].timed[0]
    if MODE != "triton":
        import tunebook

        report["stats"] = tunebook.stats()
    if MODE.startswith("patch"):
        report["after_unpatch"] = after_unpatch(new_key)
    print(json.dumps(report))


def after_unpatch(new_key: Callable[[], Any]) -> dict[str, Any]:
    """unpatch(), then a new key of an adopted kernel: Triton tunes it, tunebook sees nothing."""
    import triton

    import tunebook

    before = tunebook.stats()["benchmarked"]
    tunebook.unpatch()
    give_triton_a_host_clock()
    adopted_left = [n for n, t in autotuners().items() if "_tunebook_autotuner" in vars(t)]
    for tuner in autotuners().values():
        # As FLA_CACHE_RESULTS=0 does for the unpatched run (test_libraries.py says why):
        # Triton 3.4 would read its disk cache under the interpreter, and fail there.
        if not isinstance(tuner, tunebook.Autotuner):
            tuner.cache_results = False
    torch.manual_seed(0)
    new_key()
    return {
        "run_is_tritons": triton.runtime.autotuner.Autotuner.run.__module__ == "triton.runtime.autotuner",
        "autotune_is_tritons": triton.autotune is triton.runtime.autotuner.autotune,
        "adopted_left": adopted_left,
        "triton_benchmarked": triton_benchmarked[0],
        "tunebook_benchmarked": tunebook.stats()["benchmarked"] - before,
        "kernels": used_kernels(),
    }


if __name__ == "__main__":
    main()
