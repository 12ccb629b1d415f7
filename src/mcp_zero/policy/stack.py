"""A thread with a stack of its own size, leaving every other thread's as it is.

``threading.stack_size`` is one setting of the whole interpreter: every thread started
while it was raised for the policy compiler's thread (a pool's, ``asyncio.to_thread``'s, a
plugin's) got the raised stack too, and kept it (found by review: 326 of the 327 threads
another thread started during 20 compiles had 256 MiB). A thread made with
``pthread_create`` and attributes of its own has the size alone; ctypes runs the Python
callable on it, taking the GIL as any thread does.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

_ENTRY = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
_ATTR_BYTES = 128  # pthread_attr_t: 56 bytes on x86-64 and 64 on arm64, room to spare


def _pthread() -> ctypes.CDLL:
    # The interpreter links libc and its pthread_* (no library search); an instance of our
    # own, so that the argument types set here are no other module's.
    libc = ctypes.CDLL(None)
    libc.pthread_attr_init.argtypes = [ctypes.c_void_p]
    libc.pthread_attr_setstacksize.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.pthread_attr_destroy.argtypes = [ctypes.c_void_p]
    libc.pthread_create.argtypes = [
        ctypes.POINTER(ctypes.c_ulong),
        ctypes.c_void_p,
        _ENTRY,
        ctypes.c_void_p,
    ]
    libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    return libc


_libc: ctypes.CDLL | None = None
_running: dict[int, object] = {}  # the entries of threads not yet joined, by id


def start_thread(work: Callable[[], _T], stack_bytes: int) -> Callable[[], _T]:
    """Start ``work()`` on a new thread whose stack is ``stack_bytes``; return its join, which
    waits for it and returns what ``work`` returned, or raises what it raised (call it once).
    Raises OSError when no such thread can be started (an address-space limit refusing the
    stack: EAGAIN)."""
    global _libc
    if _libc is None:
        _libc = _pthread()
    libc = _libc
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def main(_: int | None) -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # (raised by the join, in the caller's thread)
            failure.append(exc)

    entry = _ENTRY(main)
    attr = ctypes.create_string_buffer(_ATTR_BYTES)
    thread = ctypes.c_ulong()
    error = libc.pthread_attr_init(attr)
    if error == 0:
        error = libc.pthread_attr_setstacksize(attr, stack_bytes)
        if error == 0:
            _running[id(entry)] = entry  # (ctypes frees what no one references: the thread runs it)
            error = libc.pthread_create(ctypes.byref(thread), attr, entry, None)
        libc.pthread_attr_destroy(attr)
    if error != 0:
        _running.pop(id(entry), None)
        why = os.strerror(error)
        raise OSError(error, f"cannot start a thread with a {stack_bytes >> 20} MiB stack: {why}")

    def join() -> _T:
        # (a call of a CDLL function lets go of the GIL: the thread runs meanwhile)
        libc.pthread_join(thread, None)
        _running.pop(id(entry), None)
        if failure:
            raise failure[0]
        return outcome[0]

    return join
