"""Config identity: how the book names a ``triton.Config``, and back.

A config's id is its launch parameters as text (``BLOCK_M=64,BLOCK_N=32|num_stages=3,num_warps=4``),
so the same config has the same id in every process, on every machine, in every book.
Configs equal in every launch parameter (a list with duplicates, or two that differ only in
their ``pre_hook``) share one id: the first declared stands for them, as it would win
Triton's tie, and it is the one measured. A Space's candidates get one Config object per
id, made on first sight and reused, so that ids are computed once per object.

>>> import triton
>>> same = [triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 64}, num_warps=4)]
>>> index = ConfigIndex(same)
>>> index.id_of(same[0]) == index.id_of(same[1])
True
>>> index.unique(same) == [same[0]]
True
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import _compat
from ._book import config_id, config_record
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._space import Space


class ConfigIndex:
    """Ids, stored records and Config objects of one kernel's configs (declared or from a Space).

    Not thread-safe on its own; the autotuner uses it under its lock (the hit path never does).
    """

    def __init__(self, configs: Sequence[Any]) -> None:
        self.configs = list(configs)
        # id(Config) -> (the Config, weakly; its id; its stored record). The reference tells a
        # live object from a new one at a freed one's address (pruners build new Configs per call).
        self._known: dict[int, tuple[weakref.ref[Any], str, dict[str, Any]]] = {}
        self._by_id: dict[str, Any] = {}  # config id -> the Config that stands for it
        self._space_configs: dict[tuple[Any, ...], Any] = {}  # a Space point -> its one Config
        self._meta: tuple[tuple[str, ...], dict[tuple[Any, ...], str], int] | None = None
        # The ids of the declared list (a Space's points are not listed: Space.declares).
        self.declared = frozenset(self.id_of(config) for config in self.configs)

    def id_of(self, config: Any) -> str:
        """The config's id (computed once per Config object)."""
        return self._entry(config)[1]

    def record_of(self, config: Any) -> dict[str, Any]:
        """The config as a book stores it."""
        return self._entry(config)[2]

    def _entry(self, config: Any) -> tuple[weakref.ref[Any], str, dict[str, Any]]:
        known = self._known.get(id(config))
        if known is None or known[0]() is not config:
            record = config_record(config.kwargs, _compat.config_options(config))
            known = self._known[id(config)] = (weakref.ref(config), config_id(record), record)
            self._by_id.setdefault(known[1], config)
        return known

    def config(self, cid: str) -> Any:
        """The Config that stands for ``cid`` (KeyError for an id never seen)."""
        return self._by_id[cid]

    def unique(self, configs: Iterable[Any]) -> list[Any]:
        """``configs`` without repeats of an id, each id represented by the config that stands for it."""
        out: dict[str, Any] = {}
        for config in configs:
            cid = self.id_of(config)
            out.setdefault(cid, self._by_id[cid])
        return list(out.values())

    def from_space(self, space: Space, candidate: Mapping[str, Any]) -> Any:
        """The one Config object for a Space candidate (its id is the Config's, computed once)."""
        # Looked up by the candidate's values (typed: True is not 1), not by an id: a key's
        # first call may pass thousands of candidates here.
        point = tuple(sorted((k, type(v), v) for k, v in candidate.items()))
        config = self._space_configs.get(point)
        if config is None:
            config = self._space_configs[point] = space.to_config(candidate)
            self.id_of(config)
        return config

    def id_for_meta(self, meta: Mapping[str, Any]) -> str | None:
        """A config id with the meta-parameters of this launch (to look up a recorded grid).

        A grid callable sees the kernel's parameters, never num_warps/num_stages, so configs
        that differ only in those launch with the same grid: any of them will do.
        """
        if self._meta is None or self._meta[2] != len(self._by_id):
            names = tuple(sorted({n for c in self._by_id.values() for n in c.kwargs}))
            index: dict[tuple[Any, ...], str] = {}
            for cid, c in self._by_id.items():
                index.setdefault(tuple(c.kwargs.get(n) for n in names), cid)
            self._meta = (names, index, len(self._by_id))
        names, index, _ = self._meta
        return index.get(tuple(meta.get(n) for n in names))


def prune(
    configs: Sequence[Any],
    nargs: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    early_config_prune: Callable[..., Any] | None,
    perf_model: Callable[..., Any] | None,
    top_k: int | float,
) -> list[Any]:
    """Triton's pruning, as ``Autotuner.prune_configs`` applies it: ``early_config_prune``,
    then the ``top_k`` configs ``perf_model`` estimates fastest."""
    pruned = list(configs)
    if early_config_prune:
        pruned = early_config_prune(pruned, nargs, **kwargs)
        if not pruned:
            raise ConfigurationError(
                "tunebook.autotune: early_config_prune returned no configs for this call; it must "
                "return at least one config."
            )
    if perf_model:
        if isinstance(top_k, float) and top_k <= 1.0:
            top_k = max(1, int(len(pruned) * top_k))
        elif not isinstance(top_k, int):
            raise TypeError(
                "Error while pruning configs, top_k must be either 1) a float <= 1.0 or 2) an int"
            )
        if len(pruned) > top_k:
            est = {cfg: perf_model(**nargs, **kwargs, **cfg.all_kwargs()) for cfg in pruned}
            pruned = sorted(est, key=lambda c: est[c])[:top_k]
    return list(pruned)
