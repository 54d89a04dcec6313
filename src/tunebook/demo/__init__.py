"""The tunebook demo: ``python -m tunebook.demo``. See __main__.py."""
