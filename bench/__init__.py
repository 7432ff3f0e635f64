"""The produl-server benchmark suite (issue 6): six measures, each against a floor.

Run everything with ``python -m bench`` from the repository root; see
``docs/performance.rst`` (written by that command) for what each measure means.
Nothing here is part of the installed package.
"""
