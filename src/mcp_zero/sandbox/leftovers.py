"""The workers a server runs, written down in its data dir, and what they leave behind
when the server is killed (Linux).

After ``kill -9`` of a server its workers die with it (their parent-death signal), but what
their plugins started runs on under init. The environment of such a process names the
worker's data dir and server (:func:`proctree.left_behind`), unless it was started with an
environment of its own (``Popen(cmd, env={...})``). Its session is surer: a worker is a
session leader (``start_new_session``), and every process below it keeps the worker's pid
as its session id unless it calls ``setsid()`` itself. So a server keeps a file under the
data dir listing the workers it runs (:class:`WorkerRecord`, rewritten as one starts or
exits: never on a call's path), and the next server finds the sessions of a dead server's
workers (:func:`left_sessions`). A process that both left its worker's session (a
daemon) and replaced its environment is found by neither.

Linux takes no pid again while it is the session id of a live process: while anything of a
worker's session runs, no stranger has the worker's pid, nor a session of that id. Once the
session is empty, the pid may be taken again (after the pids wrapped around) by a process
that starts a session of its own — a daemon's double fork leaves one whose leader has
exited. What is in a session of that id now is a leftover only if it started while the
server ran: the running server touches its record every second (:data:`HEARTBEAT_S`), and
a process that started after the record's last touch (and a margin) is left alone. So
is one in a session of a record restored from a backup, unless it started before the
backup was taken. The other checks: the same boot and pid namespace, started after the
worker, run by the worker's user or the server's. A stranger is taken for a leftover only
if it took the pid within seconds of the server's death, when the pids had wrapped round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mcp_zero.sandbox import proctree

T = TypeVar("T")

HEARTBEAT_S = 1.0  # how often a running server touches its record
# how late after the record's last touch a process may have started and still be a leftover
# (the next touch, the second /proc/stat's boot time is rounded to, and clock adjustments)
LATE_S = HEARTBEAT_S + 2.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Worker:
    """A worker as recorded: its pid, when it started (clock ticks after boot), and the
    users its plugin's processes may run as (the server's, the one it switches to)."""

    pid: int
    started: int
    uids: tuple[int, ...]
    # (found by left_sessions) the latest start, in clock ticks after boot, of a process in
    # its session that is its leftover: one that started later came after its server died
    until: int | None = None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return boot.read().strip()
    except OSError:
        return ""


def _proc_value(path: str, key: str, convert: Callable[[str], T]) -> T | None:
    """The first word after ``key`` on the line of ``path`` that starts with it (a /proc
    file), converted; None when there is none or it does not convert."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(key):
                    return convert(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _boot_time() -> float | None:
    """When the machine booted (seconds since the epoch), as /proc/stat says."""
    return _proc_value("/proc/stat", "btime ", float)


class WorkerRecord:
    """The file in ``directory`` that lists this process's running workers: made with the
    first, rewritten (whole, atomically) as each starts or exits, removed with the last.
    Written only as far as the process's own crash needs: after the host's, the boot id
    differs and the file is void."""

    def __init__(self, directory: Path) -> None:
        me = proctree.process(os.getpid())
        self._started = 0 if me is None else me.started
        self.path = directory / f"{os.getpid()}-{self._started}.json"
        self._directory = directory

    def write(self, workers: list[Worker]) -> None:
        """List ``workers`` as this server's (none: remove the file). Raises OSError (a
        full disk)."""
        if not workers:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        body = {
            "boot": _boot_id(),
            "pid_namespace": proctree.pid_namespace() or "",
            "server": [os.getpid(), self._started],
            "workers": [[w.pid, w.started, list(w.uids)] for w in workers],
        }
        self._directory.mkdir(mode=0o700, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        try:
            partial.write_text(json.dumps(body))
            os.replace(partial, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise

    def touch(self) -> None:
        """Say this server still runs (every :data:`HEARTBEAT_S`, while it has workers)."""
        with contextlib.suppress(OSError):  # (none listed now; or a full disk: it is late)
            os.utime(self.path)


@dataclass(frozen=True, slots=True)
class _Recorded:
    boot: str
    pid_namespace: str
    server: tuple[int, int]
    workers: list[Worker]
    touched: float  # when its server last said it ran (the file's mtime)


def _load(path: Path) -> _Recorded | None:
    try:
        body = json.loads(path.read_text())
        recorded = _Recorded(
            str(body["boot"]),
            str(body["pid_namespace"]),
            (int(body["server"][0]), int(body["server"][1])),
            [Worker(int(p), int(s), tuple(int(u) for u in uids)) for p, s, uids in body["workers"]],
            path.stat().st_mtime,
        )
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None
    # (pid 0 or 1 is no worker: a session 0 is the kernel's, and killpg(0) our own group)
    if recorded.server[0] <= 1 or any(worker.pid <= 1 for worker in recorded.workers):
        return None
    return recorded


def left_sessions(directory: Path) -> list[Worker]:
    """The workers recorded in ``directory`` by servers no longer running (their sessions
    to end with :func:`end_sessions`); their files are removed. A record that is corrupt,
    from before a reboot or from another machine (another boot id) is removed too; one
    from another pid namespace (a container sharing the data dir) is left to its own."""
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    boot, namespace, booted = _boot_id(), proctree.pid_namespace() or "", _boot_time()
    table = proctree.processes()
    found: list[Worker] = []
    for path in paths:
        recorded = _load(path)
        if recorded is not None and recorded.boot == boot and booted is not None:
            if recorded.pid_namespace != namespace:
                continue  # its pids are not ours: whether its server runs is not ours to tell
            if _alive(table, *recorded.server):
                continue  # a server running on the data dir beside us: its workers are its own
            until = int((recorded.touched + LATE_S - booted) * _CLK_TCK)
            found.extend(dataclasses.replace(worker, until=until) for worker in recorded.workers)
        with contextlib.suppress(OSError):
            path.unlink()
    _drop_partial(directory, table)
    return found


def _drop_partial(directory: Path, table: dict[int, proctree.Proc]) -> None:
    """Remove the half-written records (``PID-TICKS.partial``) of servers no longer running:
    killed while writing, or short of room."""
    for path in directory.glob("*.partial"):
        pid, _, started = path.stem.partition("-")
        digits = (pid + started).isascii() and pid.isdigit() and started.isdigit()
        if not (digits and _alive(table, int(pid), int(started))):
            with contextlib.suppress(OSError):
                path.unlink()


def _uid(pid: int) -> int | None:
    return _proc_value(f"/proc/{pid}/status", "Uid:", int)


def _alive(table: dict[int, proctree.Proc], pid: int, started: int) -> bool:
    """Whether process ``pid``, started at ``started`` (clock ticks after boot), still runs."""
    proc = table.get(pid)
    return proc is not None and proc.state != "Z" and proc.started == started


def _members(worker: Worker, table: dict[int, proctree.Proc], known: bool = False) -> list[int]:
    """The live processes of ``worker``'s session, itself included if it still runs (its
    server is gone: it is on its way out); none if its pid was taken again: its session
    had ended then. The session is the worker's only while one of them started before its
    server last touched its record (``until``): no stranger can have made a session of that
    id while that one ran, so the others, started later (a leftover forking on and on), are
    the worker's too. ``known``: the session was found the worker's already."""
    leader = table.get(worker.pid)
    if leader is not None and leader.state != "Z" and leader.started != worker.started:
        return []
    until = worker.until
    if until is None:  # (not found by left_sessions: when its server died is not known)
        return []
    members = [
        (pid, proc.started)
        for pid, proc in table.items()
        if proc.session == worker.pid
        and proc.state != "Z"
        and worker.started <= proc.started
        and _uid(pid) in worker.uids
    ]
    if known or any(started <= until for _, started in members):
        return [pid for pid, _ in members]
    return []


_ROUNDS = 4  # scans of the sessions: a process may fork while the last scan's are killed


def end_sessions(workers: list[Worker]) -> list[int]:
    """SIGKILL what runs in the sessions of ``workers`` (of servers no longer running), each
    with its tree; the pids killed."""
    killed: set[int] = set()
    known: set[int] = set()  # sessions found the workers' (their forks since are too)
    for _ in range(_ROUNDS):
        table = proctree.processes()
        found = {w.pid: _members(w, table, w.pid in known) for w in workers}
        found = {session: pids for session, pids in found.items() if pids}
        if not found:
            break
        known.update(found)
        for session, pids in found.items():
            # its group (the session's first, of the same id) at once: a process forking in
            # a loop is undone; then each tree, for those that made groups of their own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(session, signal.SIGKILL)
            for pid in pids:
                killed.update(proctree.kill_tree(pid, include_root=True))
            killed.update(pids)
    return sorted(killed)


__all__ = ["Worker", "WorkerRecord", "end_sessions", "left_sessions"]
