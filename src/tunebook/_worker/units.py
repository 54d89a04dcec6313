"""What a long-lived worker (``python -m tunebook._worker --serve``) does with one request.

A sweep (``tunebook._sweep``) plans each key once, then hands its candidates out in small
units to many workers; each request is one JSON line on the worker's stdin:

    {"op": "plan", "id": 1, "job": {...}, "not_references": [...]}   (the job with "judge": true, see plan)
    {"op": "measure", "id": 2, "job": {...}, "cids": ["BLOCK=64|..."], "full": false, "ok_known": true,
     "not_references": ["BLOCK=32|..."]}
    {"op": "record", "id": 3, "job": {...}, "key": [...], "key_text": "...", "cid": "...",
     "config": {...}, "reason": "..."}

and the worker answers with JSON lines on stdout, ending each request with ``done`` or
``error``:

    {"event": "plan", "id": 1, "plan": {...}}            (see :func:`plan`)
    {"event": "candidate", "id": 2, "key_text": ..., "key": [...], "cid": ..., "config": {...}}
    {"event": "candidate", ..., "reference": true}       (launched as check='s would-be reference)
    {"event": "result", "id": 2, "key_text": ..., "key": [...], "cid": ..., "result": {...},
     "unexpected": false}                                (result None: skipped, no recorded grid)
    {"event": "done", "id": 2}
    {"event": "error", "id": 2, "reason": "..."}

* **Measured as a miss would measure.** The call is rebuilt as ``tunebook tune`` rebuilds it
  (the kernel's ``inputs=``, else the recorded layout); candidates, ids, the budget, the
  strategy and the hints are the autotuner's own; a config is timed by the same function
  as in ``tune_key`` (quick, or ``full`` for a contender), checked against the key's first
  config that runs when the kernel has ``check=`` (each would-be reference named to the
  session before it is launched, and those that took a worker down passed over:
  ``not_references``).
* **Kept here first.** Each result is appended to this worker's journal at once (the next
  config may take the process down; ``journal.py``), which the next worker folds into its
  book; the driver writes it into its own book when it arrives. A failure that points at
  the call rather than the config (``unexpected``: an exception not the backend's, or a
  timer's NaN or inf) is not kept while the key has no config that ran (``ok_known``), as in
  ``tune_key``.
* **Crashes are the supervisor's.** A config that kills the process is blamed by the
  session that runs this worker (``session.py``), which records it through ``record`` in
  the next worker.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._book import Result, now_iso
from .._jsonio import key_text as _key_text
from .._jsonio import stored_key

Emit = Callable[[dict[str, Any]], None]


@dataclass
class KeyContext:
    """One key's rebuilt call and candidates in this worker, kept for the key's next units."""

    tuner: Any
    call: Any
    key: tuple[Any, ...]
    key_text: str
    candidates: list[Any]
    ids: list[str]

    def by_id(self) -> dict[str, Any]:
        return dict(zip(self.ids, self.candidates))


_CONTEXTS: OrderedDict[str, KeyContext] = OrderedDict()
_KEEP = 4  # keys whose inputs stay allocated: a worker usually takes units of few keys at a time


def context(job: Mapping[str, Any]) -> KeyContext:
    """The key's call and candidates, rebuilt once per key and kept for its next units."""
    from .._call import Call
    from .child import locate, rebuild_call

    name = json.dumps([job["module"], job["attr"], job.get("call"), job.get("key")], sort_keys=True)
    if name in _CONTEXTS:
        _CONTEXTS.move_to_end(name)
        return _CONTEXTS[name]
    tuner = locate(job["module"], job["attr"])
    grid, args, kwargs = rebuild_call(tuner, job)
    call = Call.bind(tuner.arg_names, args, kwargs, grid)
    key, candidates = tuner.key_and_candidates(call)
    candidates = list(candidates)
    ctx = KeyContext(
        tuner, call, key, _key_text(key), candidates, [tuner.config_index.id_of(c) for c in candidates]
    )
    _CONTEXTS[name] = ctx
    while len(_CONTEXTS) > _KEEP:
        _CONTEXTS.popitem(last=False)
    return ctx


def handle(request: Mapping[str, Any], emit: Emit) -> None:
    """Answer one request (see the module docstring); exceptions are the caller's to report."""
    op, rid = request.get("op"), request.get("id")
    if op == "plan":
        emit({"event": "plan", "id": rid, "plan": plan(request["job"], request, emit)})
    elif op == "measure":
        measure(request, emit)
    elif op == "record":
        record(request)
    else:
        raise ValueError(f"unknown request {op!r}; expected plan, measure or record")
    emit({"event": "done", "id": rid})


def plan(
    job: Mapping[str, Any], request: Mapping[str, Any] | None = None, emit: Emit | None = None
) -> dict[str, Any]:
    """What the driver needs to search one key on this worker's platform (for the plan
    ``request``, whose reference search names its launches through ``emit``).

    ``key``/``key_text`` (the book's), ``ids`` and ``records`` of the candidates in order,
    ``hints`` and ``seeds`` (indices; ``_miss.earlier_seeds``), the ``strategy`` name
    (``auto`` resolved), ``seed``, ``budget`` ([max_configs, max_seconds], the effective
    one), ``adaptive`` (quick then full measurements), ``page`` (kernel, platform, slug and
    platform id: the book page results go to), ``known`` (this worker's book's entry for the
    key, or None) and ``settings`` (``_failures.settings_hash`` of ``check=``; None: off).
    A job with ``judge`` (a key whose wrong results the driver may judge again) also gets
    ``reference``: the config ``check=`` takes as reference here, run for it ("" if none runs).
    """
    from .. import _failures, _policy
    from .._miss import earlier_seeds, rule_hint, search_hints
    from .._search import choose_strategy
    from .._tuner import search_order, with_rule

    ctx = context(job)
    tuner = ctx.tuner
    ident = tuner.identity()
    page = tuner.page()
    page.refresh()
    entry = page.get(ctx.key_text)
    near = _policy.nearest(ctx.key, page.entries.values())
    hints = search_hints(tuner, page, ctx.key, ctx.ids, list(ctx.candidates), near)
    seeds = earlier_seeds(tuner, page, ctx.key, ctx.ids, list(ctx.candidates))
    budget = _policy.effective_budget(tuner.options.budget, len(ctx.ids))
    strategy = tuner.options.strategy
    if strategy == "auto":
        strategy = choose_strategy(len(ctx.ids), budget, search_order(seeds, hints))
    # fallback='s config joins the hints after the strategy is chosen, as in tune_key
    hints = with_rule(hints, rule_hint(tuner, ctx.key, ctx.ids, list(ctx.candidates)))
    return {
        "key": list(stored_key(ctx.key)),
        "key_text": ctx.key_text,
        "ids": ctx.ids,
        "records": [tuner.config_index.record_of(c) for c in ctx.candidates],
        "hints": list(hints),
        "seeds": list(seeds),
        "strategy": strategy,
        "seed": tuner.options.seed,
        "budget": [budget.max_configs, budget.max_seconds],
        "adaptive": tuner.timers().adaptive,
        "page": {
            "kernel": ident.kernel.to_json(),
            "platform": {**ident.platform, "id": ident.platform_id},
            "slug": ident.slug,
            "platform_id": ident.platform_id,
        },
        "known": entry.to_json() if entry is not None else None,
        "settings": _failures.settings_hash(tuner.options.check),
        **({"reference": reference(ctx, request, emit)} if job.get("judge") else {}),
    }


def reference(ctx: KeyContext, request: Mapping[str, Any] | None = None, emit: Emit | None = None) -> str:
    """The id of the config ``check=`` takes as the key's reference here, as a measure unit's
    bench takes it (the first candidate that runs, less the request's ``not_references``;
    each named through ``emit``), run for it; "" if none runs or checking is off."""
    from .._miss import _bench_function

    search = _reference_search(ctx, request, list(stored_key(ctx.key)), emit) if request and emit else None
    bench = _bench_function(ctx.tuner, ctx.call, ctx.candidates, search)
    judging = getattr(bench, "judging", None)  # a checking bench's (_check.CheckedBench)
    try:
        now = judging() if judging is not None else None
    finally:
        restore = getattr(bench, "restore", None)
        if restore is not None:
            restore()
    return now.reference if now is not None else ""


def measure(request: Mapping[str, Any], emit: Emit) -> None:
    """Time the configs ``cids`` of the request's key, one result event each."""
    from .._failures import no_timing
    from .._miss import _bench_function, _precompiler, unexpected_failure
    from .._tuner import time_candidate
    from .child import exit_if_gpu_broken, reporting

    ctx = context(request["job"])
    by_id = ctx.by_id()
    cids = list(request["cids"])
    foreign = [cid for cid in cids if cid not in by_id]
    if foreign:
        raise ValueError(
            f"{len(foreign)} config(s) of this unit are not candidates of key {ctx.key_text} here (e.g. "
            f"{foreign[0]}): the driver planned the key with other configs. Run the same tunebook and "
            "kernel code on every node."
        )
    tuner, rid = ctx.tuner, request["id"]
    configs = [by_id[cid] for cid in cids]
    key = list(stored_key(ctx.key))
    # Every candidate in the key's order, so that check= takes the key's first config that runs
    # as its reference, as a tuning in one process does.
    bench = _bench_function(tuner, ctx.call, ctx.candidates, _reference_search(ctx, request, key, emit))
    precompile = _precompiler(tuner, ctx.call)
    if precompile is not None:
        precompile(configs)
    timers = tuner.timers()
    full = bool(request.get("full"))
    timer, quick = (timers.full, False) if full else (timers.quick, timers.adaptive)
    page = _page_spec(tuner.page())
    ok_known = bool(request.get("ok_known"))
    find_reference = getattr(bench, "find_reference", None)  # a checking bench's
    try:
        if find_reference is not None:
            find_reference()  # before the first candidate is named: its launches are named as its
        for cid, config in zip(cids, configs):
            record_ = tuner.config_index.record_of(config)
            where = {"id": rid, "key_text": ctx.key_text, "key": key, "cid": cid}
            emit({"event": "candidate", **where, "config": record_})
            result, exc = time_candidate(bench, timer, config, record_, quick)
            # A timer's NaN or inf is held as the call's exceptions are (_failures.py).
            unexpected = (exc is not None and unexpected_failure(exc)) or (
                result is not None and no_timing(result)
            )
            with reporting:
                if result is not None:
                    ok_known = ok_known or result.ok
                    if ok_known or not unexpected:
                        _persist(page, ctx.key_text, key, cid, result)
                emit(
                    {
                        "event": "result",
                        **where,
                        "result": result.to_json() if result is not None else None,
                        "unexpected": unexpected,
                    }
                )
            if result is not None:
                exit_if_gpu_broken(cid, result)
    finally:
        restore = getattr(bench, "restore", None)
        if restore is not None:
            restore()


def _reference_search(ctx: KeyContext, request: Mapping[str, Any], key: list[Any], emit: Emit) -> Any:
    """Where check= looks for the key's reference in this unit: every candidate in order, less
    those this worker's book records unable to run for the key (as ``_miss`` passes them
    over in one process) and those the session saw take a worker down as the reference
    (``not_references``), each named to the session (a ``candidate`` event with
    ``reference``) before it is launched, so that a crash or hang there is blamed on it, not
    on the config about to be measured."""
    from .._check import ReferenceSearch
    from .._miss import cannot_run_positions

    page = ctx.tuner.page()
    page.refresh(ctx.key_text)
    skip = cannot_run_positions(ctx.ids, page.get(ctx.key_text), request.get("not_references") or ())

    def announce(i: int) -> None:
        record_ = ctx.tuner.config_index.record_of(ctx.candidates[i])
        where = {"id": request["id"], "key_text": ctx.key_text, "key": key, "cid": ctx.ids[i]}
        emit({"event": "candidate", **where, "config": record_, "reference": True})

    return ReferenceSearch(
        ids=ctx.ids,
        skip=skip,
        where=f"{ctx.tuner.label} key {ctx.key_text}",
        announce=announce,
    )


def record(request: Mapping[str, Any]) -> None:
    """Keep the failure of a config that took the previous worker down."""
    ctx = context(request["job"])
    result = Result(dict(request["config"]), None, str(request["reason"])[:2000], now_iso())
    page = _page_spec(ctx.tuner.page())
    _persist(page, ctx.key_text, list(stored_key(ctx.key)), request["cid"], result)


_journal: Any = None


def _persist(page: Mapping[str, Any], key_text: str, key: list[Any], cid: str, result: Result) -> None:
    global _journal
    if _journal is None:
        from .. import _settings
        from .journal import Journal

        _journal = Journal(_settings.book_dir())
    _journal.append(page, key_text, key, cid, result)


def _page_spec(page: Any) -> dict[str, Any]:
    """What a journal line says of its page: enough to write it into a book."""
    return {"file": page.file_name, "kernel": page.kernel.to_json(), "platform": dict(page.platform)}
