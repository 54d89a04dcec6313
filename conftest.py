"""Set-up shared by the tests (tests/) and the docstring examples (src/tunebook/): every kernel
runs on the CPU through Triton's interpreter, which must be chosen before triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"
# Docstring examples that open a book write to a scratch directory, never the user's cache
# (the tests' own fixture gives each test a fresh one).
if not os.environ.get("TUNEBOOK_DIR"):
    import tempfile

    os.environ["TUNEBOOK_DIR"] = tempfile.mkdtemp(prefix="tunebook-doctests-")
