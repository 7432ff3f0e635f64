"""Files and directories only this user may change: the quota's and the spool's.

Both hold what other local users must neither read (visitor ids) nor plant
(a forged event would leave under this user's server key, a forged quota
would stall the sender). So a directory is used only if it is ours and no
group or other user may write it, and a file only if it is a regular file
of ours that nobody else may write (and the spool's is made unreadable to others).
"""

from __future__ import annotations

import os
import stat


class RefusedError(Exception):
    """A directory or file that is not safe to use; the message says why."""


def check_private_dir(path: str, *, follow: bool) -> None:
    """Refuse *path* unless it is a directory of ours that only we may write.

    Args:
        path: The directory.
        follow: Whether a symbolic link to a directory is acceptable.
    """
    info = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise RefusedError("not a directory")
    _check_owner_and_mode(info, 0o022, "writable by group or others")


def check_private_file(path: str) -> None:
    """Refuse *path* unless it is a regular file of ours that nobody else may write.

    A file of ours that group or others may read is made private (mode
    ``0o600``) instead: we may, and its contents are ours to protect. A
    missing file passes (it will be created private), and so does a
    directory, for the caller's own open to report.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        return
    if not stat.S_ISREG(info.st_mode):
        raise RefusedError(f"{path} is not a regular file")
    _check_owner_and_mode(info, 0o022, f"{path} is writable by group or others")
    if info.st_mode & 0o077:
        os.chmod(path, 0o600)


def _check_owner_and_mode(info: os.stat_result, mask: int, what: str) -> None:
    if info.st_uid != os.geteuid():
        raise RefusedError(f"owned by uid {info.st_uid}, not by us (uid {os.geteuid()})")
    if info.st_mode & mask:
        raise RefusedError(f"{what} (mode {info.st_mode & 0o777:#o})")
