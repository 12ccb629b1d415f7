"""Landlock confinement and the mount view (sandbox/isolation.py) in real child processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from mcp_zero.sandbox import isolation
from mcp_zero.sandbox.isolation import landlock_abi
from requires import require, require_root

# The child confines itself as a worker does, then tries each path.
CHILD = """
import ctypes, json, sys
from mcp_zero.sandbox import isolation
read, write, hidden, tries = json.loads(sys.argv[1])
ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, as the worker has
abi = isolation.confine_files(read + list(isolation.SYSTEM_READ), write, hidden=hidden)
outcome = {}
for mode, path in tries:
    try:
        with open(path, mode):
            outcome[mode + " " + path] = "ok"
    except OSError as exc:
        outcome[mode + " " + path] = type(exc).__name__
print(json.dumps({"abi": abi, "outcome": outcome}))
"""


def _confined(read: list[Path], write: list[Path], hidden: Path, tries: list[tuple[str, Path]]):
    spec = [[str(p) for p in read], [str(p) for p in write], str(hidden)]
    spec.append([(mode, str(path)) for mode, path in tries])
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)


def test_a_granted_tree_that_holds_the_hidden_one_is_granted_without_it(tmp_path: Path) -> None:
    # The server's data dir under a tree a worker may read (a venv beside it, /etc/mcp0):
    # granting the tree whole would hand over the data dir's secrets with it.
    server = tmp_path / "app" / "data"
    (server / "plugin-data" / "p").mkdir(parents=True)
    (server / "admin.token").write_text("secret")
    (tmp_path / "app" / "lib.py").write_text("code")
    os.symlink(server, tmp_path / "app" / "shortcut")  # a way round, by a link
    own = server / "plugin-data" / "p"
    got = _confined(
        read=[tmp_path / "app"],
        write=[own],
        hidden=server,
        tries=[
            ("r", tmp_path / "app" / "lib.py"),
            ("r", server / "admin.token"),
            ("r", tmp_path / "app" / "shortcut" / "admin.token"),
            ("w", own / "mine.txt"),
            ("w", tmp_path / "app" / "lib.py"),
        ],
    )
    assert got["abi"] == landlock_abi()
    if not got["abi"]:  # a kernel without Landlock: nothing is confined, as documented
        assert set(got["outcome"].values()) == {"ok"}
        return
    assert got["outcome"] == {
        f"r {tmp_path / 'app' / 'lib.py'}": "ok",
        f"r {server / 'admin.token'}": "PermissionError",
        f"r {tmp_path / 'app' / 'shortcut' / 'admin.token'}": "PermissionError",
        f"w {own / 'mine.txt'}": "ok",
        f"w {tmp_path / 'app' / 'lib.py'}": "PermissionError",  # read, not write
    }


def test_packages_installed_editable_are_readable_where_their_finder_points(
    tmp_path: Path,
) -> None:
    # setuptools' editable installs import through a finder whose MAPPING names a checkout
    # outside sys.path: confined to sys.path, a plugin importing such a package failed with
    # PermissionError where the server imported it fine.
    checkout = tmp_path / "checkout" / "edpkg"
    checkout.mkdir(parents=True)
    (checkout / "__init__.py").write_text("VALUE = 42\n")
    site = tmp_path / "site"
    site.mkdir()
    (site / "__editable___edpkg_1_0_finder.py").write_text(
        "import importlib.util, sys\n"
        f"MAPPING = {{'edpkg': {str(checkout)!r}}}\n"
        "class Finder:\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name in MAPPING:\n"
        "            return importlib.util.spec_from_file_location(\n"
        "                name, MAPPING[name] + '/__init__.py',\n"
        "                submodule_search_locations=[MAPPING[name]])\n"
        "def install():\n"
        "    sys.meta_path.append(Finder)\n"
    )
    (site / "__editable__.edpkg-1.0.pth").write_text(
        "import __editable___edpkg_1_0_finder; __editable___edpkg_1_0_finder.install()\n"
    )
    child = (
        "import ctypes, site, sys\n"
        f"site.addsitedir({str(site)!r})\n"  # as site does for site-packages at start
        "from mcp_zero.sandbox import isolation, worker\n"
        "ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)\n"
        "read = [*isolation.SYSTEM_READ, sys.prefix, sys.base_prefix, *sys.path[1:]]\n"
        "isolation.confine_files(read + worker.editable_paths(), [])\n"
        "import edpkg\n"
        "print(edpkg.VALUE)\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"


# The child (stdlib only, with isolation.py loaded from its path: an unprivileged user may
# not reach this checkout's interpreter or package) gives itself a worker's mount view, then
# tries to change and see each path.
MOUNT_CHILD = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("isolation", sys.argv[1])
isolation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(isolation)
writable, hidden, keep, cwd, network_first, tries = json.loads(sys.argv[2])
os.chdir(cwd)
if network_first:  # as a worker without the network does: in its user namespace then
    assert isolation.isolate_network()
held = isolation.confine_mounts(
    writable + ["/dev/shm"], cover=[hidden], keep=keep, private=["/dev/shm"], private_mb=1
)
outcome = {}
for action, path in tries:
    try:
        if action == "chmod":
            os.chmod(path, 0o666)
        elif action == "stat":
            os.stat(path)
        else:
            with open(path, "a"):
                pass
        outcome[action + " " + path] = "ok"
    except OSError as exc:
        outcome[action + " " + path] = __import__("errno").errorcode[exc.errno]
print(json.dumps({"held": held, "uid": os.getuid(), "cwd": os.getcwd(), "outcome": outcome}))
"""

NOBODY = 65534


def _unprivileged_python() -> tuple[str, int | None]:
    """An interpreter the child can run as an unprivileged user, and that user (None: the
    tests' own, when they do not run as root)."""
    if os.geteuid() != 0:
        return sys.executable, None
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            runs = subprocess.run([candidate, "-c", "pass"], user=NOBODY, timeout=30)
        except OSError:
            continue
        if runs.returncode == 0:
            return candidate, NOBODY
    require(False, "no Python an unprivileged user may run: /usr/bin/python3 (this venv's is not)")
    raise AssertionError("unreachable: require() skipped or failed")


@pytest.mark.parametrize("network_first", [False, True], ids=["", "after-netns"])
@pytest.mark.parametrize("unprivileged", [False, True], ids=["root", "unprivileged"])
def test_a_mount_view_leaves_only_the_writable_trees_writable_and_covers_the_secret(
    unprivileged: bool, network_first: bool
) -> None:
    if not unprivileged:
        require_root()
    python, user = _unprivileged_python() if unprivileged else (sys.executable, None)
    # Readable by the unprivileged user: not under pytest's tmp_path (mode 0700)
    base = Path(tempfile.mkdtemp(prefix="mcp0-mounts-"))
    shm = Path(f"/dev/shm/{base.name}")
    try:
        base.chmod(0o755)
        module = base / "isolation.py"
        shutil.copy(isolation.__file__, module)
        server = base / "server"
        copy, data = server / "plugins" / "p" / "1", server / "plugin-data" / "p"
        for directory in (copy, data):
            directory.mkdir(parents=True)
        (copy / "plugin.json").write_text("{}")
        (server / "admin.token").write_text("secret")
        (base / "outside.txt").write_text("not the worker's")
        for path in (server / "admin.token", base / "outside.txt"):
            path.chmod(0o600)
        if user is not None:
            for path in (base, *base.rglob("*")):
                os.chown(path, user, user)
        tries = [
            ("chmod", server / "admin.token"),
            ("stat", server / "admin.token"),
            ("chmod", base / "outside.txt"),
            ("write", base / "new.txt"),
            ("write", server / "new.txt"),  # the cover itself
            ("chmod", copy / "plugin.json"),  # kept, read-only
            ("stat", copy / "plugin.json"),
            ("write", data / "own.txt"),
            ("chmod", data / "own.txt"),
            ("chmod", Path("../../admin.token")),  # from a cwd that was under the cover
            ("write", shm),  # its own /dev/shm
        ]
        spec = [[str(data)], str(server), [str(copy), str(data)], str(data), network_first]
        spec.append([(action, str(path)) for action, path in tries])
        done = subprocess.run(
            [python, "-c", MOUNT_CHILD, str(module), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=30,
            user=user,
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        modes = {
            p.name: oct(p.stat().st_mode & 0o777)
            for p in (server / "admin.token", base / "outside.txt")
        }
    finally:
        shutil.rmtree(base)
    assert report["held"] is True, report
    assert report["uid"] == (user if user is not None else os.getuid())  # itself, mapped
    assert report["cwd"] == str(data)
    assert [report["outcome"][f"{a} {p}"] for a, p in tries] == [
        "ENOENT",
        "ENOENT",
        "EROFS",
        "EROFS",
        "EROFS",
        "EROFS",
        "ok",
        "ok",
        "ok",
        "ENOENT",
        "ok",
    ]
    assert not shm.exists()  # (the host's /dev/shm)
    assert modes == {"admin.token": "0o600", "outside.txt": "0o600"}


# A switch that fails half way (its group changed, its user not) gives the process its
# groups back and arms its parent-death signal again, which the group change cleared.
HALF_SWITCH = """
import ctypes, json, os, signal
from mcp_zero.sandbox import isolation
libc = ctypes.CDLL(None)
libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
before = (os.getresgid(), os.getgroups())
def refused(*args):
    raise PermissionError(1, "Operation not permitted")
os.setresuid = refused
switched = isolation.become(65534, 65534, os.getppid())
signal_now = ctypes.c_int()
libc.prctl(2, ctypes.byref(signal_now), 0, 0, 0)  # PR_GET_PDEATHSIG
print(json.dumps({"switched": switched, "same": (os.getresgid(), os.getgroups()) == before,
                  "uid": os.getuid(), "deathsig": signal_now.value}))
"""


def test_a_switch_that_fails_half_way_leaves_the_process_as_it_was() -> None:
    require_root()
    done = subprocess.run(
        [sys.executable, "-c", HALF_SWITCH], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "switched": False,
        "same": True,
        "uid": 0,
        "deathsig": int(signal.SIGKILL),
    }


# The child installs a worker's seccomp filter, naming the test's process (the server, for a
# worker) and its process group, then signals each target with signal 0.
SIGNAL_CHILD = """
import ctypes, errno, fcntl, json, os, resource, signal, socket, struct, sys
from mcp_zero.sandbox import isolation
server, group, bystander, thread = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, as the worker has
numbers = {"x86_64": (200, 234, 129), "aarch64": (130, 131, 138)}[os.uname().machine]
tkill, tgkill, rt_sigqueueinfo = numbers
def raw(number, *args):
    if libc.syscall(number, *args) < 0:
        raise OSError(ctypes.get_errno(), "")
def queued(pid):  # rt_sigqueueinfo with si_code SI_QUEUE, as sigqueue() sends
    info = (ctypes.c_int * 32)(0, 0, -1)
    raw(rt_sigqueueinfo, pid, 0, info)
tries = {
    "kill server": lambda: os.kill(server, 0),
    "kill group": lambda: os.kill(-group, 0),
    "kill all": lambda: os.kill(-1, 0),
    "tgkill server": lambda: raw(tgkill, server, server, 0),
    "queue server": lambda: queued(server),
    "pidfd server": lambda: os.close(os.pidfd_open(server)),
    "tkill itself": lambda: raw(tkill, threading_id(), 0),
    "kill bystander": lambda: os.kill(bystander, 0),
    "queue bystander": lambda: queued(bystander),
    "pidfd bystander": lambda: os.close(os.pidfd_open(bystander)),
    "kill itself": lambda: os.kill(os.getpid(), 0),
    "prlimit server": lambda: resource.prlimit(server, resource.RLIMIT_CPU, cpu(server)),
    "affinity server": lambda: os.sched_setaffinity(server, os.sched_getaffinity(server)),
    "nice server": lambda: os.setpriority(os.PRIO_PROCESS, server, nice(server)),
    "nice user": lambda: os.setpriority(os.PRIO_USER, 0, 19),
    "prlimit bystander": lambda: resource.prlimit(bystander, resource.RLIMIT_CPU, cpu(bystander)),
    "affinity bystander": lambda: os.sched_setaffinity(bystander, {0}),
    "nice bystander": lambda: os.setpriority(os.PRIO_PROCESS, bystander, 19),
    "kill own group": lambda: os.kill(0, 0),
    "kill server thread": lambda: os.kill(thread, 0),
    "tgkill server thread": lambda: raw(tgkill, thread, thread, 0),
    "prlimit server thread": lambda: resource.prlimit(thread, resource.RLIMIT_CPU, cpu(thread)),
    "prlimit itself": lambda: resource.prlimit(os.getpid(), resource.RLIMIT_CPU, cpu(0)),
    "prlimit 0": lambda: resource.prlimit(0, resource.RLIMIT_CPU, cpu(0)),
    "affinity itself": lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)),
    "nice itself": lambda: os.setpriority(os.PRIO_PROCESS, os.getpid(), nice(0)),
    "nice 0": lambda: os.setpriority(os.PRIO_PROCESS, 0, nice(0)),
    # signals sent another way (found by a bug hunt): through an open /proc/<pid> as a
    # pidfd, and as the owner of a file's signal-driven I/O (F_SETSIG: SIGKILL too)
    "procfd server": lambda: procfd_signal(server),
    "procfd bystander": lambda: procfd_signal(bystander),
    "setown server": lambda: fcntl.fcntl(sock, fcntl.F_SETOWN, server),
    "setown group": lambda: fcntl.fcntl(sock, fcntl.F_SETOWN, -group),
    "setown server thread": lambda: fcntl.fcntl(sock, fcntl.F_SETOWN, thread),
    "setown_ex server": lambda: fcntl.fcntl(sock, 15, struct.pack("ii", 1, server)),
    "fiosetown server": lambda: fcntl.ioctl(sock, 0x8901, struct.pack("i", server)),
    "siocspgrp server": lambda: fcntl.ioctl(sock, 0x8902, struct.pack("i", server)),
    "setown bystander": lambda: fcntl.fcntl(sock, fcntl.F_SETOWN, bystander),
    "setown itself": lambda: fcntl.fcntl(sock, fcntl.F_SETOWN, os.getpid()),
    "getown": lambda: fcntl.fcntl(sock, fcntl.F_GETOWN),
}
sock, _ = socket.socketpair()
def procfd_signal(pid):
    fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY)
    try:
        signal.pidfd_send_signal(fd, 0)
    finally:
        os.close(fd)
def threading_id():
    return __import__("threading").get_native_id()
def cpu(pid):  # (set to what it is: only whether it may is seen)
    return resource.prlimit(pid, resource.RLIMIT_CPU)
def nice(pid):
    return os.getpriority(os.PRIO_PROCESS, pid)
assert isolation.restrict_syscalls(protected=[server, group, thread])
outcome = {}
for name, attempt in tries.items():
    try:
        attempt()
        outcome[name] = "ok"
    except OSError as exc:
        outcome[name] = errno.errorcode[exc.errno]
print(json.dumps(outcome))
"""


def test_a_worker_may_not_signal_the_server_nor_set_its_limits_or_scheduling() -> None:
    # Nothing else keeps a non-root server's worker, of the server's own user, from setting
    # its RLIMIT_CPU to a second (which kills it), nor, before Landlock ABI 6 (Linux 6.12),
    # from stopping or killing it (here, without Landlock, the child could do all of it to
    # the test's process). Through a thread's id too: rlimits and signals are the process's
    # (found by a bug hunt: RLIMIT_NOFILE 3 set through a thread starved the server).
    bystander = subprocess.Popen(["sleep", "60"])
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                SIGNAL_CHILD,
                json.dumps([os.getpid(), os.getpgid(0), bystander.pid, thread.native_id]),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            start_new_session=True,  # its own group, as a worker's
        )
    finally:
        bystander.kill()
        bystander.wait()
        stop.set()
        thread.join()
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    refused = ["kill server", "kill group", "kill all", "tgkill server", "queue server"]
    refused += ["pidfd server", "tkill itself", "prlimit server", "affinity server"]
    refused += ["nice server", "nice user", "kill server thread", "tgkill server thread"]
    # another process's rlimits, scheduling and priority: none, its own children's too
    refused += ["prlimit server thread", "prlimit bystander", "affinity bystander"]
    refused += ["nice bystander"]
    refused += ["procfd server", "procfd bystander", "setown server", "setown group"]
    refused += ["setown server thread", "setown_ex server", "fiosetown server"]
    refused += ["siocspgrp server"]
    assert {name: outcome[name] for name in refused} == dict.fromkeys(refused, "EPERM")
    allowed = ["kill bystander", "queue bystander", "pidfd bystander", "kill itself"]
    allowed += ["kill own group", "prlimit itself", "prlimit 0", "affinity itself"]
    allowed += ["nice itself", "nice 0", "setown bystander", "setown itself", "getown"]
    assert {name: outcome[name] for name in allowed} == dict.fromkeys(allowed, "ok")


def test_a_worker_names_the_server_s_threads_as_well_as_its_pid_and_group() -> None:
    # (what restrict_syscalls is given in a worker: a signal to a thread's id is the process's)
    from mcp_zero.sandbox import worker

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        named = worker._server({"MCP0_PARENT_PID": str(os.getpid())})  # type: ignore[arg-type]
    finally:
        stop.set()
        thread.join()
    assert named[:2] == [os.getpid(), os.getpgid(0)]
    assert thread.native_id in named
    assert threading.main_thread().native_id in named
