"""Write tests/data/tables/synthetic-*.json: made-up GEMM timing tables for strategy tests.

Real tables come from benchmarks/measure_tables.py on a GPU. These stand in for them: a
smooth landscape over a 1500-config GEMM space (a rough model of an H100: wave
quantization, tile efficiency, warps and pipelining) with 1.5% multiplicative noise, and
shared-memory overflows recorded as failures. Deterministic; rerun to regenerate:

    python tests/data/make_synthetic_tables.py
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from tunebook._search import Table, TableRow
from tunebook._space import Space

HERE = Path(__file__).resolve().parent
SPACE = Space(
    BLOCK_M=[16, 32, 64, 128, 256],
    BLOCK_N=[16, 32, 64, 128, 256],
    BLOCK_K=[16, 32, 64, 128],
    num_warps=[2, 4, 8],
    num_stages=[1, 2, 3, 4, 5],
)
SHAPES = [(4096, 4096, 4096), (512, 4096, 4096), (64, 8192, 8192), (16384, 1024, 2048)]
PLATFORM = {
    "backend": "synthetic",
    "device": "model of an H100",
    "arch": "90",
    "triton": "n/a",
    "timer": "synthetic",
}
SMS = 132
SMEM_LIMIT = 232448
PEAK_TFLOPS = 700.0


def model_ms(c: dict, m: int, n: int, k: int) -> float | str:
    """Milliseconds for config ``c`` on an (m, n, k) fp16 GEMM, or a failure reason."""
    bm, bn, bk, warps, stages = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"]
    smem = (bm + bn) * bk * 2 * max(stages - 1, 1)
    if smem > SMEM_LIMIT:
        return (
            f"OutOfResources: out of resource: shared memory, Required: {smem}, Hardware limit: "
            f"{SMEM_LIMIT}. Reducing block sizes or `num_stages` may help."
        )
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    per_sm = max(1, min(4, SMEM_LIMIT // smem, 64 // warps))
    waves = math.ceil(tiles / (SMS * per_sm))
    intensity = (bm * bn) / (bm + bn)  # flops per byte loaded, up to a constant
    e_tile = intensity / (intensity + 24.0)
    e_k = {16: 0.72, 32: 0.9, 64: 1.0, 128: 0.96}[bk]
    e_stages = {1: 0.45, 2: 0.78, 3: 0.94, 4: 1.0, 5: 0.99}[stages]
    ideal_warps = min(8.0, max(2.0, bm * bn / 4096))
    e_warps = math.exp(-0.35 * math.log2(warps / ideal_warps) ** 2)
    spill = max(1.0, (bm * bn / (32 * warps)) / 256) ** 1.5  # accumulators past the register file
    efficiency = e_tile * e_k * e_stages * e_warps / spill
    tile_ms = 2.0 * bm * bn * k / (PEAK_TFLOPS * 1e9 / SMS) / efficiency
    return waves * tile_ms / min(per_sm, 2) ** 0.5 + 0.004


def make(m: int, n: int, k: int, seed: int) -> Table:
    rng = random.Random(seed)
    rows = []
    for c in SPACE.candidates():
        value = model_ms(c, m, n, k)
        if isinstance(value, str):
            rows.append(TableRow(c, None, value))
        else:
            rows.append(TableRow(c, round(value * math.exp(rng.gauss(0.0, 0.015)), 6)))
    return Table(
        kernel="matmul",
        shape={"M": m, "N": n, "K": k, "dtype": "float16"},
        platform=PLATFORM,
        rows=tuple(rows),
        space={name: list(values) for name, values in SPACE.params.items()},
    )


def main() -> None:
    out = HERE / "tables"
    out.mkdir(exist_ok=True)
    for seed, (m, n, k) in enumerate(SHAPES):
        table = make(m, n, k, seed)
        path = out / f"synthetic-matmul-M{m}-N{n}-K{k}.json"
        table.dump(path)
        best, ms = table.best()
        fails = sum(r.ms is None for r in table.rows)
        print(
            f"{path.name}: {len(table.rows)} configs, {fails} failed, "
            f"best {ms:.4f} ms {table.rows[best].config}"
        )


if __name__ == "__main__":
    main()
