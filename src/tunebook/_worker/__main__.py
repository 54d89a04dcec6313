"""Entry point of a tuning worker process (see child.py):

python -m tunebook._worker JOBFILE     # the jobs in JOBFILE (-: on stdin), then exit
python -m tunebook._worker --serve     # requests from stdin, one per line (units.py)
"""

import sys

from .child import serve_main, worker_main

if __name__ == "__main__":
    sys.exit(serve_main() if sys.argv[1:] == ["--serve"] else worker_main(sys.argv[1]))
