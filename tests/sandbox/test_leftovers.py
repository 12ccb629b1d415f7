"""What a killed server's workers leave (mcp_zero.sandbox.leftovers), on real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mcp_zero.sandbox import leftovers, proctree

# A server: starts a worker (a session of its own) that starts a sleeper with an empty
# environment and exits; lists the worker in its record, says the sleeper's pid, and waits.
SERVER = """
import os, subprocess, sys, time
from pathlib import Path
from mcp_zero.sandbox import leftovers, proctree
worker = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(600)'], env={}, stdin=subprocess.DEVNULL).pid)"],
    start_new_session=True, stdout=subprocess.PIPE)
started = proctree.process(worker.pid).started  # (a zombie once it exits: until reaped)
leftovers.WorkerRecord(Path(sys.argv[1])).write(
    [leftovers.Worker(worker.pid, started, (os.geteuid(),))])
print(int(worker.stdout.readline()), flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    process = proctree.process(pid)
    return process is not None and process.state != "Z"


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} runs on"
        time.sleep(0.01)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    sleeper: int  # what its worker left: in the worker's session, with no environment
    directory: Path

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start(script: str, directory: Path) -> subprocess.Popen[bytes]:
    """A server of ``script`` that lists its worker in ``directory`` (what it says: stdout)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(directory)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    return proc


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    directory = tmp_path / "workers"
    proc = start(SERVER, directory)
    assert proc.stdout is not None
    started = Server(proc, int(proc.stdout.readline()), directory)
    try:
        yield started
    finally:
        started.kill9()
        proc.stdout.close()
        proctree.kill_tree(started.sleeper, include_root=True)


@contextmanager
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A process of the same shape as a worker's leftover: a session of its own, with no
    environment."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], env={}, start_new_session=True
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_servers_workers_sessions_are_ended(server: Server) -> None:
    with stranger() as other:
        assert leftovers.left_sessions(server.directory) == []  # its server runs: its own
        assert alive(server.sleeper)
        server.kill9()
        found = leftovers.left_sessions(server.directory)
        assert [worker.pid for worker in found] != []
        assert list(server.directory.iterdir()) == []  # once: the record is done with
        assert server.sleeper in leftovers.end_sessions(found)
        wait_gone(server.sleeper)
        assert other.poll() is None


def _edited(server: Server, change: Callable[[dict[str, Any]], None]) -> None:
    [path] = server.directory.iterdir()
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _another_boot(record: dict[str, Any]) -> None:
    record["boot"] = "a boot before, or another machine's"


def _another_user(record: dict[str, Any]) -> None:
    record["workers"][0][2] = [os.geteuid() + 1]


def _started_later(record: dict[str, Any]) -> None:
    record["workers"][0][1] += 10**9  # the sleeper started before the worker: not its


@pytest.mark.parametrize(
    "change", [_another_boot, _another_user, _started_later], ids=lambda c: c.__name__[1:]
)
def test_a_session_that_is_not_the_workers_is_left(server: Server, change: Any) -> None:
    server.kill9()
    _edited(server, change)
    assert leftovers.end_sessions(leftovers.left_sessions(server.directory)) == []
    assert alive(server.sleeper)


def test_a_session_whose_leader_runs_is_not_the_workers(server: Server) -> None:
    # its pid taken again (after the pids wrapped around) by a process that leads a session
    # of its own: the worker's session had ended
    server.kill9()
    with stranger() as other:
        leader = proctree.process(other.pid)
        assert leader is not None

        def taken_again(record: dict[str, Any]) -> None:
            record["workers"][0][:2] = [other.pid, leader.started - 1]

        _edited(server, taken_again)
        assert leftovers.end_sessions(leftovers.left_sessions(server.directory)) == []
        assert other.poll() is None


# A worker that leaves a sleeper and a walker (a process that forks its next generation and
# exits, every 0.1 s, in a process group of its own) in its session, both with an empty
# environment.
WALKING_SERVER = """
import os, subprocess, sys, time
from pathlib import Path
from mcp_zero.sandbox import leftovers, proctree
walk = (
    "import os, time\\n"
    "os.setpgid(0, 0)\\n"
    "while True:\\n"
    "    time.sleep(0.1)\\n"
    "    if os.fork():\\n"
    "        os._exit(0)\\n"
)
worker = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(600)'], env={}, stdin=subprocess.DEVNULL).pid); "
    f"subprocess.Popen([sys.executable, '-c', {walk!r}], env={{}}, stdin=subprocess.DEVNULL)"],
    start_new_session=True, stdout=subprocess.PIPE)
started = proctree.process(worker.pid).started
leftovers.WorkerRecord(Path(sys.argv[1])).write(
    [leftovers.Worker(worker.pid, started, (os.geteuid(),))])
print(worker.pid, int(worker.stdout.readline()), flush=True)
time.sleep(600)
"""


def test_what_forks_on_in_a_session_the_worker_had_before_its_server_died_is_ended(
    tmp_path: Path,
) -> None:
    # Only processes started before the server's last touch were taken for leftovers: a
    # walker's generation is always newer, and it ran on (found by review). A session with
    # a member that old is the worker's (no stranger made one of its id since): all of it.
    directory = tmp_path / "workers"
    proc = start(WALKING_SERVER, directory)
    assert proc.stdout is not None
    session, sleeper = map(int, proc.stdout.readline().split())
    try:
        proc.kill()
        proc.wait()
        [record] = directory.iterdir()
        # The server's last touch: just before the sleeper started (less the margin), so the
        # sleeper is older than it and every walker generation since is newer
        sleeper_proc = proctree.process(sleeper)
        assert sleeper_proc is not None
        with open("/proc/stat") as stat:
            booted = next(float(line.split()[1]) for line in stat if line.startswith("btime "))
        ticks = os.sysconf("SC_CLK_TCK")
        touched = booted + sleeper_proc.started / ticks - leftovers.LATE_S + 0.05
        os.utime(record, (touched, touched))
        until = sleeper_proc.started + 0.05 * ticks
        deadline = time.monotonic() + 5
        while not any(
            p.session == session and p.started > until and p.state != "Z"
            for pid, p in proctree.processes().items()
            if pid != sleeper
        ):
            assert time.monotonic() < deadline, "no walker generation after the touch"
            time.sleep(0.05)
        ended = leftovers.end_sessions(leftovers.left_sessions(directory))
        assert sleeper in ended
        wait_gone(sleeper)
        left = [p for p in proctree.processes().values() if p.session == session]
        assert [p for p in left if p.state != "Z"] == []
    finally:
        proctree.kill_tree(sleeper, include_root=True)
        for pid, p in proctree.processes().items():
            if p.session == session:
                proctree.kill_tree(pid, include_root=True)
        proc.stdout.close()


def test_a_record_naming_pid_0_is_dropped(server: Server) -> None:
    # A hand-written one: ending "its session" killed the starting server's own process
    # group (killpg(0)), and session 0 is the kernel's threads (found by review)
    server.kill9()

    def pid_zero(record: dict[str, Any]) -> None:
        record["workers"][0][0] = 0

    _edited(server, pid_zero)
    assert leftovers.left_sessions(server.directory) == []
    assert list(server.directory.iterdir()) == []


def test_what_started_after_the_server_last_said_it_ran_is_left(server: Server) -> None:
    # A daemon whose double fork left it in a session of a dead worker's pid, taken again
    # after the server died (a restored backup's record makes that window as long as you
    # like), was killed as a leftover (found by review)
    server.kill9()
    [record] = server.directory.iterdir()
    os.utime(record, (time.time() - 60, time.time() - 60))  # its last touch: a minute ago
    assert leftovers.end_sessions(leftovers.left_sessions(server.directory)) == []
    assert alive(server.sleeper)


def test_a_half_written_record_goes_once_its_server_is_gone(tmp_path: Path) -> None:
    me = proctree.process(os.getpid())
    assert me is not None
    mine = tmp_path / f"{os.getpid()}-{me.started}.partial"  # a server running: its own
    gone = tmp_path / f"{os.getpid()}-{me.started + 1}.partial"  # its pid, another process
    for path in (mine, gone):
        path.write_text("{")
    assert leftovers.left_sessions(tmp_path) == []
    assert sorted(tmp_path.iterdir()) == [mine]


def test_a_record_that_cannot_be_read_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "1-2.json").write_text('{"boot": ')
    (tmp_path / "3-4.json").write_text("[]")
    assert leftovers.left_sessions(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
    assert leftovers.left_sessions(tmp_path / "none") == []


def test_a_record_lists_the_running_workers_and_goes_with_the_last(tmp_path: Path) -> None:
    record = leftovers.WorkerRecord(tmp_path / "workers")
    record.write([leftovers.Worker(os.getpid(), 1, (0,))])
    assert record.path.exists()
    assert leftovers.left_sessions(tmp_path / "workers") == []  # this server runs
    record.write([])
    assert not record.path.exists()
