"""``tunebook diff``: what differs between two books, or between two platforms of one book.

Pages are paired by kernel (name and kernel id) and, between two books, by platform id.
For each pair: keys only on one side, keys whose winner differs, and configs whose median
time changed by more than ``--threshold`` (relative). Exit status 0 when nothing differs,
1 when something does, as diff(1) does, so scripts can gate on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from .._book.records import Entry
from ._common import echo_json, load_or_fail, out, select_pages, trouble_exits_2, warn_skipped
from ._load import Page, platform_label
from ._summary import fmt_key, fmt_time, is_recorded_miss, key_order, miss_hint, short_config

JSON_FORMAT = "tunebook-diff"
JSON_VERSION = 1


def _page_ref(page: Page) -> dict[str, Any]:
    return {
        "kernel": page.kernel_name,
        "kernel_id": page.identity.id,
        "platform": page.platform_label,
        "platform_id": page.platform_id,
        "path": str(page.path),
    }


def _a_number(value: float) -> float:
    # FloatRange lets nan through (no comparison fails), and nan hid every timing change.
    if math.isnan(value):
        raise click.BadParameter("nan is not a relative change; 0.05 is 5%", param_hint="'--threshold'")
    return value


def diff_pages(a: Page, b: Page, threshold: float) -> dict[str, Any]:
    """Key-level differences between two pages of one kernel."""
    ea, eb = a.doc.entries, b.doc.entries
    winners, timings = [], []

    def natural(texts: Iterable[str], entries: Mapping[str, Entry]) -> list[str]:  # 100 before 1000, as show
        return sorted(texts, key=lambda t: (key_order(entries[t].key), t))

    for key_text in natural(ea.keys() & eb.keys(), ea):
        x, y = ea[key_text], eb[key_text]
        wx, wy = x.best(), y.best()
        if wx != wy:
            winners.append(
                {
                    "key": list(x.key),
                    "a": {
                        "winner": wx,
                        "ms": x.results[wx].median if wx else None,
                        "config": x.results[wx].config if wx else None,
                    },
                    "b": {
                        "winner": wy,
                        "ms": y.results[wy].median if wy else None,
                        "config": y.results[wy].config if wy else None,
                    },
                }
            )
        for cid in sorted(x.results.keys() & y.results.keys()):
            rx, ry = x.results[cid], y.results[cid]
            if rx.ok != ry.ok:
                timings.append(
                    {
                        "key": list(x.key),
                        "config": cid,
                        "a_ms": rx.ms and rx.median,
                        "b_ms": ry.ms and ry.median,
                        "ratio": None,
                        "a_error": rx.error,
                        "b_error": ry.error,
                    }
                )
            elif rx.ok and rx.median > 0 and abs(ry.median / rx.median - 1) > threshold:
                ratio = ry.median / rx.median  # infinite only against a hand-edited 1e-310 ms
                timings.append(
                    {
                        "key": list(x.key),
                        "config": cid,
                        "a_ms": rx.median,
                        "b_ms": ry.median,
                        "ratio": round(ratio, 6) if math.isfinite(ratio) else None,
                        "a_error": None,
                        "b_error": None,
                    }
                )
    return {
        "a": _page_ref(a),
        "b": _page_ref(b),
        "keys_only_a": [list(ea[k].key) for k in natural(ea.keys() - eb.keys(), ea)],
        "keys_only_b": [list(eb[k].key) for k in natural(eb.keys() - ea.keys(), eb)],
        "recorded_misses_a": [list(ea[k].key) for k in natural(ea, ea) if is_recorded_miss(ea[k])],
        "recorded_misses_b": [list(eb[k].key) for k in natural(eb, eb) if is_recorded_miss(eb[k])],
        "winner_changed": winners,
        "timing_changed": timings,
    }


def _changed(pair: dict[str, Any]) -> bool:
    return any(pair[k] for k in ("keys_only_a", "keys_only_b", "winner_changed", "timing_changed"))


def _index(pages: list[Page], with_platform: bool) -> dict[tuple[str, ...], Page]:
    index: dict[tuple[str, ...], Page] = {}
    for page in pages:
        ident = (page.kernel_name, page.identity.id) + ((page.platform_id,) if with_platform else ())
        index[ident] = page
    return index


def _select_platform(pages: list[Page], wanted: str) -> list[Page]:
    """Pages whose platform id starts with ``wanted``, or whose device name, or label without
    its runtime and SM count, contains it: what a filter matched before labels named those
    (so a ``4`` for an L4 is not also the ``114 SMs`` of an H100). Where that matches nothing,
    the whole label: ``cuda 12.8`` picks pages by their runtime."""
    w = wanted.lower()
    chosen = [
        p
        for p in pages
        if p.platform_id.startswith(w)
        or w in _short_label(p.doc.platform).lower()
        or w in str(p.doc.platform.get("device", "")).lower()
    ]
    return chosen or [p for p in pages if w in p.platform_label.lower()]


def _short_label(platform: dict[str, Any]) -> str:
    """A page's label as it was before it named the runtime and SM count."""
    return platform_label({k: v for k, v in platform.items() if k not in ("runtime", "sm_count")})


def diff_data(
    a_pages: list[Page], b_pages: list[Page], by_platform: bool, threshold: float
) -> dict[str, Any]:
    ia, ib = _index(a_pages, not by_platform), _index(b_pages, not by_platform)
    pairs = [diff_pages(ia[k], ib[k], threshold) for k in sorted(ia.keys() & ib.keys())]
    data = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "only_a": [_page_ref(ia[k]) for k in sorted(ia.keys() - ib.keys())],
        "only_b": [_page_ref(ib[k]) for k in sorted(ib.keys() - ia.keys())],
        "pages": [p for p in pairs if _changed(p)],
        "unchanged": len([p for p in pairs if not _changed(p)]),
    }
    data["differ"] = bool(data["only_a"] or data["only_b"] or data["pages"])
    return data


def _winner_text(side: dict[str, Any], missed: bool) -> str:
    if missed:
        return "recorded miss (no results)"
    return f"{short_config(side['config'])} ({fmt_time(side['ms'])})"


def _print(data: dict[str, Any], name_a: str, name_b: str) -> None:
    console = out()
    any_miss = False
    for side, name in (("only_a", name_a), ("only_b", name_b)):
        for ref in data[side]:
            console.print(
                f"only in {escape(name)}: {escape(ref['kernel'])} [dim]{ref['kernel_id']}[/] on "
                f"{escape(ref['platform'])}"
            )
    for pair in data["pages"]:
        a, b = pair["a"], pair["b"]
        where = (
            a["platform"] if a["platform_id"] == b["platform_id"] else f"{a['platform']} vs {b['platform']}"
        )
        console.print(f"\n[bold]{escape(a['kernel'])}[/] [dim]{a['kernel_id']}[/] on {escape(where)}")
        missed = {side: {fmt_key(k) for k in pair[f"recorded_misses_{side}"]} for side in ("a", "b")}
        any_miss = any_miss or bool(missed["a"] or missed["b"])
        for side, name in (("a", name_a), ("b", name_b)):
            for key in pair[f"keys_only_{side}"]:
                text = fmt_key(key)
                what = " (a recorded miss: no results)" if text in missed[side] else ""
                console.print(f"  key {escape(text)} only in {escape(name)}{what}")
        for w in pair["winner_changed"]:
            text = fmt_key(w["key"])
            console.print(
                f"  key {escape(text)}: winner {escape(_winner_text(w['a'], text in missed['a']))} -> "
                f"{escape(_winner_text(w['b'], text in missed['b']))}"
            )
        for t in pair["timing_changed"]:
            change = (
                f"x{t['ratio']:.3g}"
                if t["ratio"] is not None
                else "ran / failed"
                if t["a_error"] or t["b_error"]
                else "changed beyond a ratio"
            )
            console.print(
                f"  key {escape(fmt_key(t['key']))} config {escape(t['config'])}: "
                f"{fmt_time(t['a_ms'])} -> {fmt_time(t['b_ms'])} ({change})"
            )
    if any_miss:
        console.print(f"\n{escape(miss_hint())} (MODULE: the module that defines the kernel)")
    if not data["differ"]:
        console.print(f"no differences ({data['unchanged']} kernel pages compared)")


@click.command("diff")
@click.argument("a", required=False, type=click.Path(path_type=Path))
@click.argument("b", required=False, type=click.Path(path_type=Path))
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="X",
    help="Twice: compare two platforms of one book (A, default TUNEBOOK_DIR). X matches a platform "
    "id prefix, or a substring of its device name or label (its runtime and SM count only where "
    "nothing else matches).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    callback=lambda ctx, param, value: _a_number(value),
    default=0.05,
    show_default=True,
    help="Report a config's time change only above this relative change (0.05 = 5%).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@trouble_exits_2
def command(
    a: Path | None, b: Path | None, platforms: tuple[str, ...], threshold: float, as_json: bool
) -> None:
    """What differs between books A and B, or between two platforms (--platform X --platform Y) of one book.

    Exit status: 0 when nothing differs, 1 when something does.
    """
    if platforms:
        if len(platforms) != 2 or b is not None:
            raise click.UsageError(
                "compare platforms with exactly two --platform options and at most one BOOK"
            )
        loaded = load_or_fail(a)
        warn_skipped(loaded)
        sides = []
        for wanted in platforms:
            pages = _select_platform(loaded.pages, wanted)
            found = {p.platform_id for p in pages}
            if len(found) != 1:
                labels = sorted({f"{p.platform_id} {p.platform_label}" for p in (pages or loaded.pages)})
                what = "no platform" if not found else f"{len(found)} platforms"
                raise click.ClickException(
                    f"--platform {wanted!r} matches {what} in {loaded.source}; "
                    f"{'candidates' if found else 'platforms there'}: {'; '.join(labels) or 'none'}. "
                    "Use a longer id prefix or device substring."
                )
            sides.append(pages)
        if sides[0][0].platform_id == sides[1][0].platform_id:  # "no differences", exit 0, before
            raise click.UsageError(
                f"--platform {platforms[0]!r} and --platform {platforms[1]!r} both match the platform "
                f"{sides[0][0].platform_id} {sides[0][0].platform_label}: name two different platforms"
            )
        data = diff_data(sides[0], sides[1], by_platform=True, threshold=threshold)
        names = platforms
    else:
        if a is None or b is None:
            raise click.UsageError("give two books A and B, or one book and two --platform options")
        la, lb = load_or_fail(a), load_or_fail(b)
        warn_skipped(la)
        warn_skipped(lb)
        for loaded in (la, lb):
            select_pages(loaded)  # a book with no readable book file is an error
        data = diff_data(la.pages, lb.pages, by_platform=False, threshold=threshold)
        names = (str(a), str(b))
    if as_json:
        echo_json(data)
    else:
        _print(data, names[0], names[1])
    raise SystemExit(1 if data["differ"] else 0)
