"""A Space's configs as one kernel's calls see them.

Listing a Space of thousands of points against a platform's filters costs tens of ms, which
every first call of a key used to pay (in serve mode too, where the answer is one book
read). So the points this platform allows are listed once per kernel, with their config ids,
and a call's candidates are a :class:`SpaceCandidates`: a sequence whose ``triton.Config``
(and stored record) of a point is made only when something reads that point. A budgeted
search reads the few it measures, so a key's first call over a Space of 10^5 points makes a
handful of Configs, not 10^5 (it made every one, at about 40 us each, before).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, overload

from . import _compat, _warnings
from ._book import config_id, config_record
from ._configs import ConfigIndex
from ._errors import ConfigurationError
from ._reads import unwatched
from ._space import Space

# A call with more candidates than this is said once per kernel: its first call of each key
# still lists every point (a few us each: its id, the arg constraints), and the exhaustive,
# neighbors and bayes strategies read every point (docs/spaces-and-strategies.md, "Cost").
LARGE = 100_000


class SpaceListing:
    def __init__(self, space: Space, index: ConfigIndex, platform: Callable[[], Mapping[str, Any]]) -> None:
        self.space = space
        self._index = index
        self._platform = platform  # the page's platform, asked on the first listing
        self._feasible: list[Any] | None = None
        self._ids: list[str] | None = None  # the config id of each feasible point
        self._configs: dict[int, Any] = {}  # index in _feasible -> its Config
        self._defaults: dict[str, Any] | None = None  # the options a Config without them has
        self._warned = False
        self._fields: tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]] | None = None
        self._texts: dict[tuple[Any, ...], str] = {}  # (name, type, value, float's repr) -> its field
        self._unique: bool | None = None  # whether no two feasible points share an id

    def feasible(self) -> list[Any]:
        """The Space's points this platform allows (listed on first use)."""
        if self._feasible is None:
            self._feasible = self.space.candidates(platform=self._platform())
        return self._feasible

    def ids(self) -> list[str]:
        """The config id of each feasible point, made from the point (no Config)."""
        if self._ids is None:
            self._ids = [self._id(point) for point in self.feasible()]
        return self._ids

    def allowed(self, named: Mapping[str, Any], label: str) -> SpaceCandidates:
        """The feasible points a call's arguments allow (its arg constraints), as Configs
        made on first read, one per config id."""
        feasible, ids = self.feasible(), self.ids()
        if self.space.arg_constraints:
            allows = self.space.allows_args
            kept: Sequence[int] = [i for i, point in enumerate(feasible) if allows(point, named)]
        else:
            kept = range(len(feasible))
        if self._unique is None:
            self._unique = len(set(ids)) == len(ids)
        if not self._unique:  # rare (two NaN values): the first point stands for its id
            seen: set[str] = set()
            kept = [i for i in kept if not (ids[i] in seen or seen.add(ids[i]))]  # type: ignore[func-returns-value]
        if not kept:
            items = unwatched(named).items()
            shown = ", ".join(f"{k}={v!r}" for k, v in items if not hasattr(v, "dtype"))
            raise ConfigurationError(
                f"tunebook.autotune: the Space of {label} has no feasible config for this call "
                f"({shown}): {self._emptied()}."
            )
        if len(kept) > LARGE and not self._warned:
            self._warned = True
            _warnings.warn_once(
                f"large-space:{label}",
                "tunebook: %s: a call has %d candidate configs; the first call of each key lists them "
                "all (about 0.5-1 s per 10^5 points, more with arg_constraints), and the exhaustive, "
                "neighbors and bayes strategies read every one. Narrow the Space with constraints or "
                "fewer values, or tune offline (tunebook tune); strategy='random' with max_configs= "
                "reads only the points it measures (said once per kernel)",
                label,
                len(kept),
            )
        return SpaceCandidates(self, kept)

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

    def record(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """A point as the book stores its Config (``ConfigIndex.record_of`` of ``to_config``):
        a Config keeps the values it is given, and has Triton's defaults for the options a
        point leaves out."""
        options = self.space.option_names
        meta = {k: v for k, v in point.items() if k not in options}
        given = {k: v for k, v in point.items() if k in options}
        merged = {**self._option_defaults(), **given}
        return config_record(meta, {k: v for k, v in merged.items() if v is not None})

    def _id(self, point: Mapping[str, Any]) -> str:
        """``config_id(self.record(point))``, from each field's text made once: a first call
        names every point, and a record and its id cost ~10 us a point where this costs ~1."""
        if self._fields is None:
            self._fields = self._field_names()
        meta, options = self._fields
        cached = self._texts
        texts = []
        for part in (meta, options):
            fields = []
            for name, default in part:
                if part is meta:
                    if name not in point:
                        continue
                    value = point[name]  # None included: a record keeps a meta-parameter's None
                else:
                    value = point.get(name, default)
                    if value is None:  # an option of None is left out of the Config
                        continue
                # 0.0 and -0.0 (and True and 1) are one dict key, two fields.
                ref = (name, type(value), value, repr(value) if type(value) is float else None)
                text = cached.get(ref)
                if text is None:
                    text = cached[ref] = _field_text(name, value, part is options)
                fields.append(text)
            texts.append(",".join(fields))
        return "|".join(texts)

    def _option_defaults(self) -> dict[str, Any]:
        """The options a Config made without them has (Triton's defaults), asked once."""
        if self._defaults is None:
            self._defaults = _compat.config_options(_compat.Config({}))
        return self._defaults

    def _field_names(self) -> tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]:
        """(meta-parameters, options) in the order an id lists them, each with the value a
        point without it has (options: Triton's default; None: left out)."""
        defaults = self._option_defaults()
        names, options = self.space.params, self.space.option_names
        meta = tuple((n, None) for n in sorted(n for n in names if n not in options))
        opts = tuple((n, defaults.get(n)) for n in sorted({*defaults, *options}))
        return meta, opts

    def config(self, index: int) -> Any:
        """The Config of feasible point ``index`` (made once)."""
        config = self._configs.get(index)
        if config is None:
            assert self._feasible is not None
            config = self._index.from_space(self.space, self._feasible[index])
            self._configs[index] = config
        return config


class SpaceCandidates(Sequence[Any]):
    """A call's candidates from a Space: ``triton.Config`` objects, each made when first read.

    ``ids`` are known for all without a Config (:meth:`SpaceListing.ids`); ``records`` and
    ``flat`` read one point each. Iterating makes every Config: the autotuner's own paths read
    by index (``config_of``, ``candidates[i]``), and only what a user's hook gets (pruning,
    ``fallback=``, ``check=``) or a worker needs is made in full.
    """

    def __init__(self, listing: SpaceListing, kept: Sequence[int]) -> None:
        self._listing = listing
        self._kept = kept  # indices into the listing's feasible points
        every = listing.ids()
        self.ids: list[str] = [every[i] for i in kept] if isinstance(kept, list) else every
        self._positions: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self._kept)

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._listing.config(self._kept[i])

    def __iter__(self) -> Iterator[Any]:
        for i in self._kept:
            yield self._listing.config(i)

    def config_of(self, cid: str) -> Any:
        """The candidate whose id is ``cid`` (KeyError if none)."""
        if self._positions is None:
            self._positions = {c: k for k, c in enumerate(self.ids)}
        return self[self._positions[cid]]

    @property
    def records(self) -> Sequence[dict[str, Any]]:
        """Each candidate as the book stores it, made when read."""
        return _Records(self)

    def record(self, i: int) -> dict[str, Any]:
        feasible = self._listing.feasible()
        return self._listing.record(feasible[self._kept[i]])


class _Records(Sequence[dict[str, Any]]):
    def __init__(self, candidates: SpaceCandidates) -> None:
        self._candidates = candidates

    def __len__(self) -> int:
        return len(self._candidates)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._candidates.record(i)


def candidate_ids(index: ConfigIndex, candidates: Sequence[Any]) -> list[str]:
    """The config ids of ``candidates``: a Space's without making its Configs."""
    if isinstance(candidates, SpaceCandidates):
        return candidates.ids
    return [index.id_of(c) for c in candidates]


def _field_text(name: str, value: Any, option: bool) -> str:
    """One field of a config id, as ``config_id`` writes it."""
    if option:
        return config_id(config_record({}, {name: value}))[1:]
    return config_id(config_record({name: value}, {}))[:-1]


def config_of(index: ConfigIndex, candidates: Sequence[Any], cid: str) -> Any:
    """The candidate that stands for ``cid``: a Space's made now if it was never read."""
    if isinstance(candidates, SpaceCandidates):
        return candidates.config_of(cid)
    return index.config(cid)


def configs_timings(
    index: ConfigIndex, candidates: Sequence[Any], results: Mapping[str, Any], measured_only: bool = False
) -> dict[Any, list[float]]:
    """Triton's ``configs_timings`` of a decided key: each candidate's timing as the book holds
    it, ``[inf] * 3`` for one without. A Space's candidates (``measured_only``, whether or not
    pruning hooks made them a list) are listed only where the book holds a result (a budgeted
    search of 10^5 points measured a few): a Config is made per result, not per point."""
    if isinstance(candidates, SpaceCandidates):
        measured = [(k, results[cid]) for k, cid in enumerate(candidates.ids) if cid in results]
        return {candidates[k]: _ms(result) for k, result in measured}
    if measured_only:
        listed = ((c, results.get(index.id_of(c))) for c in candidates)
        return {c: _ms(result) for c, result in listed if result is not None}
    return {c: _ms(results.get(index.id_of(c))) for c in candidates}


def _ms(result: Any) -> list[float]:
    return list(result.ms) if result is not None and result.ms else [math.inf] * 3
