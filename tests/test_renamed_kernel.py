"""The name a page is filed under is not what a result is matched by: the same kernel (source
hash, key names) on the same platform under another name is answered from the results it
has, in a new process, without benchmarking; and the answer is then this name's too."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import book_files, run_python

# One kernel, launched under a name chosen by the child: tunebook.autotune's own (the
# function's name), an explicit name=, or tunebook.patch()'s module.qualname.
CHILD = """
import json, os, torch, triton, tunebook
import small_kernels
from small_kernels import block_configs, grid_1d, vectors
how, fn = os.environ["HOW"], getattr(small_kernels, os.environ.get("FN", "add_kernel"))
configs = block_configs(32, 64, 128, 256)
if how == "patch":
    tunebook.patch()
    kernel = triton.autotune(configs, key=["n"])(fn)
elif how == "named":
    kernel = tunebook.autotune(configs, key=["n"], name="vendor.ops.add")(fn)
else:
    kernel = tunebook.autotune(configs, key=["n"])(fn)
for n in (300, 5000):
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    assert fn is not small_kernels.add_kernel or torch.equal(out, x + y), "wrong output"
print(json.dumps({"benchmarked": tunebook.stats()["benchmarked"], "best": kernel.best_config.kwargs["BLOCK"],
                  "name": kernel.label}))
"""


def child(book: Path, how: str, mode: str = "tune") -> dict:
    return run_python(CHILD, env={"TUNEBOOK_DIR": str(book), "HOW": how, "TUNEBOOK_MODE": mode})


@pytest.mark.parametrize(("first", "then"), [("own", "patch"), ("patch", "own"), ("own", "named")])
def test_the_same_kernel_under_another_name_benchmarks_nothing(tmp_path: Path, first: str, then: str) -> None:
    """Found by a misuse review: moving from @tunebook.autotune to the zero-code patch
    (which names kernels module.qualname), or a kernel defined in a script run directly
    (__main__.k) and then imported, tuned everything again."""
    book = tmp_path / "book"
    tuned = child(book, first)
    assert tuned["benchmarked"] > 0
    again = child(book, then)
    assert again["name"] != tuned["name"], (tuned, again)
    assert again["benchmarked"] == 0 and again["best"] == tuned["best"], (tuned, again)
    assert len(book_files(book)) == 2  # the new name's page holds the keys now
    served = child(book, then, mode="serve")
    assert served["benchmarked"] == 0 and served["best"] == tuned["best"]


def test_a_renamed_kernel_of_another_source_is_not_answered(tmp_path: Path) -> None:
    """Only the exact kernel counts: another source under another name tunes."""
    book = tmp_path / "book"
    child(book, "own")
    other = run_python(
        CHILD, env={"TUNEBOOK_DIR": str(book), "HOW": "named", "FN": "add_wrong_at_128_kernel"}
    )
    assert other["benchmarked"] > 0
