"""What happens on a miss: a key the autotuner has not decided in this process.

    candidates (pruned, one per config id)
        │
        ▼
    the page of the book ─► every candidate measured, or the search done ─► answer from the book
        │ (refreshed first: another process or host may have tuned it meanwhile)
        ▼ otherwise, by TUNEBOOK_MODE (the rule: _policy.py)
    tune  → measure what the book lacks, persist as it goes (_tuner.py; isolate=True: _worker/)
    serve → fallback= / own partial results / this GPU's imported table (tables=) / the key
            on this GPU under an old Triton release / nearest key / the key on another GPU
            of this architecture / an edited source's / first config (fallback= in place of
            the first config with prefer_nearest=), and record the miss
    off   → measure everything, remember nothing

:func:`resolve` returns a :class:`Resolution`; the autotuner settles it (its cache, its
``configs_timings``, Triton's post-tuning reset) under its lock. Nothing here runs on a hit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import (
    _compat,
    _distributed,
    _failures,
    _misses,
    _policy,
    _settings,
    _stats,
    _tables,
    _tuner,
    _warnings,
)
from ._bench import QUANTILES
from ._book import Entry, Page, Result, config_id, config_record
from ._call import Call
from ._errors import WrongResult
from ._failures import failed_for_good, is_wrong_result
from ._jsonio import key_text as _key_text
from ._jsonio import stored_key
from ._listing import SpaceCandidates, candidate_ids
from ._progress import Progress
from ._space import platform_allows
from ._tuner import Exchange, KeyTuning, Outcome, Persist, failure, inputs_restored, tune_key

if TYPE_CHECKING:
    from ._autotuner import Autotuner
    from ._check import ReferenceSearch
    from ._search import Budget

log = logging.getLogger("tunebook")


@dataclass(frozen=True)
class Resolution:
    """How a miss was answered: the config id (None: the first candidate), from where
    ("book", "tuned" or "served"), the key's entry afterwards, and what it cost."""

    cid: str | None
    source: str
    entry: Entry | None
    benchmarked: int = 0
    seconds: float = 0.0
    why: str = ""  # why its search ended, in words (Outcome.why), where this process searched
    # served: the config was not measured for the key here (another platform's, a neighbour's,
    # a rule's answer), and the stats() counters the answer added (_set_aside takes them back)
    unmeasured: bool = False
    counted: tuple[str, ...] = ()
    none_ran: str = ""  # tuned: no config ran (Outcome.none_ran), the first is launched in their place


@dataclass(frozen=True)
class Miss:
    """One key to answer: who asks, for which call, among which candidates (one per config id)."""

    tuner: Autotuner
    call: Call
    key: tuple[Any, ...]
    text: str  # the key as the book names it
    candidates: Sequence[Any]
    ids: list[str]

    @property
    def by_id(self) -> dict[str, Any]:
        return dict(zip(self.ids, self.candidates))


def resolve(tuner: Autotuner, call: Call, key: tuple[Any, ...], candidates: Sequence[Any]) -> Resolution:
    """Answer a miss of ``key`` among ``candidates`` (see the module docstring)."""
    # A Space's candidates stay lazy (_listing.SpaceCandidates): a Config is made per point read.
    listed = candidates if isinstance(candidates, SpaceCandidates) else list(candidates)
    miss = Miss(tuner, call, key, _key_text(key), listed, candidate_ids(tuner.config_index, candidates))
    mode = "off" if _tensor_keyed(tuner, call) else _settings.mode()
    budget = tuner.options.budget
    page = tuner.page() if mode != "off" else None
    entry = page.get(miss.text, miss.ids) if page is not None else None
    if page is not None:
        if entry is None or not _policy.answered(entry, miss.ids, budget) or _judged_again(miss, mode, entry):
            # another process (or host, through Redis) may have tuned it meanwhile
            page.refresh(miss.text, declared=miss.ids)
            entry = page.get(miss.text)
        if entry is None or not _policy.answered(entry, miss.ids, budget):
            entry = _renamed(miss, page, budget) or entry
        _warn_undeclared(miss, entry)
        again = _judged_again(miss, mode, entry)
        if _policy.decide(entry, miss.ids, mode, budget, page.settled(miss.text), again) == "book":
            _stats.add("book_hits")
            return Resolution(entry.best(miss.ids) if entry is not None else None, "book", entry)
        _stats.add("misses")
        if mode == "serve":
            served = _serve(miss, entry, page)
            return dataclasses.replace(served, counted=("misses", *served.counted))
    begun = time.perf_counter()
    try:
        outcome = _tune(miss, entry, page)
    except BaseException:
        # A tuning that raises (every config failed for a reason in the call) still took
        # time, and compile_seconds / group_wait_seconds, counted as they happen, are parts of it.
        _stats.add("tuning_seconds", time.perf_counter() - begun)
        raise
    _stats.add("benchmarked", outcome.measured)
    _stats.add("tuning_seconds", outcome.seconds)
    _stats.add("failures", outcome.failures)
    cid = outcome.entry.best(miss.ids)
    return Resolution(
        cid, "tuned", outcome.entry, outcome.measured, outcome.seconds, outcome.why, none_ran=outcome.none_ran
    )


def _judged_again(miss: Miss, mode: str, entry: Entry | None) -> bool:
    """Whether ``tune`` mode tunes the key again because its wrong results were judged under
    other ``check=`` settings or another reference than a tuning now would judge them under
    (``_failures.stale_verdicts``)."""
    return (
        mode == "tune"
        and entry is not None
        and _failures.stale_verdicts(entry.results, miss.ids, miss.tuner.options.check)
    )


def _renamed(miss: Miss, page: Page, budget: Budget) -> Entry | None:
    """The key's answer from this kernel's page under another name (``Page.renamed``),
    recorded in this page: the same results, now found here by every later process."""
    for found in page.renamed(miss.key):
        if _policy.answered(found, miss.ids, budget):
            return page.record(miss.text, found)
    return None


def _tensor_keyed(tuner: Autotuner, call: Call) -> bool:
    """Whether a key name of this call holds a tensor. Its key is then new at every call (a
    tensor compares by identity) and its text the tensor's contents: tuned as Triton tunes it,
    at every call, and never written into the book (each call wrote a key file of its own)."""
    named = call.named
    tensors = [name for name in tuner.keys if hasattr(named.get(name), "data_ptr")]
    if tensors:
        _warnings.warn_once(
            f"tensor-key:{tuner.label}",
            "tunebook: %s: key= names %s, which this call passes a tensor: a key of it is new at every "
            "call, so the kernel is tuned at every call, as Triton does, and nothing is remembered. "
            "Key on a size or a shape passed as an argument instead (the dtypes of tensor arguments "
            "are part of every key already)",
            tuner.label,
            ", ".join(map(repr, tensors)),
        )
    return bool(tensors)


@dataclass(frozen=True)
class BookChoice:
    """A key the book answers in ``serve`` mode, found without listing the kernel's Space:
    the chosen config's id, the entry, and the results this call allows (config id -> the
    Space point's Config, in the order the Space lists them)."""

    cid: str
    entry: Entry
    allowed: dict[str, Any]


def book_choice(tuner: Autotuner, call: Call, key: tuple[Any, ...]) -> BookChoice | None:
    """The book's answer for ``key`` in ``serve`` mode, for a kernel over a Space, from the
    entry's results alone; None where only :func:`resolve` can tell.

    Listing a Space's candidates for a call costs milliseconds per key (thousands of points,
    each checked by the arg constraints and named), and a fresh server's first request meets
    dozens of keys. A book entry holds a few dozen results: checking those against the Space
    and this call gives the same answer as ``resolve``'s rule for ``serve`` mode wherever the
    search's choice runs and is allowed: the rule serves it, as the best of the allowed
    results within the tie tolerance. Otherwise (no entry, no choice, a choice this call does
    not allow, or Triton's pruning hooks, which see the whole list) the full path decides.
    """
    space = tuner.space
    if space is None or tuner.early_config_prune or tuner.perf_model or _settings.mode() != "serve":
        return None
    page = tuner.page()
    entry = page.get(_key_text(key), declared=lambda cid, config: space.declares(config))
    if entry is None or not entry.chosen:
        return None
    platform, index = page.platform, tuner.config_index
    named = tuner.reads.watch(call.named)  # what the rules read keys the hits (_reads.py)
    allowed: list[tuple[int, str, Any]] = []
    for cid, result in entry.results.items():
        point = space.point_of(result.config)
        if point is None or not platform_allows(point[1], platform) or not space.allows_args(point[1], named):
            continue
        # The point must launch exactly what was measured: ``declares`` passes option fields
        # the Space does not list (``num_ctas: 1``, as older records stored Triton's default),
        # and a result measured at ``num_warps=8`` must not stand for the Space's point that
        # launches Triton's default, which the full path would name otherwise.
        config = index.from_space(space, point[1])
        if index.id_of(config) == cid:
            allowed.append((point[0], cid, config))
    allowed.sort(key=lambda a: a[0])
    ids = [cid for _, cid, _ in allowed]
    best = entry.best(ids) if _policy.chosen_among(entry, ids) else None
    if best is None:
        return None
    return BookChoice(best, entry, {cid: config for _, cid, config in allowed})


def _warn_undeclared(miss: Miss, entry: Entry | None) -> None:
    """Say once per kernel that the book holds results for configs the kernel does not declare
    (a longer list tuned them, or another version of the code): they are ignored, never run."""
    if entry is None:
        return
    ids = set(miss.ids)
    others = [cid for cid in entry.results if cid not in ids]  # often none: then nothing to compute
    if not others:
        return
    tuner = miss.tuner
    ignored = [cid for cid in others if not tuner.declares(entry.results[cid].config)]
    if ignored:
        _warnings.warn_once(
            f"undeclared:{tuner.label}",
            "tunebook: %s: the book holds %d result%s for key %s of configs the kernel does not declare "
            "(%s); they are ignored, and only declared configs are run. Other keys may hold more; "
            "declare the configs again to use them (said once per kernel).",
            tuner.label,
            len(ignored),
            "" if len(ignored) == 1 else "s",
            list(miss.key),
            ", ".join(sorted(ignored)[:3]) + (", ..." if len(ignored) > 3 else ""),
        )


def _serve(miss: Miss, entry: Entry | None, page: Page) -> Resolution:
    """``serve`` mode: a config with zero benchmarking, and the miss recorded for later.

    The chain (``_policy.serve_choice``) runs among the key's candidates that this process
    has not set aside for it (``_set_aside.py``); the key's own results are never set aside."""
    last = miss.tuner.options.prefer_nearest
    aside = miss.tuner.set_aside.of(miss.key)
    # Nor configs the key's own results rule out (cannot run here, a wrong result under
    # check=): a tuning that ended before any config ran left them, and serve launched them.
    ruled_out = {
        cid: "" for cid, r in (entry.results.items() if entry is not None else ()) if failed_for_good(r)
    }
    others = _without(miss, {**ruled_out, **aside}) if aside or ruled_out else miss
    if not others.ids:  # every one ruled out: the chain as it was
        others = _without(miss, aside) if aside else miss
    own = entry.best(miss.ids) if entry is not None else None
    picked = None if last else _user_fallback(miss)  # its rule sees every candidate, as always
    picked = None if picked in aside else picked
    near = _near(others, page)
    table = None
    upgraded: list[tuple[str, str]] = []
    edited: list[tuple[str, str]] = []
    same_arch: list[tuple[str, str]] = []
    if picked is None and own is None:  # only where it is asked
        table = _table_answer(others, str(page.platform.get("device", "")))
        if table is None:
            upgraded, edited = _other_versions_answers(others, page)
        if table is None and not upgraded and all(other.best(others.ids) is None for other in near):
            same_arch = _same_arch_answers(others, page)
    cid, how = _policy.serve_choice(
        others.ids, entry, near, picked, table, upgraded, edited, same_arch, own_ids=miss.ids
    )
    counted = _count_answer(miss, page, (cid, how), table, upgraded, same_arch)
    if cid is None and last:
        # fallback= asked last, and only when reached: a pack kernel's rule ranks thousands
        # of candidates, and a config it returns that goes unused is no reason to warn.
        cid, how = _policy.serve_choice(others.ids, None, [], _user_fallback(miss))
    if cid is None and others.ids:
        cid = others.ids[0]  # the first config not set aside for the key
    log.warning(
        "tunebook: %s key %s is not in the book; serving %s without benchmarking (TUNEBOOK_MODE=serve)",
        miss.tuner.label,
        list(miss.key),
        how,
    )
    # A key decided again after a set-aside had its miss recorded by the first decision; and
    # by_id makes every candidate's Config (a Space's too): only where a miss is written.
    if not aside and page.local is not None and _settings.record_misses():
        _misses.record(page, miss.key, miss.text, miss.call, miss.by_id)
    return Resolution(cid, "served", entry, unmeasured=cid is None or cid != own, counted=counted)


def _without(miss: Miss, aside: Mapping[str, str]) -> Miss:
    """``miss`` without the candidates set aside for its key."""
    kept = [(cid, c) for cid, c in zip(miss.ids, miss.candidates) if cid not in aside]
    return dataclasses.replace(miss, ids=[cid for cid, _ in kept], candidates=[c for _, c in kept])


# What serve mode says, once per kernel, when it answers from another platform's evidence.
_UPGRADE_WARNING = (
    "tunebook: %s: this page (%s) lacks keys that a page of this GPU under another Triton release or "
    "runtime holds; serving their winners there, tuned under that release. Tune this release's page "
    "to serve its own: each key's search measures the old winners first (said once per kernel)."
)
_SAME_ARCH_WARNING = (
    "tunebook: %s: no book answers its keys on %s; serving %s, a device of the same architecture and "
    "Triton release. Tune on this device to serve its own: each key's search measures that winner "
    "first (said once per kernel)."
)


def _count_answer(
    miss: Miss,
    page: Page,
    answer: tuple[str | None, str],
    table: tuple[str, str] | None,
    upgraded: list[tuple[str, str]],
    same_arch: list[tuple[str, str]],
) -> tuple[str, ...]:
    """Count a serve-mode answer that came from another platform's evidence, and say once per
    kernel where such answers come from and how to serve this platform's own; the names of
    the counters it added."""
    warning: tuple[Any, ...] = ()
    if table is not None and answer == table:
        name = "table_answers"
    elif answer in upgraded:
        name = "upgrade_answers"
        release = f"Triton {page.platform.get('triton', '?')}, {page.platform.get('runtime', '?')}"
        warning = (_UPGRADE_WARNING, release)
    elif answer in same_arch:
        name = "same_arch_answers"
        warning = (_SAME_ARCH_WARNING, page.platform.get("device", "this device"), answer[1])
    else:
        return ()
    _stats.add(name)
    if warning:
        _warnings.warn_once(f"{name}:{miss.tuner.label}", warning[0], miss.tuner.label, *warning[1:])
    return (name,)


def _same_arch_answers(miss: Miss, page: Page) -> list[tuple[str, str]]:
    """(config id, how) of this key's winners on other platforms of this backend, GPU
    architecture and Triton release (``Page.same_arch_winners``)."""
    answers = []
    for entry, where in page.same_arch_winners(miss.key):
        cid = entry.best(miss.ids)
        if cid is not None:
            answers.append((cid, f"this key's winner on {where}"))
    return answers


def _other_versions_answers(miss: Miss, page: Page) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(config id, how) of this key's winners in the kernel's other pages of this GPU: under
    another Triton release or runtime, and of another source on this platform (``Page.
    versions_on_this_gpu``), in this version's config ids (``renamed_configs``)."""
    edited, upgraded = page.versions_on_this_gpu(miss.key)
    if not edited and not upgraded:
        return [], []
    earlier = [*edited, *(entry for entry, _ in upgraded)]
    renamed = renamed_configs(miss.tuner, earlier, miss.ids, miss.candidates)
    allowed = [*miss.ids, *renamed]

    def winner(entry: Entry) -> str | None:
        cid = entry.best(allowed)
        return renamed.get(cid, cid) if cid is not None else None

    after_upgrade = [(winner(e), f"this key's winner under {under} on this GPU") for e, under in upgraded]
    after_edit = [(winner(entry), "this key's winner for another source of the kernel") for entry in edited]
    return (
        [(cid, how) for cid, how in after_upgrade if cid is not None],
        [(cid, how) for cid, how in after_edit if cid is not None],
    )


def _near(miss: Miss, page: Page) -> list[Entry]:
    """The remembered keys nearest to the miss's, nearest first: ranked by their names (at
    most NAME_BUDGET of each store, asked and parsed once per page), then only the nearest
    few are read."""
    texts = _policy.nearest_texts(miss.key, page.key_names())[:NEAR_READ]
    return _policy.nearest(miss.key, page.lookup(texts))


def _tables_found(tuner: Autotuner, key: tuple[Any, ...], device: str | None = None) -> list[_tables.Found]:
    """What the imported tables the kernel reads (``tables=``) give for ``key``: those of
    ``device`` only, or of every GPU."""
    tables = tuner.options.tables
    if tables is None:
        return []
    return _tables.lookup(tables, tuner.imported_tables(device), key)


def _table_answer(miss: Miss, device: str) -> tuple[str, str] | None:
    """(config id, how) of the first table tuned on ``device`` whose entry the call allows."""
    for answer in _tables_found(miss.tuner, miss.key, device):
        cid = _tables.candidate_id(answer, miss.ids, miss.candidates)
        if cid is not None:
            return cid, answer.describe()
        _warnings.warn_once(
            f"table-config:{miss.tuner.label}:{sorted(answer.config.items())}",
            "tunebook: %s: %s maps to %s, which is not one of the configs this call allows (%s); "
            "it is not served (said once per config)",
            miss.tuner.label,
            answer.describe(),
            answer.config,
            _tables.WhyNot(answer, miss.candidates),
        )
    return None


def search_hints(
    tuner: Autotuner,
    page: Page,
    key: tuple[Any, ...],
    ids: list[str],
    candidates: Sequence[Any],
    near: list[Entry],
) -> list[int]:
    """Candidate indices a search of ``key`` measures first, after ``earlier_seeds``: an
    imported table's entry for this GPU, the nearest keys' winners, the same key's winners on
    other platforms, other GPUs' table entries (``_tune``, and a Ray sweep's plan). A hint is
    kept on a tie (``_tuner.tie_aware_choice``)."""
    hints = _policy.hints(ids, near, page.sibling_winners(key))
    device = str(page.platform.get("device", ""))
    index = {cid: i for i, cid in enumerate(ids)}
    here: list[int] = []
    elsewhere: list[int] = []
    for answer in _tables_found(tuner, key):
        cid = _tables.candidate_id(answer, ids, candidates)
        if cid is not None:
            (here if _tables.same_device(answer.device, device) else elsewhere).append(index[cid])
    return list(dict.fromkeys([*here, *hints, *elsewhere]))


def earlier_seeds(
    tuner: Autotuner, page: Page, key: tuple[Any, ...], ids: list[str], candidates: Sequence[Any]
) -> list[int]:
    """Candidate indices a search of ``key`` measures before its hints: the fastest configs of
    other versions of the kernel (another source, Triton release or runtime) for this key on
    this GPU. Unlike hints they are not kept on a tie: a kernel is matched to its old
    versions by name and key names, which an unrelated kernel of the same name may share, so
    they order the search and the search's own times decide."""
    earlier = page.other_versions(key)
    return _policy.seeds(ids, earlier, renamed_configs(tuner, earlier, ids, candidates))


def renamed_configs(
    tuner: Autotuner, earlier: Sequence[Entry], ids: Sequence[str], candidates: Sequence[Any]
) -> dict[str, str]:
    """Earlier versions' config ids that are one of this version's candidates under another
    id, because the kernel gained a meta-parameter with a default: an old ``BLOCK_N=64`` is
    this version's ``BLOCK_N=64,SLICES=1`` when the kernel declares ``SLICES: tl.constexpr = 1``.
    Without this, an edit that adds a tuned parameter loses every seed (on an H200 the decode
    kernel's re-tune lost its old winners that way and served some keys 1.45x slower)."""
    known = set(ids)
    if all(cid in known for entry in earlier for cid in entry.results):
        return {}  # nothing renamed (the common case): skip listing every candidate's form
    defaults = _parameter_defaults(tuner.base_fn)
    if not defaults:
        return {}

    def form(record: dict[str, Any]) -> str:
        kwargs = {k: v for k, v in record.get("kwargs", {}).items() if defaults.get(k, _NONE) != v}
        return config_id({**record, "kwargs": kwargs})

    current: dict[str, str] = {}
    for cid, candidate in zip(ids, candidates):
        current.setdefault(form(tuner.config_index.record_of(candidate)), cid)
    renamed: dict[str, str] = {}
    for entry in earlier:
        for cid, result in entry.results.items():
            same = None if cid in known else current.get(form(result.config))
            if same is not None:
                renamed[cid] = same
    return renamed


_NONE = object()  # a default no stored value equals


def _parameter_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The kernel function's parameters that declare a default, and their defaults."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # not introspectable: no defaults to match by
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


# How many of the nearest keys a miss reads: enough for the hints and a serve-mode fallback.
NEAR_READ = 16


def _user_fallback(miss: Miss) -> str | None:
    """The id of the config the user's ``fallback=`` picks, if it is one of the candidates."""
    return fallback_pick(miss.tuner, miss.key, miss.ids, miss.candidates)


def fallback_pick(
    tuner: Autotuner, key: tuple[Any, ...], ids: Sequence[str], candidates: Sequence[Any]
) -> str | None:
    """The id of the config ``fallback=`` picks for ``key``, if it is one of the candidates."""
    fallback = tuner.options.fallback
    if fallback is None:
        return None
    picked = fallback(key, list(candidates))
    if picked is None:
        return None
    if not isinstance(picked, _compat.Config):  # its .kwargs failed far from the cause
        raise TypeError(
            f"{tuner.label}: fallback= returned {type(picked).__name__} {picked!r:.200}; it must return "
            "one of the configs it is given (a triton.Config) or None"
        )
    chosen = next((cid for cid, c in zip(ids, candidates) if c is picked), None)
    if chosen is None:
        cid = config_id(config_record(picked.kwargs, _compat.config_options(picked)))
        chosen = cid if cid in ids else None
    if chosen is None:
        log.warning(
            "tunebook: %s: fallback= returned %s, which is not one of the kernel's configs for this call; "
            "ignoring it",
            tuner.label,
            picked,
        )
    return chosen


def rule_hint(
    tuner: Autotuner, key: tuple[Any, ...], ids: Sequence[str], candidates: Sequence[Any]
) -> int | None:
    """The index of the config ``fallback=`` picks for ``key``: what serve mode would launch
    untuned. A search measures it first, and keeps it on a tie, so that a tuned key never ends
    slower than the kernel's own rule (on an H200, fused_moe's 40-config search at 8,192 tokens
    ended 3% behind the rule it falls back to). It does not steer the strategy as the other
    hints do: a rule is a guess for every key, not a measured neighbour. A fallback that
    raises is the kernel's bug, not the search's: said once, and the search goes on without it."""
    try:
        cid = fallback_pick(tuner, key, ids, candidates)
    except Exception as exc:  # user code; tuning must go on
        _warnings.warn_once(
            f"fallback-raised:{tuner.label}",
            "tunebook: %s: fallback= failed (%s: %s) while tuning key %s; the search goes on without "
            "the rule's config (said once; fix the fallback)",
            tuner.label,
            type(exc).__name__,
            exc,
            _key_text(key),
        )
        return None
    return ids.index(cid) if cid is not None else None


def _tune(miss: Miss, entry: Entry | None, page: Page | None) -> Outcome:
    tuner, options = miss.tuner, miss.tuner.options
    grouped = options.group is not None or _settings.distributed()
    team = _distributed.team(options.group, tuner.label) if page is not None and grouped else None
    if options.group_given_as_none:
        _distributed.alone_by_mistake(tuner.label)
    if page is None and grouped:
        _warnings.warn_once(
            f"group-off:{tuner.label}",
            "tunebook: %s: TUNEBOOK_MODE=off keeps no book, so each rank tunes its keys alone, not with "
            "its group, and ranks may launch different configs (said once)",
            tuner.label,
        )
    if options.isolate and page is not None:
        from . import _worker  # only isolation needs it

        if team is not None:  # TUNEBOOK_DISTRIBUTED=1 (group= with isolate=True is refused)
            _warnings.warn_once(
                f"group-isolate:{tuner.label}",
                "tunebook: %s: tuning with the group (TUNEBOOK_DISTRIBUTED=1), this process measures its "
                "share itself: isolate=True is not used for it (said once)",
                tuner.label,
            )
        elif not _worker.inside_worker():
            return _worker.tune_isolated(tuner, miss.call, miss.key, miss.text, miss.by_id, page)
    near = _near(miss, page) if page is not None else []
    hints = search_hints(tuner, page, miss.key, miss.ids, miss.candidates, near) if page is not None else []
    seeds = earlier_seeds(tuner, page, miss.key, miss.ids, miss.candidates) if page is not None else []
    rule = rule_hint(tuner, miss.key, miss.ids, miss.candidates)
    if team is not None and page is not None:
        from . import _collective  # only jobs that tune together need it

        # One search for the group: every rank's job covers every candidate and writes nowhere;
        # the protocol has the leader run it and the others measure the parts it deals them.
        try:
            return _collective.tune_together(
                team,
                page,
                miss.key,
                miss.text,
                miss.ids,
                lambda exchange, known: _job(miss, known, None, hints, rule, exchange, seeds),
                entry,
            )
        except Exception as exc:
            if not _distributed.is_store_failure(exc):
                raise
            # The store's host (the rank that made it) has gone: nobody is left to wait for,
            # so this rank tunes alone, as when a leader does not answer in time.
            _warnings.warn_once(
                f"group-store:{tuner.label}",
                "tunebook: %s: the group's store failed (%s: %s), as when the rank that hosts it has "
                "gone; this rank tunes key %s, and each later one, alone (said once)",
                tuner.label,
                type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
                miss.text,
            )
            entry = page.get(miss.text)
    job = _job(miss, entry, page, hints, rule, seeds=seeds)
    with inputs_restored(job):
        return tune_key(job)


def _job(
    miss: Miss,
    entry: Entry | None,
    page: Page | None,
    hints: list[int],
    rule: int | None = None,
    exchange: Exchange | None = None,
    seeds: Sequence[int] = (),
) -> KeyTuning:
    """The tuning of the miss's key, persisting in ``page`` (None: remembered for this call
    only, as a group's rank does: the protocol writes the decision)."""
    tuner, options = miss.tuner, miss.tuner.options
    configs = miss.candidates
    records = _records(tuner, configs)
    persist = Persist(page, miss.text, miss.key, miss.ids[0], entry)
    search = _reference_search(miss, entry, persist, records) if options.check is not None else None
    return KeyTuning(
        key_text=miss.text,
        key=stored_key(miss.key),
        configs=configs,
        ids=miss.ids,
        records=records,
        known=entry,
        timers=tuner.timers(),
        bench=_bench_function(tuner, miss.call, configs, search),
        persist=persist,
        is_unexpected=unexpected_failure,
        is_transient=transient_failure,
        precompile=_precompiler(tuner, miss.call),
        strategy=options.strategy,
        budget=_policy.effective_budget(options.budget, len(configs)),
        hints=hints,
        rule=rule,
        seeds=seeds,
        seed=options.seed,
        progress=Progress(tuner.label, miss.key),
        exchange=exchange,
        label=tuner.label,
        where=page.file_name if page is not None else "",
    )


def _records(tuner: Autotuner, configs: Sequence[Any]) -> Sequence[dict[str, Any]]:
    """The candidates as the book stores them: a Space's made when read."""
    if isinstance(configs, SpaceCandidates):
        return configs.records
    return [tuner.config_index.record_of(c) for c in configs]


def transient_failure(exc: BaseException) -> str | None:
    """Why ``exc`` is a failure of the moment rather than the config's (None: the config's):
    the device out of memory (other allocations of this process or another hold it; the same
    config may run at the next tuning) or a collision of two launches on the interpreter."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's, any device
        return "because the device was out of memory"
    if _compat.is_interpreter_collision(exc):
        return "because another thread launched a kernel on Triton's interpreter at the same time"
    return None


def unexpected_failure(exc: BaseException) -> bool:
    """Whether a config's exception points at the call rather than the config: neither a wrong
    result (``check=``) nor one of the backend's errors for a config that cannot run."""
    return not isinstance(exc, WrongResult) and not _compat.is_unrunnable_config_error(exc)


def _reference_search(
    miss: Miss, entry: Entry | None, persist: Persist, records: Sequence[Mapping[str, Any]]
) -> ReferenceSearch:
    """Where ``check=`` looks for its reference (``_check.ReferenceSearch``): configs the book
    records unable to run for this key are not launched for it, and those it finds unable to
    run are recorded for the key, as when measured. It launches in list order, outside the
    search's budget, so without this every process launched them again. Not another key's
    records: a config that cannot run for one key may for this one, and the reference is
    the first config that runs for this key, which is what ``_failures.expected_reference``
    predicts from this key's results alone (it once tried those last, and a key whose
    prediction and reference differed was judged again in every process)."""
    from ._check import ReferenceSearch

    # Persist takes the seconds since the tuning began, to count each write's share: from
    # here, a moment before tune_key's own clock starts.
    begun = time.perf_counter()

    def record(i: int, exc: BaseException) -> None:
        marked = _failures.found_as_reference(failure(records[i], exc))
        persist({miss.ids[i]: marked}, "", time.perf_counter() - begun)

    def name_launch(i: int) -> None:  # to a worker's supervisor (_tuner.observed), if any
        observer = _tuner._observer
        if observer is not None:
            observer.candidate(miss.text, stored_key(miss.key), miss.ids[i], records[i], reference=True)

    return ReferenceSearch(
        ids=miss.ids,
        skip=cannot_run_positions(miss.ids, entry),
        record=record,
        where=f"{miss.tuner.label} key {miss.text}",
        announce=name_launch,
    )


def cannot_run_positions(ids: Sequence[str], entry: Entry | None, also: Collection[str] = ()) -> set[int]:
    """The positions in ``ids`` of the configs ``entry`` records unable to run for the key
    (``_cannot_run``) and of those in ``also``: what check='s reference search passes over."""
    passed_over = (_cannot_run(entry.results) if entry is not None else set()) | set(also)
    return {i for i, cid in enumerate(ids) if cid in passed_over}


def _cannot_run(results: Mapping[str, Result]) -> set[str]:
    """The configs whose recorded failure says they cannot run here (``_failures.py``); not a
    wrong result, which is about the reference it was checked against."""
    return {cid for cid, r in results.items() if failed_for_good(r) and not is_wrong_result(r)}


def _bench_function(
    tuner: Autotuner, call: Call, candidates: Sequence[Any], search: ReferenceSearch | None = None
) -> Callable[[Callable[..., Any], Any], Any]:
    """``bench(timer, config) -> timing`` for one key, checked against a reference with ``check=``
    (its reference looked for as ``search`` says)."""
    run, defaults = tuner.fn.run, tuner.option_defaults()
    if tuner.options.check is None:
        return lambda timer, config: timer(
            tuner.hooks.timed_launch(run, call, config, defaults), quantiles=QUANTILES
        )
    from ._check import CheckedBench, OutputCheck

    checker = OutputCheck(call.args, call.kwargs, names=tuner.arg_names, **tuner.options.check)
    bench = CheckedBench(
        checker,
        candidates,
        run_once=lambda config: tuner.hooks.check_launch(run, call, config, defaults),
        timed=lambda config: tuner.hooks.timed_launch(run, call, config, defaults),
        quantiles=QUANTILES,
        search=search,
    )
    bench.judge_under(tuner.config_index.id_of, _failures.settings_hash(tuner.options.check) or "")
    return bench


def _precompiler(tuner: Autotuner, call: Call) -> Callable[[list[Any]], None] | None:
    """Compiles a batch of candidates ahead of measurement, in a thread pool (GPU only)."""
    workers = tuner.options.compile_workers
    if _compat.interpreting() or workers <= 1:
        return None
    defaults = tuner.option_defaults()

    def warm(config: Any) -> Any:
        return tuner.fn.run(*call.args, grid=call.grid, warmup=True, **call.run_kwargs(config, defaults))

    def precompile(configs: list[Any]) -> None:
        _compat.precompile([functools.partial(warm, c) for c in configs], workers)

    return precompile


def announce(
    tuner: Autotuner, key: tuple[Any, ...], config: Any, resolution: Resolution, ids: Sequence[str]
) -> None:
    """Triton's TRITON_PRINT_AUTOTUNING line for a key (once per key and process), counting
    only the configs the kernel declares (``ids``): a book's results for others are ignored."""
    total = len(ids)
    if resolution.source == "book":
        print(
            f"tunebook: {tuner.label} key {key}: best config {config} remembered in the book; "
            f"0 of {total} configs benchmarked"
        )
        return
    results = resolution.entry.results if resolution.entry is not None else {}
    measured = sum(1 for cid in ids if cid in results)
    known = max(0, measured - resolution.benchmarked)
    unmeasured = max(0, total - measured)
    why = f" ({resolution.why})" if resolution.why else ""
    print(
        f"Triton autotuning for function {tuner.label},\nwith key as {key},\n"
        f"finished after {resolution.seconds:.2f}s,\nbest config selected: {config};\n"
        f"tunebook: {resolution.benchmarked} of {total} configs benchmarked now, "
        f"{known} remembered in the book" + (f", {unmeasured} not measured{why}" if unmeasured else "")
    )
