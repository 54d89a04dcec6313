"""Every environment variable the library reads, declared once, typed, with its default
(``TUNEBOOK_PATCH`` is read by ``_hook.py`` itself, before tunebook is imported). The kernel
pack's own are in ``kernels/_common.py``, the LLM demo's in ``demo/llm/loading.py``.

Values are read when asked for, never cached at import, so a test or a launcher can
change the environment before the first kernel call and have it honoured.

>>> import os, tunebook._settings as s
>>> os.environ["TUNEBOOK_MODE"] = "serve"
>>> s.mode()
'serve'
>>> del os.environ["TUNEBOOK_MODE"]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._errors import ConfigurationError

Mode = Literal["tune", "serve", "off"]
MODES: tuple[Mode, ...] = ("tune", "serve", "off")


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    doc: str

    def raw(self) -> str:
        value = os.environ.get(self.name, "")
        return value if value.strip() else self.default


TUNEBOOK_DIR = Setting(
    "TUNEBOOK_DIR", "", "Writable book directory. Default: the user cache dir, e.g. ~/.cache/tunebook."
)
TUNEBOOK_PATH = Setting(
    "TUNEBOOK_PATH",
    "",
    "Extra read-only book directories, os.pathsep-separated, consulted after TUNEBOOK_DIR.",
)
TUNEBOOK_MODE = Setting(
    "TUNEBOOK_MODE",
    "tune",
    "What an unseen key does: tune (benchmark and remember), serve (never benchmark), off (no book).",
)
TUNEBOOK_PROGRESS = Setting(
    "TUNEBOOK_PROGRESS",
    "auto",
    "Progress lines on stderr while tuning: 1, 0, or auto (when stderr is a terminal).",
)
TUNEBOOK_REDIS_URL = Setting(
    "TUNEBOOK_REDIS_URL",
    "",
    "A Redis server holding a book shared by a fleet (redis://host:port/db); needs tunebook[redis].",
)
TUNEBOOK_REDIS_TIMEOUT_S = Setting(
    "TUNEBOOK_REDIS_TIMEOUT_S",
    "0.25",
    "The most one request to the Redis book may take, in seconds (connecting, and each socket read, "
    "one fifth of it); raise it for a server farther away than a few milliseconds.",
)
TUNEBOOK_DISTRIBUTED = Setting(
    "TUNEBOOK_DISTRIBUTED",
    "0",
    "1: kernels without group= tune collectively in the default group of an initialized torch.distributed.",
)
TUNEBOOK_DISTRIBUTED_JOIN_S = Setting(
    "TUNEBOOK_DISTRIBUTED_JOIN_S",
    "5",
    "Seconds the first rank to miss a key waits for the others before tuning with those that came.",
)
TUNEBOOK_DISTRIBUTED_WAIT_S = Setting(
    "TUNEBOOK_DISTRIBUTED_WAIT_S",
    "900",
    "Seconds a rank waits for the group's next batch or decision on a key before it tunes alone (a dead "
    "or hung leader); the most the leader waits for a rank's part of a batch.",
)
TUNEBOOK_TIMER = Setting(
    "TUNEBOOK_TIMER",
    "",
    "short: the short-kernel measurement policy (interleaved CUDA-graph rounds and a confidence rule "
    "for contenders under TUNEBOOK_SHORT_KERNEL_US; timer id '<timer>-interleaved'). Unset: off.",
)
TUNEBOOK_SHORT_KERNEL_US = Setting(
    "TUNEBOOK_SHORT_KERNEL_US",
    "50",
    "With TUNEBOOK_TIMER=short: contenders whose quick timing is under this many microseconds "
    "get the policy.",
)
TUNEBOOK_PATCH = Setting(
    "TUNEBOOK_PATCH",
    "",
    "1: apply tunebook.patch() as each process imports Triton, where `tunebook install-hook` installed "
    "the start-up hook (read by _hook.py itself, which runs before tunebook can be imported).",
)
TUNEBOOK_DIRECT_LAUNCH = Setting(
    "TUNEBOOK_DIRECT_LAUNCH",
    "1",
    "0: a hit launches through Triton's JITFunction.run instead of calling the compiled kernel's "
    "launcher itself (read when a config's first hit builds its launcher).",
)
TUNEBOOK_RECORD_MISSES = Setting(
    "TUNEBOOK_RECORD_MISSES",
    "1",
    "0: serve mode records no misses (the news `tunebook tune --misses` reads), for deployments that "
    "never run it, or whose book directory is read-only by design.",
)
TRITON_PRINT_AUTOTUNING = Setting(
    "TRITON_PRINT_AUTOTUNING", "0", "Triton's own switch: print the outcome of each tuning to stdout."
)
TRITON_INTERPRET = Setting(
    "TRITON_INTERPRET", "0", "Triton's own switch: run kernels in the CPU interpreter."
)

ALL: tuple[Setting, ...] = (
    TUNEBOOK_DIR,
    TUNEBOOK_PATH,
    TUNEBOOK_MODE,
    TUNEBOOK_PROGRESS,
    TUNEBOOK_REDIS_URL,
    TUNEBOOK_REDIS_TIMEOUT_S,
    TUNEBOOK_DISTRIBUTED,
    TUNEBOOK_DISTRIBUTED_JOIN_S,
    TUNEBOOK_DISTRIBUTED_WAIT_S,
    TUNEBOOK_PATCH,
    TUNEBOOK_TIMER,
    TUNEBOOK_SHORT_KERNEL_US,
    TUNEBOOK_DIRECT_LAUNCH,
    TUNEBOOK_RECORD_MISSES,
    TRITON_PRINT_AUTOTUNING,
    TRITON_INTERPRET,
)

_TRUE = {"1", "true", "yes", "on"}


def book_dir() -> Path:
    """The writable book directory."""
    raw = TUNEBOOK_DIR.raw()
    if raw:
        return Path(raw).expanduser()
    import platformdirs  # deferred: only needed when the default is used

    return Path(platformdirs.user_cache_dir("tunebook", appauthor=False))


def book_path() -> list[Path]:
    """The read-only book directories from TUNEBOOK_PATH, in order."""
    return [Path(p).expanduser() for p in TUNEBOOK_PATH.raw().split(os.pathsep) if p.strip()]


def redis_url() -> str | None:
    """The shared fleet book's Redis URL, or None when TUNEBOOK_REDIS_URL is unset or blank."""
    return TUNEBOOK_REDIS_URL.raw().strip() or None


def mode() -> Mode:
    """The policy for unseen keys; an unknown value is an error that names the valid ones."""
    value = TUNEBOOK_MODE.raw().strip().lower()
    if value not in MODES:
        raise ConfigurationError(
            f"TUNEBOOK_MODE={value!r} is not a mode tunebook knows; expected one of {', '.join(MODES)}. "
            "Unset it to use the default, 'tune'."
        )
    return value


_FALSE = {"0", "false", "no", "off"}


def _switch(setting: Setting, extra: tuple[str, ...] = ()) -> str:
    """A yes/no setting's value, lower-cased: '1', '0' or one of ``extra``; unset is the
    default. A value it cannot read is an error that names the valid ones: a typo (``ture``)
    read as 'no' would leave a fleet tuning alone, or silent, without a word."""
    value = setting.raw().strip().lower() or setting.default
    if value in _TRUE:
        return "1"
    if value in _FALSE:
        return "0"
    if value in extra:
        return value
    valid = ", ".join(["1", "0", *extra])
    raise ConfigurationError(
        f"{setting.name}={setting.raw()!r} is not a value tunebook reads; expected one of {valid} "
        f"(or true/false, yes/no, on/off). Unset it for the default, {setting.default!r}."
    )


def progress() -> str:
    """'1' (always), '0' (never) or 'auto' (when stderr is a terminal)."""
    return _switch(TUNEBOOK_PROGRESS, ("auto",))


def distributed() -> bool:
    """Whether kernels without ``group=`` tune in torch.distributed's default group."""
    return _switch(TUNEBOOK_DISTRIBUTED) == "1"


def _seconds(setting: Setting, unit: str = "seconds") -> float:
    raw = setting.raw().strip()
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigurationError(
            f"{setting.name}={raw!r} is not a number of {unit}; expected a positive number, e.g. "
            f"{setting.default}. Unset it to use the default."
        )
    return value


def redis_timeout_s() -> float:
    """The time budget of one request to the Redis book (TUNEBOOK_REDIS_TIMEOUT_S)."""
    return _seconds(TUNEBOOK_REDIS_TIMEOUT_S)


def distributed_join_s() -> float:
    return _seconds(TUNEBOOK_DISTRIBUTED_JOIN_S)


def distributed_wait_s() -> float:
    return _seconds(TUNEBOOK_DISTRIBUTED_WAIT_S)


TIMERS = ("", "short")


def timer() -> str:
    """The measurement policy: '' (the kernel's own timer) or 'short'; anything else is an error."""
    value = TUNEBOOK_TIMER.raw().strip().lower()
    if value not in TIMERS:
        raise ConfigurationError(
            f"TUNEBOOK_TIMER={value!r} is not a measurement policy tunebook knows; expected 'short'. "
            "Unset it to time with the kernel's own timer."
        )
    return value


def short_kernel_us() -> float:
    return _seconds(TUNEBOOK_SHORT_KERNEL_US, "microseconds")


def direct_launch() -> bool:
    """Whether hits launch the compiled kernel themselves (see ``_compat/direct.py``)."""
    return _switch(TUNEBOOK_DIRECT_LAUNCH) == "1"


def record_misses() -> bool:
    """Whether serve mode records its misses for `tunebook tune --misses` (``_misses.py``)."""
    return _switch(TUNEBOOK_RECORD_MISSES) == "1"


def print_autotuning() -> bool:
    return TRITON_PRINT_AUTOTUNING.raw().strip().lower() in _TRUE


def interpreting() -> bool:
    return TRITON_INTERPRET.raw().strip().lower() in _TRUE


def check() -> None:
    """Read every setting a kernel's calls will read, so that a bad value stops a server when
    its kernels are decorated, not at their first request."""
    mode()
    timer()
    progress()
    distributed()
    if redis_url():
        redis_timeout_s()
    direct_launch()
    record_misses()
