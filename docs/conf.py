"""Sphinx configuration for the produl-server documentation.

Build with ``tox -e docs``, or by hand with the package installed::

    sphinx-build -n -W --keep-going -b html docs docs/_build/html
    sphinx-build -b doctest docs docs/_build/doctest

The docs document the *installed* package (as the tests do), so this file
does not put the checkout on ``sys.path``.
"""

from __future__ import annotations

from typing import Any

import produl_server

project = "produl-server"
author = "Produl"
copyright = "Produl"
release = produl_server.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nitpicky = True

# -- autodoc / napoleon ------------------------------------------------------

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No network at build time, so no intersphinx: standard-library and
# third-party types that appear in signatures are left unlinked on purpose.
nitpick_ignore = [
    ("py:class", name)
    for name in (
        "abc.ABC",
        "argparse.ArgumentParser",
        "collections.abc.Callable",
        "collections.abc.Iterable",
        "collections.abc.Iterator",
        "collections.abc.Mapping",
        "collections.abc.Sequence",
        "contextvars.ContextVar",
        "re.Pattern",
        "django.http.request.HttpRequest",
        "dramatiq.broker.Broker",
        "dramatiq.middleware.middleware.Middleware",
        "flask.Flask",
        "flask.app.Flask",
        "flask.wrappers.Request",
        "HttpRequest",
        "HttpResponseBase",
        "WSGIApplication",
        "ASGIApp",
        "Scope",
        "collections.abc.MutableMapping",
        "os.PathLike",
        "threading.Condition",
        "types.TracebackType",
        "typing.Any",
        "uuid.UUID",
    )
]

# -- doctest -------------------------------------------------------------------

# Every document's examples run against a local collector on 127.0.0.1,
# never the network: the collector's URL and key go into the environment,
# exactly where Produl() looks for them.
doctest_global_setup = """
import os as _os
from produl_server.testing import LocalCollector as _LocalCollector

_collector = _LocalCollector().start()
_saved_env = {k: _os.environ.get(k) for k in ("PRODUL_API_URL", "PRODUL_SERVER_KEY")}
_os.environ["PRODUL_API_URL"] = _collector.url
_os.environ["PRODUL_SERVER_KEY"] = _collector.server_key
"""
doctest_global_cleanup = """
_collector.stop()
for _k, _v in _saved_env.items():
    if _v is None:
        _os.environ.pop(_k, None)
    else:
        _os.environ[_k] = _v
"""
doctest_test_doctest_blocks = ""  # only explicit doctest directives run

# -- HTML ----------------------------------------------------------------------

html_theme = "furo"
html_title = f"produl-server {release}"
html_static_path: list[str] = []
html_show_sourcelink = False


# -- public names for private modules -------------------------------------------

#: Where a name used unqualified in a docstring may be documented.
_PUBLIC_MODULES = ("produl_server", "produl_server.testing", "produl_server.collector")


def _public_alias(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve ``produl_server._worker.Stats`` to the documented ``produl_server.Stats``.

    Type hints name the module an object is defined in; the reference
    documents each object where users import it from. A name a docstring
    uses unqualified (``LocalCollector.drop_next``) is looked up in the
    public modules.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if target.startswith("produl_server."):
        parts = target.split(".")
        public = [p for p in parts[:-1] if not p.startswith("_")] + parts[-1:]
        candidates = [".".join(public), "produl_server." + parts[-1]]
    else:
        candidates = [f"{module}.{target}" for module in _PUBLIC_MODULES]
    domain = env.get_domain("py")
    for candidate in candidates:
        if candidate == target:
            continue
        found = domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode
        )
        if found is not None:
            return found
    return None


def setup(app: Any) -> None:
    app.connect("missing-reference", _public_alias)
