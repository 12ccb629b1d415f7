"""File descriptors: writing whole buffers, reading a file that must be a regular one, and
walking a tree another process may be changing."""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

#: How deep :func:`walk` goes (it holds a directory's descriptor per level).
MAX_DEPTH = 128
#: How :func:`walk` opens a directory: never through a symbolic link.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``: a pipe or socket takes only what it has room for at
    once, and one in non-blocking mode (set by an event loop's transport on a descriptor it
    shares) says so with BlockingIOError: then this waits until it can write again."""
    try:
        n = os.write(fd, data)
    except BlockingIOError:
        n = 0
    if n == len(data):  # the usual case: one write
        return
    view = memoryview(data)[n:]
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


class NotRegularFile(OSError):
    """A path that had to be a regular file is something else (its kind in ``kind``)."""

    def __init__(self, path: object, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind


def read_regular(path: str | os.PathLike[str], limit: int = -1) -> bytes:
    """The bytes of the regular file at ``path`` (or a link to one); with a ``limit``, at
    most that many and one more (a file over it tells by its length). Opened without
    blocking, so that a named pipe in its place cannot hang the reader, nor a device
    (/dev/zero) feed it without end: raises NotRegularFile for those (nothing left open),
    OSError as ``open`` does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # (a socket: no opening one)
            kind = file_kind(os.stat(path).st_mode)
            if kind is not None:
                raise NotRegularFile(path, kind) from None
        raise
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotRegularFile(path, kind)
        file = os.fdopen(fd, "rb")
    except BaseException:
        # (fdopen of a directory raises, its descriptor left open: one a second leaked
        # while a directory named *.cedar was in the policy dir: found by review)
        os.close(fd)
        raise
    with file:
        return file.read(limit + 1 if limit >= 0 else -1)


def walk_up(path: str | os.PathLike[str]) -> Iterator[tuple[int, str, os.stat_result]]:
    """Every entry below the directory at ``path``, however deep, each after all it holds:
    (its directory's descriptor, its name, its own ``lstat``). For deleting a tree and for
    adding up its bytes, where :func:`walk` (a descriptor per level, :data:`MAX_DEPTH`) and
    ``os.walk`` or ``shutil.rmtree`` (recursion: RecursionError some 1,000 levels down, in
    a tree a plugin can make in its data dir) stop short.

    It holds one directory open at a time: it goes down by name and back up through
    ``..``, checking each directory it comes back to is the one it left (else OSError: the
    tree was moved meanwhile). It never follows a link, does not enter another file system
    (a mount inside the tree is yielded, not entered), and leaves out a directory it cannot
    enter (yielded, not entered). The descriptor is valid until the next item: act on the
    entry through it (``dir_fd=fd``).
    """
    fd = os.open(path, DIR_FLAGS)
    top = os.fstat(fd)
    # a directory being walked: its stat, its name in its parent, its names still to come
    stack: list[tuple[os.stat_result, str, Iterator[str]]] = [(top, "", iter(os.listdir(fd)))]
    try:
        while stack:
            here, own, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if not stack:
                    break
                parent = os.open("..", DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = parent
                if not os.path.samestat(os.fstat(fd), stack[-1][0]):
                    raise OSError(errno.ENOENT, "moved while walked", own)
                yield fd, own, here
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone meanwhile
            if not stat.S_ISDIR(st.st_mode) or st.st_dev != top.st_dev:
                yield fd, name, st
                continue
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError:
                yield fd, name, st  # (cannot be entered, or replaced by a link meanwhile)
                continue
            try:
                if not os.path.samestat(os.fstat(sub), st):
                    raise FileNotFoundError(errno.ENOENT, "replaced while walked", name)
                listed = iter(os.listdir(sub))
            except OSError:
                os.close(sub)
                yield fd, name, st
                continue
            os.close(fd)
            fd = sub
            stack.append((st, name, listed))
    finally:
        os.close(fd)


def remove_tree(path: str | os.PathLike[str], *, ignore_errors: bool = False) -> None:
    """Delete the directory ``path`` and all it holds, however deep (:func:`walk_up`). What
    cannot be deleted is left, and the first such error raised at the end (OSError), unless
    ``ignore_errors``; a tree already gone is no error."""
    failed: OSError | None = None
    try:
        for fd, name, st in walk_up(path):
            try:
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed = failed or exc
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        failed = failed or exc
    if failed is not None and not ignore_errors:
        raise failed


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """The bytes of the regular files below the directory ``path``, however deep (links not
    followed; what cannot be read, not counted; 0 if it cannot be read at all)."""
    total = 0
    try:
        for _, _, st in walk_up(path):
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    except OSError:
        pass
    return total


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular one is, for an error message; None if regular."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "a special file"


def walk(
    top: int, include: Callable[[str], bool] | None = None, *, strict: bool = False
) -> Iterator[tuple[int, str, os.stat_result, str]]:
    """Every entry below the directory open at ``top``: (its directory's descriptor, its
    name, its own ``lstat``, its path relative to ``top``), a directory before what it
    holds, names for which ``include`` is false left out (and not entered).

    Made for trees that someone else may be changing while a privileged process walks them
    (a plugin's data dir, a source directory a user owns): it goes by directory
    descriptors, never follows a symbolic link, and enters a directory only if it is still
    the one it listed. A name swapped for another meanwhile leads nowhere it should not.
    Act on an entry through its directory's descriptor and ``follow_symlinks=False``, or
    ``O_NOFOLLOW``.

    By default it leaves out what it cannot enter, a directory on another filesystem (a
    mount inside the tree) and what is below :data:`MAX_DEPTH` levels (logged). ``strict``
    (a copy, which must have everything): it enters other filesystems and raises
    ``OSError`` instead.
    """
    device = os.fstat(top).st_dev
    stack = [(top, iter(sorted(os.listdir(top))), "")]
    try:
        while stack:
            fd, names, prefix = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if fd != top:
                    os.close(fd)
                continue
            if include is not None and not include(name):
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                if strict:
                    exc.filename = prefix + name
                    raise
                continue  # gone meanwhile
            relative = prefix + name
            if stat.S_ISDIR(st.st_mode) and st.st_dev != device and not strict:
                continue  # a mount inside the tree (files may show their layer's: overlayfs)
            yield fd, name, st, relative
            if not stat.S_ISDIR(st.st_mode):
                continue
            if len(stack) > MAX_DEPTH:
                if strict:
                    raise OSError(errno.ELOOP, f"more than {MAX_DEPTH} levels deep", relative)
                logger.warning("%s: not walked below %d levels", relative, MAX_DEPTH)
                continue
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if strict:
                    exc.filename = relative
                    raise
                continue  # replaced by a link or a file meanwhile
            try:
                if not os.path.samestat(os.fstat(sub), st):
                    raise FileNotFoundError(errno.ENOENT, "replaced while walked", relative)
                listed = iter(sorted(os.listdir(sub)))
            except OSError as exc:
                os.close(sub)
                if strict:
                    exc.filename = relative
                    raise
                continue
            stack.append((sub, listed, relative + "/"))
    finally:
        for fd, _, _ in stack:
            if fd != top:
                os.close(fd)
