"""Keeping a plugin's processes within reach, and ending all of them (Linux).

A worker's process group is not enough to end what a plugin started: a child
that calls ``setsid()`` (any daemonizing library does) leaves the group, and
once its parent exits it belongs to init, out of reach. Two measures close that:

- the worker becomes a *child subreaper* before it loads plugin code, so every
  orphan among its descendants is re-parented to the worker, not to init, and
  stays in the worker's process tree; and
- ending a worker ends its whole tree: each process is stopped (``SIGSTOP``, so
  none can fork behind the walk), and then all are killed.

A worker that dies by itself (a crash, the kernel's OOM killer) leaves its tree
to the nearest subreaper above it: ``mcp0 serve`` is one, and ends the orphans
it inherits (:func:`orphans`, :func:`end_trees`). What this cannot do is cap how many
processes a plugin starts; a cgroup's ``pids`` controller is the tool for that.

Stdlib only: the worker imports it before any plugin code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Collection, Iterable

PR_SET_CHILD_SUBREAPER = 36
_MAX_ROUNDS = 16  # walks of a tree whose processes keep forking while it is being stopped
_STOP_WAIT_S = 0.5  # how long one round waits for the processes it stopped to stop


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children; ``True`` if that worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the interpreter links libc: no search
    except OSError:
        return False
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def parents() -> dict[int, int]:
    """Every process's parent, by pid, from ``/proc`` (empty where there is none)."""
    found: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                line = stat.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = line[line.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            found[int(name)] = int(fields[1])
    return found


def descendants(root: int, table: dict[int, int] | None = None) -> list[int]:
    """The pids below ``root`` in the process tree, parents before their children."""
    children: dict[int, list[int]] = {}
    for pid, ppid in (parents() if table is None else table).items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    level = [root]
    while level:
        level = [child for pid in level for child in children.get(pid, ())]
        found.extend(level)
    return found


def _state(pid: int) -> str:
    """The process's state letter (``R``, ``S``, ``T`` stopped, ``Z`` zombie…); ``X`` if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            line = stat.read()
    except OSError:
        return "X"
    return line[line.rfind(b")") + 2 :][:1].decode("ascii", "replace")


def _wait_stopped(pids: list[int]) -> None:
    """Until each of ``pids`` has stopped (or is gone): a signal is delivered after
    ``kill`` returns, and a fork the process is in the middle of completes first. Once it
    has stopped, every child it made is in ``/proc`` for the next walk to find."""
    deadline = time.monotonic() + _STOP_WAIT_S
    waiting = list(pids)
    while waiting and time.monotonic() < deadline:
        waiting = [pid for pid in waiting if _state(pid) not in ("T", "t", "Z", "X")]
        if waiting:
            time.sleep(0.001)


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_tree(root: int, *, include_root: bool) -> list[int]:
    """SIGKILL every descendant of ``root`` (and ``root`` itself if ``include_root``); the
    pids signalled. Each is stopped first, and the tree walked again until the walk finds
    no one new, so that a process forking meanwhile cannot leave a child behind."""
    stopped: list[int] = []
    seen: set[int] = set()
    if include_root:
        if _signal(root, signal.SIGSTOP):
            _wait_stopped([root])
        else:
            include_root = False  # already gone: its orphans went elsewhere
    for _ in range(_MAX_ROUNDS):
        fresh = [pid for pid in descendants(root) if pid not in seen]
        if not fresh:
            break
        seen.update(fresh)
        now = [pid for pid in fresh if _signal(pid, signal.SIGSTOP)]
        stopped.extend(now)
        _wait_stopped(now)
    killed = [pid for pid in stopped if _signal(pid, signal.SIGKILL)]
    if include_root and _signal(root, signal.SIGKILL):
        killed.append(root)
    return killed


def orphans(keep: Collection[int]) -> list[int]:
    """This process's children but those in ``keep``: in a subreaper that starts no other
    processes than ``keep`` (its workers), those it inherited from a dead worker."""
    me = os.getpid()
    return [pid for pid, ppid in parents().items() if ppid == me and pid not in keep]


def end_trees(roots: Iterable[int]) -> list[int]:
    """Kill each of ``roots`` (this process's children) with its tree, and reap the roots
    that have exited; the pids killed."""
    roots = list(roots)
    killed = [pid for root in roots for pid in kill_tree(root, include_root=True)]
    reap(roots)
    return killed


def reap(pids: Iterable[int]) -> None:
    """Collect the exit status of those of ``pids`` that have exited (no zombies left)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


__all__ = [
    "become_subreaper",
    "descendants",
    "end_trees",
    "kill_tree",
    "orphans",
    "parents",
    "reap",
]
