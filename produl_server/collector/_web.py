"""The live page's static files, shipped as package data."""

from __future__ import annotations

import functools
from importlib import resources

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
_FILES = {
    "/": "index.html",
    "/index.html": "index.html",
    "/app.css": "app.css",
    "/app.js": "app.js",
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("produl_server.collector").joinpath("static").joinpath(name).read_bytes()


def asset(path: str) -> tuple[bytes, str] | None:
    """The static file served at ``path``.

    Args:
        path: The URL path, e.g. ``/`` or ``/app.js``.

    Returns:
        ``(content, content type)``, or ``None`` when nothing is served there.
    """
    name = _FILES.get(path)
    if name is None:
        return None
    suffix = name[name.rindex(".") :]
    return _read(name), _TYPES[suffix]
