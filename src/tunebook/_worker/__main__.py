"""Entry point of a tuning worker process: ``python -m tunebook._worker JOBFILE`` (see child.py)."""

import sys

from .child import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
