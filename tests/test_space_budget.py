"""A budgeted search over a large Space costs per config measured, not per point of the Space.

A key's first call used to make a ``triton.Config``, an id, a stored record and a flat dict for
every point (10^6 points: 72 s and 2.7 GB with ``max_configs=4``). These tests count the
Configs made, never the time.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import triton
import triton.language as tl

import tunebook
from small_kernels import grid_1d, vectors
from tunebook import _compat
from tunebook._configs import ConfigIndex
from tunebook._listing import LARGE, SpaceListing
from tunebook._space import Space

CUDA_90 = {"backend": "cuda", "arch": "90", "device": "NVIDIA H100", "triton": "3.6.0"}


@triton.jit
def add_meta(
    x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


class Flat:
    """``do_bench``: runs the candidate once and reports a time from its meta-parameters."""

    def __init__(self) -> None:
        self.measured: list[dict[str, Any]] = []
        self._now: dict[str, Any] = {}

    def pre_hook(self, nargs: dict[str, Any], reset_only: bool = False) -> None:
        self._now = dict(nargs)

    def __call__(self, kernel_call: Any, quantiles: Any = None) -> list[float]:
        kernel_call()
        self.measured.append(self._now)
        ms = 1.0 + self._now["A"] / 10 + self._now["B"] / 100
        return [ms, ms, ms]


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the Configs made from Space points (every one goes through ``to_config``)."""
    made = [0]
    to_config = Space.to_config

    def counted(self: Space, candidate: Any) -> Any:
        made[0] += 1
        return to_config(self, candidate)

    monkeypatch.setattr(Space, "to_config", counted)
    return made


LARGE_SPACE = dict(BLOCK=[16, 32, 64, 128, 256], A=range(10), B=range(10), C=range(10), num_stages=range(20))


def budgeted(space: Space, bench: Flat, max_configs: int = 4, **options: Any) -> Any:
    """``add_meta`` tuned over ``space`` by a random search of ``max_configs``, timed by ``bench``."""
    return tunebook.autotune(
        space,
        key=["n"],
        strategy="random",
        max_configs=max_configs,
        do_bench=bench,
        pre_hook=bench.pre_hook,
        adaptive=False,
        **options,
    )(add_meta)


def test_first_call_over_a_large_space_makes_configs_for_what_it_measures(monkeypatch):
    made = _counting(monkeypatch)
    space = Space(**LARGE_SPACE)
    assert len(space) == 100_000
    bench = Flat()
    kernel = budgeted(space, bench)
    for n in (300, 301):  # two keys
        x, y, out = vectors(n)
        kernel[grid_1d(n)](x, y, out, n)
        assert torch.allclose(out, x + y)
    assert len(bench.measured) == 8
    # The measured ones, and at most a few more (a key's winner): never one per point.
    assert made[0] <= 16, made[0]
    # configs_timings lists the candidates the book holds a result for, winner included.
    assert kernel.best_config in kernel.configs_timings
    assert 1 <= len(kernel.configs_timings) <= 4
    assert all(len(t) == 3 for t in kernel.configs_timings.values())


def test_a_key_the_book_answers_is_served_without_making_every_config(monkeypatch):
    space, bench = Space(**LARGE_SPACE), Flat()
    x, y, out = vectors(300)
    budgeted(space, bench)[grid_1d(300)](x, y, out, 300)
    made = _counting(monkeypatch)
    again = budgeted(space, bench)  # a new process, as far as it knows
    out.fill_(float("nan"))
    again[grid_1d(300)](x, y, out, 300)
    assert torch.allclose(out, x + y) and len(bench.measured) == 4
    assert made[0] <= 4, made[0]


def test_ids_and_records_made_from_points_are_those_of_their_configs():
    # Every kind of value an id writes: ints, bools, floats (-0.0 is not 0.0 in an id),
    # strings, None options (left out), None meta-parameters (kept: SPLIT=null), options the
    # Space leaves to Triton's defaults.
    space = Space(
        BLOCK=[16, 64],
        SPLIT=[None, 2],
        EVEN=[True, False],
        SHIFT=[-0.0, 1.5],
        MODE=["a,b|c=d", "x"],
        ONE=[1],
        num_warps=[2, 8],
        maxnreg=[None, 128],
    )
    index = ConfigIndex([])
    listing = SpaceListing(space, index, lambda: CUDA_90)
    points = listing.feasible()
    assert len(points) == space.size
    made = [space.to_config(p) for p in points]
    assert listing.ids() == [index.id_of(c) for c in made]
    assert [listing.record(p) for p in points] == [index.record_of(c) for c in made]
    assert len(set(listing.ids())) == len(points)
    options = _compat.config_options(made[0])
    assert "num_stages" in options  # Triton's default, named in the id as a Config names it


def test_candidates_read_by_index_and_by_id():
    space = Space(BLOCK=[16, 32, 64], num_warps=[4, 8], arg_constraints=[lambda c, a: c["BLOCK"] <= a["n"]])
    index = ConfigIndex([])
    listing = SpaceListing(space, index, lambda: CUDA_90)
    candidates = listing.allowed({"n": 32}, "k")
    assert len(candidates) == 4 and [c.kwargs["BLOCK"] for c in candidates] == [16, 16, 32, 32]
    assert candidates.ids == [index.id_of(c) for c in candidates]
    assert candidates.config_of(candidates.ids[3]) is candidates[3] is candidates[-1]
    assert candidates.records[1] == index.record_of(candidates[1])
    assert [c.num_warps for c in candidates[1:3]] == [8, 4]


def test_a_call_with_more_candidates_than_large_is_said_once(monkeypatch):
    monkeypatch.setattr("tunebook._listing.LARGE", 50)
    assert LARGE == 100_000
    space = Space(BLOCK=[16, 32, 64, 128], num_warps=[1, 2, 4, 8], num_stages=range(1, 5))
    listing = SpaceListing(space, ConfigIndex([]), lambda: CUDA_90)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listing.allowed({}, "big_kernel")
        listing.allowed({}, "big_kernel")
    said = [str(w.message) for w in caught if "64 candidate configs" in str(w.message)]
    assert len(said) == 1 and "big_kernel" in said[0] and "max_configs" in said[0]


def test_configs_timings_of_a_space_is_one_rule_with_pruning_hooks_or_without():
    # A Space's configs_timings lists what the book holds results for; a pruning hook (which
    # turns the candidates into a list of Configs) does not bring back [inf] * 3 for the rest.
    space = Space(BLOCK=[16, 32, 64, 128], A=range(5), B=[0], C=[0])
    sizes, measured = [], []
    for prune in (None, {"early_config_prune": lambda configs, nargs, **kw: list(configs)}):
        bench = Flat()
        kernel = budgeted(space, bench, max_configs=3, prune_configs_by=prune)
        x, y, out = vectors(200)
        kernel[grid_1d(200)](x, y, out, 200)
        assert torch.allclose(out, x + y)
        assert all(t[0] < float("inf") for t in kernel.configs_timings.values())
        sizes.append(len(kernel.configs_timings))
        measured.append(len(bench.measured))
    assert measured == [3, 0]  # the second kernel is answered by the first one's book entry
    assert sizes == [3, 3]


def test_a_serve_mode_miss_not_recorded_makes_no_config_per_point(monkeypatch):
    # A serve-mode miss describes its call for the book with every candidate's grid; where no
    # miss is written (TUNEBOOK_RECORD_MISSES=0), no candidate's Config is made for it.
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    monkeypatch.setenv("TUNEBOOK_RECORD_MISSES", "0")
    space = Space(BLOCK=[16, 32, 64, 128, 256], A=range(10), B=range(10), C=range(10))
    kernel = tunebook.autotune(space, key=["n"], adaptive=False)(add_meta)
    made = _counting(monkeypatch)
    x, y, out = vectors(300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel[grid_1d(300)](x, y, out, 300)
    assert torch.allclose(out, x + y)
    assert made[0] <= 2, made[0]


def test_checked_outputs_over_a_large_space_make_configs_for_what_they_read(monkeypatch):
    # check= takes its reference from the first candidate that runs: it reads candidates in
    # order until one does, not all 10^5.
    made = _counting(monkeypatch)
    bench = Flat()
    kernel = budgeted(Space(**LARGE_SPACE), bench, check=True)
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    assert torch.allclose(out, x + y) and len(bench.measured) >= 4
    assert made[0] <= 16, made[0]
