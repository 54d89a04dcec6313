"""The TUNEBOOK_PATCH=1 start-up hook: installed, inert without the variable, patching at
``import triton`` with it, and never breaking the interpreter's start.

Each test installs the hook into this environment's site-packages (the real start-up
path: Python's ``site`` reads it) and removes it afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from click.testing import CliRunner

from test_persistence import read_only
from tunebook import _hook
from tunebook.cli._app import cli

from .test_libraries import installed_hook

__all__ = ["installed_hook"]  # the fixture, shared

PROBE = """
import json, sys
started = {"hook": "_tunebook_startup_hook" in sys.modules, "triton": "triton" in sys.modules}
from triton import autotune
import triton, triton.runtime.autotuner as a
patched = a.Autotuner.run.__module__ == "tunebook._patch"
print(json.dumps({**started, "patched": patched, "bound": autotune is triton.autotune and patched}))
"""


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1", **env},
        timeout=120,
    )


def test_the_variable_is_the_one_settings_declares() -> None:
    from tunebook import _settings

    assert _hook.VARIABLE == _settings.TUNEBOOK_PATCH.name  # _hook.py cannot import it: it runs first


def test_install_and_uninstall_from_the_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    installed = runner.invoke(cli, ["install-hook", "--dir", str(tmp_path)])
    assert installed.exit_code == 0, installed.output
    pth = tmp_path / _hook.PTH_NAME
    assert f"installed {pth}" in installed.output
    # not a site directory of this Python: said, rather than "processes now run tunebook.patch()"
    assert f"{tmp_path} is not a site directory of this interpreter" in installed.output
    assert f"tunebook uninstall-hook --dir {tmp_path}" in installed.output
    (line,) = pth.read_text().splitlines()
    assert line.startswith("import os;")  # `site` executes a .pth line only when it starts so
    removed = runner.invoke(cli, ["uninstall-hook", "--dir", str(tmp_path)])
    assert removed.exit_code == 0 and f"removed {pth}" in removed.output and not pth.exists()
    again = runner.invoke(cli, ["uninstall-hook", "--dir", str(tmp_path)])
    assert again.exit_code == 0 and "nothing to remove" in again.output


def test_install_into_a_directory_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    result = CliRunner().invoke(cli, ["install-hook", "--dir", str(missing)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{missing} is not a directory" in result.output and "--dir" in result.output
    unwritable = tmp_path / "ro"
    unwritable.mkdir()
    with read_only(unwritable):
        result = CliRunner().invoke(cli, ["install-hook", "--dir", str(unwritable)])
    assert result.exit_code == 1 and f"cannot write the hook into {unwritable}" in result.output


def test_the_hook_does_nothing_without_the_variable(installed_hook: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TUNEBOOK_PATCH", raising=False)
    for env in ({}, {"TUNEBOOK_PATCH": "0"}, {"TUNEBOOK_PATCH": "off"}, {"TUNEBOOK_PATCH": " "}):
        proc = python(PROBE, **env)
        assert proc.returncode == 0, proc.stderr
        assert '{"hook": false, "triton": false, "patched": false, "bound": false}' in proc.stdout, env
        assert proc.stderr == ""


def test_the_hook_patches_when_triton_is_imported_not_before(installed_hook: Path) -> None:
    proc = python(PROBE, TUNEBOOK_PATCH="1")
    assert proc.returncode == 0, proc.stderr
    assert '{"hook": true, "triton": false, "patched": true, "bound": true}' in proc.stdout
    assert proc.stderr == ""
    # Without triton ever imported, the interpreter pays for nothing but the hook's file.
    quiet = python(
        "import sys; print('triton' in sys.modules, 'tunebook' in sys.modules)", TUNEBOOK_PATCH="1"
    )
    assert quiet.stdout.strip() == "False False"


def test_a_value_neither_on_nor_off_patches_nothing_and_says_so(installed_hook: Path) -> None:
    """Every value but the off ones patched (`none`, `disable`, a typo `ture`), where each
    other switch of tunebook refuses a value it cannot read."""
    for value in ("none", "disable", "ture", "2"):
        proc = python(PROBE, TUNEBOOK_PATCH=value)
        assert proc.returncode == 0 and '"patched": false' in proc.stdout, (value, proc.stdout)
        (line,) = proc.stderr.splitlines()
        assert f"TUNEBOOK_PATCH={value!r} is neither on (1, true, yes, on) nor off" in line
    for value in ("TRUE", " yes ", "on"):
        proc = python(PROBE, TUNEBOOK_PATCH=value)
        assert '"patched": true, "bound": true' in proc.stdout and proc.stderr == "", value


def test_the_hook_patches_when_tunebook_is_imported_before_triton(installed_hook: Path) -> None:
    """tunebook imports triton half-way through its own import: the patch then failed
    ("partially initialized module 'tunebook' has no attribute 'patch'") and Triton ran
    unpatched, in every program that imports tunebook first and in `tunebook explain`,
    `prune` and `tune`, which docs/adoption.md runs with the hook."""
    proc = python("import tunebook\n" + PROBE, TUNEBOOK_PATCH="1")
    assert proc.returncode == 0, proc.stderr
    assert '"patched": true, "bound": true' in proc.stdout and proc.stderr == ""
    kernels = installed_hook.parent / "hook_probe_kernels.py"
    try:
        kernels.write_text(
            "import triton, triton.language as tl\n"
            "@triton.autotune(configs=[triton.Config({'B': 16})], key=['n'])\n"
            "@triton.jit\n"
            "def k(x, n, B: tl.constexpr):\n"
            "    pass\n"
        )
        explained = python(
            "import sys; from tunebook.cli._app import cli; sys.argv = ['tunebook', 'explain', "
            "'hook_probe_kernels:k']; cli()",
            TUNEBOOK_PATCH="1",
        )
    finally:
        kernels.unlink()
    assert "not a @tunebook.autotune kernel" not in explained.stdout + explained.stderr, explained.stderr
    assert "hook_probe_kernels.k" in explained.stdout + explained.stderr, explained.stdout + explained.stderr


def test_a_broken_tunebook_never_breaks_the_interpreter_start(installed_hook: Path, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "tunebook"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise RuntimeError('this tunebook is broken')\n")
    shutil.copy(Path(_hook.__file__), shadow / "_hook.py")
    proc = python(
        "print('started'); import triton; print('triton', triton.__version__ != '')",
        TUNEBOOK_PATCH="1",
        PYTHONPATH=str(shadow.parent),
    )
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["started", "triton True"]
    (line,) = proc.stderr.splitlines()  # reported once
    assert "TUNEBOOK_PATCH is set, but tunebook.patch() failed at `import triton`" in line
    assert "this tunebook is broken" in line and "Triton runs unpatched" in line

    (shadow / "_hook.py").write_text("this is not python(\n")
    proc = python("print('started')", TUNEBOOK_PATCH="1", PYTHONPATH=str(shadow.parent))
    assert proc.returncode == 0 and proc.stdout.strip() == "started"
    (line,) = proc.stderr.splitlines()
    assert "its start-up hook failed (SyntaxError" in line and "tunebook uninstall-hook" in line
    assert str(installed_hook) in line
