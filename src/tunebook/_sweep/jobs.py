"""The jobs a tuning run hands its workers: one key of one kernel each.

A job is ``{"module", "attr", "key_text", "call", "key"}`` (``_worker/supervisor.py``), plus
``books`` (the kernel's ``books=``) for a sweep's driver. ``tunebook tune`` and
:func:`tunebook.tune_on_ray` build them here: a kernel's recorded misses, or declared keys
that its ``inputs=`` factory turns into calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._book import Entry
from .._failures import stale_verdicts

if TYPE_CHECKING:
    from .._autotuner import Autotuner


def pending(tuner: Autotuner) -> list[tuple[str, Any]]:
    """Recorded misses of this kernel on this platform that no tuning has finished, or whose
    wrong results under ``check=`` a tuning would judge again (``_failures.stale_verdicts``:
    the kernel's check settings or its first config changed since)."""
    page = tuner.page()
    texts = sorted(page.keys(fresh=True))  # every key: a tuning run may read the whole book
    page.refresh()  # and what it read of them before
    page.lookup(texts)
    return [
        (text, entry)
        for text, entry in ((t, page.entries.get(t)) for t in texts)
        if entry is not None and entry.misses and entry.call is not None and _to_tune(tuner, entry)
    ]


def _to_tune(tuner: Autotuner, entry: Entry) -> bool:
    """Whether a tuning of the recorded miss ``entry`` has work: no choice yet, or wrong results
    that would be judged again (a kernel call in tune mode judges it again too)."""
    return not entry.chosen or stale_verdicts(entry.results, candidate_ids(tuner, entry), tuner.options.check)


def candidate_ids(tuner: Autotuner, entry: Entry) -> list[str]:
    """The ids of the configs a tuning of ``entry``'s key takes, in order, as far as the kernel
    and the book tell without its call: the kernel's list (of which the call's pruning may
    drop some: its worker then finds nothing to judge again and measures nothing), or for a
    Space, the configs the book holds for the key, the first of its last tuning first."""
    declared = [tuner.config_index.id_of(config) for config in tuner.configs]
    if declared:
        return declared
    return list(dict.fromkeys([*filter(None, [entry.first]), *entry.results]))


def miss_jobs(module: str, attr: str, tuner: Autotuner) -> list[dict[str, Any]]:
    """A job per recorded miss of ``tuner`` (imported as ``module:attr`` by workers)."""
    return [
        {
            "module": module,
            "attr": attr,
            "key_text": key_text,
            "call": entry.call,
            "key": dict(zip(map(str, tuner.keys), entry.key)),
            "books": [str(b) for b in tuner.options.book_dirs()],
        }
        for key_text, entry in pending(tuner)
    ]


def key_jobs(
    module: str, attr: str, tuner: Autotuner, keys: Sequence[tuple[str, Mapping[str, Any]]]
) -> list[dict[str, Any]]:
    """A job per declared key, given as (text, values by key name); needs ``inputs=``."""
    if tuner.options.inputs is None:
        raise ValueError(
            f"{module}:{attr} has no inputs= factory, so tunebook cannot build its arguments from key "
            "values; add inputs=... to its tunebook.autotune(...) (see docs/guide.md), or tune its "
            "recorded misses instead (tunebook tune --misses)"
        )
    names = [str(k) for k in tuner.keys]
    for _, values in keys:  # before a cluster starts: a worker would fail each key alone
        unknown, missing = sorted(set(values) - set(names)), [n for n in names if n not in values]
        if unknown or missing:
            problems = [f"{', '.join(unknown)} not in the kernel's key"] if unknown else []
            problems += [f"{', '.join(missing)} missing"] if missing else []
            raise ValueError(
                f"key {dict(values)}: {'; '.join(problems)}; the key of {module}:{attr} is "
                f"{', '.join(names)}: give each, e.g. {dict.fromkeys(names, '...')}"
            )
    return [
        {
            "module": module,
            "attr": attr,
            "key_text": text,
            "call": None,
            "key": dict(values),
            "books": [str(b) for b in tuner.options.book_dirs()],
        }
        for text, values in keys
    ]
