"""Who a root server's workers run as, and the files the server prepares for them.

A worker of a server run as root switches to the ``worker_user`` setting's user
(:data:`WORKER_USER` by default; see ``isolation.become``): root's files are then not its
own. The server lets that user read the plugin's code; the worker itself, as root and
before it switches, hands its data dir to that user (``settle``), or back to root.

The data dir is the plugin's to write, so whatever the server does in it runs against a
plugin that may be changing it at that moment (an old worker still running, a second
server on the same data dir): it is walked with :func:`mcp_zero.fdio.walk`, and every
change made through a directory's descriptor without following a link.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
from pathlib import Path

from mcp_zero.fdio import DIR_FLAGS, walk

logger = logging.getLogger(__name__)

#: Who the workers of a server run as root run as: never root, whose files would be theirs.
WORKER_USER = "nobody"


def worker_identity(user: str = WORKER_USER) -> tuple[int, int] | None:
    """The user and group (the user's own) a root server's workers switch to: ``user``
    (the ``worker_user`` setting; ``nobody`` is 65534 where the system has no such user);
    None for a server that is not root, or a user that is root (they stay root). Raises
    KeyError for a user the system does not know."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        if user != WORKER_USER:
            raise
        return 65534, 65534
    return None if entry.pw_uid == 0 else (entry.pw_uid, entry.pw_gid)


def hand_over(data_dir: Path, uid: int, gid: int) -> None:
    """Make a plugin's data dir the worker user's, with what is in it (written by a root
    worker of an earlier release, or by hand); nothing to do when the directory already is
    that user's (a plugin cannot give its own data dir back to root, so cannot have the
    server walk it again). A file with another name elsewhere (a hard link) is left as it
    is: chown would hand over that other file as well."""
    top = os.open(data_dir, DIR_FLAGS)
    try:
        if os.fstat(top).st_uid == uid:
            return
        left = 0
        for fd, name, st, _ in walk(top):
            if (st.st_uid, st.st_gid) == (uid, gid):
                continue  # (done by a walk that was cut short: each start gets further)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink != 1:
                left += 1  # (a hard link)
                continue
            try:
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
            except OSError:  # (another user's, not mapped in a user namespace)
                left += 1
        if left:
            logger.warning(
                "%s: %d files (hard links, or of users not mapped here) left to their owners,"
                " not given to uid %d",
                data_dir,
                left,
                uid,
            )
        os.fchown(top, uid, gid)  # last: it says the walk is done
    finally:
        os.close(top)


def reclaim(data_dir: Path, identity: tuple[int, int] | None) -> None:
    """Give a data dir owned by neither root nor ``identity`` (the ``worker_user`` setting
    changed) back to root: run by a root worker before it enters any namespace, where it
    may chown any user's files (in a user namespace only mapped users' are its)."""
    owner = os.stat(data_dir, follow_symlinks=False).st_uid
    if owner != 0 and (identity is None or owner != identity[0]):
        hand_over(data_dir, 0, 0)


def settle(data_dir: Path, identity: tuple[int, int] | None) -> None:
    """Make a worker's data dir, with its ``TMPDIR``, the user the worker runs as from now
    on: ``identity`` (nobody, to which it is about to switch) or its own. Run by the worker
    itself, as root, once it knows whether it can switch: a data dir handed over to a
    worker that then stayed root would be closed to it (a root process without
    capabilities may not enter nobody's 0700 directory); one handed over earlier goes back
    to root then."""
    owner = identity or (os.geteuid(), os.getegid())
    if os.geteuid() == 0:
        hand_over(data_dir, *owner)
    make_tmp(data_dir, owner if os.geteuid() == 0 else None)


def make_tmp(data_dir: Path, identity: tuple[int, int] | None) -> None:
    """Make the data dir's ``.tmp`` (the worker's ``TMPDIR``) a directory of the worker's
    user: made again if the plugin removed it, or put something else in its place."""
    top = os.open(data_dir, DIR_FLAGS)
    try:
        try:
            st = os.stat(".tmp", dir_fd=top, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            # (another worker of the plugin may have replaced it meanwhile)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(".tmp", dir_fd=top)
            st = None
        if st is None:
            with contextlib.suppress(FileExistsError):
                os.mkdir(".tmp", 0o700, dir_fd=top)
            try:
                st = os.stat(".tmp", dir_fd=top, follow_symlinks=False)
            except FileNotFoundError:
                return  # (the plugin is racing its own TMPDIR: it breaks only its own)
            if not stat.S_ISDIR(st.st_mode):
                return
        if identity is not None and (st.st_uid, st.st_gid) != identity:
            os.chown(".tmp", *identity, dir_fd=top, follow_symlinks=False)
    finally:
        os.close(top)


def readable_to_all(tree: Path) -> None:
    """Let every user read ``tree``'s files, search its directories and run what its owner
    may run: a plugin's copy, which a root server's workers (nobody) load. Inside the
    server's ``0700`` data dir that opens it to no one else. Links are left as they are."""
    top = os.open(tree, DIR_FLAGS)
    try:
        _add_read(top, 0o555)
        for fd, name, st, _ in walk(top):
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                try:
                    opened = os.open(name, flags, dir_fd=fd)
                except OSError:
                    continue
                try:
                    _add_read(opened, 0o555 if stat.S_ISDIR(st.st_mode) else 0o444)
                finally:
                    os.close(opened)
    finally:
        os.close(top)


def _add_read(fd: int, bits: int) -> None:
    st = os.fstat(fd)
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return  # (replaced by something else meanwhile)
    if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IXUSR:
        bits |= 0o111
    if st.st_mode & bits != bits:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | bits)


__all__ = [
    "WORKER_USER",
    "hand_over",
    "make_tmp",
    "readable_to_all",
    "reclaim",
    "settle",
    "worker_identity",
]
