"""Kernel-pack tests run in ``serve`` mode: no benchmarking, each key runs its op's
hand-picked config (the interpreter is too slow to tune spaces of hundreds of configs).
The tests that tune set TUNEBOOK_MODE themselves."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def serve_mode(book_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Depends on book_dir so that it runs after the root conftest, which clears the mode.
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")


@pytest.fixture
def gen(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    from .packutil import generator

    return generator(request.node.nodeid)
