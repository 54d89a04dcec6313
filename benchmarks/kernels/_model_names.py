"""Model names as the benchmark results files have spelt them, for the tools that read those
files (kept apart from ``linear.py``, which imports torch, so that a picture needs none)."""

OLD_NAMES = {  # linear.py's names before it took the pack's; results in benchmarks/results use them
    "llama3-8b": "llama-3-8b",
    "llama3-70b-tp4": "llama-3-70b-tp4",
    "llama3-70b-tp8": "llama-3-70b-tp8",
}
