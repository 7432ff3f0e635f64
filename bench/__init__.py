"""The produl-server benchmark suite (issue 6): nine measures, each against a floor.

Run everything with ``python -m bench`` from the repository root; see
``docs/performance.rst`` (written by that command) for what each measure means.
``python -m bench.soak_fleet`` soaks a fleet sharing its quota and spool in
Redis through restarts (issue 13); it is not part of the suite's table.
Nothing here is part of the installed package.
"""
