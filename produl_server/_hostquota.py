"""One request quota shared by every process of the host.

Produl's API allows a number of requests per minute per IP. Each process
paces itself with a :class:`~._quota.RollingQuota`, but eight gunicorn or
Celery workers on one host would then send eight times the quota. A
:class:`HostQuota` answers the same questions (``take``, ``wait``,
``used``) from a small file that all the processes of one user share.

The file
    A header (magic, version, capacity, head, count) and a ring of
    ``capacity`` float64 timestamps, oldest first from ``head``: the
    requests of the last ``window`` seconds. Each process maps it with
    ``mmap``, so a ``take`` is one ``flock``, a few reads and writes of
    shared memory, and one unlock. The name is a short hash of ``key``
    (the API URL): one quota per collector.

Where it lives
    ``$XDG_RUNTIME_DIR/produl-server/`` when that is set and writable, else
    ``<tempdir>/produl-server-<uid>/``; the ``directory`` argument overrides
    both (say, a volume shared by containers). The directory is created
    with mode 0o700 and refused when another user owns it or when group or
    others may write to it: nobody else may read the file, fill it or lock
    it. Containers sharing a quota must therefore run as the same uid.

Time
    ``now`` is wall-clock time (``time.time()``), the only clock that all
    processes share. Stored timestamps never go backwards (a request is
    stored at ``max(now, newest)``), so the ring stays sorted even when two
    processes read the clock in one order and take the lock in the other.
    If the clock steps back, entries more than ``window`` ahead of ``now``
    are stale and dropped; smaller steps only make the pacing stricter for
    a while, and no answer is ever longer than ``window``. A clock that
    steps forward ends the window early, as it would for any wall clock.

Limits
    The ring holds as many slots as the largest limit any process asked
    for (it grows under the lock, keeping every timestamp, and never
    shrinks while the file exists). Each caller decides with its own
    ``limit``: a process configured for 1,000 waits once 1,000 requests of
    the host are in the window, even if another one allows 2,000.

Locking
    ``fcntl.flock``: the kernel releases it when its holder dies, so a
    killed process never wedges the others. A stopped one (SIGSTOP, a
    debugger) would, so the lock is only ever tried without blocking, for
    at most :attr:`HostQuota.LOCK_BUDGET` seconds; after that the call
    answers "wait :attr:`HostQuota.BUSY_WAIT` seconds". When the lock has
    been unavailable for :attr:`HostQuota.STUCK_AFTER` seconds, one warning
    is logged and the process paces itself alone at the full limit (the
    collector's 429 and ``Retry-After`` are the backstop) until the lock
    can be taken again: better too many requests than none at all because
    one process is frozen. Requests paced alone are not copied into the
    file afterwards.

Fallbacks
    Without ``fcntl`` (Windows), or when the directory or the file cannot be
    made or used (read-only, full, refused), the quota is an in-process
    :class:`~._quota.RollingQuota` and one warning on the
    ``produl_server`` logger says where and why. :attr:`HostQuota.shared`
    tells which it is.

Processes
    A child of ``os.fork()`` inherits the parent's descriptor, and ``flock``
    belongs to the open file, so parent and child would share one lock and
    both "hold" it at once. The child must call
    :meth:`HostQuota.after_fork_in_child`, which opens the file anew. One
    object is safe to use from several threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import mmap
import os
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable

from ._private import RefusedError, check_private_dir
from ._quota import QUOTA_WINDOW, RollingQuota

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    _HAVE_FCNTL = False
else:
    _HAVE_FCNTL = True

log = logging.getLogger("produl_server")

__all__ = ["HostQuota", "HostWideQuota"]

_MAGIC = b"PRDLHQ\x00\x01"
_VERSION = 1
#: magic, version, capacity, head, count: 32 bytes, native byte order
#: (the file never leaves the host).
_HEADER = struct.Struct("=8sIIQQ")
_RING = struct.Struct("=QQ")  # head, count
_RING_OFFSET = 16
_SLOT = 8
_MAX_LIMIT = 10_000_000


def _make_private(path: str, *, explicit: bool) -> None:
    """Create *path* with mode 0o700 if it is missing, then check it."""
    if explicit:
        os.makedirs(path, mode=0o700, exist_ok=True)
    else:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    check_private_dir(path, follow=explicit)


def _default_directories() -> list[str]:
    """Where the file may live, best first (without ``directory``)."""
    found = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        found.append(os.path.join(runtime, "produl-server"))
    found.append(os.path.join(tempfile.gettempdir(), f"produl-server-{os.geteuid()}"))
    return found


def _choose_directory(directory: str | None) -> tuple[str, str | None]:
    """The directory to use and None, or the last one tried and why it failed."""
    if directory is not None:
        candidates, explicit = [directory], True
    else:
        candidates, explicit = _default_directories(), False
    reason = ""
    for path in candidates:
        try:
            _make_private(path, explicit=explicit)
        except (OSError, RefusedError) as exc:
            reason = str(exc)
            continue
        return path, None
    return candidates[-1], reason


def _open_private_file(path: str) -> int:
    """Open (or create, mode 0o600) the quota file; refuse anything odd."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise RefusedError(f"{path} is not a regular file of ours")
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Mapping:
    """The whole file, mapped: the header's bytes and the slots as floats."""

    def __init__(self, fd: int, need: int) -> None:
        """Map the file behind *fd*, first growing it to *need* slots (never shrinking)."""
        size = os.fstat(fd).st_size
        want = _HEADER.size + _SLOT * need
        if size < want:
            # Real zeros, not a sparse hole: a full disk fails here with ENOSPC
            # instead of a SIGBUS when the mapping is written later.
            os.pwrite(fd, bytes(want - size), size)
            size = want
        self.map = mmap.mmap(fd, size)
        #: Slots in the mapping (the ring may use fewer).
        self.mapped = (size - _HEADER.size) // _SLOT
        end = _HEADER.size + _SLOT * self.mapped
        self.slots = memoryview(self.map)[_HEADER.size : end].cast("d")

    def header(self, limit: int) -> tuple[int, int, int] | None:
        """Capacity, head and count if the header is sound and fits *limit*; else None."""
        magic, version, capacity, head, count = _HEADER.unpack_from(self.map, 0)
        if (
            magic == _MAGIC
            and version == _VERSION
            and limit <= capacity <= self.mapped
            and head < capacity
            and count <= capacity
        ):
            return capacity, head, count
        return None

    def entries(self) -> list[float]:
        """The ring's timestamps, oldest first, if the header is sound (any capacity)."""
        found = self.header(1)
        if found is None:
            return []
        capacity, head, count = found
        return [self.slots[(head + i) % capacity] for i in range(count)]

    def format(self, capacity: int, kept: list[float]) -> None:
        """Lay out a ring of *capacity* slots (no more than mapped) holding *kept*."""
        for index, stamp in enumerate(kept):
            self.slots[index] = stamp
        _HEADER.pack_into(self.map, 0, _MAGIC, _VERSION, capacity, 0, len(kept))

    def close(self) -> None:
        self.slots.release()
        self.map.close()


class HostQuota:
    """At most *limit* requests in any rolling *window* seconds, for the whole host.

    Args:
        limit: Requests allowed in the window. Processes may disagree: each
            decides with its own.
        key: Names the quota; processes with the same key share it (the
            lead passes the API URL).
        directory: Where the file lives, instead of the runtime directory.
        window: The window, in seconds.

    ``now`` in every call is ``time.time()``: see the module's notes.
    """

    #: The longest a call tries for the lock before answering BUSY_WAIT.
    LOCK_BUDGET = 0.02
    #: The answer when the lock could not be had within LOCK_BUDGET.
    BUSY_WAIT = 0.05
    #: After this long without the lock, pace alone until it comes back.
    STUCK_AFTER = 1.0

    def __init__(
        self, limit: int, key: str, directory: str | None = None, window: float = QUOTA_WINDOW
    ) -> None:
        if not 1 <= limit <= _MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {_MAX_LIMIT}, not {limit}")
        if not window > 0:
            raise ValueError(f"window must be positive, not {window}")
        self.limit = limit
        self.window = float(window)
        self.key = key
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._mapping: _Mapping | None = None
        self._used = 0
        self._busy_since: float | None = None
        #: Pacing alone: always without the file, for a while when the lock is stuck.
        self._local: RollingQuota | None = None
        self._path: str | None = None
        #: The file is given up for good: setup failed, or close() was called.
        self._gave_up = False
        if not _HAVE_FCNTL:
            self._give_up(directory or "(no directory)", "no fcntl.flock on this platform")
            return
        folder, reason = _choose_directory(directory)
        if reason is not None:
            self._give_up(folder, reason)
            return
        name = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        self._path = os.path.join(folder, f"quota-{name}.bin")
        self._open(self._path)

    # -- the public interface ------------------------------------------------

    def take(self, now: float) -> float:
        """Use one request of the quota if it fits; else the seconds to wait.

        Raises:
            ValueError: *now* is NaN or infinite (it would stay in the file).
        """
        return self._call(now, record=True)

    def wait(self, now: float) -> float:
        """Seconds until one more request fits (0: it fits now)."""
        return self._call(now, record=False)

    @property
    def used(self) -> int:
        """Requests of the host counted in the window (as of the last call)."""
        local = self._local
        return local.used if local is not None else self._used

    @property
    def shared(self) -> bool:
        """True while the host's file paces this process; False while it paces alone."""
        return self._fd is not None and self._local is None

    @property
    def path(self) -> str | None:
        """The quota file, or None when there is none."""
        return self._path

    def close(self) -> None:
        """Let go of the file; later calls pace this process alone."""
        with self._mutex:
            self._gave_up = True
            self._release()
            self._local = self._local or RollingQuota(self.limit, self.window)

    def after_fork_in_child(self) -> None:
        """Call in a forked child: open the file anew, for a lock of its own.

        The inherited descriptor is closed without unlocking: the parent may
        hold the lock through it.
        """
        self._mutex = threading.Lock()
        self._busy_since = None
        self._release()
        if not self._gave_up and self._path is not None:
            self._local = None
            self._open(self._path)

    # -- setup and teardown ----------------------------------------------------

    def _give_up(self, where: str, reason: str) -> None:
        """Pace this process alone from now on, and say so once."""
        self._gave_up = True
        self._release()
        self._local = RollingQuota(self.limit, self.window)
        log.warning(
            "produl_server: the request quota is not shared with other processes "
            "(%s: %s); this process paces itself alone",
            where,
            reason,
        )

    def _open(self, path: str) -> None:
        try:
            self._fd = _open_private_file(path)
        except (OSError, RefusedError) as exc:
            self._give_up(path, str(exc))

    def _release(self) -> None:
        """Unmap and close (never unlock: a forked parent may hold the lock)."""
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- one call --------------------------------------------------------------

    def _call(self, now: float, *, record: bool) -> float:
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time.time(), not {now}")
        with self._mutex:
            fd = self._fd
            if fd is None:
                return self._call_local(now, record=record)
            alone = self._local is not None
            try:
                locked = self._try_lock(fd) if alone else self._lock(fd)
            except OSError as exc:  # ENOLCK and the like: no locking here
                self._give_up(self._path or "", f"flock: {exc}")
                return self._call_local(now, record=record)
            if not locked:
                return self._call_local(now, record=record) if alone else self._busy(now, record)
            if alone:
                self._recovered()
            self._busy_since = None
            try:
                return self._shared(fd, now, record=record)
            except (OSError, ValueError, BufferError) as exc:
                self._give_up(self._path or "", f"{type(exc).__name__}: {exc}")
                return self._call_local(now, record=record)
            finally:
                if self._fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _call_local(self, now: float, *, record: bool) -> float:
        if self._local is None:
            self._local = RollingQuota(self.limit, self.window)
        return self._local.take(now) if record else self._local.wait(now)

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _lock(self, fd: int) -> bool:
        """Take the lock, trying for at most LOCK_BUDGET seconds."""
        if self._try_lock(fd):
            return True
        deadline = time.monotonic() + self.LOCK_BUDGET
        pause = 0.0001
        while True:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            if self._try_lock(fd):
                return True
            if time.monotonic() >= deadline:
                return False
            pause = min(pause * 2, 0.004)

    def _busy(self, now: float, record: bool) -> float:
        """No lock within the budget: ask for patience, or start pacing alone."""
        clock = time.monotonic()
        if self._busy_since is None:
            self._busy_since = clock
        if clock - self._busy_since < self.STUCK_AFTER:
            return self.BUSY_WAIT
        log.warning(
            "produl_server: the shared request quota %s has been locked for %.1f s "
            "(a stopped process?); this process paces itself alone until it is free",
            self._path,
            clock - self._busy_since,
        )
        self._local = RollingQuota(self.limit, self.window)
        return self._call_local(now, record=record)

    def _recovered(self) -> None:
        self._local = None
        log.info("produl_server: the shared request quota %s is free again", self._path)

    def _shared(self, fd: int, now: float, *, record: bool) -> float:
        """The decision, under the lock."""
        mapping, capacity, head, count = self._ring(fd)
        slots = mapping.slots
        # Entries from further ahead than the window: the clock went back.
        # (Both tests are written so that a NaN, which only a damaged file
        # could hold, leaves too.)
        future = now + self.window
        while count and not slots[(head + count - 1) % capacity] <= future:
            count -= 1
        horizon = now - self.window
        while count and not slots[head] > horizon:
            head = (head + 1) % capacity
            count -= 1
        limit = self.limit
        wait = 0.0
        if count >= limit:
            wait = min(slots[(head + count - limit) % capacity] - horizon, self.window)
        elif record:
            newest = slots[(head + count - 1) % capacity] if count else now
            slots[(head + count) % capacity] = max(now, newest)
            count += 1
        _RING.pack_into(mapping.map, _RING_OFFSET, head, count)
        self._used = count
        return wait

    def _ring(self, fd: int) -> tuple[_Mapping, int, int, int]:
        """The mapping, capacity, head and count: mapped, sound, and big enough."""
        mapping = self._mapping
        if mapping is not None:
            found = mapping.header(self.limit)
            if found is not None:
                return mapping, *found
            # Another process may have grown the file: map all of it.
            mapping.close()
            self._mapping = None
        # A new file gets the caller's limit of slots.
        mapping = self._mapping = _Mapping(fd, self.limit)
        found = mapping.header(self.limit)
        if found is not None:
            return mapping, *found
        # Unformatted, corrupt, or a ring smaller than this caller's limit
        # (whose entries are kept: fewer than the limit, oldest first).
        kept = mapping.entries()
        mapping.format(self.limit, kept)
        return mapping, self.limit, 0, len(kept)


class HostWideQuota:
    """A :class:`HostQuota` as the schedule calls it, with the sender's clock.

    Processes compare their request times in the shared file, so they need a
    clock they share: the wall clock, not each process's monotonic one. The
    ``now`` the sender passes (its monotonic clock) is placed on the wall
    clock by the two clocks' offset, read anew at each call: with the real
    clock that is ``time.time()``; with a test's fake clock, the quota moves
    as that clock moves.

    Args:
        host: The shared window.
        wall: The wall clock. mono: the monotonic clock the sender's ``now``
            is read from. Both for tests.
    """

    kind = "host"

    def __init__(
        self,
        host: HostQuota,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self._wall = wall
        self._mono = mono

    def take(self, now: float) -> float:
        return self.host.take(now + (self._wall() - self._mono()))

    @property
    def used(self) -> int:
        return self.host.used

    @property
    def shared(self) -> bool:
        return self.host.shared

    def after_fork_in_child(self) -> None:
        self.host.after_fork_in_child()
