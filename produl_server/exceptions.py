"""Exceptions raised by produl-server.

The tree, drawn::

    ProdulError
    ├── ConfigurationError   (also ValueError)   bad key, URL or option
    ├── InvalidEventError    (also ValueError)   a track_* call with bad input
    │   └── InvalidEventTypeError (also TypeError) ...because of a wrong type
    └── DeliveryError        never raised: handed to on_error

Only input problems raise, and they raise in the caller. Delivery problems
(the network, the collector's answers) never raise: they are logged on the
``produl_server`` logger, counted in :attr:`Produl.stats` and handed to the
``on_error`` hook as a :class:`DeliveryError`.
"""

from __future__ import annotations


class ProdulError(Exception):
    """Root of every exception produl-server raises or reports."""


class ConfigurationError(ProdulError, ValueError):
    """The client was configured wrongly: a missing key, a bad URL or option.

    Raised by the :class:`~produl_server.Produl` constructor, never later.
    """


class InvalidEventError(ProdulError, ValueError):
    """A ``track_*`` call was given input that the collector would refuse.

    Args:
        field: Where the problem is.
        message: What rule was broken, and how to fix it.

    Attributes:
        field: Where the problem is, as a key path such as
            ``properties["items"][2]`` or an argument name such as
            ``visitor_id``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidEventTypeError(InvalidEventError, TypeError):
    """An :class:`InvalidEventError` caused by a value of the wrong type.

    It is also a :class:`TypeError`, so ``except TypeError`` catches it.
    """


class DeliveryError(ProdulError):
    """An event could not be delivered; handed to ``on_error``, never raised.

    Args:
        reason: The stable code, see below.
        message: A sentence for logs.
        status: The HTTP status, if the collector answered.

    Attributes:
        reason: A short stable code: ``"rejected"`` (400/413/422, other 4xx,
            and 3xx, since redirects are not followed), ``"unauthorized"``
            (401/403), ``"retries_exhausted"``, ``"queue_full"``,
            ``"shutdown"`` or ``"invalid"``.
        status: The HTTP status the collector answered, if there was one.
    """

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
