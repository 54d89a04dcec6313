"""The guide's quick start is a whole program: run as written, in two processes sharing one
book, the first tunes and the second benchmarks nothing and runs the same config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


@pytest.mark.once  # the guide's steps over the core's persistence, tested on every Triton
def test_the_quick_start_runs_twice_and_the_second_run_benchmarks_nothing(tmp_path: Path) -> None:
    section = GUIDE.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (tmp_path / "quickstart.py").write_text(code)
    env = {**os.environ, "TRITON_INTERPRET": "1", "TUNEBOOK_DIR": str(tmp_path / "book")}
    env.pop("TUNEBOOK_MODE", None)
    said = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "quickstart.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        said.append(proc.stdout.strip().splitlines()[-1])
    first, second = (re.fullmatch(r"configs benchmarked: (\d+) \| running (.*)", line) for line in said)
    assert first and second, said
    assert first[1] == "6" and second[1] == "0" and first[2] == second[2], said
