"""The LLM demo's tests run its kernels in ``serve`` mode on the CPU interpreter (as the
server does), on two models: ``tiny`` (random weights, a fraction of a second a step) for
the engine's and the server's behaviour, and SmolLM2-135M-Instruct cut to its first
layers (seconds a step: its 49152-wide output projection dominates) against Hugging
Face's ``LlamaForCausalLM`` with the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REAL_LAYERS = 2  # SmolLM2 cut to its first two layers on the interpreter


@pytest.fixture(autouse=True)
def serve_mode(book_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # After the root conftest (book_dir), which clears the mode.
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """SmolLM2-135M-Instruct's GGUF, every layer read (fp32, HF names) once per session."""
    from tunebook.demo.llm.loading import read_gguf

    return read_gguf()
