"""Confinement a worker applies to itself before it loads plugin code (Linux).

Stdlib only: it runs inside the worker, single-threaded, right after start.
Nothing here raises: each measure that the host does not allow is skipped and
reported, so the kernel can tell the operator what actually holds.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
MAX_OPEN_FILES = 256

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            # The interpreter links libc: no library search (find_library forks ldconfig).
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    return _libc


def apply_rlimits(memory_mb: int) -> None:
    """Cap address space at ``memory_mb`` MiB, forbid core dumps, cap open files."""
    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(MAX_OPEN_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, cap), cap))


def tie_to_parent(parent_pid: int) -> None:
    """Die with the kernel (SIGKILL on parent death) and never gain privileges via exec."""
    libc = _c()
    if libc is None:
        return
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    # The parent may have died before prctl took effect.
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


def isolate_network() -> bool:
    """Move this process into a new, empty network namespace; ``True`` when that worked.

    Root gets a plain ``CLONE_NEWNET``; others try an unprivileged user namespace
    with it. Must run before any thread starts.
    """
    libc = _c()
    if libc is None:
        return False
    flags = [CLONE_NEWNET] if os.geteuid() == 0 else []
    flags.append(CLONE_NEWUSER | CLONE_NEWNET)
    return any(libc.unshare(f) == 0 for f in flags)


__all__ = ["apply_rlimits", "isolate_network", "tie_to_parent"]
