"""Writing whole buffers to file descriptors."""

from __future__ import annotations

import os
import select


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
