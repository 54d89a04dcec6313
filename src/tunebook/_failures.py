"""Which failed results are facts about their config, and which say nothing about it.

A config that cannot run here failed for its own reasons: the backend's "cannot run" errors
(out of resources, a failed ``tl.static_assert``, a compilation error, ptxas), a wrong result
under ``check=``, a crash or a hang that took its worker down, a launch that left the GPU
context unusable. The book keeps those, and the config is never measured again for the key.
A timer's NaN or inf, or any other exception (a grid function's, a hook's, the timer's), may
be the call's rather than the config's. While no config of a key has run, such failures are
not recorded on any path (in this process, a worker's, another rank's), and those a book
already holds (written by an older tunebook) are measured again by the next tuning of the key.

The rule reads a result as the book stores it, so that every path (``tune_key``, a worker's
result, a rank's, a book of another version) applies the same one.

A wrong result is a verdict of ``check=``, which depends on more than the config: the
reference config it was compared with and the tolerances and ignored arguments. Its reason
ends with what it was judged under (:class:`Judging`), and a key whose wrong results were
judged otherwise than the current tuning would judge them is tuned again from scratch
(:func:`judged_otherwise`); a wrong result an older tunebook wrote (no such ending) stands.

>>> from tunebook._book import Result
>>> says_nothing(Result({}, None, "no valid timing: [nan, nan, nan]"))
True
>>> says_nothing(Result({}, None, "ValueError: grid: the call is broken"))
True
>>> says_nothing(Result({}, None, "OutOfResources: out of resource: shared memory"))
False
>>> says_nothing(Result({}, None, "InterpreterError: AssertionError('BLOCK too small')"))
False
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ._book import Result
from ._compat import is_sticky_gpu_error
from ._devices import here_model

# What time_candidate's result says of a timer's NaN or inf.
NO_TIMING = "no valid timing"

# How many characters of a failure's reason the book keeps (time_candidate).
ERROR_LIMIT = 2000
WRONG_RESULT = "WrongResult"

# Exception types whose failure is the config's (_compat.unrunnable_config_errors, WrongResult).
_CONFIG_ERRORS = (
    "OutOfResources",
    "CompileTimeAssertionFailure",
    "CompilationError",
    "PTXASError",
    WRONG_RESULT,
)
# A failed tl.static_assert on Triton's interpreter (_compat.is_config_specific_error).
_INTERPRETER_ASSERT = "InterpreterError: AssertionError("
# What the supervisor records for a config that took its worker down (supervisor.run_jobs).
_WORKER_ENDED = ("timed out: ", "the worker process died")


def no_timing(result: Result) -> bool:
    """Whether a failed result is a timer's NaN or inf rather than an exception (time_candidate)."""
    return not result.ok and (result.error or "").startswith(NO_TIMING)


def says_nothing(result: Result) -> bool:
    """Whether ``result`` failed for a reason that may not be its config's."""
    if result.ok:
        return False
    error = (result.error or "").strip()
    name = error.split(":", 1)[0].strip()
    if name in _CONFIG_ERRORS or error.startswith(_INTERPRETER_ASSERT) or error.startswith(_WORKER_ENDED):
        return False
    # A launch that left the CUDA context unusable: measured again in a process, it would take
    # that process's context down.
    return not is_sticky_gpu_error(error)


def failed_for_good(result: Result) -> bool:
    """Whether ``result`` is a failure of its config that the book keeps for the key: never
    measured again, nor served for it.

    >>> failed_for_good(Result({}, None, "OutOfResources: out of resource: shared memory"))
    True
    >>> failed_for_good(Result({}, None, "no valid timing: [nan, nan, nan]"))
    False
    """
    return not result.ok and not says_nothing(result)


def is_wrong_result(result: Result) -> bool:
    """Whether ``result`` is a wrong result under ``check=`` (tagged with its Judging or not)."""
    return not result.ok and (result.error or "").startswith(WRONG_RESULT + ":")


# How a failure that check='s reference search recorded ends (_miss._reference_search): a
# config the search never chose, not counted against its max_configs (_tuner.tune_key).
_FOUND_AS_REFERENCE = " (found looking for check='s reference)"


def found_as_reference(failure: Result) -> Result:
    """``failure`` marked as one the reference search recorded; its start, which says what
    failed (:func:`says_nothing`), is kept."""
    return replace(failure, error=reason_found_as_reference(failure.error or ""))


def reason_found_as_reference(reason: str) -> str:
    """A failure's ``reason`` marked as :func:`found_as_reference` marks it (a supervisor's,
    for a would-be reference that took its worker down)."""
    return reason[: ERROR_LIMIT - len(_FOUND_AS_REFERENCE)] + _FOUND_AS_REFERENCE


def by_reference_search(result: Result) -> bool:
    """Whether ``result`` is a failure :func:`found_as_reference`."""
    return not result.ok and (result.error or "").endswith(_FOUND_AS_REFERENCE)


def to_measure_again(results: Mapping[str, Result], ids: Iterable[str]) -> set[str]:
    """The candidates ``ids`` whose recorded failures in ``results`` are measured again: those
    that say nothing about their config, while none of the candidates has run."""
    mine = [cid for cid in ids if cid in results]
    if any(results[cid].ok for cid in mine):
        return set()
    return {cid for cid in mine if says_nothing(results[cid])}


class NoneRan:
    """What was said of each key where no config ran (``_tuner.none_ran``), by the config
    launched in their place, for the error of that launch if it fails too. Kept per platform
    (a host of several GPU models: one GPU's "nothing ran" is not another's) and forgotten
    when the key is decided again. Used under the autotuner's lock.

    >>> record = NoneRan()
    >>> record.decided(("k",), "a", "none of the 4 configs measured ran"); record.said(("k",), "a")
    'none of the 4 configs measured ran'
    >>> record.decided(("k",), "b", ""); record.said(("k",), "a") is None
    True
    """

    def __init__(self) -> None:
        self._said: dict[tuple[Any, Any, str], str] = {}  # (platform, key, config id) -> words

    def decided(self, key: Any, cid: str, said: str) -> None:
        """``key`` was decided to ``cid`` on this device's platform; ``said`` if no config ran."""
        if not self._said and not said:
            return
        where = here_model()
        for old in [k for k in self._said if k[0] == where and k[1] == key]:
            del self._said[old]
        if said:
            self._said[(where, key, cid)] = said

    def said(self, key: Any, cid: str) -> str | None:
        """What was said where ``cid`` was launched for ``key`` in place of configs none of
        which ran, on this device's platform; None otherwise."""
        return self._said.get((here_model(), key, cid)) if self._said else None


# How a wrong result's reason ends: `` [checked against <reference id>; settings <hash>]``.
_AGAINST = " [checked against "
_SETTINGS = "; settings "


@dataclass(frozen=True)
class Judging:
    """What ``check=`` judges a key's candidates under: the id of its reference config and a
    short hash of its settings (:func:`settings_hash`). A wrong result's reason carries it
    (:meth:`tag`), readable and parsed back by :func:`judged_under`.

    >>> from tunebook._book import Result
    >>> judging = Judging("BLOCK=16|", "0123456789ab")
    >>> error = "WrongResult: " + judging.tag("wrong result: out differs")
    >>> error
    'WrongResult: wrong result: out differs [checked against BLOCK=16|; settings 0123456789ab]'
    >>> judged_under(Result({}, None, error)) == judging
    True
    >>> judged_under(Result({}, None, "WrongResult: wrong result: out differs")) is None  # an older book's
    True
    """

    reference: str
    settings: str

    def tag(self, reason: str) -> str:
        """``reason`` ending with this judging, short enough that the book keeps it whole."""
        tag = f"{_AGAINST}{self.reference}{_SETTINGS}{self.settings}]"
        room = ERROR_LIMIT - len(WRONG_RESULT + ": ") - len(tag)
        if len(reason) > room:
            reason = reason[: max(room - 3, 0)] + "..."
        return reason + tag


def judged_under(result: Result) -> Judging | None:
    """What a wrong result was judged under; None for any other result, and for a wrong
    result an older tunebook recorded (its reason says nothing of it)."""
    error = result.error or ""
    if not is_wrong_result(result) or not error.endswith("]"):
        return None
    start = error.rfind(_AGAINST)
    middle = error.rfind(_SETTINGS)
    if start < 0 or middle < start:
        return None
    return Judging(error[start + len(_AGAINST) : middle], error[middle + len(_SETTINGS) : -1])


def settings_hash(check: Mapping[str, Any] | None) -> str | None:
    """A short hash of what ``check=``'s verdicts depend on (the tolerance of every dtype,
    the ignored arguments; not ``max_bytes``, which refuses a call but judges no config);
    None where checking is off.

    >>> settings_hash({}) == settings_hash({"max_bytes": 1 << 20}), settings_hash(None)
    (True, None)
    >>> settings_hash({}) == settings_hash({"rtol": 0.5})
    False
    """
    if check is None:
        return None
    from ._check import DEFAULT_ATOL, DEFAULT_RTOL, _tolerances  # _check imports nothing of ours back

    settings = {
        "rtol": _tolerances(DEFAULT_RTOL, check.get("rtol"), "rtol"),
        "atol": _tolerances(DEFAULT_ATOL, check.get("atol"), "atol"),
        "ignore": sorted(set(check.get("ignore", ()))),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def expected_reference(results: Mapping[str, Result], ids: Iterable[str]) -> str | None:
    """The config ``check=`` takes as reference for a key, as far as the book tells: the first
    of ``ids`` (the call's order) not recorded as failing but for a wrong result or a timer's
    NaN (a config that cannot run fails the reference run too)."""
    for cid in ids:
        result = results.get(cid)
        if result is None or result.ok or is_wrong_result(result) or no_timing(result):
            return cid
    return None


def judged_otherwise(results: Mapping[str, Result], ids: Iterable[str], now: Judging | None) -> bool:
    """Whether some wrong result of the candidates ``ids`` was judged under something other
    than ``now`` (None: ``check=`` is off now): their verdicts no longer hold, and the key is
    tuned again from scratch, every candidate measured and judged again.

    >>> from tunebook._book import Result
    >>> wrong = Result({}, None, "WrongResult: " + Judging("a", "h1").tag("wrong result"))
    >>> results = {"a": Result({}, (1.0, 1.0, 1.0)), "b": wrong}
    >>> judged_otherwise(results, ["a", "b"], Judging("a", "h1")), judged_otherwise(results, ["a", "b"], None)
    (False, True)
    >>> judged_otherwise(results, ["b", "a"], Judging("b", "h1")), judged_otherwise(results, ["a"], None)
    (True, False)
    """
    verdicts = {v for cid in ids if cid in results and (v := judged_under(results[cid])) is not None}
    return bool(verdicts) and (now is None or verdicts != {now})


def tagged(results: Mapping[str, Result], ids: Iterable[str]) -> bool:
    """Whether some result of the candidates ``ids`` is a wrong result that says what it was
    judged under: only such a key is ever judged again."""
    return any(judged_under(results[cid]) is not None for cid in ids if cid in results)


def stale_verdicts(
    results: Mapping[str, Result], ids: Sequence[str], check: Mapping[str, Any] | None
) -> bool:
    """:func:`stale_under` the settings of ``check=`` (the kernel's option; None: off)."""
    # Nothing judged under tags is the common case: decided without hashing the settings.
    return tagged(results, ids) and (check is None or stale_under(results, ids, settings_hash(check)))


def stale_under(results: Mapping[str, Result], ids: Sequence[str], settings: str | None) -> bool:
    """:func:`judged_otherwise` against what a tuning under ``settings`` (:func:`settings_hash`
    of ``check=``; None: off) would judge under, as far as the book tells
    (:func:`expected_reference`): decided without running anything, where a key may be
    answered from the book (a miss, a sweep's plan). A tuning confirms it with
    :func:`judged_again` before it measures anything again."""
    if settings is None:
        return tagged(results, ids)
    reference = expected_reference(results, ids)
    return reference is not None and judged_otherwise(results, ids, Judging(reference, settings))


def judged_again(
    results: Mapping[str, Result], ids: Sequence[str], judging: Callable[[], Judging | None] | None
) -> bool:
    """Whether a tuning of the candidates ``ids`` measures and judges them all again: some
    wrong result of theirs was judged otherwise than the tuning judges, which ``judging`` says
    (a checking bench's ``judging``, which runs the reference config if it did not yet; None
    if ``check=`` is off now). Asked only where a verdict is tagged. The one rule of
    ``tune_key`` (``_tuner.judged_again``) and a sweep's plan (``_sweep/schedule.py``).

    >>> from tunebook._book import Result
    >>> wrong = Result({}, None, "WrongResult: " + Judging("a", "h1").tag("wrong result"))
    >>> results = {"a": Result({}, (1.0, 1.0, 1.0)), "b": wrong}
    >>> judged_again(results, ["a", "b"], lambda: Judging("a", "h1")), judged_again(results, ["a", "b"], None)
    (False, True)
    >>> judged_again(results, ["a", "b"], lambda: None)  # no candidate runs: nothing is judged
    False
    """
    if not tagged(results, ids):
        return False
    if judging is None:
        return True
    now = judging()
    return now is not None and judged_otherwise(results, ids, now)


def superseded(
    results: Mapping[str, Result], ids: Iterable[str], now: Judging | None, at: str
) -> dict[str, Result]:
    """The wrong results of the candidates ``ids`` still judged otherwise than ``now`` (None:
    ``check=`` off) after a tuning that judged the key again: those its budget did not measure
    again. Returned untagged (recorded ``at``), as an older tunebook's are, which judge no key
    again: else the key was judged again, and measured, in every later process. The config
    stays failed for the key.

    >>> from tunebook._book import Result
    >>> wrong = Result({}, None, "WrongResult: " + Judging("a", "h1").tag("wrong result"))
    >>> superseded({"b": wrong}, ["b"], Judging("c", "h1"), "now")["b"].error
    'WrongResult: wrong result (checked against a, not judged again)'
    >>> superseded({"b": wrong}, ["b"], Judging("a", "h1"), "now")
    {}
    """
    out = {}
    for cid in ids:
        result = results.get(cid)
        verdict = judged_under(result) if result is not None else None
        if result is None or verdict is None or verdict == now:
            continue
        reason = (result.error or "")[: (result.error or "").rfind(_AGAINST)]
        out[cid] = replace(
            result, error=f"{reason} (checked against {verdict.reference}, not judged again)", at=at
        )
    return out


def doubted_reference(results: Mapping[str, Result], ids: Iterable[str]) -> str | None:
    """The reference config of a key whose every other candidate checked against it, two at
    least, disagreed with it, while none agreed: then the reference is the likelier one to
    be wrong. None otherwise.

    >>> from tunebook._book import Result
    >>> ok = Result({}, (1.0, 1.0, 1.0))
    >>> wrong = Result({}, None, "WrongResult: " + Judging("a", "h").tag("x"))
    >>> doubted_reference({"a": ok, "b": wrong, "c": wrong}, "abc")
    'a'
    >>> doubted_reference({"a": ok, "b": wrong, "c": wrong, "d": ok}, "abcd") is None
    True
    """
    verdicts = {cid: judged_under(results[cid]) for cid in ids if cid in results}
    references = {v.reference for v in verdicts.values() if v is not None}
    if len(references) != 1:
        return None
    (reference,) = references
    disagreed = sum(1 for cid, v in verdicts.items() if v is not None and cid != reference)
    agreed = any(results[cid].ok for cid in verdicts if cid != reference)
    return reference if disagreed >= 2 and not agreed else None
