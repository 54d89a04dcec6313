"""Identity: kernel hashes, platform fingerprints and keys."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import triton

import tunebook
from conftest import book_files, load_module, run_python
from small_kernels import add_kernel, grid_1d, scale_kernel
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


# ----------------------------------------------------------- a user do_bench's timer id

_timed_block: dict[str, int] = {}


def _name_block(nargs: dict) -> None:
    _timed_block["BLOCK"] = nargs["BLOCK"]


def timed_by(table: dict, fn, quantiles=None, **_):
    """A do_bench reporting the time ``table`` gives the running config's BLOCK."""
    fn()
    ms = table[_timed_block["BLOCK"]]
    return [ms, ms, ms] if quantiles else ms


def _tuned_with(do_bench) -> tuple[int, int, str]:
    """(the BLOCK chosen for n=300, configs measured for it, the timer id) under ``do_bench``."""
    configs = [triton.Config({"BLOCK": b}, pre_hook=_name_block) for b in (32, 64)]
    kernel = tunebook.autotune(configs, key=["n"], do_bench=do_bench)(add_kernel)
    before = tunebook.stats()["benchmarked"]
    x, y, out = torch.randn(300), torch.randn(300), torch.empty(300)
    kernel[grid_1d(300)](x, y, out, 300)
    return (
        kernel.best_config.kwargs["BLOCK"],
        tunebook.stats()["benchmarked"] - before,
        kernel.identity().platform["timer"],
    )


def test_two_partials_or_two_lambdas_are_two_timers_with_their_own_pages(book_dir):
    """A timer is part of the platform: switching a kernel from one partial (or lambda) to
    another measures again under the new one, instead of serving the old one's winner."""
    fast_32, fast_64 = {32: 1.0, 64: 2.0}, {32: 2.0, 64: 1.0}
    first = _tuned_with(functools.partial(timed_by, fast_32))
    second = _tuned_with(functools.partial(timed_by, fast_64))
    assert first[:2] == (32, 2) and second[:2] == (64, 2)
    assert first[2] != second[2] and first[2].startswith("custom:partial(timed_by)#")
    assert _tuned_with(functools.partial(timed_by, dict(fast_32)))[1:] == (0, first[2])  # the same timer
    # A lambda is its own code: these two differ in their constants.
    third = _tuned_with(lambda fn, quantiles=None: timed_by({32: 1.0, 64: 2.0}, fn, quantiles))
    fourth = _tuned_with(lambda fn, quantiles=None: timed_by({32: 2.0, 64: 1.0}, fn, quantiles))
    assert third[:2] == (32, 2) and fourth[:2] == (64, 2) and third[2] != fourth[2]
    assert third[2].startswith(
        "custom:test_two_partials_or_two_lambdas_are_two_timers_with_their_own_pages.<locals>.<lambda>#"
    )
    assert len(book_files(book_dir)) == 4


def test_a_named_timer_keeps_its_name_and_a_partials_id_names_no_address():
    """A named function or callable object keeps the id existing books were written under;
    a partial's arguments are named without the addresses that change every process."""
    from tunebook._bench import custom_name

    class Replay:
        def __call__(self, fn, quantiles=None):
            return 1.0

    assert custom_name(timed_by) == "timed_by" and custom_name(Replay()) == "Replay"
    assert custom_name(functools.partial(timed_by, object())) == custom_name(
        functools.partial(timed_by, object())
    )
    assert custom_name(functools.partial(timed_by, {32: 1.0})) != custom_name(
        functools.partial(timed_by, {32: 2.0})
    )


TIMERS_APP = """
import json
import triton
import tunebook
from small_kernels import add_kernel


def outer():
    def bench(fn, quantiles=None, **kw):
        fn()
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    return bench


K1 = tunebook.autotune(
    [triton.Config({"BLOCK": 32})], key=["n"], do_bench=lambda fn, quantiles=None: [1.0] * 3
)(add_kernel)
K2 = tunebook.autotune(
    [triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})], key=["n", "x_ptr"],
    do_bench=lambda fn, quantiles=None: [1.0] * 3
)(add_kernel)
K3 = tunebook.autotune([triton.Config({"BLOCK": 32})], key=["n"], do_bench=outer())(add_kernel)
IDS = [k.identity().platform["timer"] for k in (K1, K2, K3)]
"""


def test_a_timers_id_is_the_same_run_as_a_script_or_imported_and_a_nested_function_keeps_its_name(tmp_path):
    """Found by a review of the timer ids: a function defined in another was renamed (the
    books tuned with it no longer matched), a lambda's id hashed the statement around it
    (two equal lambdas on decorator lines that differ in their configs got two ids) and its
    module (``__main__`` for a script, the module's name once imported)."""
    (tmp_path / "timers_app.py").write_text(TIMERS_APP)
    as_script = run_python(TIMERS_APP + '\nprint(json.dumps({"ids": IDS}))\n', cwd=tmp_path)["ids"]
    imported = run_python(
        'import json, timers_app; print(json.dumps({"ids": timers_app.IDS}))', cwd=tmp_path
    )["ids"]
    lambda_1, lambda_2, nested = as_script
    assert nested == "custom:outer.<locals>.bench"  # as before the ids changed: its books still match
    assert lambda_1 == lambda_2 and lambda_1.startswith("custom:<lambda>#")
    assert imported == as_script


def test_a_partials_arguments_name_no_address_in_any_form_and_a_lambda_by_its_code():
    """Found by a review of the timer ids: only a repr with " at 0x" lost its address, so a
    partial over a stream (``cuda_stream=0x55d1...``) got a new id, hence a new page, in
    every process; and two partials over different lambdas shared one id."""
    from tunebook._bench import custom_name

    class Stream:  # as torch.cuda.Stream's repr
        def __repr__(self) -> str:
            return f"<torch.cuda.Stream device=cuda:0 cuda_stream={hex(id(self))}>"

    streams = [Stream() for _ in range(2)]
    assert custom_name(functools.partial(timed_by, stream=streams[0])) == custom_name(
        functools.partial(timed_by, stream=streams[1])
    )
    assert custom_name(functools.partial(timed_by, key=lambda x: x + 1)) != custom_name(
        functools.partial(timed_by, key=lambda x: x * 100)
    )
    assert custom_name(functools.partial(timed_by, key=lambda x: x + 1)) == custom_name(
        functools.partial(timed_by, key=lambda x: x + 1)
    )
