"""The pack's tune path end to end, as a user ships a book: ``python -m tunebook.kernels
tune`` tunes every op's key for a model into a book (a 2-config budget: the interpreter
takes ~0.1 s a config); a process serving from that book read-only, and one tuning with it
as its own book, benchmark nothing and run the same configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import book_files, run_python, side_by_side
from tunebook._book import read_document
from tunebook.kernels import _models

from .packutil import tune_command

# Every op of the pack on SmolLM2-135M's shapes, one token: the same calls the tune
# command makes. Prints the counters and each kernel's config as the last line.
CALL_EACH_OP = """
import json, tunebook
from tunebook.kernels import _models
from tunebook.kernels.rms_norm import _rms_norm_kernel
from tunebook.kernels.rotary_embedding import _rotary_embedding_kernel
from tunebook.kernels.silu_and_mul import _silu_and_mul_kernel

chosen = []
ops = ("rms_norm", "silu_and_mul", "rotary_embedding")
for job in _models.plan(ops, models=_models.select_models("smollm2-135m"), tokens=[1]):
    job.build("cpu").run(None)
    kernel = {"rms_norm": _rms_norm_kernel, "silu_and_mul": _silu_and_mul_kernel,
              "rotary_embedding": _rotary_embedding_kernel}[job.op]
    chosen.append(str(kernel.best_config))
print(json.dumps({**tunebook.stats(), "chosen": chosen}))
"""


@pytest.mark.once  # the pack's command line over the core's persistence (tests/conftest.py)
def test_tune_command_then_serve_from_the_book(book_dir: Path, tmp_path: Path) -> None:
    budget = {"TUNEBOOK_KERNELS_MAX_CONFIGS": "2"}
    ops = "rms_norm,silu_and_mul,rotary_embedding"
    args = ("--out", str(book_dir), "--ops", ops, "--models", "smollm2-135m", "--tokens", "1")
    tune = tune_command(*args, "--max-configs", "2", env=budget)
    assert tune.returncode == 0, tune.stderr
    assert "done: 8 configs measured" in tune.stdout, tune.stdout  # 2 for each of 4 keys
    names = sorted(p.name.split("--")[0] for p in book_files(book_dir))
    assert names == [
        "tunebook-kernels-rms_norm",
        "tunebook-kernels-rotary_embedding",
        "tunebook-kernels-silu_and_mul",
    ]
    books = [read_document(p) for p in book_files(book_dir)]
    assert sum(len(b.entries) for b in books if b is not None) == 4, books

    # As the package ships its books: read-only, in serve mode.
    env = {**budget, "TUNEBOOK_DIR": str(tmp_path / "empty"), "TUNEBOOK_PATH": str(book_dir)}
    shipped = run_python(CALL_EACH_OP, env={**env, "TUNEBOOK_MODE": "serve"})
    assert shipped["benchmarked"] == 0 and shipped["fallbacks"] == 0 and shipped["book_hits"] == 4, shipped

    # As the writable book of a process in tune mode.
    tuned = run_python(CALL_EACH_OP, env={**budget, "TUNEBOOK_DIR": str(book_dir), "TUNEBOOK_MODE": "tune"})
    assert tuned["benchmarked"] == 0 and tuned["book_hits"] == 4, tuned
    assert tuned["chosen"] == shipped["chosen"]


def test_the_shipped_books_hold_pages_only_never_a_writers_lock_or_temp_file() -> None:
    """A package ships what is under its books directory: the pages' ``*.json``. Writers'
    state (``.tunebook/``: locks, pending news, temp files) stays with the book it was written
    in (docs/kernels.md, "Tuning and shipping a book")."""
    from tunebook.kernels._common import BOOKS_DIR

    shipped = [p.relative_to(BOOKS_DIR) for p in BOOKS_DIR.rglob("*") if not p.is_dir()]
    assert shipped
    stray = [p for p in shipped if p.suffix not in {".json", ".md"} or ".tunebook" in p.parts]
    assert not stray, stray


# Each pack kernel's budget with TUNEBOOK_KERNELS_MAX_CONFIGS unset, by its page's name.
BUDGETS = """
import json
from tunebook.kernels import _common
print(json.dumps({k.kernel_identity().name.replace(".", "-"): [k.options.max_configs, k.options.max_seconds]
                  for k in _common.kernels()}))
"""


@pytest.mark.once  # the shipped books' contents: the same on every Triton
def test_every_shipped_key_is_a_finished_search_that_tune_mode_serves_as_it_is() -> None:
    """In tune mode (the library's default) a read-only book's choice answers its key only
    where the kernel declares no budget of its own (``_policy.decide``); otherwise a shipped
    search that stopped before the budget (most do: converged neighbour searches, 12-64
    configs of 58-1,130) would be searched again at the key's first call on an H200. So no
    pack kernel declares one by default, and every shipped entry holds a choice that ran."""
    import json

    from tunebook.kernels._common import BOOKS_DIR

    env = {k: v for k, v in os.environ.items() if k != "TUNEBOOK_KERNELS_MAX_CONFIGS"}
    budgets = {k: v for k, v in run_python(BUDGETS, env=env).items() if not k.startswith("_")}
    assert len(budgets) >= 10 and all(b == [None, None] for b in budgets.values()), budgets
    entries, unfinished = 0, set()
    for page in BOOKS_DIR.iterdir():
        if not page.is_dir():
            continue
        op = page.name.split("--")[0]
        assert op in budgets, page.name  # a page of no kernel of the pack
        for path in page.glob("*.json"):
            entry = json.loads(path.read_text())
            if entry.get("format") != "tunebook-entry":  # the page's own record
                continue
            chosen = entry["results"].get(entry.get("chosen"))
            if chosen is None or chosen["error"] is not None:
                unfinished.add((op.removeprefix("tunebook-kernels-"), *entry["key"][:3]))
            entries += 1
    assert entries > 600, entries
    # Every shipped search decided: the last two a device time limit had cut short
    # (paged_attention_decode 64 x 8192 on SmolLM2's layout, silu_and_mul 2048 x 18944) were
    # re-tuned in the fifteenth session. A search cut short is served from its own results,
    # but a shipped book should not hold one.
    assert not unfinished, sorted(map(str, unfinished))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_open_books_without_a_gpu_or_the_interpreter_names_the_interpreter() -> None:
    """A server starting on a CPU machine without TRITON_INTERPRET: open_books() let Triton's
    RuntimeError ("0 active drivers ([]). There should only be one.") out as a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import tunebook, tunebook.kernels as k\n"
        "try:\n    k.open_books()\nexcept tunebook.ConfigurationError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Triton found no GPU (0 active drivers" in done.stdout
    assert "set TRITON_INTERPRET=1 before importing tunebook.kernels" in done.stdout


def test_open_books_opens_every_kernels_page_so_a_first_call_hashes_no_source(monkeypatch) -> None:
    # A server calls open_books() as it starts; its first request then hashes no kernel
    # source and opens no page (issue 14's first token).
    import torch

    import tunebook.kernels as k
    from tunebook import _fingerprint
    from tunebook.kernels import _common

    monkeypatch.setenv("TUNEBOOK_MODE", "off")  # no kernel reads a book: none is opened
    assert k.open_books() == 0
    monkeypatch.delenv("TUNEBOOK_MODE")
    assert k.open_books() == len(_common.kernels()) == 10  # two each for fused_moe and linear
    assert all(kernel._home.opened is not None for kernel in _common.kernels())

    def refuse(fn):
        raise AssertionError("a kernel's source was hashed after open_books()")

    monkeypatch.setattr(_fingerprint, "kernel_hash", refuse)
    x = torch.randn(3, 64)
    torch.testing.assert_close(
        k.rms_norm(x, torch.ones(64), 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    )


def test_every_shipped_result_is_a_point_of_its_kernels_space_with_its_own_id(recwarn) -> None:
    # Serve mode answers a shipped key from its results only where the Space point launches
    # exactly what was measured (same id); a result that fails this is never served, and a
    # shipped book of such results would turn every GPU server's hits into fallbacks. Checked
    # here, without a GPU, for every result of every shipped page.
    from tunebook._book import read_book_file
    from tunebook._configs import ConfigIndex
    from tunebook.kernels import _common

    tuners = {kernel.label.replace(".", "-"): kernel for kernel in _common.kernels()}
    pages = [p for p in _common.BOOKS_DIR.iterdir() if p.is_dir()]
    assert len(pages) == len(tuners) == 10
    checked, wrong = 0, []
    for page in pages:
        kernel = tuners[page.name.split("--")[0]]
        index = ConfigIndex([])
        document, why = read_book_file(page)
        assert document is not None, why
        for entry in document.entries.values():
            for cid, result in entry.results.items():
                point = kernel.space.point_of(result.config)
                mine = index.id_of(index.from_space(kernel.space, point[1])) if point else None
                checked += 1
                if mine != cid:
                    wrong.append((page.name, cid, mine))
    assert checked > 7000 and not wrong, wrong[:5]
    assert not [str(w.message) for w in recwarn], "a shipped file was skipped"


SHIPPED_BOOKS_CHILD = """
import json, os
from tunebook.kernels import _common
if "LATE_SWITCH" in os.environ:  # set after the pack was imported, before any kernel's book is opened
    os.environ["TUNEBOOK_KERNELS_SHIPPED_BOOKS"] = os.environ["LATE_SWITCH"]
print(json.dumps({"books": sorted({str(p) for k in _common.kernels() for p in k.options.book_dirs()})}))
"""


@pytest.mark.once  # the command's and the switch's plumbing (tests/conftest.py)
def test_the_shipped_books_can_be_left_out_for_a_fresh_tuning(tmp_path) -> None:
    # Benchmarks that must tune every key (fidelity.py, --no-shipped-books) leave them out;
    # the switch is read when a kernel's book is first opened, like TUNEBOOK_DIR, so a
    # launcher may set it after the import; any other value is an error naming the two.
    from tunebook.kernels._common import BOOKS_DIR

    def refused() -> pytest.ExceptionInfo[AssertionError]:
        with pytest.raises(AssertionError) as caught:
            run_python(SHIPPED_BOOKS_CHILD, env={"TUNEBOOK_KERNELS_SHIPPED_BOOKS": "maybe"})
        return caught

    default, off, late, bad = side_by_side(
        lambda: run_python(SHIPPED_BOOKS_CHILD),
        lambda: run_python(SHIPPED_BOOKS_CHILD, env={"TUNEBOOK_KERNELS_SHIPPED_BOOKS": "0"}),
        lambda: run_python(SHIPPED_BOOKS_CHILD, env={"LATE_SWITCH": "off"}),
        refused,
    )
    assert default["books"] == [str(BOOKS_DIR)]
    assert off["books"] == [] and late["books"] == []
    bad.match(r"TUNEBOOK_KERNELS_SHIPPED_BOOKS='maybe' is not a switch; expected 1")


def tune_command_says(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> str:
    """The first line of a real `python -m tunebook.kernels tune --dry-run` (what it will use)."""
    keys = ["--ops", "rms_norm", "--models", "smollm2-135m", "--tokens", "1"]
    proc = tune_command("--out", str(tmp_path / "out"), "--dry-run", *keys, *flags, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()[0]


@pytest.mark.once  # the command's and the switch's plumbing (tests/conftest.py)
def test_the_tune_command_keeps_what_the_environment_asks_unless_a_flag_says_otherwise(tmp_path) -> None:
    """Without flags the environment's switch and budget stand (an earlier version wrote its
    defaults back over them); --no-shipped-books and --max-configs apply, the budget through
    a re-exec (it is fixed when the pack is imported)."""
    plain, from_env, from_flags, proc = side_by_side(
        lambda: tune_command_says(tmp_path / "plain"),
        lambda: tune_command_says(
            tmp_path / "env", env={"TUNEBOOK_KERNELS_SHIPPED_BOOKS": "0", "TUNEBOOK_KERNELS_MAX_CONFIGS": "8"}
        ),
        lambda: tune_command_says(
            tmp_path / "flags", "--no-shipped-books", "--max-configs", "3", env={"TUNEBOOK_PATH": "/x"}
        ),
        lambda: tune_command("--out", str(tmp_path / "zero"), "--max-configs", "0"),
    )
    assert plain.endswith("(shipped books: used; budget: tunebook's default)")
    assert from_env.endswith("(shipped books: left out; budget: 8 configs a key)")
    assert from_flags.endswith("(shipped books: left out; budget: 3 configs a key)")
    assert proc.returncode == 2 and "--max-configs: expected a positive integer; found 0" in proc.stderr


@pytest.mark.once  # the command's and the switch's plumbing (tests/conftest.py)
def test_the_tune_command_refuses_an_out_it_cannot_write_and_counts_below_one(tmp_path: Path) -> None:
    """Before any tuning (it once measured every key and said "done" with nothing saved)."""
    (tmp_path / "afile").write_text("")
    keys = ("--ops", "rms_norm", "--models", "smollm2-135m", "--tokens", "1")
    dry = ("--out", str(tmp_path / "book"), "--dry-run")
    unwritable, no_tokens, no_block, bad_contexts, no_context, nothing, unused = side_by_side(
        lambda: tune_command("--out", str(tmp_path / "afile" / "book"), *keys),
        lambda: tune_command(*dry, "--tokens", "0"),
        lambda: tune_command(*dry, "--block-size", "0"),
        lambda: tune_command(*dry, "--contexts", "512,8k"),
        lambda: tune_command(*dry, "--contexts", "0"),
        lambda: tune_command(*dry, "--ops", "paged_attention_decode", "--contexts", str(1 << 22)),
        lambda: tune_command(*dry, "--ops", "rms_norm", "--contexts", "512"),
    )
    assert unwritable.returncode == 2 and "configs measured" not in unwritable.stdout
    assert f"--out: cannot write the book at {tmp_path / 'afile' / 'book'}" in unwritable.stderr
    assert no_tokens.returncode == 2
    assert "--tokens: expected positive token counts; found 0" in no_tokens.stderr
    assert no_block.returncode == 2
    assert no_block.stderr.endswith("--block-size: expected 1 to 1024 tokens a block; found 0\n")
    assert bad_contexts.returncode == 2
    assert "--contexts: expected comma-separated integers; found '512,8k'" in bad_contexts.stderr
    assert (
        no_context.returncode == 2
        and "--contexts: expected positive context lengths; found 0" in no_context.stderr
    )
    assert (
        nothing.returncode == 2 and "no calls to tune: --ops paged_attention_decode has no" in nothing.stderr
    )
    assert "at most 2,097,152 cached tokens a call" in nothing.stderr
    assert unused.returncode == 2
    assert "--contexts sets decode attention's context lengths, and --ops has no paged_attention_decode" in (
        unused.stderr
    )


@pytest.mark.once  # the command's and the switch's plumbing (tests/conftest.py)
def test_the_tune_command_without_torch_prints_the_install_line_alone(tmp_path: Path) -> None:
    """A torch that cannot be imported (a package on PYTHONPATH whose import fails, as a
    missing one does): the message once came after a chained traceback of two exceptions."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        'raise ImportError("No module named \'torch\'", name="torch")\n'
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "tunebook.kernels", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr.splitlines() == [
        "error: tunebook.kernels needs torch, which is not installed. Install it with:",
        "    pip install 'tunebook[kernels]'",
        "On a machine without a GPU, install PyTorch's CPU build first (e.g. pip install torch==2.13.0).",
    ], proc.stderr
    # imported as a library it stays an ImportError the caller can catch
    library = subprocess.run(
        [sys.executable, "-c", "import tunebook.kernels"], capture_output=True, text=True, env=env, timeout=60
    )
    assert "tunebook._errors.MissingDependency: tunebook.kernels needs torch" in library.stderr


@pytest.mark.once  # the command's plumbing (tests/conftest.py); hints and table answers: tests/test_tables.py
def test_the_tune_command_imports_vllms_tables_into_the_book_before_tuning(tmp_path: Path) -> None:
    """``--vllm-tables``: the shipped fused_moe books were tuned with vLLM's tables as hints,
    which took ``tunebook import`` and then the tune command; one command does both now."""
    import json

    tables = tmp_path / "configs"
    tables.mkdir()
    entry = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8, "num_warps": 4}
    table = {"1": {**entry, "num_stages": 3}, "64": {**entry, "num_stages": 4}}
    (tables / "E=8,N=14336,device_name=NVIDIA_H200.json").write_text(json.dumps(table))
    (tables / "E=8,N=14336,device_name=NVIDIA_H200,backend=flydsl.json").write_text(json.dumps(table))
    out = tmp_path / "book"
    keys = ("--ops", "fused_moe", "--models", "smollm2-135m")  # no MoE in SmolLM2: the import alone runs
    dry, real, missing = side_by_side(
        lambda: tune_command(
            "--out", str(tmp_path / "dry"), *keys, "--dry-run", "--vllm-tables", str(tables)
        ),
        lambda: tune_command("--out", str(out), *keys, "--vllm-tables", str(tables)),
        lambda: tune_command("--out", str(tmp_path / "x"), *keys, "--vllm-tables", str(tmp_path / "no")),
    )
    assert dry.returncode == 0, dry.stderr
    assert "would import 2 vLLM table file(s)" in dry.stdout and not (tmp_path / "dry").exists()
    assert real.returncode == 0, real.stderr
    assert "skipped E=8,N=14336,device_name=NVIDIA_H200,backend=flydsl.json" in real.stdout + real.stderr
    (page,) = out.glob("vllm-fused_moe--*--NVIDIA-H200--*")
    stored = {p.stem: json.loads(p.read_text()) for p in page.glob("*.json") if p.name != "page.json"}
    assert set(stored) == {"8,14336,1", "8,14336,64"}, sorted(stored)
    (one,) = stored["8,14336,64"]["results"].values()
    assert one["config"]["kwargs"] == {k: v for k, v in entry.items() if k != "num_warps"}
    assert (one["config"]["num_warps"], one["config"]["num_stages"]) == (4, 4)
    assert missing.returncode == 2 and not (tmp_path / "x").exists()
    assert f"--vllm-tables: {tmp_path / 'no'} is neither a file nor a directory" in missing.stderr


# Decode attention as a server with 32-token cache blocks and contexts of 40 tokens calls it:
# one sequence of SmolLM2-135M's layout. Prints the counters and the launched config's key.
CALL_DECODE_BLOCKS_OF_32 = """
import json, tunebook
from tunebook.kernels import _models

keys = []
for job in _models.plan(["paged_attention_decode"], _models.select_models("smollm2-135m"), [1],
                        block_size=32, contexts=[40]):
    w = job.build("cpu")
    w.run(None)
    keys.append(w.key)
print(json.dumps({**tunebook.stats(), "keys": keys}))
"""


@pytest.mark.once  # the pack's command line over the core's persistence (tests/conftest.py)
def test_the_tune_command_tunes_a_servers_block_size_and_contexts_then_serves_them(tmp_path: Path) -> None:
    """`--block-size 32 --contexts 40`: decode's key is tuned at the server's block size and
    context (the shipped books hold 16-token blocks only), and a process serving from that
    book read-only benchmarks nothing and falls back nowhere on a call of that layout."""
    book = tmp_path / "book"
    budget = {"TUNEBOOK_KERNELS_MAX_CONFIGS": "2"}
    keys = ("--ops", "paged_attention_decode", "--models", "smollm2-135m", "--tokens", "1")
    tune = tune_command(
        "--out", str(book), *keys, "--block-size", "32", "--contexts", "40", "--max-configs", "2", env=budget
    )
    assert tune.returncode == 0, tune.stderr
    assert "1 calls on cpu" in tune.stdout and "done: 2 configs measured" in tune.stdout, tune.stdout
    (entry,) = [e for b in map(read_document, book_files(book)) if b is not None for e in b.entries.values()]
    assert list(entry.key[:6]) == [1, 64, 9, 3, 64, 32], entry.key  # batch, context bucket, heads, block

    readonly = {"TUNEBOOK_DIR": str(tmp_path / "empty"), "TUNEBOOK_PATH": str(book), "TUNEBOOK_MODE": "serve"}
    served = run_python(CALL_DECODE_BLOCKS_OF_32, env={**budget, **readonly})
    assert served["benchmarked"] == 0 and served["fallbacks"] == 0 and served["book_hits"] == 1, served
    assert served["keys"] == [
        {"batch": 1, "max_context_len": 40, "NQ": 9, "NK": 3, "HEAD_SIZE": 64, "PAGE": 32}
    ]


def test_plan_lays_the_cache_ops_out_at_another_block_size_and_decode_at_other_contexts() -> None:
    """The default block size leaves every shape as it was (benchmark labels stay); another
    reaches decode, the cache write and prefill over a cached prefix (not prefill without
    one); contexts replace decode's three, each shape once (a context given twice too) with
    all its models."""
    llama = _models.select_models("llama-3-8b,mixtral-8x7b")  # one attention layout, 32/8
    ops = ("paged_attention_decode", "reshape_and_cache", "varlen_attention")
    default = {(job.op, job.shape) for job in _models.plan(ops, llama, [1])}
    heads = (("n_q", 32), ("n_kv", 8), ("head_size", 128))
    assert default == {
        *(("paged_attention_decode", (*heads, ("page", 16), ("context", n))) for n in (512, 8192, 32768)),
        ("reshape_and_cache", (("n_kv", 8), ("head_size", 128), ("page", 16))),
        *(("varlen_attention", (*heads, ("seqlen", n), ("prefix", p))) for n, p in _models.PREFILL_SHAPES),
    }
    jobs = _models.plan(ops, llama, [1], block_size=64, contexts=[100, 3000, 100])
    by_op: dict[str, list[dict[str, int]]] = {}
    for job in jobs:
        by_op.setdefault(job.op, []).append(dict(job.shape))
        assert job.models == ("llama-3-8b", "mixtral-8x7b"), job
    assert [(s["page"], s["context"]) for s in by_op["paged_attention_decode"]] == [(64, 100), (64, 3000)]
    assert [s["page"] for s in by_op["reshape_and_cache"]] == [64]
    assert [s.get("page") for s in by_op["varlen_attention"]] == [None, None, None, 64, 64]
    prefix = next(job for job in jobs if job.op == "varlen_attention" and dict(job.shape)["prefix"])
    built = prefix.build("cpu")
    assert built.key["PAGE"] == 64 and built.tensors["k_cache"].shape[1] == 64


# A process on another GPU of this machine's architecture (its device name patched): the
# pages it writes are that GPU's, as a book shipped for an H200 is on an H100.
AS_ANOTHER_GPU = """
from tunebook import _compat
real = _compat.device_identity
_compat.device_identity = lambda: {**real(), "device": "NVIDIA H200"}
"""
TUNE = """
import json, sys
from tunebook.kernels.__main__ import main
print(json.dumps({"code": main(%r)}))
"""


def test_a_book_shipped_for_another_gpu_of_this_architecture_serves_here(book_dir: Path, tmp_path: Path):
    """A fresh process on a GPU without its own page serves every op's keys from the pages of
    another GPU of its architecture and Triton release: nothing benchmarked, each key that
    GPU's winner, counted as such."""
    budget = {"TUNEBOOK_KERNELS_MAX_CONFIGS": "2"}
    args = ["tune", "--out", str(book_dir), "--ops", "rms_norm,silu_and_mul,rotary_embedding"]
    args += ["--models", "smollm2-135m", "--tokens", "1", "--max-configs", "2"]
    assert run_python(AS_ANOTHER_GPU + TUNE % (args,), env=budget)["code"] == 0
    pages = [read_document(p) for p in book_files(book_dir)]
    assert len(pages) == 3 and all(p is not None and p.platform["device"] == "NVIDIA H200" for p in pages)

    env = {**budget, "TUNEBOOK_DIR": str(tmp_path / "empty"), "TUNEBOOK_PATH": str(book_dir)}
    env["TUNEBOOK_MODE"] = "serve"
    there = run_python(AS_ANOTHER_GPU + CALL_EACH_OP, env=env)  # the GPU it was tuned on
    here = run_python(CALL_EACH_OP, env=env)
    assert there["book_hits"] == 4 and there["fallbacks"] == 0, there
    assert here["benchmarked"] == 0 and here["book_hits"] == 0 and here["same_arch_answers"] == 4, here
    assert here["chosen"] == there["chosen"]
