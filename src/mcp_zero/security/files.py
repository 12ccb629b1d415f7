"""Files written whole or not at all, safe against other processes writing them at once.

A file is written to a temporary file of its own in the same directory (created with its
final mode, so a secret is never readable by others, not even while being written), flushed
to disk, renamed over the target, and the directory flushed too: a reader sees the old file
or the new one, a crash leaves one of them, and writers at once each rename their own file
(the last wins) instead of writing into, or renaming away, the same ``.tmp``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) atomically and durably.

    Raises OSError (a full disk, a directory that cannot be written); the temporary file is
    removed then, and ``path`` is left as it was.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)  # mkstemp made it 0600, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename into it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` (created 0600, never removed:
    removing it would let two processes lock two different files) while the block runs."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def make_private(path: Path) -> int | None:
    """Take from ``path`` (a secret file) what its mode gives others (group and world), if
    anything; the mode it had then, or None (it gave them nothing, or it cannot be looked
    at: no file, or a directory we may not search, which reading it will tell). Raises
    OSError when its mode cannot be changed (another user's file)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    os.chmod(path, mode & 0o700)
    return mode
