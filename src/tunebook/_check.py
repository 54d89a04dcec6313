"""Result checking: every candidate config must compute what a reference config computes.

A config that runs fast but writes the wrong answer (a mask bug that only one block size
hits, a race that only one ``num_warps`` exposes) would otherwise win the tuning and be
remembered. :class:`OutputCheck` runs each candidate once on the same inputs as a
reference run and compares every tensor argument afterwards.

Contract:

* **Same inputs for every run.** The tensor arguments are snapshotted on construction;
  :meth:`OutputCheck.reference` and :meth:`OutputCheck.check` copy the snapshot back in
  place before their run and again after it, so in-place kernels (``acc += x``), atomics
  into an output and scratch buffers all start from the caller's values every time, and
  the runs between (timing) cannot leak into the next check.
* **What is compared**: every tensor argument (positional or keyword, not nested in tuples)
  except those named in ``ignore``: outputs, and inputs too, since a config that writes
  out of bounds into an input is as wrong as one that miscomputes its output.
* **Equality**: integers, bool and ``float8_e8m0fnu`` (a pure exponent) exactly; floating
  point within ``atol * max|ref| + rtol * |ref|`` per element (``max|ref|``: the largest
  finite magnitude in the reference's value of that argument), tolerances per dtype
  (:data:`DEFAULT_RTOL`, :data:`DEFAULT_ATOL`); NaN equals NaN at the same place and
  nothing else; an infinity equals only the same infinity. Complex tensors are compared
  as their real and imaginary parts, counted per complex element.
* **Memory**: the snapshot holds a copy of every tensor argument, on its device (the
  arguments' memory, twice over), and the reference keeps a copy of each argument its
  run changed (the outputs). Construction refuses with :class:`SnapshotTooLarge` when the
  snapshot alone would exceed ``max_bytes``. Comparisons work a piece at a time
  (``_compare.py``: whether a run changed an argument in its raw bits, float8 in its bytes;
  within tolerances, each piece widened to float32), so their temporaries stay a few
  hundred MB at most.
* **A failing check is not a failing run.** If ``run`` raises, its exception propagates;
  if restoring or comparing raises in :meth:`OutputCheck.reference` (device memory, a
  dtype PyTorch cannot copy here), :class:`CheckUnavailable` does: the caller tells
  a config that cannot run from a check that cannot.
* **Not thread-safe**: one OutputCheck belongs to one tuning, which the autotuner
  already serializes.

Example (runs on a CPU; ``run`` stands for launching one config of a kernel)::

    >>> import torch
    >>> x, out = torch.arange(4.0), torch.zeros(4)
    >>> check = OutputCheck((x, out), {}, names=["x", "out"])
    >>> check.reference(lambda: torch.add(x, 1, out=out), name="x + 1")
    >>> check.check(lambda: torch.add(x, 1, out=out)) is None
    True
    >>> print(check.check(lambda: torch.sub(x, 1, out=out)))  # doctest: +NORMALIZE_WHITESPACE
    wrong result: out differs from the reference config x + 1 in 4 of 4 elements
    (max abs error 2, tolerance 0.008 + 0.002*|ref|, first at index (0,): got -1, ref 1); to
    accept differences of this size, give check= a larger rtol/atol for float32, or add out to
    its ignore list
    >>> check.restore(); out.tolist()
    [0.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _compare, _warnings
from ._errors import SnapshotTooLarge, WrongResult

# Floating tolerances by dtype name. A candidate may sum in another order than the
# reference (split-K, atomics), so outputs of reductions legitimately differ by more than
# a rounding of the output dtype. Measured on an H200 (docs/result-checking.md): a fp32
# GEMM through TF32 ``tl.dot`` with one accumulator is itself 0.08% (K = 65536) to 0.3%
# (K = 2^20) of max|C| off the exact product, and a split-K config differs from it by as
# much; 2e-3 covers that up to K = 2^20. fp16/bf16 outputs add their own rounding (one ulp
# is 2^-10 ~ 1e-3 and 2^-7 ~ 8e-3 relative). The bugs the check exists for (a wrong op, a
# tail left unwritten, a wrong offset) are off by the size of the values themselves.
DEFAULT_RTOL: Mapping[str, float] = {
    "float16": 1e-2,
    "bfloat16": 2e-2,
    "float32": 2e-3,
    "float64": 1e-7,
    "float8_e4m3fn": 0.25,  # 3 mantissa bits: one ulp is 0.125 relative
    "float8_e4m3fnuz": 0.25,
    # 2 mantissa bits: one ulp is 0.25 relative. Not 0.5 (two ulps): at an output's largest
    # element rtol and atol add up, and at 0.5 each an output of zeros passed everywhere.
    "float8_e5m2": 0.25,
    "float8_e5m2fnuz": 0.25,
}
# The absolute part is in units of the argument's largest finite |ref|: a GEMM element is a
# sum of products, and the rounding error of another summation order scales with the size
# of those products, not with the element, which cancellation can bring near zero. Scaled
# so, one tolerance serves outputs of any magnitude, and a kernel whose outputs are all
# tiny (softmax over a large vocabulary) cannot pass by writing zeros.
DEFAULT_ATOL: Mapping[str, float] = dict(DEFAULT_RTOL)
# Beyond this many bytes of snapshot, OutputCheck refuses (the snapshot lives on the
# arguments' device, next to them).
DEFAULT_MAX_BYTES = 4 << 30
# The most a floating dtype with no entry above is allowed (rtol, and atol in units of
# max|ref|): 10 eps alone gave float8_e8m0fnu (eps 1) 10, and any output passed. At an
# output's largest element the two add up, and an output of zeros passes there once
# rtol + atol reaches 1; at 0.25 each (float8_e4m3fn's, two of its ulps) a candidate off by
# half its largest value fails, and the bugs the check exists for are off by the size of
# the values themselves.
_MAX_FALLBACK = 0.25

Tolerance = float | Mapping[Any, float]


class CheckUnavailable(RuntimeError):
    """The check itself could not run: restoring the arguments or comparing them raised
    (device memory, a dtype PyTorch cannot copy here), not the run it checks."""


@contextlib.contextmanager
def _checking(what: str) -> Iterator[None]:
    """Raise what fails inside as :class:`CheckUnavailable`, saying it was ``what``."""
    try:
        yield
    except Exception as exc:
        raise CheckUnavailable(f"{what} raised {type(exc).__name__}: {exc}") from exc


@dataclass
class _Arg:
    """One distinct tensor argument: where it lives and what it held."""

    names: list[str]  # more than one when the same tensor is passed twice
    tensor: Any
    target: Any  # what is snapshotted and restored: the tensor, or its whole storage span
    snapshot: Any
    expected: Any = None  # after the reference run; None: the reference left it unchanged

    @property
    def label(self) -> str:
        return " and ".join(self.names)

    def original(self) -> Any:
        """The snapshot seen through the argument's own shape and strides."""
        if self.target is self.tensor:
            return self.snapshot
        return self.snapshot.as_strided(self.tensor.size(), self.tensor.stride(), 0)


class OutputCheck:
    """Runs configs on the same inputs and tells which ones disagree with a reference.

    ``args`` and ``kwargs`` are the kernel call's arguments (the same objects the runs
    launch with: restoring is in place). ``names`` are the kernel's argument names, for
    the reasons (default ``argument 0``, ``argument 1``...). ``rtol`` and ``atol`` replace
    the defaults: one float for every floating dtype, or a mapping from dtype (a
    ``torch.dtype`` or its name, ``"float16"``) to float, merged over the defaults.
    ``ignore`` names arguments not to compare (scratch buffers, locks, outputs that are
    legitimately different per config such as the order of ties); they are still restored.
    """

    def __init__(
        self,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        names: Sequence[str] | None = None,
        rtol: Tolerance | None = None,
        atol: Tolerance | None = None,
        ignore: Collection[str] = (),
        max_bytes: int | None = None,
    ) -> None:
        import torch

        self._rtol = _tolerances(DEFAULT_RTOL, rtol, "rtol")
        self._atol = _tolerances(DEFAULT_ATOL, atol, "atol")
        self._ignore = frozenset(ignore)
        self._has_reference = False
        self._reference_name = ""
        positional = list(names or ())
        positional += [f"argument {i}" for i in range(len(positional), len(args))]
        named = [*zip(positional, args), *kwargs.items()]
        # The same tensor passed twice (out aliasing an input) is snapshotted once.
        distinct: dict[tuple[Any, ...], list[str]] = {}
        tensors: dict[tuple[Any, ...], Any] = {}
        for name, value in named:
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                identity = (value.device, value.data_ptr(), value.dtype, value.size(), value.stride())
                distinct.setdefault(identity, []).append(name)
                tensors.setdefault(identity, value)
        targets = {k: _restorable(t) for k, t in tensors.items()}
        self.nbytes = sum(t.numel() * t.element_size() for t in targets.values())
        max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        if self.nbytes > max_bytes:
            sizes = [(t.numel() * t.element_size(), " and ".join(distinct[k])) for k, t in targets.items()]
            largest = sorted(sizes, reverse=True)[:3]
            raise SnapshotTooLarge(
                f"tunebook: result checking needs a snapshot of the kernel's tensor arguments of "
                f"{_size(self.nbytes)} ({', '.join(f'{n} {_size(b)}' for b, n in largest)}), more than "
                f"max_bytes={_size(max_bytes)}; the snapshot lives on the arguments' device. Raise the limit "
                "(check={'max_bytes': ...}), tune on smaller inputs of the same key, or set check=False."
            )
        with torch.no_grad():
            self._args = [_Arg(distinct[k], tensors[k], targets[k], targets[k].clone()) for k in tensors]

    @property
    def names(self) -> list[str]:
        """The labels of the snapshotted tensor arguments, in argument order."""
        return [a.label for a in self._args]

    def restore(self) -> None:
        """Put the caller's original values back into every tensor argument, in place."""
        import torch

        with torch.no_grad():
            for arg in self._args:
                arg.target.copy_(arg.snapshot)

    def reference(self, run: Callable[[], Any], name: str = "") -> None:
        """Run the reference once on the original inputs and keep what it changed.

        ``run`` launches the reference config (or any callable writing the same outputs,
        e.g. a PyTorch implementation); ``name`` names it in the reasons. If ``run`` raises,
        the inputs are restored and its exception propagates; if restoring the inputs or
        comparing them raises, :class:`CheckUnavailable` does, from that error. Either way
        no reference is set.
        """
        import torch

        with _checking("restoring the arguments from the snapshot"):
            self.restore()
        try:
            run()
            with _checking("comparing the reference's arguments with the snapshot"), torch.no_grad():
                changed = [
                    None if _compare.unchanged(arg.tensor, arg.original()) else arg.tensor.clone()
                    for arg in self._args
                ]
        finally:
            with _checking("restoring the arguments from the snapshot"):
                self.restore()
        for arg, expected in zip(self._args, changed):
            arg.expected = expected
        self._has_reference = True
        self._reference_name = name

    def check(self, run: Callable[[], Any], *, own: bool = False) -> str | None:
        """Run a candidate once on the original inputs; None if it matches, else why not.

        If ``run`` raises, the inputs are restored and the exception propagates (a config
        that cannot run is the caller's failure to record, not a wrong result). ``own``:
        the candidate is the reference config itself, run again (a mismatch then says the
        kernel is not deterministic).
        """
        import torch

        if not self._has_reference:
            raise RuntimeError(
                "tunebook: OutputCheck.check() was called before reference(); run the reference "
                "config first, through reference(run)."
            )
        self.restore()
        try:
            run()
            with torch.no_grad():
                for arg in self._args:
                    if all(n in self._ignore for n in arg.names):
                        continue
                    expected = arg.expected if arg.expected is not None else arg.original()
                    reason = self._reason(arg, expected, own)
                    if reason is not None:
                        return reason
            return None
        finally:
            self.restore()

    def _reason(self, arg: _Arg, ref: Any, own: bool) -> str | None:
        """Why ``arg`` differs from ``ref`` (its expected value), or None if it does not."""
        got = arg.tensor
        part = _compare.element_dtype(got.dtype)
        exact = _compare.exact_dtype(part)
        rtol = 0.0 if exact else self._tolerance(self._rtol, part)
        # atol is relative to the largest finite reference value (see DEFAULT_ATOL).
        atol = 0.0 if exact else self._tolerance(self._atol, part) * _compare.largest(ref)
        found = _compare.Mismatches()
        for g, r in zip(_compare.pieces(got), _compare.pieces(ref)):
            found.add(g, r, exact, rtol, atol)
        if not found.count:
            return None
        parts = [f"max abs error {found.max_err:.3g}"] if found.max_err >= 0 else []
        parts.append(f"tolerance {'exact' if exact else f'{atol:.3g} + {rtol:.3g}*|ref|'}")
        this, other = ("this run", "the earlier run") if own else ("the candidate", "the reference")
        if found.nan_got:
            parts.append(f"{found.nan_got} of them NaN in {this} only")
        if found.nan_ref:
            parts.append(f"{found.nan_ref} of them NaN in {other} only")
        index = _unravel(found.first, tuple(got.size()))
        parts.append(f"first at index {index}: got {found.got}, ref {found.ref}")
        verb, them = ("differ", "them") if len(arg.names) > 1 else ("differs", "it")
        whom = "its own earlier run" if own else f"the reference config {self._reference_name}".strip()
        head = f"wrong result: {arg.label} {verb} from {whom} in {found.count} of {got.numel()} elements"
        if exact:
            accept = f"if {arg.label} may rightly differ between configs, add {them} to check='s ignore list"
        else:
            accept = (
                f"to accept differences of this size, give check= a larger rtol/atol for "
                f"{_dtype_name(part)}, or add {arg.label} to its ignore list"
            )
        why = ": the kernel is not deterministic" if own else ""
        # No closing bracket at the end: the tuning loop may append a tag to the reason.
        return f"{head} ({', '.join(parts)}){why}; {accept}"

    def _tolerance(self, table: Mapping[str, float], dtype: Any) -> float:
        """The tolerance of ``dtype`` in ``table``: its own, else the one for every dtype, else
        about as many ulps as the defaults allow fp16, at most :data:`_MAX_FALLBACK`."""
        name = _dtype_name(dtype)
        if name in table:
            return table[name]
        return table.get("*", min(_fallback(dtype), _MAX_FALLBACK))


def _restorable(t: Any) -> Any:
    """What to snapshot and copy back for ``t``: itself, or the span of storage it covers.

    ``copy_`` into a tensor whose elements share memory (a stride-0 ``expand``) is refused
    by PyTorch, so such an argument is restored through a flat view of the storage span
    its elements occupy. The test below is a cheap sufficient condition for no overlap.
    """
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.size()) if sz > 1)
    reach = 1
    for stride, size in dims:
        if stride < reach:
            span = 1 + sum((sz - 1) * st for st, sz in zip(t.stride(), t.size()))
            return t.as_strided((span,), (1,), t.storage_offset())
        reach = stride * size
    return t


def _tolerances(defaults: Mapping[str, float], given: Tolerance | None, what: str) -> dict[str, float]:
    """The tolerance table by dtype name; "*" holds a single float given for every dtype."""
    if given is None:
        return dict(defaults)
    # Anything but a mapping is one value for every dtype (checked below: 'a' is refused
    # by name, where it failed with "'str' object has no attribute 'items'").
    pairs = list(given.items()) if isinstance(given, Mapping) else [("*", given)]
    # A "*" entry stands for every dtype, so the defaults do not outrank it.
    out = {} if any(k == "*" for k, _ in pairs) else dict(defaults)
    given_as: dict[str, Any] = {}
    for dtype, value in pairs:
        name = _tolerance_key(dtype, what)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            dtypes = "every dtype" if name == "*" else name
            raise ValueError(
                f"tunebook: check {what} for {dtypes} is {value!r}; give a number >= 0 "
                f"(one for every dtype, or a mapping such as {{torch.float16: 1e-2}})."
            )
        if name in given_as and out[name] != float(value):
            raise ValueError(
                f"tunebook: check {what} gives {name} two values, {out[name]!r} under {given_as[name]!r} "
                f"and {value!r} under {dtype!r} (a complex dtype's tolerance is its parts' dtype's); "
                "give it one."
            )
        given_as[name] = dtype
        out[name] = float(value)
    return out


def _tolerance_key(dtype: Any, what: str) -> str:
    """The table's name for a key of a tolerance mapping: a floating dtype's name, or a complex
    one's parts' (complex values are compared as their real and imaginary parts); "*" as is."""
    import torch

    if isinstance(dtype, str) and dtype == "*":
        return "*"
    found = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if isinstance(found, torch.dtype) and found.is_complex:
        found = found.to_real()
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return _dtype_name(found)
    dtypes = {d for d in vars(torch).values() if isinstance(d, torch.dtype)}
    valid = sorted(_dtype_name(d) for d in dtypes if d.is_floating_point or d.is_complex)
    raise ValueError(
        f"tunebook: check {what} is given for {dtype!r}, which is not a floating or complex torch dtype; "
        f"its keys are torch dtypes or their names ({', '.join(valid)}), or '*' for every dtype."
    )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _fallback(dtype: Any) -> float:
    """For a floating dtype with no entry: about as many ulps as the defaults allow fp16."""
    import torch

    return 10 * float(torch.finfo(dtype).eps)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _size(nbytes: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor:
            return f"{nbytes / factor:.1f} {unit}"
    return f"{nbytes} B"


@dataclass(frozen=True)
class ReferenceSearch:
    """Where :class:`CheckedBench` looks for its reference, and whom it tells what it finds.

    The reference is the first candidate, in list order, that runs. Those at ``skip``
    (recorded unable to run for this key) are not launched for it. ``record(i, exc)``
    hears of each candidate whose launch raised the backend's error for a config that
    cannot run (``_compat.is_unrunnable_config_error``, as the tuning loop classifies it), to
    record it as that config's failure; ``announce(i)`` of each before it is launched.
    ``ids`` name the candidates, ``where`` the kernel and key, in messages.

    >>> list(ReferenceSearch(skip={0, 2}).order(4))
    [1, 3]
    """

    ids: Sequence[str] = ()
    skip: Collection[int] = frozenset()
    record: Callable[[int, BaseException], None] | None = None
    where: str = "kernel"
    # Hears of each candidate just before it is launched as the would-be reference: a worker
    # tells its supervisor, so that a crash or hang there is blamed on that config, not on
    # the candidate about to be measured (which the supervisor would record as hung for good,
    # while the next worker's search hung on the same config again).
    announce: Callable[[int], None] | None = None

    def order(self, n: int) -> Iterator[int]:
        """The candidates (indices below ``n``) to try as the reference, in turn."""
        return (i for i in range(n) if i not in self.skip)

    def name(self, i: int, candidate: Any) -> str:
        return self.ids[i] if i < len(self.ids) else str(candidate)


class CheckedBench:
    """Benchmarking with ``check=``: before a config is timed the first time, its output is
    compared with the reference config's on the same inputs; a mismatch raises
    :class:`~tunebook.WrongResult`, which the tuning loop records as that config's failure.

    The reference is the first candidate that runs (:class:`ReferenceSearch`), found when the
    first config is measured. A candidate whose launch fails there is passed over; one that
    cannot run (the backend's error) is recorded through the search, and raises the same
    error without a launch when measured later. If the check itself fails there
    (:class:`CheckUnavailable`), the key is measured unchecked and that is said once, loudly.
    ``bench(timer, config)`` times with ``timer`` and the launch ``timed(config)`` returns;
    ``restore()`` puts the caller's inputs back afterwards, so its own launch sees what it
    passed.
    """

    def __init__(
        self,
        checker: OutputCheck,
        candidates: Sequence[Any],
        run_once: Callable[[Any], None],
        timed: Callable[[Any], Callable[[], None]],
        quantiles: Sequence[float],
        search: ReferenceSearch | None = None,
    ) -> None:
        self._checker = checker
        self._candidates = candidates  # read in order until one runs: a Space's Configs made as read
        self._search = search or ReferenceSearch()
        # id(config) -> the error it raised as a would-be reference, raised again when measured
        self._cannot_run: dict[int, BaseException] = {}
        self._run_once = self._unless_cannot_run(run_once)
        self._timed = self._unless_cannot_run(timed)
        self._quantiles = quantiles
        self._reference: Any = None  # None: not chosen yet; False: no candidate runs, or no check
        self._unavailable = False  # the check itself failed (said once)
        self._checked: set[int] = set()

    def _unless_cannot_run(self, launch: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def guarded(config: Any) -> Any:
            known = self._cannot_run.get(id(config))
            if known is not None:
                raise known
            return launch(config)

        return guarded

    def find_reference(self) -> None:
        """Look for the reference (once; the first measurement does, if nothing did before). A
        tuning loop that tells a supervisor which config it launches calls it before it names
        its first candidate, so that the search's own launches are named as theirs."""
        if self._reference is not None:
            return
        from . import _compat

        self._reference = False  # unless a candidate runs below
        for i in self._search.order(len(self._candidates)):
            candidate = self._candidates[i]
            name = self._search.name(i, candidate)
            if self._search.announce is not None:
                self._search.announce(i)
            try:
                self._checker.reference(functools.partial(self._run_once, candidate), name=name)
            except CheckUnavailable as exc:
                self._give_up(exc)
                return
            except Exception as exc:  # the candidate's own launch: the next one is tried
                if _compat.is_unrunnable_config_error(exc):
                    self._cannot_run[id(candidate)] = exc
                    if self._search.record is not None:
                        self._search.record(i, exc)
                continue
            self._reference = candidate
            return

    def _give_up(self, exc: CheckUnavailable) -> None:
        self._unavailable = True
        # Not raised: a bench's exception is the measured config's failure to the tuning loop,
        # and a call that runs unchecked, saying so, beats one that fails for the check's sake.
        _warnings.warn_once(
            f"check-unavailable:{self._search.where}",
            "tunebook: %s: check= could not run: %s. The key's configs are measured without checking "
            "their results, so what the book records for the key is unchecked. Fix the cause (device "
            "memory, a dtype PyTorch cannot copy here) or set check=False for this kernel, and delete "
            "the key's file in the page so that the key is tuned again",
            self._search.where,
            exc,
        )

    # What a wrong result says it was judged under (_failures.Judging), set by judge_under.
    _id_of: Callable[[Any], str] | None = None
    _settings = ""

    def judge_under(self, id_of: Callable[[Any], str], settings: str) -> None:
        """Tag every wrong result with the reference's id (``id_of(config)``) and ``settings``
        (the hash of ``check=``'s settings), so that a key is judged again when they change."""
        self._id_of, self._settings = id_of, settings

    def judging(self) -> Any:
        """What this tuning judges under (a ``_failures.Judging``), the reference chosen now if
        it was not yet; None if no candidate runs (nothing is judged) or judge_under was not
        called."""
        from ._failures import Judging

        self.find_reference()
        if self._reference is False or self._id_of is None:
            return None
        return Judging(self._id_of(self._reference), self._settings)

    def __call__(self, timer: Callable[..., Any], config: Any) -> Any:
        self.find_reference()
        if self._reference is not False and id(config) not in self._checked:
            self._checked.add(id(config))
            reason = self._checker.check(lambda: self._run_once(config), own=config is self._reference)
            if reason is not None:
                judging = self.judging()
                raise WrongResult(reason if judging is None else judging.tag(reason))
        return timer(self._timed(config), quantiles=self._quantiles)

    def restore(self) -> None:
        try:
            self._checker.restore()
        except Exception:
            if not self._unavailable:
                raise
            # Said already; the key was measured as without check=, which restores nothing.
