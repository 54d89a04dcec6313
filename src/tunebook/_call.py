"""One kernel call as the slow path sees it: the arguments, by position and by name, and the grid.

The slow path passes this record down instead of parking per-call state on the autotuner.

>>> call = Call.bind(["x", "n"], (None, 4), {"BLOCK": 64}, grid=(1,))
>>> call.nargs, call.named["BLOCK"]
({'x': None, 'n': 4}, 64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._launch import lean_options


@dataclass(frozen=True)
class Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grid: Any
    nargs: dict[str, Any]  # the positional arguments by name, as Triton's Autotuner.nargs holds them

    @staticmethod
    def bind(arg_names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any], grid: Any) -> Call:
        return Call(tuple(args), dict(kwargs), grid, dict(zip(arg_names, args)))

    @property
    def named(self) -> dict[str, Any]:
        """Every argument by name (positional and keyword)."""
        return {**self.nargs, **self.kwargs}

    def launch_kwargs(self, config: Any) -> dict[str, Any]:
        """The call's keyword arguments plus the config's meta-parameters and options.

        Raises ValueError, as Triton does, when the call passes a meta-parameter the config
        sets (an auto-tuned symbol re-defined by the caller).
        """
        conflicts = self.kwargs.keys() & config.kwargs.keys()
        if conflicts:
            raise ValueError(
                f"Conflicting meta-parameters: {', '.join(sorted(conflicts))}. Make sure that you don't "
                "re-define auto-tuned symbols."
            )
        return {**self.kwargs, **config.all_kwargs()}

    def run_kwargs(self, config: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """What a launch of ``config`` passes to Triton's ``run``: :meth:`launch_kwargs`
        without the options equal to ``defaults`` (``Autotuner.option_defaults``), as the
        hits pass them, so that every launch of the config finds the one kernel Triton
        compiled for it (``_launch.lean_options``). Hooks still see :meth:`launch_kwargs`,
        as Triton's do."""
        return lean_options(self.launch_kwargs(config), defaults)

    def hook_args(self, config: Any) -> dict[str, Any]:
        """What Triton passes to pre- and post-hooks: every argument and the config's values."""
        return {**self.nargs, **self.launch_kwargs(config)}
