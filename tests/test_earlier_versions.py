"""An edited kernel starts a new page (its source hash changed), and its re-tune measures the
earlier version's fastest configs for the same key on the same platform first: a small budget
keeps what the old search found. Real kernels on the CPU interpreter; the earlier version's
page is read from disk, from the writable book or a read-only one (shipped books)."""

from __future__ import annotations

import json
import threading
import time
import warnings

import pytest
import triton
import triton.language as tl

import tunebook
from conftest import book_files
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors

TIMES = {32: 3.0, 64: 1.0, 128: 2.0, 256: 4.0, 512: 5.0}


@triton.jit
def add_kernel_edited(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + y, written again (a new source hash: a new page)"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + tl.load(y_ptr + offs, mask=mask), mask=mask)


def tuned(fn, replay: Replay, key: list | None = None, name: str = "add", **options):  # type: ignore[no-untyped-def]
    kernel = tunebook.autotune(
        block_configs(*TIMES),
        key=key or ["n"],
        name=name,
        do_bench=replay,
        pre_hook=replay.pre_hook,
        **options,
    )(fn)
    return kernel


def run(kernel, n: int) -> None:  # type: ignore[no-untyped-def]
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    assert out.eq(x + y).all()


def test_an_edited_kernel_measures_the_earlier_versions_fastest_configs_first(book_dir):
    replay = Replay(TIMES)
    run(tuned(add_kernel, replay), 300)  # every config measured: 64, 128, 32 fastest
    assert len(replay.measured) == len(TIMES)
    assert len(list(book_dir.glob("add--*"))) == 1

    replay.measured.clear()
    edited = tuned(add_kernel_edited, replay, max_configs=3, strategy="exhaustive")
    run(edited, 300)
    assert replay.measured[:3] == [64, 128, 32]
    assert edited.best_config.kwargs == {"BLOCK": 64}
    assert len(list(book_dir.glob("add--*"))) == 2  # its own page; the old one untouched


def test_the_earlier_version_may_sit_in_a_read_only_book(tmp_path, monkeypatch, book_dir):
    """The pack's re-tune after an edit: the old page ships read-only, the new one is written."""
    replay = Replay(TIMES)
    shipped = tmp_path / "shipped"
    monkeypatch.setenv("TUNEBOOK_DIR", str(shipped))
    run(tuned(add_kernel, replay), 300)
    monkeypatch.setenv("TUNEBOOK_DIR", str(book_dir))
    monkeypatch.setenv("TUNEBOOK_PATH", str(shipped))
    replay.measured.clear()
    run(tuned(add_kernel_edited, replay, max_configs=2, strategy="exhaustive"), 300)
    assert replay.measured == [64, 128]
    assert tunebook.stats()["benchmarked"] == len(TIMES) + 2


def test_an_earlier_version_with_another_key_rule_is_not_used(book_dir):
    """Its key texts may read the same and mean other things (here n=300 is [300] under both
    rules): nothing is carried over, the search starts from the declared order."""
    replay = Replay(TIMES)
    run(tuned(add_kernel, replay, key=[tunebook.bucket("n", [300, 4096])]), 300)
    replay.measured.clear()
    run(tuned(add_kernel_edited, replay, max_configs=3, strategy="exhaustive"), 300)
    assert replay.measured[:3] == [32, 64, 128]
    assert len(list(book_dir.glob("add--*"))) == 2  # both pages in this book


def test_a_triton_upgrade_re_tunes_from_the_old_releases_page_of_this_gpu(book_dir, monkeypatch):
    """Another Triton release (and, as upgrades go, another runtime) is another platform: the
    same kernel's page under the old ones seeds the new one's search; another GPU's would not."""
    from tunebook import _compat

    replay = Replay(TIMES)
    real = _compat.triton_version()
    identity = _compat.device_identity()
    with monkeypatch.context() as patched:
        patched.setattr(_compat, "TRITON_VERSION", "3.0.0")
        patched.setattr(_compat, "device_identity", lambda: {**identity, "runtime": "an older one"})
        run(tuned(add_kernel, replay), 300)
    assert _compat.triton_version() == real
    assert len(list(book_dir.glob("add--*"))) == 1

    replay.measured.clear()
    run(tuned(add_kernel, replay, max_configs=3, strategy="exhaustive"), 300)
    assert replay.measured[:3] == [64, 128, 32]
    assert len(list(book_dir.glob("add--*"))) == 2


def test_another_gpus_page_of_an_earlier_version_is_not_used(book_dir, monkeypatch):
    from tunebook import _compat

    replay = Replay(TIMES)
    identity = _compat.device_identity()
    with monkeypatch.context() as patched:
        patched.setattr(_compat, "device_identity", lambda: {**identity, "device": "Another GPU"})
        run(tuned(add_kernel, replay), 300)
    replay.measured.clear()
    run(tuned(add_kernel_edited, replay, max_configs=3, strategy="exhaustive"), 300)
    assert replay.measured[:3] == [32, 64, 128]
    assert len(list(book_dir.glob("add--*"))) == 2  # both pages in this book


def test_an_earlier_versions_configs_are_measured_first_but_never_kept_on_a_tie(book_dir):
    """A kernel is matched to its old versions by name and key names, which an unrelated
    kernel may share: their ranking orders the search, and this version's own times decide
    (a hint within 2% of the best would be kept)."""
    run(tuned(add_kernel, Replay(TIMES)), 300)  # 64 fastest, then 128, 32
    replay = Replay({**TIMES, 32: 1.0, 64: 1.015})
    edited = tuned(add_kernel_edited, replay, strategy="exhaustive")
    run(edited, 300)
    assert replay.measured[:3] == [64, 128, 32]
    assert edited.best_config.kwargs == {"BLOCK": 32}  # 1.5% ahead of the old winner: it stands


@triton.jit
def add_kernel_third(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = y + x, a third version"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(y_ptr + offs, mask=mask) + tl.load(x_ptr + offs, mask=mask), mask=mask)


def test_this_releases_old_version_ranks_before_an_old_releases(book_dir, monkeypatch):
    from tunebook import _compat

    with monkeypatch.context() as patched:
        patched.setattr(_compat, "TRITON_VERSION", "3.0.0")
        run(tuned(add_kernel, Replay({**TIMES, 128: 0.5, 256: 0.7, 32: 0.9})), 300)  # 128, 256, 32
    run(tuned(add_kernel_edited, Replay(TIMES)), 300)  # 64, 128, 32
    replay = Replay(TIMES)
    run(tuned(add_kernel_third, replay, max_configs=4, strategy="exhaustive"), 300)
    assert replay.measured == [64, 128, 32, 256]


def test_the_newest_old_version_ranks_first(book_dir):
    run(tuned(add_kernel, Replay({**TIMES, 512: 0.1, 256: 0.2, 32: 0.3})), 300)  # 512, 256, 32
    run(tuned(add_kernel_edited, Replay(TIMES)), 300)  # later: 64, 128, 32
    replay = Replay(TIMES)
    run(tuned(add_kernel_third, replay, max_configs=5, strategy="exhaustive"), 300)
    assert replay.measured == [64, 128, 32, 512, 256]


def test_another_name_with_the_same_file_name_is_not_an_old_version(book_dir):
    """Page names keep only [A-Za-z0-9_] of a kernel's name: "my.add" and "my-add" share one."""
    run(tuned(add_kernel, Replay(TIMES), name="my.add"), 300)
    replay = Replay(TIMES)
    run(tuned(add_kernel_edited, replay, name="my-add", max_configs=3, strategy="exhaustive"), 300)
    assert replay.measured == [32, 64, 128]
    assert len(list(book_dir.glob("my-add--*"))) == 2


@triton.jit
def add_kernel_unrolled(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr = 1):
    """out = x + y, each program adding UNROLL blocks: a version that gained a parameter"""
    for u in tl.static_range(UNROLL):
        offs = (tl.program_id(0) * UNROLL + u) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        total = tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, total, mask=mask)


@triton.jit
def add_kernel_unrolled_no_default(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """out = x + y, UNROLL blocks a program, with no default for UNROLL"""
    for u in tl.static_range(UNROLL):
        offs = (tl.program_id(0) * UNROLL + u) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        total = tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, total, mask=mask)


def run_unrolled(fn, **options) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """Tunes ``fn`` over BLOCK x UNROLL (an unrolled block costs what its BLOCK does, and the
    same timer as the old version's: another would be another platform); the (BLOCK, UNROLL)
    measured, in order."""
    replay, launched = Replay(TIMES), []

    def pre_hook(nargs, reset_only=False):  # type: ignore[no-untyped-def]
        launched.append((nargs["BLOCK"], nargs["UNROLL"]))
        replay.pre_hook(nargs, reset_only)

    configs = [triton.Config({"BLOCK": b, "UNROLL": u}) for u in (2, 1) for b in TIMES]
    kernel = tunebook.autotune(
        configs, key=["n"], name="add", do_bench=replay, pre_hook=pre_hook, strategy="exhaustive", **options
    )(fn)
    x, y, out = vectors(300)
    kernel[lambda meta: (triton.cdiv(300, meta["BLOCK"] * meta["UNROLL"]),)](x, y, out, 300)
    assert out.eq(x + y).all()
    return launched[: len(replay.measured)]


def test_a_version_that_gained_a_parameter_is_seeded_where_the_parameter_has_its_default(book_dir):
    """The old version's BLOCK=64 is this version's BLOCK=64,UNROLL=1 (UNROLL's default), not
    BLOCK=64,UNROLL=2: the old ranking is measured first, at the default."""
    run(tuned(add_kernel, Replay(TIMES)), 300)  # 64, 128, 32 fastest
    measured = run_unrolled(add_kernel_unrolled, max_configs=4)
    assert measured == [(64, 1), (128, 1), (32, 1), (32, 2)]  # then the declared order


def test_a_gained_parameter_without_a_default_seeds_nothing(book_dir):
    """Which UNROLL the old version ran is unknown: the search starts from the declared order."""
    run(tuned(add_kernel, Replay(TIMES)), 300)
    assert run_unrolled(add_kernel_unrolled_no_default, max_configs=3) == [(32, 2), (64, 2), (128, 2)]


# -- serve mode: a key this page lacks, answered from the kernel's other pages of this GPU


def tuned_under_an_old_release(monkeypatch, fn=add_kernel, times=TIMES, n=300):  # type: ignore[no-untyped-def]
    """Tune ``fn`` at ``n`` as if under Triton 3.0.0 and an older runtime (another platform)."""
    from tunebook import _compat

    identity = _compat.device_identity()
    with monkeypatch.context() as patched:
        patched.setattr(_compat, "TRITON_VERSION", "3.0.0")
        patched.setattr(_compat, "device_identity", lambda: {**identity, "runtime": "an older one"})
        run(tuned(fn, Replay(times)), n)


def served_block(kernel, n: int) -> int:  # type: ignore[no-untyped-def]
    run(kernel, n)
    return int(kernel.best_config.kwargs["BLOCK"])


def test_after_a_triton_upgrade_serve_mode_answers_a_key_with_its_winner_under_the_old_release(
    book_dir, monkeypatch
):
    """A fleet that upgrades Triton before re-tuning serves what the old search found for each
    key on this GPU (not the first config, which nothing else here would improve on),
    benchmarking nothing, and says so once."""
    tuned_under_an_old_release(monkeypatch)  # n=300: 64 fastest
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    kernel = tuned(add_kernel, Replay(TIMES))
    with pytest.warns(tunebook.BookWarning, match="another Triton release or runtime"):
        assert served_block(kernel, 300) == 64
    stats = tunebook.stats()
    assert stats["benchmarked"] == 0 and stats["upgrade_answers"] == 1 and stats["fallbacks"] == 1
    assert served_block(tuned(add_kernel, Replay(TIMES)), 4000) == 32  # a key it lacks: the first config


def test_the_old_releases_winner_for_the_key_ranks_before_a_neighbours_and_the_rule(book_dir, monkeypatch):
    tuned_under_an_old_release(monkeypatch)  # n=300: 64
    run(tuned(add_kernel, Replay({**TIMES, 256: 0.5})), 4000)  # this release, n=4000: 256
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    assert served_block(tuned(add_kernel, Replay(TIMES)), 300) == 64
    rule = tuned(add_kernel, Replay(TIMES), prefer_nearest=True, fallback=lambda key, configs: configs[-1])
    assert served_block(rule, 300) == 64  # prefer_nearest: the rule is asked last
    assert served_block(tuned(add_kernel, Replay(TIMES)), 5000) == 256  # only the neighbour has it


def test_another_gpus_old_release_answers_nothing(book_dir, monkeypatch):
    from tunebook import _compat

    identity = _compat.device_identity()
    with monkeypatch.context() as patched:
        patched.setattr(_compat, "TRITON_VERSION", "3.0.0")
        patched.setattr(_compat, "device_identity", lambda: {**identity, "device": "Another GPU"})
        run(tuned(add_kernel, Replay(TIMES)), 300)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    assert served_block(tuned(add_kernel, Replay(TIMES)), 300) == 32
    assert tunebook.stats()["upgrade_answers"] == 0


def test_an_edited_kernels_old_winner_for_the_key_ranks_after_a_neighbouring_keys(book_dir, monkeypatch):
    """An edit may move the best tile: a neighbour of the same source is the better guess, and
    the old source's winner answers only where nothing of this source does."""
    run(tuned(add_kernel, Replay(TIMES)), 300)  # the old source, n=300: 64
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    assert served_block(tuned(add_kernel_edited, Replay(TIMES)), 300) == 64
    monkeypatch.setenv("TUNEBOOK_MODE", "tune")
    run(tuned(add_kernel_edited, Replay({**TIMES, 256: 0.5})), 4000)  # the new source, n=4000: 256
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    assert served_block(tuned(add_kernel_edited, Replay(TIMES)), 300) == 256
    assert tunebook.stats()["upgrade_answers"] == 0


def test_an_old_winner_is_served_under_this_versions_name_for_it(book_dir, monkeypatch):
    """The old BLOCK=64 is this version's BLOCK=64,UNROLL=1 (UNROLL's default)."""
    run(tuned(add_kernel, Replay(TIMES)), 300)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    configs = [triton.Config({"BLOCK": b, "UNROLL": u}) for u in (2, 1) for b in TIMES]
    kernel = tunebook.autotune(configs, key=["n"], name="add", do_bench=Replay(TIMES))(add_kernel_unrolled)
    x, y, out = vectors(300)
    kernel[lambda meta: (triton.cdiv(300, meta["BLOCK"] * meta["UNROLL"]),)](x, y, out, 300)
    assert out.eq(x + y).all()
    assert kernel.best_config.kwargs == {"BLOCK": 64, "UNROLL": 1}


# -- serve mode on a GPU without a page: another GPU of this architecture's winner


def tuned_on(monkeypatch, device: str, arch: str | None = None, times=TIMES, n: int = 300) -> None:  # type: ignore[no-untyped-def]
    """Tune add_kernel at ``n`` as if on ``device`` (of this architecture unless ``arch``)."""
    from tunebook import _compat

    identity = _compat.device_identity()
    elsewhere = {**identity, "device": device, **({"arch": arch} if arch else {})}
    with monkeypatch.context() as patched:
        patched.setattr(_compat, "device_identity", lambda: elsewhere)
        run(tuned(add_kernel, Replay(times)), n)


def test_a_gpu_without_a_page_serves_the_winner_of_another_gpu_of_its_architecture(book_dir, monkeypatch):
    """A book shipped for one GPU answers serve mode on another of the same architecture and
    Triton (its configs compile and run there) rather than the first config, and says so once."""
    tuned_on(monkeypatch, "NVIDIA H200")  # n=300: 64
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    with pytest.warns(tunebook.BookWarning, match="a device of the same architecture"):
        assert served_block(tuned(add_kernel, Replay(TIMES)), 300) == 64
    stats = tunebook.stats()
    assert stats["benchmarked"] == 0 and stats["same_arch_answers"] == 1 and stats["upgrade_answers"] == 0


def test_another_architectures_page_answers_nothing(book_dir, monkeypatch):
    tuned_on(monkeypatch, "Another GPU", arch="another arch")
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    assert served_block(tuned(add_kernel, Replay(TIMES)), 300) == 32
    assert tunebook.stats()["same_arch_answers"] == 0


def test_this_gpus_neighbouring_key_ranks_before_another_gpus_winner_for_the_key(book_dir, monkeypatch):
    tuned_on(monkeypatch, "NVIDIA H200")  # n=300: 64
    run(tuned(add_kernel, Replay({**TIMES, 256: 0.5})), 4000)  # this GPU, n=4000: 256
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    assert served_block(tuned(add_kernel, Replay(TIMES)), 300) == 256
    assert tunebook.stats()["same_arch_answers"] == 0


# -- a served config that cannot compile for the call is set aside, and the call served


@triton.jit
def add_kernel_limited(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, LIMIT: tl.constexpr):
    """out = x + y, for blocks of at most LIMIT (a constraint the key does not see)"""
    tl.static_assert(BLOCK <= LIMIT)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


def run_limited(kernel, n: int, limit: int) -> None:  # type: ignore[no-untyped-def]
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n, LIMIT=limit)
    assert out.eq(x + y).all()


def test_a_served_config_that_cannot_compile_here_is_set_aside_and_the_call_served(book_dir, monkeypatch):
    """Another GPU's winner (128) fails this call's static assertion before anything runs:
    the call is served by the next answer (that GPU's second best, 64), and later calls of
    the key too, without another failure."""
    from tunebook import _compat

    identity = _compat.device_identity()
    with monkeypatch.context() as patched:
        patched.setattr(_compat, "device_identity", lambda: {**identity, "device": "NVIDIA H200"})
        run_limited(tuned(add_kernel_limited, Replay({**TIMES, 128: 0.5})), 300, limit=1024)  # 128, 64
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    kernel = tuned(add_kernel_limited, Replay(TIMES))
    with pytest.warns(tunebook.BookWarning, match="BLOCK=128.*cannot run here"):
        run_limited(kernel, 300, limit=64)
    assert kernel.best_config.kwargs == {"BLOCK": 64}
    run_limited(kernel, 300, limit=64)
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, n=300, LIMIT=64)  # the key laid out otherwise: its decision, 64
    assert out.eq(x + y).all()
    assert kernel.best_config.kwargs == {"BLOCK": 64} and tunebook.stats()["benchmarked"] == 0
    from tunebook import _misses
    from tunebook._book import read_document

    assert _misses.flush()
    entries = [e for page in book_files(book_dir) for e in read_document(page).entries.values()]
    misses = [e.misses for e in entries if e.misses]
    assert misses == [1]  # one miss in the book for the key, not one per answer it was served


def test_a_measured_winner_that_cannot_compile_reaches_the_caller(book_dir, monkeypatch):
    """The book's own winner for the key is not replaced behind the caller's back: the call's
    constraint is one its key leaves out, which only the caller can fix."""
    run_limited(tuned(add_kernel_limited, Replay({**TIMES, 128: 0.5})), 300, limit=1024)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    with pytest.raises(Exception, match="AssertionError"):
        run_limited(tuned(add_kernel_limited, Replay(TIMES)), 300, limit=64)


def test_setting_a_config_aside_leaves_the_keys_the_book_answers_alone(book_dir, monkeypatch):
    """128 is set aside as another key's served answer; a key whose own page holds 128 as its
    winner still runs 128."""
    run_limited(tuned(add_kernel_limited, Replay({**TIMES, 128: 0.5})), 300, limit=1024)  # 128 here
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    kernel = tuned(add_kernel_limited, Replay(TIMES))
    with pytest.warns(tunebook.BookWarning, match="cannot run here"):
        run_limited(kernel, 400, limit=64)  # served the nearest key's 128, which fails: set aside
    assert kernel.best_config.kwargs["BLOCK"] != 128
    run_limited(kernel, 300, limit=1024)  # the book's own winner
    assert kernel.best_config.kwargs == {"BLOCK": 128}
    stats = tunebook.stats()
    assert stats["misses"] == 1 and stats["fallbacks"] == 1 and stats["book_hits"] == 1  # counted once


def test_a_key_pinned_through_the_cache_keeps_its_config_when_set_aside_elsewhere(book_dir, monkeypatch):
    run_limited(tuned(add_kernel_limited, Replay({**TIMES, 128: 0.5})), 300, limit=1024)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel = tuned(add_kernel_limited, Replay(TIMES))
    run_limited(kernel, 300, limit=1024)
    pinned = next(iter(kernel.cache))
    kernel.cache[pinned] = kernel.cache[pinned]  # the caller's own write: 128 for this key
    with pytest.warns(tunebook.BookWarning, match="cannot run here"):
        run_limited(kernel, 400, limit=64)
    run_limited(kernel, 300, limit=1024)
    assert kernel.best_config.kwargs == {"BLOCK": 128}


def test_a_set_aside_leaves_other_keys_decisions_and_counts_alone(book_dir, monkeypatch):
    """Key 500 is served the nearest key's 128 and runs it; key 400 then fails with 128 and
    sets it aside for itself. Key 500 keeps 128, and no key is counted as a miss twice."""
    run_limited(tuned(add_kernel_limited, Replay({**TIMES, 128: 0.5})), 300, limit=1024)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    kernel = tuned(add_kernel_limited, Replay(TIMES))
    run_limited(kernel, 500, limit=1024)
    with pytest.warns(tunebook.BookWarning, match="cannot run here"):
        run_limited(kernel, 400, limit=64)
    for n in (500, 300, 500):
        run_limited(kernel, n, limit=1024)
        assert kernel.best_config.kwargs == {"BLOCK": 128}
    stats = tunebook.stats()
    assert stats["misses"] == 2 and stats["book_hits"] == 1 and stats["fallbacks"] == 4, stats  # 500 x3, 400


def partial_without_a_choice(book_dir, fn=add_kernel_limited) -> None:  # type: ignore[no-untyped-def]
    """Key n=300 measured for 128 (fastest) and 256 only, with no choice recorded: what a
    search cut off (a crash, a deadline) leaves, which serve mode answers from its results."""
    replay = Replay({**TIMES, 128: 0.5})
    short = tunebook.autotune(
        block_configs(128, 256), key=["n"], name="add", do_bench=replay, pre_hook=replay.pre_hook
    )
    x, y, out = vectors(300)
    extra = {"LIMIT": 1024} if fn is add_kernel_limited else {}
    short(fn)[grid_1d(300)](x, y, out, 300, **extra)
    for path in book_dir.glob("add--*/*.json"):
        if path.name != "page.json":
            doc = json.loads(path.read_text())
            doc.pop("chosen", None)
            path.write_text(json.dumps(doc))


def test_a_keys_own_partial_result_that_cannot_compile_reaches_the_caller(book_dir, monkeypatch):
    """The key's own measurements answer it in serve mode; the best of them that fails for a
    call is not replaced behind the caller's back."""
    partial_without_a_choice(book_dir)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    kernel = tuned(add_kernel_limited, Replay(TIMES))
    run_limited(kernel, 300, limit=1024)
    assert kernel.best_config.kwargs == {"BLOCK": 128} and tunebook.stats()["misses"] == 1  # own results
    with pytest.raises(Exception, match="AssertionError"):
        run_limited(tuned(add_kernel_limited, Replay(TIMES)), 300, limit=64)


def test_fallback_is_asked_before_the_keys_own_partial_results(book_dir, monkeypatch):
    """Without prefer_nearest, fallback= answers a key the book has not finished, as it always
    did; the chain after it is not asked."""
    partial_without_a_choice(book_dir, add_kernel)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    asked = []

    def rule(key, configs):  # type: ignore[no-untyped-def]
        asked.append(key)
        return next(c for c in configs if c.kwargs["BLOCK"] == 32)

    assert served_block(tuned(add_kernel, Replay(TIMES), fallback=rule), 300) == 32 and len(asked) == 1


def test_a_call_launching_while_another_sets_its_config_aside_leaves_no_stale_hit(book_dir, monkeypatch):
    """Call 1 of key 500 launches the served 128 (it fits: LIMIT=1024); during it, call 2 of
    the same key fails with 128, sets it aside and is served 64. Call 1 must not then make 128
    the key's remembered hit: a third call like call 2 is served 64."""
    run_limited(tuned(add_kernel_limited, Replay({**TIMES, 128: 0.5})), 300, limit=1024)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel = tuned(add_kernel_limited, Replay(TIMES))
    real, nested = kernel.fn.run, []

    def racing(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("LIMIT") == 1024 and not nested:
            nested.append(1)
            with pytest.warns(tunebook.BookWarning, match="cannot run here"):
                run_limited(kernel, 500, limit=64)  # another thread's call of the same key
        return real(*args, **kwargs)

    kernel.fn.run = racing
    run_limited(kernel, 500, limit=1024)
    run_limited(kernel, 500, limit=64)
    assert kernel.best_config.kwargs == {"BLOCK": 64}


def test_a_key_whose_every_candidate_is_set_aside_raises_after_trying_each_once(book_dir, monkeypatch):
    def two(**options):  # type: ignore[no-untyped-def]
        replay = Replay({**TIMES, 128: 0.5})
        configs = block_configs(128, 256)
        hooks = {"do_bench": replay, "pre_hook": replay.pre_hook}
        return tunebook.autotune(configs, key=["n"], name="add", **hooks, **options)

    run_limited(two()(add_kernel_limited), 300, limit=1024)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    for options in ({}, {"fallback": lambda key, configs: configs[0]}):
        kernel = two(**options)(add_kernel_limited)
        real, launched = kernel.fn.run, []

        def counting(*args, real=real, launched=launched, **kwargs):  # type: ignore[no-untyped-def]
            launched.append(kwargs["BLOCK"])
            return real(*args, **kwargs)

        kernel.fn.run = counting
        with warnings.catch_warnings(), pytest.raises(Exception, match="AssertionError"):
            warnings.simplefilter("ignore")
            run_limited(kernel, 400, limit=64)
        assert sorted(launched) == [128, 256], (options, launched)


def slow_launches(kernel, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """Make the slow path's launches (Triton's JITFunction.run) take ``seconds`` longer. The
    interpreter runs one kernel at a time (it patches triton.language while it runs one), so
    the launches themselves are serialized; the threads overlap in the autotuner."""
    real, one_at_a_time = kernel.fn.run, threading.Lock()

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        with one_at_a_time:
            return real(*args, **kwargs)

    kernel.fn.run = slow


def two_calls_at_once(kernel, meanwhile=None) -> list[BaseException]:  # type: ignore[no-untyped-def]
    """Two threads call key n=1000 with LIMIT=64 at once (``meanwhile`` runs here while they
    do); the errors they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def call() -> None:
        start.wait()
        try:
            run_limited(kernel, 1000, limit=64)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    if meanwhile is not None:
        try:
            meanwhile()
        except BaseException as exc:
            errors.append(exc)
    for thread in threads:
        thread.join()
    return errors


def test_threads_that_meet_a_served_config_being_set_aside_are_all_served(book_dir, monkeypatch):
    """Two threads decide the same new key at once and both launch the failing answer; and a
    third call arrives while the first launch is under way: none of them sees the error."""
    run_limited(tuned(add_kernel_limited, Replay({**TIMES, 128: 0.5})), 300, limit=1024)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel = tuned(add_kernel_limited, Replay(TIMES))
    slow_launches(kernel, 0.3)

    def third_call() -> None:  # while the first launches: it must not take a remembered hit
        time.sleep(0.1)
        run_limited(kernel, 1000, limit=64)

    assert two_calls_at_once(kernel, third_call) == [] and kernel.best_config.kwargs == {"BLOCK": 64}


def test_a_one_config_kernel_stays_on_the_hit_path_after_a_cache_write_and_delete(book_dir):
    kernel = tunebook.autotune([triton.Config({"BLOCK": 64})], key=["n"], name="one")(add_kernel)
    run(kernel, 300)
    kernel.cache[(300,)] = kernel.configs[0]
    del kernel.cache[(300,)]
    slow, real = [], kernel._slow_run
    kernel._slow_run = lambda *a, **k: slow.append(1) or real(*a, **k)
    for _ in range(3):
        run(kernel, 300)
    assert slow == []


def test_two_calls_failing_on_one_served_config_count_the_key_once(book_dir, monkeypatch):
    run_limited(tuned(add_kernel_limited, Replay({**TIMES, 128: 0.5})), 300, limit=1024)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel = tuned(add_kernel_limited, Replay(TIMES))
    slow_launches(kernel, 0.3)
    tunebook.reset_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors = two_calls_at_once(kernel)
    stats = tunebook.stats()
    assert errors == [] and stats["misses"] == 1 and stats["fallbacks"] == 2, stats


def test_a_cache_write_during_a_served_launch_is_what_later_calls_run(book_dir, monkeypatch):
    run_limited(tuned(add_kernel_limited, Replay({**TIMES, 128: 0.5})), 300, limit=1024)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel = tuned(add_kernel_limited, Replay(TIMES))
    real, pinned = kernel.fn.run, []
    block_32 = next(c for c in kernel.configs if c.kwargs["BLOCK"] == 32)

    def racing(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not pinned:
            (key,) = list(kernel.cache)  # the key being served, decided just now
            kernel.cache[key] = block_32  # another thread pins it
            pinned.append(key)
        return real(*args, **kwargs)

    kernel.fn.run = racing
    run_limited(kernel, 500, limit=1024)  # this call runs the served 128
    run_limited(kernel, 500, limit=1024)
    assert kernel.best_config.kwargs == {"BLOCK": 32}


def test_fallback_sees_every_candidate_and_a_pick_set_aside_defers_to_the_chain(book_dir, monkeypatch):
    """fallback= picks 128, which fails this call: it is set aside for the key, and the rule,
    still given every candidate, picks it again; the chain answers instead."""
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    seen = []

    def rule(key, configs):  # type: ignore[no-untyped-def]
        seen.append(len(configs))
        return next(c for c in configs if c.kwargs["BLOCK"] == 128)

    kernel = tuned(add_kernel_limited, Replay(TIMES), fallback=rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_limited(kernel, 300, limit=64)
    assert kernel.best_config.kwargs["BLOCK"] <= 64 and set(seen) == {len(TIMES)}
