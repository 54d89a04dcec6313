"""Identity: kernel hashes, platform fingerprints and keys."""

from __future__ import annotations

from pathlib import Path

import triton

from conftest import load_module
from small_kernels import add_kernel, scale_kernel
from tunebook import _compat, _fingerprint
from tunebook._jsonio import key_text

SOURCE = """
import triton
import triton.language as tl
{pad}
SCALE = {scale}

@triton.jit
def _helper(x):
    return x {op} 1

@triton.jit
def kern(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs)) * SCALE, mask=offs < n)
"""


def load(tmp_path: Path, name: str, *, pad: str = "", op: str = "+", scale: int = 2):
    path = tmp_path / f"{name}.py"
    path.write_text(SOURCE.format(pad=pad, op=op, scale=scale))
    return load_module(path, name).kern


def test_hash_ignores_line_numbers_but_not_code(tmp_path):
    base = _fingerprint.kernel_hash(load(tmp_path, "k_base"))
    assert _fingerprint.kernel_hash(load(tmp_path, "k_moved", pad="\n\n\n# moved\n")) == base
    assert _fingerprint.kernel_hash(load(tmp_path, "k_helper", op="-")) != base
    assert _fingerprint.kernel_hash(load(tmp_path, "k_const", scale=3)) != base


def test_hash_covers_helpers_in_the_same_module():
    assert _fingerprint.kernel_hash(scale_kernel) != _fingerprint.kernel_hash(add_kernel)
    assert _fingerprint.kernel_hash(scale_kernel) == _fingerprint.kernel_hash(scale_kernel)


def test_hash_sees_through_wrappers():
    wrapped = triton.heuristics({"BLOCK": lambda a: 64})(add_kernel)
    assert _fingerprint.kernel_hash(wrapped) == _fingerprint.kernel_hash(add_kernel)


def test_canonical_key_matches_tritons_rule():
    import torch

    x = torch.empty(3, dtype=torch.float16)
    key = _fingerprint.canonical_key(["x", "y", "n", "m"], ["m", "n"], (x, 5), {"n": 7, "m": 9})
    assert key == (9, 7, "torch.float16")
    assert key_text(key) == '[9,7,"torch.float16"]'


def test_interpreter_platform_is_its_own():
    fp = _fingerprint.platform_fingerprint("wallclock")
    assert fp["backend"] == "interpreter" and fp["timer"] == "wallclock"
    assert fp["triton"] == triton.__version__
    assert _fingerprint.platform_slug(fp).startswith("interpreter-")
    other = {**fp, "timer": "events"}
    assert _fingerprint.platform_id(fp) != _fingerprint.platform_id(other)


def test_gpu_identity_names_the_model(monkeypatch):
    """On a GPU the fingerprint carries the model name, so H100 PCIe and SXM differ."""

    class Target:
        backend, arch, warp_size = "cuda", 90, 32

    class Props:
        def __init__(self, name):
            self.name, self.multi_processor_count = name, 132

    import torch

    monkeypatch.setattr(_compat, "interpreting", lambda: False)
    monkeypatch.setattr(_compat, "current_target", Target)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ids = []
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, n=name: Props(n))
        ident = _compat.device_identity()
        assert ident["device"] == name and ident["arch"] == "90" and ident["runtime"].startswith("cuda")
        ids.append(_fingerprint.platform_id({**ident, "triton": "3.6.0", "timer": "events"}))
    assert ids[0] != ids[1]


def test_config_record_and_id_cover_every_option_field():
    from tunebook._book import config_id, config_record

    cfg = triton.Config({"BLOCK": 64, "EVEN": True}, num_warps=8, num_stages=2, maxnreg=128)
    options = _compat.config_options(cfg)
    assert {"num_warps", "num_stages", "num_ctas", "maxnreg"} <= set(options)
    record = config_record(cfg.kwargs, options)
    assert record == {"kwargs": {"BLOCK": 64, "EVEN": True}, **options}
    assert config_id(record) == "BLOCK=64,EVEN=true|maxnreg=128,num_ctas=1,num_stages=2,num_warps=8"
    other = triton.Config({"BLOCK": 64, "EVEN": True}, num_warps=4, num_stages=2, maxnreg=128)
    assert config_id(config_record(other.kwargs, _compat.config_options(other))) != config_id(record)


def test_globals_that_share_a_name_with_a_parameter_or_local_are_not_part_of_the_hash(tmp_path):
    """Only names that resolve to globals in the kernel's scope may enter the hash: a module's
    ``n = 1`` beside a kernel parameter ``n`` must not give a new kernel id when it becomes 2."""
    base = _fingerprint.kernel_hash(load(tmp_path, "k_shadow_1", pad="n = 1\noffs = 1\nx_ptr = 'a'"))
    other = _fingerprint.kernel_hash(load(tmp_path, "k_shadow_2", pad="n = 2\noffs = 7\nx_ptr = 'b'"))
    assert other == base
    assert _fingerprint.kernel_hash(load(tmp_path, "k_shadow_3", pad="n = 2", scale=3)) != base
