"""isolate=True as programs really use it, found by a misuse review: kernels imported along a
sys.path the program set itself, arguments of overlapping memory and Triton dtypes, Ctrl-C
in the middle of an isolated search, a timeout shorter than a worker's start-up. Real
worker processes, CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import TESTS
from tunebook._calls import build_value, describe_value, validate

KERNELS = """
import os, time
import torch, triton, tunebook
import triton.language as tl

def _slow(nargs):
    time.sleep(float(os.environ.get("SLOW_S", "0")))

@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, stride_x, DT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs * stride_x, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, (2 * x + y).to(DT), mask=mask)

axpy = tunebook.autotune(
    [triton.Config({"BLOCK": 32}, pre_hook=_slow), triton.Config({"BLOCK": 64}, pre_hook=_slow)],
    key=["n"],
    isolate=True,
    isolate_timeout=float(os.environ.get("ISOLATE_TIMEOUT", "120")),
)(_axpy_kernel)
"""

PROGRAM = """
import os, sys
sys.path.insert(0, os.environ["KERNEL_DIR"])  # the program finds its kernels itself
import torch, triton, triton.language as tl
import tunebook, mykernels

n = 200
x = torch.randn(1).expand(n)  # stride 0: one value read n times
y = torch.randn(n)
out = torch.empty(n, dtype=torch.float16)
grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)
mykernels.axpy[grid](x, y, out, n, x.stride(0), DT=tl.float16)
assert torch.allclose(out.float(), (2 * x + y).half().float(), atol=1e-2), "wrong answer"
print("benchmarked", tunebook.stats()["benchmarked"])
"""


def run_program(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    kernels = tmp_path / "kernels"
    kernels.mkdir(exist_ok=True)
    (kernels / "mykernels.py").write_text(KERNELS)
    (tmp_path / "program.py").write_text(PROGRAM)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    full_env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "TUNEBOOK_DIR": str(tmp_path / "book"),
        "KERNEL_DIR": str(kernels),
        "PYTHONPATH": str(TESTS),  # not the kernels' folder: the program adds it
        **env,
    }
    return subprocess.run(
        [sys.executable, str(tmp_path / "program.py")],
        cwd=elsewhere,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_worker_imports_along_the_programs_sys_path_and_rebuilds_overlapping_and_dtype_arguments(
    tmp_path: Path,
) -> None:
    """The worker could not import a kernel the program had put on sys.path itself
    (ModuleNotFoundError, reported as "found no config that runs"), filled a stride-0 tensor
    through its view (RuntimeError: more than one element ... refers to a single memory
    location) and could not rebuild a tl.float16 constexpr. The search's progress is shown."""
    res = run_program(tmp_path, TUNEBOOK_PROGRESS="1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "benchmarked 2" in res.stdout, res.stdout
    # The worker's own progress goes to a pipe: this process shows it (it showed nothing).
    assert "2/2 configs" in res.stderr and "done (in a worker process)" in res.stderr, res.stderr[-2000:]
    again = run_program(tmp_path)  # remembered: no worker, nothing measured
    assert again.returncode == 0 and "benchmarked 0" in again.stdout, again.stderr[-2000:]


def test_a_timeout_shorter_than_the_workers_start_up_says_so_and_records_nothing(tmp_path: Path) -> None:
    res = run_program(tmp_path, ISOLATE_TIMEOUT="0.2")
    assert res.returncode != 0
    assert "failed before measuring any config, and nothing was recorded" in res.stderr, res.stderr[-2000:]
    assert "the worker said nothing for 0.2 s" in res.stderr and "start-up" in res.stderr
    assert not list((tmp_path / "book").rglob("*,*.json"))  # no key file: nothing was recorded


def test_ctrl_c_during_an_isolated_search_ends_its_worker_and_leaves_no_file(tmp_path: Path) -> None:
    """Ctrl-C reached only the caller's thread: the supervising thread and its worker carried
    on, so a program that caught it (a REPL, a notebook, a server) had two workers tuning one
    key, each slowing the other's timings, and a job file was left in the temp directory."""
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "mykernels.py").write_text(KERNELS)
    temp = tmp_path / "temp"
    temp.mkdir()
    script = textwrap.dedent(
        """
        import faulthandler, os, signal, sys, threading, time
        sys.path.insert(0, os.environ["KERNEL_DIR"])
        import torch, triton, triton.language as tl
        import mykernels

        def children(of="tunebook._worker"):
            found = []
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        fields = fh.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        command = fh.read().decode(errors="replace")
                except (OSError, IndexError):
                    continue
                if pid.isdigit() and int(fields[1]) == os.getpid() and of in command:
                    found.append(pid)
            return found

        def interrupt():
            for _ in range(1200):  # the worker has started and measures its first config
                time.sleep(0.1)
                if children():
                    break
            else:
                print("no worker started", flush=True)
            time.sleep(1.0)
            print("interrupting", flush=True)
            # To the main thread, as a terminal's Ctrl-C reaches it (a signal the kernel hands
            # to another thread would leave the main thread's wait unwoken).
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            faulthandler.dump_traceback_later(60, exit=True)  # a hang says where, then ends

        # Python leaves SIGINT ignored when it starts ignored (a run started in the background,
        # as CI's may be): the program here is one whose Ctrl-C raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Thread(target=interrupt, daemon=True).start()
        n = 100
        x, y, out = torch.randn(n), torch.randn(n), torch.empty(n)
        try:
            mykernels.axpy[lambda m: (triton.cdiv(n, m["BLOCK"]),)](x, y, out, n, 1, DT=tl.float32)
            print("not interrupted", flush=True)
        except KeyboardInterrupt:
            where = os.listdir(os.environ["TMPDIR"])
            print("interrupted; workers", children(), "files", where, flush=True)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        env={
            **os.environ,
            "TRITON_INTERPRET": "1",
            "TUNEBOOK_DIR": str(tmp_path / "book"),
            "KERNEL_DIR": str(kernels),
            "PYTHONPATH": str(TESTS),
            "SLOW_S": "60",  # each config takes a minute: the search is under way when Ctrl-C comes
            "TMPDIR": str(temp),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "interrupted; workers [] files []" in res.stdout, (res.stdout, res.stderr[-2000:])


def test_call_descriptions_carry_overlapping_tensors_and_triton_dtypes() -> None:
    import triton.language as tl

    x = torch.randn(3, 1).expand(3, 4)
    desc = describe_value(x)
    assert desc["tensor"]["stride"] == [1, 0]
    rebuilt = build_value(desc, None, torch.Generator().manual_seed(0))
    assert rebuilt.shape == (3, 4) and rebuilt.stride() == (1, 0)
    assert torch.equal(rebuilt[:, 0], rebuilt[:, 3])  # one value a row, as the original
    # A form a reader from before it accepts (an opaque value): it keeps the key file.
    assert describe_value(tl.bfloat16) == {"opaque": "triton_dtype:bf16"}
    assert build_value({"opaque": "triton_dtype:bf16"}, None, None) == tl.bfloat16
    assert describe_value(tl.pointer_type(tl.float16)) == {"opaque": "pointer_type"}
    assert validate({"args": [describe_value(tl.float16)], "kwargs": {}}, "c") is None
    for name in ("fp99", "void", "fp16; rm"):  # checked by name, not by Triton's assert (python -O)
        with pytest.raises(ValueError, match="unknown Triton dtype"):
            build_value({"opaque": f"triton_dtype:{name}"}, None, None)
    # A view that does not overlap is filled through its shape, not its storage's span.
    wide = torch.empty(64, 8192)[:, :4]
    view = build_value(describe_value(wide), None, torch.Generator().manual_seed(0))
    assert view.stride() == (8192, 1) and view.isfinite().all()
