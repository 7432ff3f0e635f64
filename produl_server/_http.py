"""Lean HTTP/1.1 for the direct route: kept-alive sockets, one POST at a time on each.

The sender's requests are all alike: one small POST to one host, whose answer
matters only for its status, ``Retry-After`` and, on an error, the first
64 KiB of its body. A general client (urllib3 over :mod:`http.client`) spends
about four times our whole request in Python on things we never use: header
objects, the ``email`` parser, retry and redirect bookkeeping. This module
does only what the sender needs, over plain sockets and :mod:`ssl`, and keeps
every bound the transport promises:

- the whole exchange has one deadline, checked before every socket call;
- at most :data:`MAX_HEAD` bytes of status line and headers are read, and at
  most :data:`MAX_ANSWER` bytes of body; whatever is longer is cut and its
  connection closed;
- an answer that breaks HTTP/1.1 raises :class:`AnswerError` before its
  status is trusted; one that breaks it in the body still stands on its
  status, and its connection is closed.

A connection goes back to the pool only after a complete answer that did
not ask to close it. Before a kept connection is used again it is checked
for a close the server already sent, and a request on a kept connection that
the server closed before answering is sent once more on a new one, within
the same deadline (the server did not read it: it answered nothing).

Proxies are not handled here: the transport sends through urllib3 when one
is configured.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

#: The most bytes of an answer's body that are read; the rest is discarded
#: with the connection.
MAX_ANSWER = 64 * 1024
#: The most bytes of status lines and header lines read for one answer.
MAX_HEAD = 64 * 1024
_RECV = 64 * 1024
_NO_BODY = frozenset({204, 304})
_HEAD_TOO_LONG = f"the answer's headers are over {MAX_HEAD} bytes"
_BAD_CHUNK_END = "a chunk of the answer does not end where its size says"


class AnswerError(OSError):
    """The server's answer is not HTTP/1.1 we can read (a network-class failure)."""


class NoAnswerError(ConnectionError):
    """The connection ended before a single byte of the answer arrived."""


class Answer:
    """What the sender keeps of one answer."""

    __slots__ = ("body", "retry_after", "status")

    def __init__(self, status: int, retry_after: str | None, body: bytes) -> None:
        self.status = status
        self.retry_after = retry_after
        self.body = body


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class _Reader:
    """Buffered, bounded reads from one socket, each within the deadline."""

    __slots__ = ("buf", "deadline", "got", "pos", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.pos = 0
        #: Whether any byte of the answer arrived.
        self.got = False

    def _fill(self) -> bool:
        """Read what the socket has; False at the end of the stream."""
        self.sock.settimeout(_remaining(self.deadline))
        chunk = self.sock.recv(_RECV)
        if not chunk:
            return False
        self.got = True
        self.buf = self.buf[self.pos :] + chunk if self.pos < len(self.buf) else chunk
        self.pos = 0
        return True

    def line(self, limit: int, too_long: str) -> bytes | None:
        """One line without its end; None at the end of the stream.

        Raises:
            AnswerError: With the message *too_long*, for a line over *limit* bytes.
        """
        while True:
            end = self.buf.find(b"\n", self.pos)
            if end >= 0:
                if end - self.pos > limit:
                    raise AnswerError(too_long)
                text = self.buf[self.pos : end]
                self.pos = end + 1
                return text[:-1] if text.endswith(b"\r") else text
            if len(self.buf) - self.pos > limit:
                raise AnswerError(too_long)
            if not self._fill():
                return None

    def take(self, size: int) -> bytes:
        """Up to *size* bytes (fewer only at the end of the stream)."""
        parts = []
        while size > 0:
            if self.pos >= len(self.buf) and not self._fill():
                break
            part = self.buf[self.pos : self.pos + size]
            self.pos += len(part)
            size -= len(part)
            parts.append(part)
        return b"".join(parts)

    def rest(self) -> int:
        """How many bytes beyond what was taken are already here."""
        return len(self.buf) - self.pos


def _head(reader: _Reader) -> tuple[bytes, int, dict[bytes, bytes]]:
    """The version, status and headers (names lower-cased) of the final answer."""
    budget = MAX_HEAD
    while True:  # 1xx answers are interim: skip them
        status_line = reader.line(budget, _HEAD_TOO_LONG)
        if status_line is None:
            if reader.got:
                raise AnswerError("the connection closed in the middle of the answer's headers")
            raise NoAnswerError("the server closed the connection without answering")
        budget -= len(status_line) + 2
        version, status = _status(status_line)
        fields, budget = _fields(reader, budget)
        if status == 101:
            raise AnswerError("the server switched protocols")
        if not 100 <= status < 200:
            return version, status, fields


def _status(line: bytes) -> tuple[bytes, int]:
    parts = line.split(None, 2)
    if (
        len(parts) < 2
        or not parts[0].startswith(b"HTTP/1.")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
    ):
        raise AnswerError("the answer does not start with an HTTP/1.x status line")
    return parts[0], int(parts[1])


def _fields(reader: _Reader, budget: int) -> tuple[dict[bytes, bytes], int]:
    """Header lines up to the blank one, within *budget* bytes; and what is left of it."""
    fields: dict[bytes, bytes] = {}
    while True:
        if budget <= 0:
            raise AnswerError(_HEAD_TOO_LONG)
        line = reader.line(budget, _HEAD_TOO_LONG)
        if line is None:
            raise AnswerError("the connection closed in the middle of the answer's headers")
        budget -= len(line) + 2
        if not line:
            return fields, budget
        name, colon, value = line.partition(b":")
        if not colon:
            raise AnswerError("a header line of the answer has no ':'")
        key = name.strip().lower()
        value = value.strip()
        if key == b"content-length" and fields.get(key, value) != value:
            raise AnswerError("the answer has two different Content-Length headers")
        fields[key] = value


def _body(reader: _Reader, status: int, fields: dict[bytes, bytes]) -> tuple[bytes, bool]:
    """At most MAX_ANSWER bytes of the body, and whether all of it was read cleanly."""
    if status in _NO_BODY:
        return b"", reader.rest() == 0
    coding = fields.get(b"transfer-encoding")
    if coding is not None:
        if coding.lower().rsplit(b",", 1)[-1].strip() != b"chunked":
            return reader.take(MAX_ANSWER), False  # ends with the connection
        return _chunked(reader)
    length = fields.get(b"content-length")
    if length is None:
        return reader.take(MAX_ANSWER), False  # ends with the connection
    if not length.isdigit() or len(length) > 18:
        raise AnswerError("the answer's Content-Length is not a number")
    size = int(length)
    data = reader.take(min(size, MAX_ANSWER))
    return data, size <= MAX_ANSWER and len(data) == size and reader.rest() == 0


def _chunked(reader: _Reader) -> tuple[bytes, bool]:
    parts: list[bytes] = []
    kept = 0
    while True:
        line = reader.line(1024, "a chunk-size line of the answer is over 1024 bytes")
        if line is None:
            return b"".join(parts), False
        text = line.split(b";", 1)[0].strip()
        if not text or len(text) > 15 or text.strip(b"0123456789abcdefABCDEF"):
            raise AnswerError("a chunk size in the answer is not hexadecimal")
        size = int(text, 16)
        if size == 0:
            break
        part = reader.take(min(size, MAX_ANSWER - kept))
        parts.append(part)
        kept += len(part)
        if len(part) < size:  # over the limit, or the stream ended
            return b"".join(parts), False
        if reader.line(2, _BAD_CHUNK_END) != b"":
            raise AnswerError(_BAD_CHUNK_END)
    budget = MAX_HEAD
    while True:  # trailers, up to the blank line
        line = reader.line(budget, f"the answer's trailers are over {MAX_HEAD} bytes")
        if line is None:
            return b"".join(parts), False
        if not line:
            return b"".join(parts), reader.rest() == 0
        budget -= len(line) + 2


def _keeps_alive(version: bytes, fields: dict[bytes, bytes]) -> bool:
    tokens = fields.get(b"connection", b"").lower()
    if b"close" in tokens:
        return False
    return version == b"HTTP/1.1" or b"keep-alive" in tokens


def exchange(sock: socket.socket, request: bytes, deadline: float) -> tuple[Answer, bool]:
    """Send *request* and read its answer; also whether the connection may be kept.

    Raises:
        OSError: Nothing usable came back (a timeout, a reset, a closed
            connection, or a status line and headers that break HTTP/1.1).
    """
    reader = _Reader(sock, deadline)
    try:
        sock.settimeout(_remaining(deadline))
        sock.sendall(request)
        version, status, fields = _head(reader)
    except (ConnectionError, ssl.SSLEOFError) as exc:
        if reader.got or isinstance(exc, NoAnswerError):
            raise
        raise NoAnswerError(f"the connection ended before any answer ({exc})") from exc
    retry_after = fields.get(b"retry-after")
    shown = None if retry_after is None else retry_after.decode("latin-1")
    try:
        body, complete = _body(reader, status, fields)
    except OSError:
        # The status line and headers arrived: the answer stands on them.
        return Answer(status, shown, b""), False
    return Answer(status, shown, body), complete and _keeps_alive(version, fields)


if hasattr(select, "poll"):

    def _closed_by_peer(sock: socket.socket) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))

else:  # pragma: no cover - Windows

    def _closed_by_peer(sock: socket.socket) -> bool:
        return bool(select.select([sock], [], [], 0)[0])


class DirectPool:
    """Up to *size* kept-alive connections to one host, shared by the sender's lanes.

    Args:
        host: The host name or address (an IPv6 address without brackets).
        port: The TCP port.
        wrap: Starts TLS on a new connection (``https``), given the socket and
            the server's name; None for plain ``http``.
        size: How many idle connections are kept at most.
    """

    def __init__(
        self,
        host: str,
        port: int,
        wrap: Callable[[socket.socket, str], socket.socket] | None,
        size: int,
    ) -> None:
        self._address = (host, port)
        self._wrap = wrap
        self._size = size
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def post(self, request: bytes, deadline: float) -> Answer:
        """One whole request on a kept connection if one is alive, else on a new one."""
        sock = self._take()
        if sock is not None:
            try:
                return self._on(sock, request, deadline)
            except NoAnswerError:
                pass  # closed by the server between two requests: once more, anew
        return self._on(self._connect(deadline), request, deadline)

    def _on(self, sock: socket.socket, request: bytes, deadline: float) -> Answer:
        try:
            answer, keep = exchange(sock, request, deadline)
        except BaseException:
            sock.close()
            raise
        if keep:
            self._give_back(sock)
        else:
            sock.close()
        return answer

    def _take(self) -> socket.socket | None:
        with self._lock:
            while self._idle:
                sock = self._idle.pop()
                if not _closed_by_peer(sock):
                    return sock
                sock.close()
        return None

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append(sock)
                return
        sock.close()

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.create_connection(self._address, timeout=_remaining(deadline))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._wrap is not None:
                sock.settimeout(_remaining(deadline))
                sock = self._wrap(sock, self._address[0])
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def abandon(self) -> None:
        """Close this process's copies of the idle sockets without taking the lock (after fork)."""
        idle, self._idle = self._idle, []
        for sock in list(idle):
            sock.close()
