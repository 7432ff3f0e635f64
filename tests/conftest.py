"""Shared fixtures; also makes sure the tests exercise the installed package."""

from __future__ import annotations

import os
import pathlib

import produl_server

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent / "produl_server"
IMPORTED = pathlib.Path(produl_server.__file__).resolve().parent

# Tests must run against what users install (the wheel), not the working tree:
# a module missing from the wheel would otherwise pass here and fail for them.
# PRODUL_TEST_ALLOW_CHECKOUT=1 is for a quick local loop with PYTHONPATH=.
if IMPORTED == CHECKOUT and os.environ.get("PRODUL_TEST_ALLOW_CHECKOUT") != "1":
    raise RuntimeError(
        f"the tests imported produl_server from the checkout ({IMPORTED}); "
        "run them through tox, which installs the wheel"
    )

pytest_plugins = ["produl_server.pytest_plugin"]
