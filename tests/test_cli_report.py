"""`tunebook report`: readable plots at a normal window size (checked in a real headless
browser when one is installed), rendered in parallel with progress on stderr."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from test_cli import entry, invoke, result
from test_cli_summary import _book_with_a_failed_first_config
from tunebook._book import Document, config_id
from tunebook.cli._common import write_document
from tunebook.cli._load import canonical_file_name
from tunebook.cli._plots import bars_figure
from tunebook.cli._summary import summarise_page
from tunebook.cli.report import MIN_PAGES_IN_PARALLEL

# The command line: last Triton only (test_cli.py says why).
pytestmark = pytest.mark.once

H200 = {"backend": "cuda", "device": "NVIDIA H200", "arch": "90", "runtime": "cuda 12.8", "triton": "3.6.0"}


def synthetic_book(directory: Path, kernels: int, keys: int, configs: int) -> None:
    """Kernels of ``keys`` keys (16 to 16 * 2**keys, times over three orders of magnitude) and
    ``configs`` configs each, about one in eleven failing."""
    for k in range(kernels):
        entries = {}
        for i in range(keys):
            m = 16 << i
            results = []
            for c in range(configs):
                kwargs = {
                    "BLOCK_M": 16 << (c % 4),
                    "BLOCK_N": 32 << (c // 4 % 3),
                    "BLOCK_K": 32,
                    "GROUP_M": 8,
                }
                slow = 1 + ((c * 7 + i * 3 + k) % 10) / 3
                failed = (c + i + k) % 11 == 5
                results.append(
                    result(kwargs, None, "OutOfResources: smem") if failed else result(kwargs, m * slow / 1e3)
                )
            e = replace(entry([m, 4096, 4096, "torch.float16"], results), first=config_id(results[0].config))
            entries[json.dumps(list(e.key), separators=(",", ":"))] = e
        kernel = {"name": f"kernel_{k:02d}", "hash": f"{k:02d}" * 32, "key": ["M", "N", "K"]}
        doc = Document(kernel, {**H200, "timer": "events"}, entries)
        write_document(directory / canonical_file_name(doc), doc)  # format 2: streamed by the report


def test_parallel_rendering_gives_the_same_page_and_shows_progress(tmp_path: Path) -> None:
    n = MIN_PAGES_IN_PARALLEL
    synthetic_book(tmp_path / "book", n, keys=3, configs=6)
    res = invoke("report", tmp_path / "book", "-o", tmp_path / "parallel.html", "--jobs", "2")
    assert "rendering plots" in res.output and f"{n}/{n}" in res.output
    invoke("report", tmp_path / "book", "-o", tmp_path / "serial.html", "--jobs", "1")
    assert (tmp_path / "parallel.html").read_text() == (tmp_path / "serial.html").read_text()


def test_the_legend_overlaps_no_bar_label(book_dir: Path) -> None:
    doc = _book_with_a_failed_first_config(book_dir)  # hatched fallback: a third legend entry
    fig = bars_figure(summarise_page(doc))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent(renderer)
    labels = [t.get_window_extent(renderer) for t in ax.texts] + [
        t.get_window_extent(renderer) for t in ax.get_xticklabels()
    ]
    assert len(ax.texts) == 3 and len(ax.get_legend().get_texts()) == 3
    assert not any(legend.overlaps(label) for label in labels)
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1 and legend.y1 <= fig.bbox.y1  # not cut off
    assert ax.get_window_extent(renderer).width > 0.6 * fig.bbox.width  # the bars get the room
    assert all(t.get_fontsize() >= 9 for t in [*ax.texts, *ax.get_xticklabels()])


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('img')].map(i => ({
    natural: i.naturalWidth, shown: Math.round(i.getBoundingClientRect().width)}));
  const cell = document.querySelector('table.heat td');
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({imgs, heat_px: parseFloat(getComputedStyle(cell).fontSize),
    page: document.documentElement.scrollWidth, view: window.innerWidth});
  document.body.appendChild(pre);
});
</script></body>"""


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={profile}", "--window-size=1280,900", "--virtual-time-budget=5000", *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip


@pytest.mark.skipif(
    BROWSER is None, reason="needs chromium (apt-get install chromium; scripts/test installs it)"
)
def test_the_report_reads_well_in_a_browser_at_1280x900(book_dir: Path, tmp_path: Path) -> None:
    """Plots are shown at their natural size (never shrunk), heatmap numbers are page text of a
    normal size, and nothing makes the page scroll sideways. The screenshot is kept for people:
    run with -rP to see its path."""
    _book_with_a_failed_first_config(book_dir)
    synthetic_book(book_dir, kernels=1, keys=12, configs=40)  # wider than the page: it scrolls in place
    report = tmp_path / "report.html"
    invoke("report", "-o", report)
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE))
    dom = chromium("--dump-dom", probed.as_uri()).stdout
    data = json.loads(dom.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0])
    assert len(data["imgs"]) == 2 and all(i["natural"] > 0 for i in data["imgs"]), data
    assert all(abs(i["natural"] - i["shown"]) <= 1 for i in data["imgs"]), data  # not scaled down
    assert data["heat_px"] >= 11, data
    assert data["page"] <= data["view"], data
    screenshot = tmp_path / "report-1280x900.png"
    chromium(f"--screenshot={screenshot}", report.as_uri())
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
    print(f"report screenshot at 1280x900: {screenshot}")


def test_a_large_page_draws_a_bounded_sample_of_its_keys(tmp_path: Path) -> None:
    """The report costs what it draws: 500 keys give 200 table rows and 60 plotted keys."""
    from test_cli import entry, invoke, result, write_doc
    from tunebook._book import Document
    from tunebook._jsonio import key_text
    from tunebook.cli.report import MAX_KEYS_DRAWN, MAX_TABLE_ROWS

    entries = {}
    for n in range(500):
        key = [1024 + n, "torch.float16"]
        entries[key_text(key)] = entry(
            key, [result({"BLOCK": 64}, 1.0 + n / 1000), result({"BLOCK": 128}, 2.0)]
        )
    platform = {
        "backend": "cuda",
        "device": "NVIDIA H200",
        "arch": "90",
        "triton": "3.6.0",
        "timer": "events",
    }
    write_doc(
        tmp_path / "book", Document({"name": "big", "hash": "cd" * 32, "key": ["n"]}, platform, entries)
    )
    report = tmp_path / "r.html"
    invoke("report", tmp_path / "book", "-o", report)
    text = report.read_text()
    assert f"{MAX_TABLE_ROWS} of 500 keys shown" in text and "500 keys" in text
    heat = text[text.index("<table class='heat'>") :]
    first_row = heat[: heat.index("</tr>")]
    assert first_row.count("<th>") == MAX_KEYS_DRAWN + 1  # the corner and one column a drawn key
