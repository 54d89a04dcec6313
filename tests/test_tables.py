"""Imported tables (``tables=``): vLLM-format files imported with the real ``tunebook import``
command serve keys the book lacks on the GPU they were tuned on, and seed searches elsewhere
(real kernels on the CPU interpreter; the interpreter's "GPU" is this CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

import tunebook
from conftest import run_python
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook import _compat, _policy, _tables
from tunebook._book import Entry, Result
from tunebook.cli import _app

HERE = _tables.device_label(_compat.device_identity()["device"])  # this "GPU", as vLLM names files


def import_table(
    directory: Path, device: str, table: dict[int, dict], kernel: str = "vllm.add", E: int = 1, N: int = 1
) -> None:
    """Write one vLLM config file for ``device`` and import it into ``directory``, as a user would."""
    source = directory.parent / f"vllm-{device}"
    source.mkdir(parents=True, exist_ok=True)
    path = source / f"E={E},N={N},device_name={device}.json"
    # newer vLLM files record their Triton version, which vLLM (and the import) drops
    path.write_text(json.dumps({"triton_version": "3.4.0", **{str(m): c for m, c in table.items()}}))
    result = CliRunner().invoke(
        _app.cli, ["import", "--format", "vllm", str(path), "--kernel", kernel, "-o", str(directory)]
    )
    assert result.exit_code == 0, result.output


def entry(block: int) -> dict[str, int]:
    return {"BLOCK_SIZE_M": block, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1}


# add_kernel's key is [n]: the table's (E, N) are fixed, its M is n; its BLOCK is BLOCK_SIZE_M.
ADD_TABLES = tunebook.Tables(
    "vllm.add",
    key=lambda key: {"E": 1, "N": 1, "M": key[0]},
    config=lambda c: {"BLOCK": c["BLOCK_SIZE_M"]} if c["BLOCK_SIZE_M"] != 999 else None,
)


def run(kernel, n: int) -> None:
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    assert out.eq(x + y).all()


def test_this_gpus_table_serves_a_missing_key_nearest_batch_size(monkeypatch, book_dir, caplog):
    import_table(book_dir, HERE, {64: entry(32), 256: entry(128), 1024: entry(64)})
    import_table(book_dir, "OTHER_GPU", {1: entry(64)})  # another GPU's: never served here
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    caplog.set_level(logging.WARNING, logger="tunebook")
    for n, expected in ((300, 128), (100, 32), (700, 64), (160, 32)):  # 160: 64 and 256 equally near
        kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=ADD_TABLES)(add_kernel)
        run(kernel, n)
        assert kernel.best_config.kwargs == {"BLOCK": expected}, n
    assert tunebook.stats()["benchmarked"] == 0 and tunebook.stats()["table_answers"] == 4
    assert any(f"imported table entry of {HERE} " in r.message for r in caplog.records)
    # without tables= the same book serves the first config: imports are not results
    plain = tunebook.autotune(block_configs(32, 64, 128), key=["n"])(add_kernel)
    run(plain, 300)
    assert plain.best_config.kwargs == {"BLOCK": 32}


def test_own_results_come_first_then_the_table_then_the_nearest_key(monkeypatch, book_dir):
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    timer = {"do_bench": replay, "pre_hook": replay.pre_hook}
    tuned = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=ADD_TABLES, **timer)(add_kernel)
    run(tuned, 300)  # tuned: BLOCK=64 wins key 300
    import_table(book_dir, HERE, {400: entry(128)})
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    served = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=ADD_TABLES, **timer)(add_kernel)
    run(served, 300)  # in the book
    assert served.best_config.kwargs == {"BLOCK": 64}
    run(served, 410)  # not in the book: the table (128) before the nearest key's winner (64)
    assert served.best_config.kwargs == {"BLOCK": 128}
    untabled = tunebook.autotune(block_configs(32, 64, 128), key=["n"], **timer)(add_kernel)
    run(untabled, 410)
    assert untabled.best_config.kwargs == {"BLOCK": 64}
    assert tunebook.stats()["benchmarked"] == 3  # key 300's; none served


def test_the_serve_chain_puts_the_table_after_own_results_and_fallback():
    ok = lambda ms: Result({"kwargs": {}}, (ms, ms, ms))  # noqa: E731
    partial = Entry(key=(410,), results={"a": ok(2.0)})
    near = [Entry(key=(300,), results={"b": ok(1.0)})]
    table = ("c", "the imported table entry")
    assert _policy.serve_choice(["a", "b", "c"], partial, near, None, table)[0] == "a"
    assert _policy.serve_choice(["a", "b", "c"], None, near, None, table)[0] == "c"
    assert _policy.serve_choice(["a", "b", "c"], None, near, "b", table)[0] == "b"  # fallback= first
    assert _policy.serve_choice(["a", "b"], None, near, None, table)[0] == "b"  # not a candidate


def test_an_entry_the_call_does_not_allow_is_not_served(monkeypatch, book_dir, caplog):
    import_table(book_dir, HERE, {300: entry(256), 600: entry(999)})  # 256: not declared; 999: unmapped
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    caplog.set_level(logging.WARNING, logger="tunebook")
    kernel = tunebook.autotune(block_configs(64, 32, 128), key=["n"], tables=ADD_TABLES)(add_kernel)
    run(kernel, 300)
    assert kernel.best_config.kwargs == {"BLOCK": 64}  # the first config, as without a table
    assert any("maps to {'BLOCK': 256}, which is not one of the configs" in r.message for r in caplog.records)
    run(kernel, 600)
    assert kernel.best_config.kwargs == {"BLOCK": 64}


def test_a_left_out_option_is_tritons_default_not_any_value(monkeypatch, book_dir):
    """An entry without num_warps launches what triton.Config launches without it (4), never
    another candidate that merely shares its meta-parameters."""
    import_table(book_dir, HERE, {300: entry(64)})
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    configs = [*block_configs(64, num_warps=2), *block_configs(64, num_warps=4), *block_configs(32)]
    kernel = tunebook.autotune(configs, key=["n"], tables=ADD_TABLES)(add_kernel)
    run(kernel, 300)
    assert (kernel.best_config.kwargs, kernel.best_config.num_warps) == ({"BLOCK": 64}, 4)
    # the table's launch (BLOCK=64, 4 warps) is not declared: served as without it (the first config)
    warps_2 = tunebook.autotune(block_configs(32, 64, num_warps=2), key=["n"], tables=ADD_TABLES)(add_kernel)
    with pytest.warns(tunebook.BookWarning, match="no config the call allows has num_warps=4"):
        run(warps_2, 300)
    assert (warps_2.best_config.kwargs, warps_2.best_config.num_warps) == ({"BLOCK": 32}, 2)
    assert tunebook.stats()["table_answers"] == 1  # the first kernel's only


def test_a_malformed_imported_page_is_skipped(monkeypatch, book_dir):
    import_table(book_dir, HERE, {300: entry(128)})
    (page,) = book_dir.glob("vllm-add--*")
    head = json.loads((page / "page.json").read_text())
    head["kernel"]["key"] = None  # hand-edited, or written by a broken tool
    (page / "page.json").write_text(json.dumps(head))
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=ADD_TABLES)(add_kernel)
    run(kernel, 300)
    run(kernel, 600)
    assert kernel.best_config.kwargs == {"BLOCK": 32}


def test_hints_this_gpus_table_then_the_nearest_keys_then_other_gpus(book_dir):
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0, 256: 4.0})
    timer = {"do_bench": replay, "pre_hook": replay.pre_hook}
    first = tunebook.autotune(block_configs(32, 64, 128, 256), key=["n"], **timer)(add_kernel)
    run(first, 200)  # the nearest key's winner: 64
    import_table(book_dir, HERE, {300: entry(256)})
    import_table(book_dir, "OTHER_GPU", {300: entry(128)})
    kernel = tunebook.autotune(
        block_configs(32, 64, 128, 256),
        key=["n"],
        tables=ADD_TABLES,
        max_configs=3,
        strategy="exhaustive",
        **timer,
    )(add_kernel)
    replay.measured.clear()
    run(kernel, 300)
    assert replay.measured[:3] == [256, 64, 128]


def test_tables_of_any_gpu_are_searched_first_when_tuning(book_dir):
    import_table(book_dir, "OTHER_GPU", {256: entry(128)})
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    kernel = tunebook.autotune(
        block_configs(32, 64, 128),
        key=["n"],
        tables=ADD_TABLES,
        max_configs=1,
        do_bench=replay,
        pre_hook=replay.pre_hook,
    )(add_kernel)
    run(kernel, 300)
    assert replay.measured[:1] == [128] and kernel.best_config.kwargs == {"BLOCK": 128}
    assert tunebook.stats()["benchmarked"] == 1


def test_a_whole_configs_directory_imports_with_skip_unsupported(tmp_path):
    source = tmp_path / "configs"
    source.mkdir()
    (source / f"E=8,N=64,device_name={HERE}.json").write_text(
        json.dumps({"triton_version": "3.4.0", "1": entry(16)})
    )
    (source / f"E=8,N=64,device_name={HERE},dtype=int4_w4a16,backend=flydsl.json").write_text("{}")
    (source / "README").write_text("not a table")
    args = [
        "import",
        "--format",
        "vllm",
        *map(str, sorted(source.iterdir())),
        "--kernel",
        "k",
        "-o",
        str(tmp_path / "b"),
    ]
    failed = CliRunner().invoke(_app.cli, args)
    assert failed.exit_code != 0 and "--skip-unsupported" in failed.output
    done = CliRunner().invoke(_app.cli, [*args, "--skip-unsupported"])
    assert done.exit_code == 0, done.output
    assert "skipped README" in done.output and "backend=flydsl" in done.output
    (page,) = (tmp_path / "b").iterdir()
    assert sorted(p.name for p in page.glob("*.json")) == ["8,64,1.json", "page.json"]


def test_a_configs_directory_given_as_itself_imports_its_json_files(tmp_path):
    source = tmp_path / "configs"
    source.mkdir()
    (source / f"E=8,N=64,device_name={HERE}.json").write_text(json.dumps({"1": entry(16)}))
    (source / f"E=8,N=64,device_name={HERE},backend=flydsl.json").write_text("{}")
    (source / "README").write_text("not a table: not a .json file, so not read")
    args = ["import", "--format", "vllm", str(source), "--kernel", "k", "-o", str(tmp_path / "b")]
    done = CliRunner().invoke(_app.cli, [*args, "--skip-unsupported"])
    assert done.exit_code == 0, done.output
    assert "backend=flydsl" in done.output and "README" not in done.output
    (page,) = (tmp_path / "b").iterdir()
    assert sorted(p.name for p in page.glob("*.json")) == ["8,64,1.json", "page.json"]
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(_app.cli, [*args[:3], str(tmp_path / "empty"), *args[4:]])
    assert empty.exit_code != 0 and "no .json file in" in empty.output


def test_lookup_rules():
    page = _tables.TablePage(
        "NVIDIA H200",
        "here",
        (
            ({"E": 8, "N": 14336, "M": 1}, entry(16)),
            ({"E": 8, "N": 14336, "M": 64}, entry(64)),
            ({"E": 8, "N": 7168, "M": 2}, entry(32)),
            ({"E": 8, "N": 14336, "M": 4, "dtype": "fp8_w8a8"}, entry(128)),
        ),
    )
    tables = tunebook.Tables("t", key=lambda k: {"E": k[0], "N": k[1], "M": k[2]}, config=dict)
    (found,) = _tables.lookup(tables, [page], (8, 14336, 5))
    assert found.config["BLOCK_SIZE_M"] == 16 and found.key["M"] == 1  # 1 is nearer 5 than 64; fp8 left out
    (found,) = _tables.lookup(tables, [page], (8, 14336, 40))
    assert found.key["M"] == 64  # 40 is nearer 64 than 1 (the key is the bucket: vLLM looks up each batch)
    assert _tables.lookup(tables, [page], (8, 4096, 5)) == []  # no table for this N
    assert _tables.lookup(tunebook.Tables("t", key=lambda k: None, config=dict), [page], (8, 14336, 5)) == []
    assert _tables.same_device("NVIDIA H200 NVL", "NVIDIA_H200")
    assert not _tables.same_device("NVIDIA H100", "H200")
    with pytest.raises(tunebook.ConfigurationError, match="kernel= must be"):
        tunebook.Tables("", key=dict, config=dict)
    with pytest.raises(tunebook.ConfigurationError, match=r"tables= takes a tunebook\.Tables"):
        tunebook.autotune(block_configs(32), key=["n"], tables={"kernel": "x"})


MOE_SERVE = """
import importlib, json, logging, os, torch, tunebook
logging.basicConfig(level=logging.WARNING)  # serve mode says where each config came from
mod = importlib.import_module("tunebook.kernels.fused_moe")
g = torch.Generator().manual_seed(0)
x, w13 = torch.randn(3, 24, generator=g), torch.randn(4, 80, 24, generator=g) / 5
w2 = torch.randn(4, 24, 40, generator=g) / 7
tw, ti = torch.topk(torch.randn(3, 4, generator=g).softmax(-1), 2)
dtype = getattr(torch, os.environ.get("MOE_DTYPE", "bfloat16"))  # vLLM's tables: 16-bit weights
x, w13, w2 = (t.to(dtype) for t in (x, w13, w2))
out = mod.fused_moe(x, w13, w2, tw, ti).float()
x, w13, w2 = x.float(), w13.float(), w2.float()
silu = torch.nn.functional.silu
h = torch.stack([silu(w13[e, :40] @ x[t]) * (w13[e, 40:] @ x[t]) for t in range(3) for e in ti[t]])
ref = (torch.stack([w2[e] @ h[2 * t + j] for t in range(3) for j, e in enumerate(ti[t])]).view(3, 2, 24)
       * tw.unsqueeze(-1)).sum(1)
def served(k):
    c = k.best_config
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
print(json.dumps({"stats": tunebook.stats(), "err": float((out - ref).abs().max()),
                  "gemm1": served(mod._moe_gemm1_kernel), "gemm2": served(mod._moe_gemm2_kernel)}))
"""


@pytest.mark.once  # the pack over the core's tables, which test_tables.py tests on every Triton
def test_the_pack_serves_vllms_table_of_this_gpu_in_a_fresh_process(tmp_path):
    """vLLM's file for (E=4, N=40) on this "GPU", imported by the real command into a book
    that no process has tuned: a fresh serve-mode process runs fused_moe with its entry for
    the nearest batch size (M=4 for 3 tokens), on both GEMMs, and computes the right answer."""
    book = tmp_path / "book"
    config = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}
    table = {
        1: {**entry(16), "BLOCK_SIZE_N": 64},
        4: {**config, "num_warps": 8, "num_stages": 5},
        512: entry(128),
    }
    import_table(book, HERE, table, kernel="vllm.fused_moe", E=4, N=40)
    env = {"TUNEBOOK_MODE": "serve", "TUNEBOOK_DIR": str(book)}
    got = run_python(MOE_SERVE, env=env)
    wanted = {**config, "num_warps": 8, "num_stages": 5}
    assert got["gemm1"] == wanted and got["gemm2"] == wanted
    assert got["stats"]["benchmarked"] == 0 and got["stats"]["table_answers"] == 2 and got["err"] < 0.05
    assert "imported table entry" in got["_stderr"]
    # the same process without the import: vLLM's default rule, not the table's config
    empty = run_python(MOE_SERVE, env={**env, "TUNEBOOK_DIR": str(tmp_path / "empty")})
    assert empty["gemm1"] != wanted and empty["err"] < 0.05
    fp32 = run_python(MOE_SERVE, env={**env, "MOE_DTYPE": "float32"})  # vLLM has no fp32 tables
    assert fp32["gemm1"] != wanted and fp32["gemm1"] == empty["gemm1"]


EXPLAINED = """
import tunebook, triton
from small_kernels import add_kernel

add = tunebook.autotune(
    [triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 128})],
    key=["n"],
    tables=tunebook.Tables("vllm.add", key=lambda k: {"E": 1, "N": 1, "M": k[0]}, config=dict),
)(add_kernel)
"""


def test_explain_lists_the_tables_a_kernel_reads_and_which_serve_here(book_dir, tmp_path):
    (tmp_path / "explained.py").write_text(EXPLAINED)
    target = f"{tmp_path / 'explained.py'}:add"
    before = CliRunner().invoke(_app.cli, ["explain", target])
    assert "imported tables (vllm.add): none in these directories" in before.output
    import_table(book_dir, HERE, {300: entry(128)})
    import_table(book_dir, "OTHER_GPU", {1: entry(32), 2: entry(32)})
    data = json.loads(CliRunner().invoke(_app.cli, ["explain", target, "--json"]).stdout)
    pages = {p["device"]: p for p in data["tables"]["pages"]}
    assert pages[HERE]["this_gpu"] and pages[HERE]["entries"] == 1
    assert not pages["OTHER_GPU"]["this_gpu"] and pages["OTHER_GPU"]["entries"] == 2
    text = CliRunner().invoke(_app.cli, ["explain", target]).output
    assert "this GPU: serve mode launches its entries" in text and "another GPU: search hints" in text


def test_a_mapping_that_fails_is_reported_once_and_never_breaks_the_call(monkeypatch, book_dir, caplog):
    """key= or config= that raises or returns the wrong type: the call runs as without tables."""
    import_table(book_dir, HERE, {300: entry(128), 600: entry(64)})
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    caplog.set_level(logging.WARNING, logger="tunebook")
    cases = {
        "key= raised IndexError": tunebook.Tables("vllm.add", key=lambda k: {"M": k[5]}, config=dict),
        "of type tuple": tunebook.Tables("vllm.add", key=lambda k: (1, 1, k[0]), config=dict),
        "config= raised KeyError": tunebook.Tables(
            "vllm.add", key=lambda k: {"E": 1, "N": 1, "M": k[0]}, config=lambda c: {"BLOCK": c["BLOCK_M"]}
        ),
    }
    for message, tables in cases.items():
        kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=tables)(add_kernel)
        for n in (600, 610):
            run(kernel, n)
            assert kernel.best_config.kwargs == {"BLOCK": 32}
        said = [r.message for r in caplog.records if message in r.message]
        assert len(said) == 1 and "vllm.add" in said[0] and "fix the mapping" in said[0], message
    tuned = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=cases["key= raised IndexError"])
    monkeypatch.setenv("TUNEBOOK_MODE", "tune")
    run(tuned(add_kernel), 700)  # tune mode: no hints from it, the search runs
    assert tunebook.stats()["benchmarked"] == 3


def test_the_nearest_entry_over_all_of_this_gpus_pages_answers(book_dir):
    """Two imports with different key columns make two pages for one GPU (a bf16-only import,
    then one with an fp8 file, which adds a dtype column): the nearest entry answers,
    whichever page holds it, and never the fp8 entry."""
    import_table(book_dir, HERE, {1: entry(32)})
    bf16 = (f"E=1,N=1,device_name={HERE}.json", {256: entry(128)})
    fp8 = (f"E=1,N=1,device_name={HERE},dtype=fp8_w8a8.json", {256: entry(64)})
    assert import_files(book_dir, bf16, fp8).exit_code == 0
    pages = _tables.load(ADD_TABLES, [book_dir])
    assert len(pages) == 2
    for pages_in_order in (pages, pages[::-1]):  # page order is a hash's: it must not decide
        found = _tables.lookup(ADD_TABLES, pages_in_order, (250,))
        assert [(f.key["M"], f.config["BLOCK"]) for f in found] == [(256, 128), (1, 32)]


def test_a_field_mapped_to_none_is_absent_and_a_key_without_the_nearest_field_is_reported(caplog):
    page = _tables.TablePage("X", "here", (({"E": 8, "N": 64, "M": 1}, entry(16)),))
    with_none = tunebook.Tables("t", key=lambda k: {"E": 8, "N": 64, "M": k[0], "dtype": None}, config=dict)
    assert [f.key["M"] for f in _tables.lookup(with_none, [page], (3,))] == [1]
    caplog.set_level(logging.WARNING, logger="tunebook")
    lower = tunebook.Tables("t", key=lambda k: {"E": 8, "N": 64, "m": k[0]}, config=dict)
    assert _tables.lookup(lower, [page], (3,)) == []
    assert any("key= gives M=None" in r.message and "['E', 'N', 'm']" in r.message for r in caplog.records)


def import_files(directory: Path, *files: tuple[str, dict[int, dict]], extra: tuple[str, ...] = ()):
    source = directory.parent / "vllm-files"
    source.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in files:
        (source / name).write_text(json.dumps({str(m): c for m, c in table.items()}))
        paths.append(str(source / name))
    args = ["import", "--format", "vllm", *paths, "--kernel", "vllm.add", "-o", str(directory), *extra]
    return CliRunner().invoke(_app.cli, args)


def test_import_refuses_two_files_that_collide_under_the_key_names_given(book_dir):
    bf16 = (f"E=1,N=1,device_name={HERE}.json", {64: entry(32)})
    fp8 = (f"E=1,N=1,device_name={HERE},dtype=fp8_w8a8.json", {64: entry(128)})
    collided = import_files(book_dir, bf16, fp8, extra=("--key", "E,N,M"))
    assert collided.exit_code != 0 and "both give key ['E', 'N', 'M']=[1, 1, 64]" in collided.output
    assert "dtype=fp8_w8a8" in collided.output and not list(book_dir.glob("vllm-add--*"))
    kept = import_files(book_dir, bf16, fp8)  # default key names keep dtype: no collision
    assert kept.exit_code == 0 and "2 keys imported" in kept.output


def test_re_importing_a_file_replaces_all_its_entries_and_keeps_other_files(monkeypatch, book_dir):
    name = f"E=1,N=1,device_name={HERE}.json"
    other = (f"E=2,N=1,device_name={HERE}.json", {256: entry(64)})
    assert import_files(book_dir, (name, {64: entry(32), 256: entry(128)}), other).exit_code == 0
    again = import_files(book_dir, (name, {64: entry(64), 100000: entry(32)}))  # re-tuned: no 256
    assert again.exit_code == 0 and "2 earlier entries of the same files replaced" in again.output
    (page,) = _tables.load(ADD_TABLES, [book_dir])
    assert sorted((k["E"], k["M"], c["BLOCK_SIZE_M"]) for k, c in page.entries) == [
        (1, 64, 64),
        (1, 100000, 32),
        (2, 256, 64),
    ]
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=ADD_TABLES)(add_kernel)
    run(kernel, 256)  # vLLM with the new file takes M=64's entry; the old 256 entry is gone
    assert kernel.best_config.kwargs == {"BLOCK": 64}


def test_a_tables_name_no_import_holds_is_said_once_with_a_close_name(monkeypatch, book_dir, caplog):
    """Found by a misuse review: Tables("vllm.ad"), a typo, served the first config with
    nothing said but "nothing comparable remembered". A book holding no import at all, or
    imports under names unlike it, says nothing (the pack's fused_moe declares vLLM's tables
    beside a user's own)."""
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    caplog.set_level(logging.WARNING, logger="tunebook")
    typo = tunebook.Tables("vllm.ad", key=ADD_TABLES.key, config=ADD_TABLES.config)
    before = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=typo)(add_kernel)
    run(before, 300)
    assert not [r for r in caplog.records if "finds no table imported" in r.message]
    import_table(book_dir, HERE, {64: entry(32), 256: entry(128)})
    kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=typo)(add_kernel)
    with pytest.warns(tunebook.BookWarning, match=r"Tables\('vllm.ad'\) finds no table imported"):
        run(kernel, 300)
    said = [r.message for r in caplog.records if "finds no table imported" in r.message]
    assert len(said) == 1 and "did you mean 'vllm.add'?" in said[0], said
    run(kernel, 700)  # said once
    assert len([r for r in caplog.records if "finds no table imported" in r.message]) == 1
    caplog.clear()
    right = tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=ADD_TABLES)(add_kernel)
    run(right, 300)
    assert right.best_config.kwargs == {"BLOCK": 128}
    # Another kernel's tables under a name unlike this one's are no mistake: nothing said.
    other = tunebook.Tables("vllm.fused_moe", key=ADD_TABLES.key, config=ADD_TABLES.config)
    run(tunebook.autotune(block_configs(32, 64, 128), key=["n"], tables=other)(add_kernel), 300)
    assert not [r for r in caplog.records if "finds no table imported" in r.message]
