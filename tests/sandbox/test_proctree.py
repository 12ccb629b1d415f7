"""Process trees (mcp_zero.sandbox.proctree) on real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from mcp_zero.sandbox import proctree

# A root that starts a daemon (its own session, orphaned at once: re-parented to the root,
# a subreaper) and a forker that starts a sleeping child every few ms until it is stopped.
TREE = """
import os, subprocess, sys, time
from mcp_zero.sandbox import proctree
proctree.become_subreaper()
subprocess.run([sys.executable, "-c",
    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; "
    "time.sleep(600)', sys.argv[1]], start_new_session=True)", sys.argv[1]], check=True)
if os.fork() == 0:
    while True:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        time.sleep(0.005)
print("ready", flush=True)
time.sleep(600)
"""


def marked(marker: str) -> list[int]:
    """The running processes whose command line carries ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def test_kill_tree_ends_daemons_and_a_process_that_keeps_forking() -> None:
    marker = f"proctree-test-{uuid.uuid4().hex}"
    with subprocess.Popen(
        [sys.executable, "-c", TREE, marker],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ) as root:
        try:
            _kill_a_growing_tree(root, marker)
            assert marked(marker) == []  # none escaped the walk
        finally:
            if root.poll() is None:
                root.kill()


def _kill_a_growing_tree(root: subprocess.Popen[bytes], marker: str) -> None:
    assert root.stdout is not None
    assert root.stdout.readline() == b"ready\n"
    time.sleep(0.1)  # the forker has a few children by now
    assert len(marked(marker)) >= 4  # root, daemon, forker and its children
    before = proctree.descendants(root.pid)
    table = {pid: proc.ppid for pid, proc in proctree.processes().items()}
    # the daemon left its session and its parent: it is the root's child all the same
    sessions = {pid: os.getsid(pid) for pid in before if alive(pid)}
    assert any(table.get(pid) == root.pid and sid == pid for pid, sid in sessions.items()), sessions
    assert len(before) >= 4  # daemon, forker and its children
    # parents come before their children
    for index, pid in enumerate(before):
        assert table[pid] == root.pid or table[pid] in before[:index]

    killed = proctree.kill_tree(root.pid, include_root=True)

    assert root.pid in killed
    assert set(before) <= set(killed)
    assert root.wait(timeout=10) == -9
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [pid for pid in killed if alive(pid)]


def test_kill_tree_of_a_process_already_gone_does_nothing() -> None:
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait()
    assert proctree.kill_tree(gone.pid, include_root=True) == []
    assert proctree.descendants(gone.pid) == []


def test_descendants_follow_the_parent_table() -> None:
    table = {
        pid: proctree.Proc(ppid, pid, "S") for pid, ppid in {2: 1, 3: 2, 4: 2, 5: 3, 9: 8}.items()
    }
    assert proctree.descendants(1, table) == [2, 3, 4, 5]
    assert proctree.descendants(8, table) == [9]
    assert proctree.descendants(5, table) == []


# A subreaper with children of every kind the sweep meets: one started by the main thread,
# one by another thread, one exited and not reaped, and an orphan it adopted.
FAMILY = """
import json, os, subprocess, sys, threading, time
from mcp_zero.sandbox import proctree
assert proctree.become_subreaper()
sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
mine = [subprocess.Popen(sleep)]
helper = threading.Thread(target=lambda: mine.append(subprocess.Popen(sleep)))
helper.start(); helper.join()
done = subprocess.Popen([sys.executable, "-c", "pass"])
middle = subprocess.run([sys.executable, "-c",
    "import subprocess, sys; print(subprocess.Popen(sys.argv[1:], start_new_session=True, "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)",
    *sleep], capture_output=True, text=True, check=True)
orphan = int(middle.stdout)
deadline = time.monotonic() + 10
while proctree.processes().get(done.pid, proctree.Proc(0, 0, "R")).state != "Z":
    assert time.monotonic() < deadline; time.sleep(0.01)
while proctree.processes().get(orphan, proctree.Proc(0, 0, "R")).ppid != os.getpid():
    assert time.monotonic() < deadline; time.sleep(0.01)
me = os.getpid()
print(json.dumps({
    "children": {pid: proc.state for pid, proc in proctree.children().items()},
    "scanned": {pid: p.state for pid, p in proctree.processes().items() if p.ppid == me},
    "expected": [p.pid for p in mine] + [done.pid, orphan],
}))
for pid in [p.pid for p in mine] + [orphan]:
    os.kill(pid, 9)
"""


def test_children_are_found_without_scanning_every_process() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FAMILY],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert sorted(int(pid) for pid in found["children"]) == sorted(found["expected"])
    assert found["children"].keys() == found["scanned"].keys()  # (states: two looks apart)
    assert list(found["children"].values()).count("Z") == 1


def test_a_group_with_a_process_below_a_worker_is_not_killed_whole() -> None:
    # A plugin's own child in a session of its own (start_new_session) keeps its group while
    # it runs below its worker: an orphan of that group is a stray, the group is not (here
    # the test's process stands for the worker)
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert proctree.kill_groups([child.pid], workers={os.getpid()}) == []
        assert alive(child.pid)
        # behind a worker that is gone, the group is killed whole
        assert proctree.kill_groups([child.pid], workers=()) == [child.pid]
        assert child.wait(timeout=10) == -9
    finally:
        child.kill()
        child.wait()
