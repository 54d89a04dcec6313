"""With FAKEGPU=H100,A100 (and this folder on PYTHONPATH): fake those GPUs in this process
(tests/fakegpu.py), e.g. in a ``tunebook tune`` worker or an ``isolate=True`` worker."""

import os
import sys

if os.environ.get("FAKEGPU"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fakegpu

    fakegpu.install(os.environ["FAKEGPU"].split(","))
