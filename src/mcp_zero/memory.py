"""Handing freed memory back to the system (glibc's malloc; elsewhere this does nothing).

By default glibc serves a large block (128 KiB or more) with its own mapping, returned
when freed, but raises that threshold to the size of each such block freed (up to 32
MiB): after a burst of large answers (1 MB results, buffered SSE events) the same sizes
come from the heap, and freeing them leaves the process resident at its peak for good.
Measured here: 8,000 blocks of 200 KiB freed left 1,443 of 1,546 MiB resident; a heap
trim gave all but 12 MiB back. So the server and each worker trim their heap now and then.
(Fixing the threshold at 128 KiB instead made every such block an mmap and munmap: a 1 MB
answer's encoding 7 times slower.)
"""

from __future__ import annotations

import ctypes

TRIM_EVERY_S = 60.0  # how often a process hands its heap's free pages back


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the interpreter links libc: no search (no subprocess)
        libc.malloc_trim  # noqa: B018 - glibc has it; musl has not
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def trim() -> None:
    """Hand the heap's free pages back to the system (``malloc_trim``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
