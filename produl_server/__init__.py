"""produl-server: the Python server-side SDK for Produl analytics.

>>> from produl_server import Produl
>>> produl = Produl(server_key="sk_example_key_0000", enabled=False)
>>> produl.track_event("invoice_paid", {"amount_cents": 4900}, visitor_id="cus_abc123")
>>> produl.flush()
True
"""

from ._client import Produl
from ._config import BeforeSend, Config, ErrorHook
from ._event import PageviewData
from ._ledger import Stats
from ._version import __version__
from .exceptions import (
    ConfigurationError,
    DeliveryError,
    InvalidEventError,
    InvalidEventTypeError,
    ProdulError,
)

# No handler of our own, not even a NullHandler: an application that set up
# no logging then gets our warnings and errors (lost events above all) on
# stderr through the stdlib's last-resort handler; one that configured
# logging decides where they go.

__all__ = [
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
