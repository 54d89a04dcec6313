"""``Space``: a declarative config space, cheap to hold even at 10^5 configs.

A space is a product of parameter value lists, cut down by constraints::

    Space(BLOCK_M=[32, 64, 128], BLOCK_N=[32, 64, 128], BLOCK_K=[32, 64],
          num_warps=[4, 8], num_stages=range(2, 6),
          constraints=[lambda c: c["BLOCK_M"] >= c["BLOCK_N"]],
          arg_constraints=[lambda c, args: c["BLOCK_K"] <= args["K"]])

Parameter names are the kernel's meta-parameters plus any option field of the installed
Triton's ``Config`` (``tunebook._compat.CONFIG_OPTION_FIELDS``: num_warps, num_ctas,
num_stages, maxnreg, ir_override, ...). A *candidate* is a plain dict of one point's values;
:meth:`Space.to_config` turns it into a ``triton.Config`` (meta-parameters in ``kwargs``,
options as fields).

Three filters cut the product, in this order:

* ``constraints`` — ``f(candidate) -> bool``, always applied (``len(space)`` counts after them);
* platform filters — given a platform dict as ``platform_fingerprint()`` returns it: configs
  with ``num_ctas > 1`` are dropped below sm_90 and off CUDA, configs setting ``maxnreg``
  are dropped off CUDA (other backends reject or ignore them);
* ``arg_constraints`` — ``f(candidate, args) -> bool`` with the call's named arguments,
  applied only when :meth:`Space.candidates` is given ``args``.

Nothing is materialized eagerly: iteration decodes mixed-radix indices on the fly, and the
only thing kept after the first ``len()`` is an array of 4-byte indices of feasible points.

>>> space = Space(BLOCK=[16, 32, 64], num_warps=[2, 4], constraints=[lambda c: c["BLOCK"] > 16])
>>> len(space)
4
>>> space.candidates()[0]
{'BLOCK': 32, 'num_warps': 2}
>>> space.to_config({"BLOCK": 32, "num_warps": 2}).kwargs
{'BLOCK': 32}
"""

from __future__ import annotations

import difflib
import random
import re
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from . import _compat
from ._errors import SpaceError
from ._reads import unwatched

__all__ = ["Space", "SpaceError"]

Candidate = dict[str, Any]
Constraint = Callable[[Candidate], bool]
ArgConstraint = Callable[[Candidate, Mapping[str, Any]], bool]

# Config option fields some Triton release has had. A space naming one the installed Triton
# lacks would silently pass it to the kernel as a meta-parameter; refuse it instead.
_OPTION_NAMES_ANY_RELEASE = frozenset(
    {
        "num_warps",
        "num_ctas",
        "num_stages",
        "maxnreg",
        "ir_override",
        "num_buffers_warp_spec",
        "num_consumer_groups",
        "reg_dec_producer",
        "reg_inc_consumer",
        "enable_warp_specialization",
        "enable_persistent",
    }
)


def _check_option_name(name: str) -> None:
    if name in _compat.CONFIG_OPTION_FIELDS:
        return
    valid = ", ".join(_compat.CONFIG_OPTION_FIELDS)
    if name in _OPTION_NAMES_ANY_RELEASE:
        raise SpaceError(
            f"Space: {name!r} is a Config option of other Triton releases, but this Triton "
            f"({_compat.triton_version()}) has no such field. Valid option names: {valid}. "
            f"Remove {name!r}, or, if it is your kernel's own meta-parameter, "
            f"pass it as meta={{{name!r}: [...]}}."
        )
    # A lowercase name one typo away from an option ("num_warp") is almost surely that option.
    close = difflib.get_close_matches(name, _compat.CONFIG_OPTION_FIELDS, n=1, cutoff=0.8)
    if name.islower() and close:
        raise SpaceError(
            f"Space: unknown option {name!r}; did you mean {close[0]!r}? Valid option names: {valid}. "
            f"If {name!r} is your kernel's own meta-parameter, pass it as meta={{{name!r}: [...]}}."
        )


def _values(name: str, raw: Any) -> tuple[Any, ...]:
    ndim = getattr(raw, "ndim", None)  # a NumPy array or a torch tensor
    if ndim == 1 and callable(getattr(raw, "tolist", None)):
        raw = raw.tolist()
    if not isinstance(raw, list | tuple | range):
        if ndim is None:
            fix = f"Write {name}=[{raw!r}] for a single value."
        elif ndim == 0:
            fix = f"Write {name}=[value.item()] for a single value."
        else:
            fix = f"A parameter's values are one list; this array has {ndim} dimensions."
        raise SpaceError(
            f"Space: {name}= must be a list, tuple or range of values; found {type(raw).__name__} "
            f"{raw!r}. {fix}"
        )
    values = tuple(_plain(v) for v in raw)
    if not values:
        raise SpaceError(
            f"Space: {name}= is empty; give it at least one value (an empty space tunes nothing)."
        )
    seen: set[Any] = set()
    for v in values:
        try:
            hash(v)
        except TypeError:
            raise SpaceError(f"Space: {name}= holds unhashable value {v!r}; use scalars.") from None
        if v in seen:
            raise SpaceError(f"Space: {name}= lists {v!r} twice; each value may appear once.")
        seen.add(v)
    return values


def _plain(value: Any) -> Any:
    """A NumPy or torch scalar (``list(2 ** np.arange(4, 7))`` holds ``np.int64``) as the Python
    scalar it holds: Triton's interpreter refuses ``np.int64`` as a meta-parameter, and the
    book would store its text, which no later read matches to the Space's value."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


class _NotABool(Exception):
    """A constraint's result that is neither True nor False (None, an ambiguous array)."""


def _verdict(result: Any) -> bool:
    """A constraint's result as a bool: None (a constraint without ``return``) and values
    whose truth is ambiguous (a tensor of several elements) are errors, not a silent False."""
    if result is True or result is False:
        return result
    if result is None:
        raise _NotABool("returned None (a missing return?) instead of True or False")
    try:
        return bool(result)
    except Exception as exc:
        shown = repr(result)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise _NotABool(
            f"returned {type(result).__name__} {shown}, which is neither True nor False "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _constraint_error(
    what: str, i: int, check: Any, exc: Exception, candidate: Candidate, tail: str
) -> SpaceError:
    """The error of constraint (or arg constraint) #i that raised ``exc``, or returned no bool."""
    name = getattr(check, "__name__", check)
    did = str(exc) if isinstance(exc, _NotABool) else f"raised {type(exc).__name__}: {exc}"
    return SpaceError(f"Space: {what} #{i} ({name!r}) {did} on candidate {candidate}{tail}")


def _cuda_cc(platform: Mapping[str, Any]) -> int | None:
    """Compute capability as an int (90 for '90', '90a', 'sm_90', 90); None if unknown."""
    match = re.search(r"\d+", str(platform.get("arch", "")))
    return int(match.group()) if match else None


def platform_allows(candidate: Mapping[str, Any], platform: Mapping[str, Any]) -> bool:
    """Whether a candidate can run on ``platform`` as far as its Config options go.

    >>> platform_allows({"num_ctas": 2}, {"backend": "cuda", "arch": "80"})
    False
    >>> platform_allows({"num_ctas": 2, "maxnreg": 128}, {"backend": "cuda", "arch": "90"})
    True
    """
    backend = platform.get("backend")
    ctas = candidate.get("num_ctas")
    if ctas is not None and ctas > 1:
        cc = _cuda_cc(platform)
        # Thread-block clusters exist on CUDA from sm_90 (Hopper) on, nowhere else.
        if backend != "cuda" or cc is None or cc < 90:
            return False
    return not (candidate.get("maxnreg") is not None and backend != "cuda")


class Space:
    """A config space: the product of parameter value lists, filtered by constraints.

    Keyword arguments name parameters; ``meta`` may hold meta-parameters whose names would
    otherwise be taken for (misspelt) Config options. Iteration is deterministic, in
    ``itertools.product`` order of the parameters as given (last one fastest).

    >>> space = Space(BLOCK_M=[32, 64], num_warps=[4, 8], num_stages=range(2, 4))
    >>> len(space), space.size
    (8, 8)
    >>> next(iter(space)).num_stages
    2
    >>> [c["BLOCK_M"] for c in space.sample(3, seed=0)]
    [64, 64, 32]
    """

    def __init__(
        self,
        *,
        constraints: Sequence[Constraint] = (),
        arg_constraints: Sequence[ArgConstraint] = (),
        meta: Mapping[str, Sequence[Any]] | None = None,
        **params: Sequence[Any],
    ) -> None:
        for name in params:
            _check_option_name(name)
        clash = sorted(set(meta or {}) & set(_compat.CONFIG_OPTION_FIELDS))
        if clash:
            raise SpaceError(
                f"Space: meta= holds {', '.join(clash)}, which Triton's Config takes as an option; "
                f"pass {'it' if len(clash) == 1 else 'them'} as keyword "
                f"parameter{'s' * (len(clash) != 1)} instead."
            )
        both = sorted(set(params) & set(meta or {}))
        if both:
            raise SpaceError(
                f"Space: {', '.join(both)} given both as a parameter and in meta=; give each once."
            )
        self._params: dict[str, tuple[Any, ...]] = {
            n: _values(n, v) for n, v in {**params, **(meta or {})}.items()
        }
        self._raw: dict[str, Any] = {**params, **(meta or {})}
        self._options = frozenset(params) & frozenset(_compat.CONFIG_OPTION_FIELDS)
        for what, funcs in (("constraints", constraints), ("arg_constraints", arg_constraints)):
            bad = [f for f in funcs if not callable(f)]
            if bad:
                raise SpaceError(f"Space: {what} must be callables; found {bad[0]!r}.")
        self.constraints: tuple[Constraint, ...] = tuple(constraints)
        self.arg_constraints: tuple[ArgConstraint, ...] = tuple(arg_constraints)
        self._names = tuple(self._params)
        self._radix = tuple(len(v) for v in self._params.values())
        size = 1
        for r in self._radix:
            size *= r
        self.size: int = size  # the product before any filter
        self._feasible: array[int] | None = None  # filled by the first len() of a constrained space

    # ------------------------------------------------------------- structure

    @property
    def params(self) -> dict[str, tuple[Any, ...]]:
        """Parameter name -> its values, in declaration order."""
        return dict(self._params)

    @property
    def option_names(self) -> frozenset[str]:
        """The parameters that are Config option fields (the rest are meta-parameters)."""
        return self._options

    def _decode(self, index: int) -> Candidate:
        # Mixed radix, last parameter fastest: the order itertools.product yields.
        out: Candidate = {}
        for name, radix in zip(reversed(self._names), reversed(self._radix)):
            index, digit = divmod(index, radix)
            out[name] = self._params[name][digit]
        return {name: out[name] for name in self._names}

    def _satisfies(self, candidate: Candidate) -> bool:
        for i, check in enumerate(self.constraints):
            try:
                ok = _verdict(check(dict(candidate)))
            except Exception as exc:
                tail = f". Constraints receive a dict with the keys {list(self._names)}; fix the constraint."
                raise _constraint_error("constraint", i, check, exc, candidate, tail) from exc
            if not ok:
                return False
        return True

    def _feasible_indices(self) -> array[int] | range:
        if not self.constraints:
            return range(self.size)
        if self._feasible is None:
            # 'q' (8 bytes) only where 'I' cannot hold the index: 4 bytes a point otherwise.
            kept = array("I" if self.size < 2**32 else "q")
            for i in range(self.size):
                if self._satisfies(self._decode(i)):
                    kept.append(i)
            self._feasible = kept
        return self._feasible

    # ------------------------------------------------------------- the sequence

    def __len__(self) -> int:
        return len(self._feasible_indices())

    def __iter__(self) -> Iterator[Any]:
        """``triton.Config`` objects, in deterministic order, constraints applied."""
        for candidate in self._iter_candidates():
            yield self.to_config(candidate)

    def _iter_candidates(self) -> Iterator[Candidate]:
        if self._feasible is not None or not self.constraints:
            for i in self._feasible_indices():
                yield self._decode(i)
            return
        # Before the first len(): filter while walking, without storing anything.
        for i in range(self.size):
            candidate = self._decode(i)
            if self._satisfies(candidate):
                yield candidate

    def __repr__(self) -> str:
        shown = []
        for name, raw in self._raw.items():
            values = raw if isinstance(raw, range) else list(self._params[name])
            shown.append(f"{name}={values!r}")
        dims = "x".join(str(r) for r in self._radix)
        notes = [f"{dims} = {self.size} configs before constraints"]
        if self._feasible is not None:
            notes.append(f"{len(self._feasible)} after")
        if self.constraints:
            notes.append(f"{len(self.constraints)} constraint{'s' * (len(self.constraints) != 1)}")
        if self.arg_constraints:
            notes.append(
                f"{len(self.arg_constraints)} arg constraint{'s' * (len(self.arg_constraints) != 1)}"
            )
        return f"Space({', '.join(shown)}; {', '.join(notes)})"

    # ------------------------------------------------------------- selections

    def candidates(
        self, platform: Mapping[str, Any] | None = None, args: Mapping[str, Any] | None = None
    ) -> list[Candidate]:
        """Every candidate as a plain dict, after constraints, platform filters and arg constraints.

        ``platform`` is a dict like ``platform_fingerprint()`` returns; None skips the platform
        filters. ``args`` maps the kernel's argument names to this call's values; None skips
        the arg constraints.
        """
        out = []
        for candidate in self._iter_candidates():
            if platform is not None and not platform_allows(candidate, platform):
                continue
            if args is not None and not self.allows_args(candidate, args):
                continue
            out.append(candidate)
        return out

    def allows_args(self, candidate: Candidate, args: Mapping[str, Any]) -> bool:
        """Whether the arg constraints allow ``candidate`` for a call with these named arguments."""
        for i, check in enumerate(self.arg_constraints):
            try:
                ok = _verdict(check(dict(candidate), args))
            except Exception as exc:
                tail = (
                    f" with arguments {sorted(unwatched(args))}. "
                    "Arg constraints receive (candidate dict, named arguments); fix the constraint."
                )
                raise _constraint_error("arg constraint", i, check, exc, candidate, tail) from exc
            if not ok:
                return False
        return True

    def sample(self, n: int, seed: int = 0) -> list[Candidate]:
        """``n`` distinct candidates (all of them if fewer), chosen at random, reproducibly.

        Draws raw indices and rejects the ones constraints forbid, so a large space is not
        enumerated; only when rejection keeps failing (a tight constraint) does it fall back
        to the list of feasible indices.
        """
        if n < 0:
            raise SpaceError(f"Space.sample: n must be >= 0; found {n}.")
        rng = random.Random(seed)
        if not self.constraints or self._feasible is not None:
            pool = self._feasible_indices()
            picks = rng.sample(range(len(pool)), min(n, len(pool)))
            return [self._decode(pool[p]) for p in picks]
        chosen: list[int] = []
        tried: set[int] = set()
        # Enough draws to find n points if at least a quarter of the space is feasible.
        for _ in range(4 * n + 64):
            if len(chosen) == n or len(tried) == self.size:
                break
            i = rng.randrange(self.size)
            if i in tried:
                continue
            tried.add(i)
            if self._satisfies(self._decode(i)):
                chosen.append(i)
        if len(chosen) < n and len(tried) < self.size:
            rest = [i for i in self._feasible_indices() if i not in tried]
            chosen.extend(rng.sample(rest, min(n - len(chosen), len(rest))))
        return [self._decode(i) for i in chosen]

    def to_config(self, candidate: Mapping[str, Any]) -> Any:
        """The ``triton.Config`` for a candidate dict of this space."""
        unknown = sorted(set(candidate) - set(self._names))
        if unknown:
            raise SpaceError(
                f"Space.to_config: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                f"parameters of this space ({', '.join(self._names)}); pass a dict from space.candidates()."
            )
        missing = [n for n in self._names if n not in self._options and n not in candidate]
        if missing:
            raise SpaceError(
                f"Space.to_config: meta-parameter{'s' * (len(missing) != 1)} {', '.join(missing)} missing "
                f"from {dict(candidate)}; pass a dict from space.candidates()."
            )
        kwargs = {k: v for k, v in candidate.items() if k not in self._options}
        options = {k: v for k, v in candidate.items() if k in self._options}
        return _compat.Config(kwargs, **options)

    def point_of(self, record: Mapping[str, Any]) -> tuple[int, Candidate] | None:
        """(its place in the order :meth:`candidates` lists them, the candidate) of a config as
        a book stores it, if this space declares it (:meth:`declares`); else None.

        >>> s = Space(BLOCK=[32, 64], num_warps=[4, 8])
        >>> s.point_of({"kwargs": {"BLOCK": 64}, "num_warps": 4, "num_ctas": 1})
        (2, {'BLOCK': 64, 'num_warps': 4})
        >>> s.point_of({"kwargs": {"BLOCK": 48}, "num_warps": 4}) is None
        True
        """
        if not self.declares(record):
            return None
        kwargs = record["kwargs"]
        # An option stored as None is left out of the record (as Triton's default), which
        # ``declares`` reads as None too.
        candidate = {n: record.get(n) if n in self._options else kwargs[n] for n in self._names}
        position = 0
        for name, radix in zip(self._names, self._radix):  # _decode's mixed radix, inverted
            position = position * radix + self._params[name].index(candidate[name])
        return position, candidate

    def declares(self, record: Mapping[str, Any]) -> bool:
        """Whether a config as a book stores it (``{"kwargs": {...}, option: value}``) is a point of
        this space that its constraints allow. Platform filters and arg constraints are left out:
        they exclude a declared config from some calls, not from the space."""
        kwargs = record.get("kwargs")
        if not isinstance(kwargs, Mapping) or set(kwargs) != set(self._names) - self._options:
            return False
        candidate = {**kwargs, **{name: record.get(name) for name in self._options}}
        if any(candidate[name] not in values for name, values in self._params.items()):
            return False
        return self._satisfies(candidate)
