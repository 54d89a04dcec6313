"""A host with GPUs of several models, faked on the CPU for tunebook's platform identity only.

Kernels still run in Triton's interpreter (TRITON_INTERPRET=1); only what ``tunebook._compat``
reads about the device is replaced: torch's ``current_device``, ``get_device_properties``,
``device_count`` and ``version.cuda``, Triton's target (``_compat.current_target``), and
``interpreting()`` inside the device helpers alone (``device_identity``, ``device_models``,
``local_gpu_ids``, ``current_device_ids``). The visible devices follow
``CUDA_VISIBLE_DEVICES`` as CUDA does: read at the first device query, in the listed order.

In a test: ``install(["H100", "A100"], monkeypatch.setattr)``; ``with device(1):`` plays
``torch.cuda.device(1)``. In a child process (a ``tunebook tune`` worker, an ``isolate=True``
worker, the command line): ``FAKEGPU=H100,A100`` and :data:`SITE` on ``PYTHONPATH``
(``fakegpu_site/sitecustomize.py`` installs it at start-up).

:class:`DeviceBench` is a ``do_bench`` whose timings are those of the current device: the
H100 prefers BLOCK=256, the A100 BLOCK=32, so a result filed under the wrong GPU shows.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tunebook import _compat

SITE = str(Path(__file__).parent / "fakegpu_site")

GPUS = {
    "H100": {"name": "NVIDIA H100 80GB HBM3", "cc": 90, "sms": 132},
    "A100": {"name": "NVIDIA A100-SXM4-80GB", "cc": 80, "sms": 108},
    # The H100's name and arch with fewer SMs (a MIG slice, or another board of the same name):
    # another platform, which only the SM count tells apart.
    "H100-114": {"name": "NVIDIA H100 80GB HBM3", "cc": 90, "sms": 114},
}
# ms per BLOCK on each GPU.
TIMES = {
    "NVIDIA H100 80GB HBM3": {32: 4.0, 64: 3.0, 128: 2.0, 256: 1.0},
    "NVIDIA A100-SXM4-80GB": {32: 1.0, 64: 2.0, 128: 3.0, 256: 4.0},
}

state: dict[str, Any] = {"physical": [], "visible": None, "current": 0}


def visible() -> list[dict[str, Any]]:
    if state["visible"] is None:  # CUDA reads CUDA_VISIBLE_DEVICES once, at its first use
        ids = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        state["visible"] = [state["physical"][int(v)] for v in ids] if ids else list(state["physical"])
    return state["visible"]


def current() -> dict[str, Any]:
    return visible()[state["current"]]


class _Props:
    def __init__(self, gpu: dict[str, Any]) -> None:
        self.name = gpu["name"]
        self.multi_processor_count = gpu["sms"]
        self.major, self.minor = divmod(gpu["cc"], 10)


class _Target:
    def __init__(self, gpu: dict[str, Any]) -> None:
        self.backend, self.arch, self.warp_size = "cuda", gpu["cc"], 32


def _as_gpu(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real`` run as on a GPU host: interpreting() false and torch.cuda available, inside it only."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        saved, available = _compat.interpreting, torch.cuda.is_available
        _compat.interpreting, torch.cuda.is_available = (lambda: False), (lambda: True)  # type: ignore[assignment]
        try:
            return real(*args, **kwargs)
        finally:
            _compat.interpreting, torch.cuda.is_available = saved, available  # type: ignore[assignment]

    return wrapper


def _properties(index: Any = None) -> _Props:
    i = state["current"] if index is None else getattr(index, "index", index)
    return _Props(visible()[int(i)])


def install(names: list[str], set_attr: Callable[[Any, str, Any], None] = setattr) -> None:
    """Fake physical GPUs ``names`` (keys of GPUS) for this process; ``set_attr`` is
    ``monkeypatch.setattr`` in a test."""
    state.update(physical=[GPUS[n] for n in names], visible=None, current=0)
    set_attr(torch.cuda, "current_device", lambda: state["current"])
    set_attr(torch.cuda, "get_device_properties", _properties)
    set_attr(torch.cuda, "device_count", lambda: len(visible()))
    set_attr(torch.version, "cuda", "12.8")
    set_attr(_compat, "current_target", lambda: _Target(current()))
    for name in ("device_identity", "device_models", "local_gpu_ids", "current_device_ids"):
        if hasattr(_compat, name):
            set_attr(_compat, name, _as_gpu(getattr(_compat, name)))
    devices = sys.modules.get("tunebook._devices")
    if devices is not None:
        set_attr(devices, "_models", None)  # asked again, of these devices


@contextlib.contextmanager
def device(index: int) -> Iterator[None]:
    """``torch.cuda.device(index)``."""
    old, state["current"] = state["current"], index
    try:
        yield
    finally:
        state["current"] = old


class DeviceBench:
    """A ``do_bench`` that times a config as the current GPU would (TIMES); configs name
    their BLOCK through :func:`configs`' pre_hook. ``log`` holds (GPU, BLOCK) per measurement."""

    def __init__(self, fail: Callable[[str, int], BaseException | None] | None = None) -> None:
        self.block = 0
        self.log: list[tuple[str, int]] = []
        self._fail = fail

    def __call__(self, fn: Callable[[], Any], quantiles: Any = None, **kwargs: Any) -> Any:
        fn()  # runs the config's pre_hook, which names its BLOCK
        gpu = current()["name"]
        error = self._fail(gpu, self.block) if self._fail is not None else None
        if error is not None:
            raise error
        self.log.append((gpu, self.block))
        ms = TIMES[gpu].get(self.block, 1.0)
        return [ms, ms, ms] if quantiles else ms

    def configs(self, blocks: tuple[int, ...] = (64, 32, 128, 256)) -> list[Any]:
        import triton

        def named(nargs: dict[str, Any]) -> None:
            self.block = nargs["BLOCK"]

        return [triton.Config({"BLOCK": b}, pre_hook=named) for b in blocks]
