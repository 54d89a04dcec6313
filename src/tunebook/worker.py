"""Entry point of a tuning worker process: ``python -m tunebook.worker JOBFILE`` (see _worker.py)."""

import sys

from tunebook._worker import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
