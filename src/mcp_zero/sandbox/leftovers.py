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
that starts a session of its own; the checks below (same boot and pid namespace, started
after the worker, run by the worker's user or the server's) make it most unlikely that
such a session is taken for a leftover, not impossible: a session whose new leader has
exited, leaving its members running, between the server's death and the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from mcp_zero.sandbox import proctree


@dataclass(frozen=True, slots=True)
class Worker:
    """A worker as recorded: its pid, when it started (clock ticks after boot), and the
    users its plugin's processes may run as (the server's, the one it switches to)."""

    pid: int
    started: int
    uids: tuple[int, ...]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return boot.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


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
            "pid_namespace": _pid_namespace(),
            "server": [os.getpid(), self._started],
            "workers": [[w.pid, w.started, list(w.uids)] for w in workers],
        }
        self._directory.mkdir(mode=0o700, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(body))
        os.replace(partial, self.path)


@dataclass(frozen=True, slots=True)
class _Recorded:
    boot: str
    pid_namespace: str
    server: tuple[int, int]
    workers: list[Worker]


def _load(path: Path) -> _Recorded | None:
    try:
        body = json.loads(path.read_text())
        return _Recorded(
            str(body["boot"]),
            str(body["pid_namespace"]),
            (int(body["server"][0]), int(body["server"][1])),
            [Worker(int(p), int(s), tuple(int(u) for u in uids)) for p, s, uids in body["workers"]],
        )
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None


def left_sessions(directory: Path) -> list[Worker]:
    """The workers recorded in ``directory`` by servers no longer running (their sessions
    to end with :func:`end_sessions`); their files are removed. A record that is corrupt,
    from before a reboot or from another machine (another boot id) is removed too; one
    from another pid namespace (a container sharing the data dir) is left to its own."""
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    boot, namespace = _boot_id(), _pid_namespace()
    table = proctree.processes()
    found = []
    for path in paths:
        recorded = _load(path)
        if recorded is not None and recorded.boot == boot:
            if recorded.pid_namespace != namespace:
                continue  # its pids are not ours: whether its server runs is not ours to tell
            pid, started = recorded.server
            server = table.get(pid)
            if server is not None and server.state != "Z" and server.started == started:
                continue  # a server running on the data dir beside us: its workers are its own
            found.extend(recorded.workers)
        with contextlib.suppress(OSError):
            path.unlink()
    return found


def _uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _members(worker: Worker, table: dict[int, proctree.Proc]) -> list[int]:
    """The live processes of ``worker``'s session, itself included if it still runs (its
    server is gone: it is on its way out); none if its pid was taken again: its session
    had ended then."""
    leader = table.get(worker.pid)
    if leader is not None and leader.state != "Z" and leader.started != worker.started:
        return []
    return [
        pid
        for pid, proc in table.items()
        if proc.session == worker.pid
        and proc.state != "Z"
        and proc.started >= worker.started
        and _uid(pid) in worker.uids
    ]


_ROUNDS = 4  # scans of the sessions: a process may fork while the last scan's are killed


def end_sessions(workers: list[Worker]) -> list[int]:
    """SIGKILL what runs in the sessions of ``workers`` (of servers no longer running), each
    with its tree; the pids killed."""
    killed: set[int] = set()
    for _ in range(_ROUNDS):
        table = proctree.processes()
        found = {worker.pid: _members(worker, table) for worker in workers}
        found = {session: pids for session, pids in found.items() if pids}
        if not found:
            break
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
