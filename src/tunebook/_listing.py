"""A Space's configs as one kernel's calls see them.

Listing a Space of thousands of points against a platform's filters costs tens of ms, which
every first call of a key used to pay (in serve mode too, where the answer is one book
read). So the points this platform allows are listed once per kernel, and a point's
``triton.Config`` is made only when a call first allows it: most calls allow a small part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._configs import ConfigIndex
from ._errors import ConfigurationError
from ._reads import unwatched
from ._space import Space


class SpaceListing:
    def __init__(self, space: Space, index: ConfigIndex, platform: Callable[[], Mapping[str, Any]]) -> None:
        self.space = space
        self._index = index
        self._platform = platform  # the page's platform, asked on the first listing
        self._feasible: list[Any] | None = None
        self._configs: dict[int, Any] = {}  # index in _feasible -> its Config

    def feasible(self) -> list[Any]:
        """The Space's points this platform allows (listed on first use)."""
        if self._feasible is None:
            self._feasible = self.space.candidates(platform=self._platform())
        return self._feasible

    def allowed(self, named: Mapping[str, Any], label: str) -> list[Any]:
        """The Configs of the feasible points a call's arguments allow (its arg constraints)."""
        allows = self.space.allows_args
        configs = [self._config(i) for i, point in enumerate(self.feasible()) if allows(point, named)]
        if not configs:
            items = unwatched(named).items()
            shown = ", ".join(f"{k}={v!r}" for k, v in items if not hasattr(v, "dtype"))
            raise ConfigurationError(
                f"tunebook.autotune: the Space of {label} has no feasible config for this call "
                f"({shown}): {self._emptied()}."
            )
        return configs

    def _emptied(self) -> str:
        """Which filter left a call no config, in words: the counts after each (Space's docs)."""
        kept, feasible = len(self.space), len(self.feasible())
        counts = f"{self.space.size} configs, {kept} after its constraints"
        if not kept:
            return f"{counts}; loosen its constraints"
        counts += f", {feasible} after the platform filter"
        if not feasible:
            platform = self._platform()
            where = " ".join(str(platform.get(k, "")) for k in ("backend", "arch")).strip()
            return (
                f"{counts} (num_ctas > 1 needs CUDA sm_90 or newer, maxnreg needs CUDA; this platform "
                f"is {where or 'unknown'}); add values it can run (num_ctas=1, maxnreg=None)"
            )
        return f"{counts}, 0 after its arg_constraints for this call; loosen its arg_constraints"

    def _config(self, index: int) -> Any:
        config = self._configs.get(index)
        if config is None:
            assert self._feasible is not None
            config = self._index.from_space(self.space, self._feasible[index])
            self._configs[index] = config
        return config
