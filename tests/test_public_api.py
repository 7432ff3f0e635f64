"""Pin the public surface, so that changing it is a decision, not an accident."""

from __future__ import annotations

import logging

import produl_server
import produl_server.exceptions as exc


def test_exported_names():
    assert produl_server.__all__ == [
        "BeforeSend",
        "Config",
        "ConfigurationError",
        "DeliveryError",
        "ErrorHook",
        "InvalidEventError",
        "InvalidEventTypeError",
        "PageviewData",
        "Produl",
        "ProdulError",
        "Stats",
        "__version__",
    ]
    for name in produl_server.__all__:
        assert getattr(produl_server, name) is not None


def test_exception_tree():
    assert issubclass(exc.ConfigurationError, exc.ProdulError)
    assert issubclass(exc.ConfigurationError, ValueError)
    assert issubclass(exc.InvalidEventError, exc.ProdulError)
    assert issubclass(exc.InvalidEventError, ValueError)
    assert issubclass(exc.InvalidEventTypeError, exc.InvalidEventError)
    assert issubclass(exc.InvalidEventTypeError, TypeError)
    assert issubclass(exc.DeliveryError, exc.ProdulError)
    assert not issubclass(exc.DeliveryError, ValueError)


def test_the_library_adds_no_log_handler():
    # Not even a NullHandler: it would silence the stdlib's last-resort
    # handler, and with it every loss report of an app that set up no logging.
    logger = logging.getLogger("produl_server")
    assert logger.handlers == []
    assert logger.level == logging.NOTSET
    assert logger.propagate


def test_version_matches_the_installed_metadata():
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("produl-server")
    except PackageNotFoundError:  # pragma: no cover - only in a bare checkout run
        installed = produl_server.__version__
    assert installed == produl_server.__version__
