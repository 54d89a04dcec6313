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

from collections.abc import Iterable, Mapping
from typing import Any

from ._book import Result
from ._compat import is_sticky_gpu_error
from ._devices import here_model

# What time_candidate's result says of a timer's NaN or inf.
NO_TIMING = "no valid timing"

# Exception types whose failure is the config's (_compat.unrunnable_config_errors, WrongResult).
_CONFIG_ERRORS = (
    "OutOfResources",
    "CompileTimeAssertionFailure",
    "CompilationError",
    "PTXASError",
    "WrongResult",
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
