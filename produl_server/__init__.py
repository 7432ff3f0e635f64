"""produl-server: the Python server-side SDK for Produl analytics.

>>> from produl_server import Produl
>>> produl = Produl(server_key="sk_example_key_0000", enabled=False)
>>> produl.track_event("invoice_paid", {"amount_cents": 4900}, visitor_id="cus_abc123")
>>> produl.flush()
True
"""

import logging

from ._client import Produl
from ._config import Config, ErrorHook
from ._event import PageviewData
from ._version import __version__
from ._worker import Stats
from .exceptions import (
    ConfigurationError,
    DeliveryError,
    InvalidEventError,
    InvalidEventTypeError,
    ProdulError,
)

# Libraries add a NullHandler and nothing else; the application decides
# where logs go.
logging.getLogger("produl_server").addHandler(logging.NullHandler())

__all__ = [
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
