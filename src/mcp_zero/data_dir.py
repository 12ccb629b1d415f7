"""The claim a process takes on a data dir before it reads or lays out anything in it.

Commands started together where no data dir is (``mcp0 serve`` and ``mcp0 agent create``,
say) each laid it out, and one that failed removed it with what the others had written
into it: an agent whose token was shown was gone (found by review). Now every process
takes an exclusive ``flock`` on the data dir itself, made first if none is there: one lays
the directory out while the others wait, then find it laid out. The process that laid it
out holds the lock until its command has ended (``Runtime(hold_new=True)``); if that
command failed and the process made the directory, found empty under the lock, it removes
it: nobody else has used it, and a process waiting on the lock finds it gone and starts
again (making it anew). The lock goes with its process: a layout cut short (``kill -9``)
is finished by the next process to take the claim.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mcp_zero import fdio

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class DataDirClaim:
    """An exclusive lock on a data dir, held until :meth:`release` (or :meth:`abandon`)."""

    def __init__(self, path: Path, fd: int, *, fresh: bool) -> None:
        self.path = path
        #: this process made the directory and found it empty: nobody else has used it
        self.fresh = fresh
        self._fd: int | None = fd

    def release(self) -> None:
        """Let the processes waiting for the data dir in (nothing if done already)."""
        if self._fd is not None:
            os.close(self._fd)  # (releases the lock)
            self._fd = None

    def abandon(self) -> None:
        """Remove the data dir if the claim is fresh (what it holds was made by this process
        alone), then release it: a process that failed to set one up leaves none behind."""
        try:
            if self.fresh and self._fd is not None:
                fdio.remove_tree(self.path, ignore_errors=True)
        finally:
            self.release()


def claim_data_dir(path: Path, *, make: bool = True) -> DataDirClaim:
    """Claim the data dir at ``path``, making it (private: mode 0700) if none is there and
    ``make``, and waiting while another process lays it out, or runs the command that made
    it.

    Raises OSError (not a directory, one that cannot be made or read), FileNotFoundError
    when there is none and not ``make``.
    """
    while True:
        claim = lock_data_dir(path, made=make and _make(path), make=make)
        if claim is not None:
            return claim


def lock_data_dir(path: Path, *, made: bool, make: bool = True) -> DataDirClaim | None:
    """The claim on the data dir at ``path`` once its lock is held (waiting for it), fresh
    if ``made`` by this process and found empty then; None when it was removed meanwhile
    (by a process that made it and failed: claim it again). Raises as :func:`claim_data_dir`.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        if not make or os.path.lexists(path):  # (or a dangling symbolic link)
            raise
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _still_at(fd, path):
            return DataDirClaim(path, fd, fresh=made and not os.listdir(fd))
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _make(path: Path) -> bool:
    """Make the directory ``path`` (and its parents); False if it was there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        return False  # the operator's directory (maybe /srv/x or shared): its mode is theirs
    os.chmod(path, 0o700)  # ours: private whatever the umask
    return True


def _still_at(fd: int, path: Path) -> bool:
    """Whether the directory open as ``fd`` is still the one at ``path``."""
    try:
        at = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (at.st_dev, at.st_ino) == (held.st_dev, held.st_ino)
