"""``python -m tunebook``: the same command line as the ``tunebook`` entry point."""

from __future__ import annotations

from tunebook.cli import main

if __name__ == "__main__":
    main()
