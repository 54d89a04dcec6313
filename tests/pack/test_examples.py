"""The examples in the pack's docstrings run and say what they show."""

from __future__ import annotations

import doctest
import importlib
import textwrap

import pytest

import tunebook.kernels


@pytest.mark.parametrize("module", ["_common", "rms_norm", "silu_and_mul", "rotary_embedding"])
def test_doctests(module: str) -> None:
    result = doctest.testmod(
        importlib.import_module(f"tunebook.kernels.{module}"), optionflags=doctest.ELLIPSIS
    )
    assert result.failed == 0 and result.attempted > 0


def test_package_example_runs() -> None:
    """The indented block after the package docstring's ``::``."""
    lines = (tunebook.kernels.__doc__ or "").split("::\n", 1)[1].splitlines()
    block = []
    for line in lines:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    namespace: dict[str, object] = {}
    exec(compile(textwrap.dedent("\n".join(block)), "tunebook.kernels example", "exec"), namespace)
    assert namespace["q"].shape == (4, 2, 16)  # type: ignore[attr-defined]
