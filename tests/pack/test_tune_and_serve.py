"""The pack's tune path end to end: a process tunes each op's key into a book (a small
budget: the interpreter takes ~0.1 s a config); a second process reading that book, and a
third serving from it as a read-only book, benchmark nothing."""

from __future__ import annotations

from pathlib import Path

from conftest import run_python

CALL_EACH_OP = """
import json, torch, tunebook
from tunebook.kernels import rms_norm, rotary_embedding, silu_and_mul
from tunebook.kernels.rms_norm import _rms_norm_kernel
from tunebook.kernels.rotary_embedding import _rotary_embedding_kernel
from tunebook.kernels.silu_and_mul import _silu_and_mul_kernel

g = torch.Generator().manual_seed(0)
x = torch.randn(3, 576, generator=g, dtype=torch.float32).to(torch.bfloat16)
y, h = rms_norm(x, torch.randn(576, generator=g), residual=torch.randn(3, 576, generator=g))
gated = silu_and_mul(torch.randn(3, 2 * 96, generator=g).to(torch.float16))
angles = torch.rand(16, 8, generator=g) * 6
cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
q, k = rotary_embedding(torch.randn(3, 4, 16, generator=g), torch.randn(3, 2, 16, generator=g),
                        torch.tensor([0, 7, 15]), cache)
kernels = [_rms_norm_kernel, _silu_and_mul_kernel, _rotary_embedding_kernel]
print(json.dumps({**tunebook.stats(),
                  "chosen": [str(kern.best_config) for kern in kernels],
                  "finite": all(bool(t.isfinite().all()) for t in (y, h, gated, q, k))}))
"""


def test_tune_then_serve_from_the_book(book_dir: Path, tmp_path: Path) -> None:
    env = {"TUNEBOOK_DIR": str(book_dir), "TUNEBOOK_MODE": "tune", "TUNEBOOK_KERNELS_MAX_CONFIGS": "2"}
    tuned = run_python(CALL_EACH_OP, env=env)
    assert tuned["finite"]
    assert tuned["benchmarked"] == 6, tuned  # 2 configs for each of the 3 keys
    assert tuned["misses"] == 3
    names = sorted(p.name.split("--")[0] for p in book_dir.glob("*.json"))
    assert names == [
        "tunebook-kernels-rms_norm",
        "tunebook-kernels-rotary_embedding",
        "tunebook-kernels-silu_and_mul",
    ]

    served = run_python(CALL_EACH_OP, env=env)
    assert served["benchmarked"] == 0, served
    assert served["book_hits"] == 3 and served["misses"] == 0
    assert served["chosen"] == tuned["chosen"]

    # The same book as a read-only one (as the package ships its books), in serve mode.
    shipped = run_python(
        CALL_EACH_OP,
        env={
            **env,
            "TUNEBOOK_DIR": str(tmp_path / "empty"),
            "TUNEBOOK_PATH": str(book_dir),
            "TUNEBOOK_MODE": "serve",
        },
    )
    assert shipped["benchmarked"] == 0 and shipped["fallbacks"] == 0 and shipped["book_hits"] == 3, shipped
    assert shipped["chosen"] == tuned["chosen"]
