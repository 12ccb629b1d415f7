"""Ending all of a plugin's processes, daemons included (Linux).

A worker's process group is not enough to end what a plugin started: a child
that calls ``setsid()`` (any daemonizing library does) leaves the group, and a
process whose parent exits is re-parented — to init, out of reach. Two measures:

- Ending a worker ends its whole tree: each process below it is stopped
  (``SIGSTOP``, so none can fork behind the walk), then all are killed
  (:func:`kill_tree`). A worker that exits does this to what it started.
- ``mcp0 serve`` is a *child subreaper*: a process orphaned anywhere below it
  becomes its child instead of init's. It sweeps them (:func:`adopted`): a
  zombie is reaped; one still in the process group of a live worker is that
  worker's (a ``cmd &`` of its shell) and is left to it — it goes with the
  worker's group; any other (it left its group with ``setsid``, or its worker
  is gone) is killed with its tree. So a plugin's processes live at most as
  long as its worker, and a daemon that leaves its worker's group lives only as
  long as its parent in the plugin does.

The workers are not subreapers themselves: a subreaper must reap what it
adopts, and a worker cannot tell an adopted orphan from the plugin's own child,
which the plugin waits for (``subprocess`` takes a child someone else reaped for
a success). After ``kill -9`` of the server nothing is left to end what its plugins
started until the next server on the data dir finds it: in the session of a worker the
dead server listed (:mod:`~mcp_zero.sandbox.leftovers`), or by its environment
(:func:`left_behind`). A process that left its worker's session (``setsid``) and replaced
its environment is found by neither; nor does anything here cap how many processes a
plugin starts — a cgroup (its ``pids`` controller, ``cgroup.kill``) is the tool for both.

Stdlib only: the worker imports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36
#: The signals that stop a server gracefully (requests in flight get their grace, and their
#: records): SIGHUP too, which a server started from a terminal or ssh session gets when
#: that session closes, and SIGQUIT; before, those two killed it on the spot (found by
#: review). A worker holds them off (the server stops it).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_MAX_ROUNDS = 16  # walks of a tree whose processes keep forking while it is being stopped
_STOP_WAIT_S = 0.5  # how long one round waits for the processes it stopped to stop


@dataclass(frozen=True, slots=True)
class Proc:
    """What ``/proc/<pid>/stat`` says of a process."""

    ppid: int
    pgid: int
    state: str  # R, S, D, T (stopped), Z (zombie)…
    started: int = 0  # clock ticks after boot
    session: int = 0


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children; ``True`` if that worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the interpreter links libc: no search
    except OSError:
        return False
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def process(pid: int | str) -> Proc | None:
    """What ``/proc`` says of process ``pid`` (None: there is none)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            line = stat.read()
    except OSError:  # gone meanwhile
        return None
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses
    fields = line[line.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        return None
    state = fields[0].decode("ascii", "replace")
    return Proc(int(fields[1]), int(fields[2]), state, int(fields[19]), int(fields[3]))


def processes() -> dict[int, Proc]:
    """Every process now, by pid, from ``/proc`` (empty where there is none)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    found = {}
    for name in names:
        if name.isdigit():
            proc = process(name)
            if proc is not None:
                found[int(name)] = proc
    return found


def descendants(root: int, table: dict[int, Proc] | None = None) -> list[int]:
    """The pids below ``root`` in the process tree, parents before their children."""
    children: dict[int, list[int]] = {}
    for pid, proc in (processes() if table is None else table).items():
        children.setdefault(proc.ppid, []).append(pid)
    found: list[int] = []
    level = [root]
    while level:
        level = [child for pid in level for child in children.get(pid, ())]
        found.extend(level)
    return found


def _state(pid: int) -> str:
    proc = process(pid)
    return "X" if proc is None else proc.state


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
    """SIGKILL every live descendant of ``root`` (and ``root`` itself if ``include_root``);
    the pids killed. Each is stopped first, and the tree walked again until the walk finds
    no one new, so that a process forking meanwhile cannot leave a child behind. Zombies
    are skipped: they are dead, their parent's to reap."""
    stopped: list[int] = []
    seen: set[int] = set()
    if include_root:
        if _state(root) not in ("Z", "X") and _signal(root, signal.SIGSTOP):
            _wait_stopped([root])
        else:
            include_root = False  # already gone
    for _ in range(_MAX_ROUNDS):
        table = processes()
        fresh = [pid for pid in descendants(root, table) if pid not in seen]
        if not fresh:
            break
        seen.update(fresh)
        now = [pid for pid in fresh if table[pid].state != "Z" and _signal(pid, signal.SIGSTOP)]
        stopped.extend(now)
        _wait_stopped(now)
    killed = [pid for pid in stopped if _signal(pid, signal.SIGKILL)]
    if include_root and _signal(root, signal.SIGKILL):
        killed.append(root)
    return killed


def children() -> dict[int, Proc]:
    """This process's children, by pid: from each thread's ``/proc/self/task/*/children``
    (a subreaper's adopted orphans go to any of its threads), so the cost is that of the
    children, not of every process on the host; from all of ``/proc`` on a kernel without
    those files (``CONFIG_PROC_CHILDREN``)."""
    me = os.getpid()
    try:
        threads = os.listdir("/proc/self/task")
        pids: set[int] = set()
        for tid in threads:
            try:
                with open(f"/proc/self/task/{tid}/children", "rb") as listing:
                    pids.update(int(pid) for pid in listing.read().split())
            except FileNotFoundError:
                if os.path.exists(f"/proc/self/task/{tid}"):
                    raise  # the kernel has no such files: not a thread that just ended
    except OSError:
        return {pid: proc for pid, proc in processes().items() if proc.ppid == me}
    found = {}
    for pid in pids:
        proc = process(pid)
        if proc is not None and proc.ppid == me:  # not reaped and reused meanwhile
            found[pid] = proc
    return found


@dataclass(frozen=True, slots=True)
class Adopted:
    """What :func:`adopted` found: zombies to reap, strays to kill, and the strays' process
    groups, to kill whole (a stray that forks and exits in a loop leaves each child
    re-parented to the subreaper before its tree can be walked: its group holds them all)."""

    zombies: list[int]
    strays: list[int]
    groups: list[int]


def adopted(workers: Collection[int]) -> Adopted:
    """In a subreaper whose own children are ``workers`` only: its other children, as
    zombies to reap and strays to kill, with the strays' groups. A live one in a worker's
    process group is that worker's and in neither list (it ends with the group)."""
    zombies, strays, groups = [], [], set()
    own_group = os.getpgrp()
    for pid, proc in children().items():
        if pid in workers:
            continue
        if proc.state == "Z":
            zombies.append(pid)
        elif proc.pgid not in workers:
            strays.append(pid)
        # (a zombie's group too: a generation that forked the next and exited, which the
        # walk of a tree can no longer reach)
        if proc.pgid not in workers and proc.pgid != own_group:
            groups.add(proc.pgid)  # (own_group: never, a worker's session is not ours)
    return Adopted(zombies, strays, sorted(groups))


def kill_groups(groups: Iterable[int], workers: Collection[int]) -> list[int]:
    """SIGKILL every process of each of ``groups`` at once (a fork under way is undone),
    but not a group one of whose processes is still below one of ``workers``: a plugin's
    own child in a session of its own (``start_new_session``) is its to end. The groups
    killed."""
    wanted = set(groups)
    if not wanted:
        return []
    table = processes()

    def below_a_worker(pid: int) -> bool:
        for _ in range(len(table)):  # (a bound: ppids read at different times may loop)
            proc = table.get(pid)
            if proc is None or proc.ppid <= 1:
                return False
            if proc.ppid in workers:
                return True
            pid = proc.ppid
        return False

    kept = {proc.pgid for pid, proc in table.items() if proc.pgid in wanted and below_a_worker(pid)}
    killed = []
    for group in sorted(wanted - kept):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
            killed.append(group)
    return killed


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            block = environ.read()
    except OSError:  # gone, or another user's
        return {}
    return dict(entry.partition(b"=")[::2] for entry in block.split(b"\0") if entry)


def left_behind(plugin_data_dir: str) -> list[int]:
    """The processes that workers of a server on this data dir started (their environment
    says so: ``MCP0_DATA_DIR`` below ``plugin_data_dir``) and that outlived that server
    (``MCP0_PARENT_PID``): after ``kill -9`` of a server, its workers die with it, but what
    their plugins started runs on under init. A server that is still running (a stdio
    session beside an HTTP server on one data dir) keeps its own: its pid is alive and
    older than they are, where a pid taken again since is younger."""
    below = os.fsencode(os.path.join(plugin_data_dir, ""))
    table = processes()
    found = []
    for pid, proc in table.items():
        if pid == os.getpid() or proc.state == "Z":
            continue
        environ = _environ(pid)
        if not environ.get(b"MCP0_DATA_DIR", b"").startswith(below):
            continue
        try:
            server = table.get(int(environ.get(b"MCP0_PARENT_PID", b"")))
        except ValueError:
            continue  # not set by a worker
        gone = server is None or server.state == "Z" or server.started > proc.started
        # in another pid namespace (a container beside us), its server's pid is not ours
        if gone and pid_namespace(pid) == pid_namespace():
            found.append(pid)
    return found


def pid_namespace(pid: int | str = "self") -> str | None:
    """The pid namespace of process ``pid`` (None: gone, or not to be read)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def reap(pids: Iterable[int], wait: float = 0.0) -> None:
    """Collect the exit status of those of ``pids`` (this process's children) that have
    exited — waiting up to ``wait`` seconds for those just killed — so that no zombie is
    left."""
    left = set(pids)
    deadline = time.monotonic() + wait
    while left:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    left.discard(pid)
            except OSError:  # not our child (any more)
                left.discard(pid)
        if not left or time.monotonic() >= deadline:
            return
        time.sleep(0.01)


__all__ = [
    "Adopted",
    "Proc",
    "adopted",
    "become_subreaper",
    "children",
    "descendants",
    "kill_groups",
    "kill_tree",
    "left_behind",
    "pid_namespace",
    "process",
    "processes",
    "reap",
]
