"""A racer for tests of code that walks a tree someone else is changing: two names
exchanged over and over (``renameat2(RENAME_EXCHANGE)``) in a thread, as fast as it goes."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextmanager
def swapping(a: Path, b: Path) -> Iterator[None]:
    """Exchange ``a`` and ``b`` (a file or directory and a link, say) until the block ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    stop = threading.Event()
    names = os.fsencode(a), os.fsencode(b)

    def swap() -> None:
        while not stop.is_set():
            libc.renameat2(_AT_FDCWD, names[0], _AT_FDCWD, names[1], _RENAME_EXCHANGE)

    racer = threading.Thread(target=swap, daemon=True)
    racer.start()
    try:
        yield
    finally:
        stop.set()
        racer.join()
