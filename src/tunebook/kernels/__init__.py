"""``tunebook.kernels``: LLM-serving ops tuned over config spaces, served from shipped books.

(The GEMM half; the lead merges this file with the other half's.)
"""

from __future__ import annotations

from .fused_moe import fused_moe
from .linear import linear

__all__ = ["fused_moe", "linear"]
