"""Confinement a worker applies to itself before it loads plugin code (Linux).

Stdlib only: it runs inside the worker, single-threaded, right after start.
Nothing here raises: each measure that the host does not allow is skipped and
reported, so the kernel can tell the operator what actually holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import signal
import stat
import struct
from collections.abc import Iterable
from typing import NamedTuple

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
_CAPABILITY_VERSION_3 = 0x20080522

PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _Syscalls(NamedTuple):
    """What the seccomp filter needs to know of an architecture: its audit arch and the
    numbers of the syscalls it judges."""

    audit_arch: int
    socket: int
    # Refused outright: the kernel keyring's add_key, request_key and keyctl; io_uring's
    # setup, enter and register (its IORING_OP_SOCKET makes a socket no filter of socket()
    # sees); tkill, which names a thread of any process; pidfd_send_signal, whose pidfd may
    # be an open /proc/<pid> directory as well as pidfd_open's (found by a bug hunt).
    refused: tuple[int, ...]
    kill: int
    # Those that signal the process their first argument names: tgkill, rt_sigqueueinfo,
    # rt_tgsigqueueinfo and pidfd_open (for pidfd_send_signal).
    on_first: tuple[int, ...]
    # Those that change the process (or thread) their first argument names, allowed only on
    # the caller itself: prlimit64 (its rlimits: RLIMIT_CPU of 1 s kills it, RLIMIT_NOFILE
    # of 3 starves it, and through any thread id: rlimits are the whole process's, found by
    # a bug hunt); sched_setaffinity, sched_setscheduler, sched_setparam, sched_setattr.
    on_self: tuple[int, ...]
    # Those that act on a process, group or user their first two arguments name (which,
    # who): setpriority, and ioprio_set; with the ``which`` that means every process of a user
    # (PRIO_USER, IOPRIO_WHO_USER), refused; otherwise allowed on the caller only.
    on_who: tuple[tuple[int, int], ...]
    # fcntl and ioctl, through which a file's owner is set: signal-driven I/O then sends the
    # owner any signal (F_SETSIG), SIGKILL too (found by a bug hunt). F_SETOWN is refused on
    # a protected pid or group; F_SETOWN_EX and the socket ioctls FIOSETOWN and SIOCSPGRP,
    # whose pid is behind a pointer the filter cannot read, outright.
    fcntl: int
    ioctl: int


_SECCOMP_ARCH = {
    "x86_64": _Syscalls(
        0xC000003E, 41, (248, 249, 250, 425, 426, 427, 200, 424), 62,
        (234, 129, 297, 434), (302, 203, 144, 142, 314), ((141, 2), (251, 3)), 72, 16,
    ),
    "aarch64": _Syscalls(
        0xC00000B7, 198, (217, 218, 219, 425, 426, 427, 130, 424), 129,
        (131, 138, 240, 434), (261, 122, 119, 118, 274), ((140, 2), (30, 3)), 25, 29,
    ),
}  # fmt: skip
_F_SETOWN, _F_SETOWN_EX = 8, 15
_FIOSETOWN, _SIOCSPGRP = 0x8901, 0x8902
_X32_SYSCALL_BIT = 0x40000000
_AF_UNIX = 1
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
MAX_OPEN_FILES = 256

# Mounts (linux/mount.h): mount(2) flags, and mount_setattr(2) (Linux 5.12; the same number
# on every architecture), which sets a whole tree read-only without touching other flags.
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 1 << 12, 1 << 14, 1 << 18
_SYS_MOUNT_SETATTR = 442
_MOUNT_ATTR_RDONLY = 1
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000

# Landlock (linux/landlock.h): the syscalls have these numbers on every architecture.
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
# The rights each ABI version knows: 1 has bits 0-12, 2 adds REFER, 3 TRUNCATE, 5 IOCTL_DEV.
_FS_RIGHTS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
# Rights that apply to a file (the others only to directories).
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
_READ = _EXECUTE | _READ_FILE | _READ_DIR
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
# What a worker may read and execute: the system's programs, libraries and settings, and
# the devices any program expects (not /dev as a whole: a root worker would read disks).
# Its interpreter's prefixes and import path are added; the rest of the filesystem (homes,
# /tmp, /var, /run, /srv, /opt…, the server's data dir) is out of reach.
SYSTEM_READ = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/sys",
    "/dev/random", "/dev/urandom", "/run/systemd/resolve",
)  # fmt: skip
# Device files a process expects to write.
SYSTEM_WRITE = ("/dev/null", "/dev/zero", "/dev/full", "/dev/tty")
# Shared memory (multiprocessing's semaphores), for a plugin that may write.
SHARED_MEMORY = "/dev/shm"  # noqa: S108

# What a worker reports of its confinement, each True when that measure held (its ready
# frame's ``sandbox``; the runtime's and the admin API's ``sandbox``).
MEASURES = (
    "network_isolated",
    "files_confined",
    "mounts_confined",
    "processes_hidden",
    "syscalls_restricted",
    "unprivileged",
)

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


def drop_bounding_set() -> None:
    """Empty the capability bounding set (while ``CAP_SETPCAP`` is held: before switching
    user): no capability can come back, by any means."""
    libc = _c()
    if libc is not None:
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


def drop_capabilities() -> None:
    """Give up every capability (a worker of a server run as root would otherwise hold them
    all: read any file, trace the server), where the architecture's ``capset`` is known."""
    libc = _c()
    number = _SYS_CAPSET.get(os.uname().machine)
    if libc is None or number is None:
        return
    drop_bounding_set()
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: none (two words)
    libc.syscall(number, header, data)


_Instruction = tuple[int, int, int | str, int | str]  # code, k, jump if true, if false
_BPF_JA = 0x05


def _assemble(program: list[_Instruction | str]) -> list[tuple[int, int, int, int]]:
    """Classic BPF from instructions whose jumps name labels (the strings in ``program``),
    or 0 for the next instruction: (code, jt, jf, k) with the offsets resolved (an
    unconditional jump's, ``BPF_JA``, in ``k``)."""
    labels: dict[str, int] = {}
    code: list[_Instruction] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)

    def offset(here: int, target: int | str) -> int:
        return labels[target] - here - 1 if isinstance(target, str) else target

    return [
        (op, 0, 0, offset(i, jt)) if op == _BPF_JA else (op, offset(i, jt), offset(i, jf), k)
        for i, (op, k, jt, jf) in enumerate(code)
    ]


def restrict_syscalls(protected: Iterable[int] = ()) -> bool:
    """Install a seccomp filter: no Unix-domain socket (``socket(AF_UNIX, …)`` fails with
    EACCES), no kernel keyring (``add_key``, ``request_key``, ``keyctl``), no io_uring
    (through which a socket is made without ``socket()``), no ``tkill`` nor
    ``pidfd_send_signal``; no signal to the ``protected`` processes (the server: its pid,
    process group and threads), nor to every process of the user at once (``kill(-1)``),
    nor a file owned by them for signal-driven I/O (``F_SETOWN``; ``F_SETOWN_EX``,
    ``FIOSETOWN`` and ``SIOCSPGRP`` not at all); and rlimits, scheduling and priorities set
    on this process alone (its pid, or 0), never on another, nor on every process of the
    user (``PRIO_USER``): EPERM. ``True`` when it is in force. A process of the server's
    user may do all of that to it without tracing it, and through any of its threads' ids
    too; Landlock governs none of this (signals only from its ABI 6), nor connecting to a
    socket file: through one (tmux, ssh-agent, Docker, D-Bus) a plugin could make the
    user's other programs act for it outside the sandbox. ``socketpair()`` stays allowed.
    Needs ``PR_SET_NO_NEW_PRIVS``."""
    libc = _c()
    arch = _SECCOMP_ARCH.get(os.uname().machine)
    if libc is None or arch is None:
        return False
    # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_JMP|JA, BPF_RET|K
    ld, jeq, jge, ja, ret = 0x20, 0x15, 0x35, _BPF_JA, 0x06
    # seccomp_data.args[0], [1] and [2]: their low words (pids and commands are ints)
    arg0, arg1, arg2 = 16, 24, 32
    pids = sorted({p for p in protected if p > 0})
    program: list[_Instruction | str] = [
        (ld, 4, 0, 0),  # seccomp_data.arch: another ABI's numbers (i386's socketcall): nothing
        (jeq, arch.audit_arch, 0, "deny"),
        (ld, 0, 0, 0),  # seccomp_data.nr
    ]
    if arch.audit_arch == 0xC000003E:  # the x32 ABI's numbers name other calls: none at all
        program.append((jge, _X32_SYSCALL_BIT, "deny", 0))
    program += [(jeq, nr, "deny", 0) for nr in arch.refused]
    program.append((jeq, arch.kill, "kill", 0))
    program += [(jeq, nr, "first", 0) for nr in arch.on_first]
    program += [(jeq, nr, "self", 0) for nr in arch.on_self]
    program += [(jeq, nr, f"which {every}", 0) for nr, every in arch.on_who]
    program += [(jeq, arch.fcntl, "fcntl", 0), (jeq, arch.ioctl, "ioctl", 0)]
    program += [
        (jeq, arch.socket, 0, "allow"),
        (ld, arg0, 0, 0),  # socket()'s address family
        (jeq, _AF_UNIX, "refuse", "allow"),
        # kill(): a pid of -1 is every process the worker may signal, -N process group N
        "kill",
        (ld, arg0, 0, 0),
        (jeq, 0xFFFFFFFF, "deny", 0),
        *((jeq, -pid & 0xFFFFFFFF, "deny", 0) for pid in pids),
        (ja, 0, "pid", "pid"),
        *(
            step
            for _, every in arch.on_who
            for step in (f"which {every}", (ld, arg0, 0, 0), (jeq, every, "deny", "who"))
        ),
        "who",
        (ld, arg1, 0, 0),
        (ja, 0, "mine", "mine"),
        "self",
        (ld, arg0, 0, 0),
        "mine",  # (a child of this process has another pid: only 0 means itself there)
        (jeq, 0, "allow", 0),
        (jeq, os.getpid(), "allow", "deny"),
        "fcntl",
        (ld, arg1, 0, 0),  # the command
        (jeq, _F_SETOWN_EX, "deny", 0),
        (jeq, _F_SETOWN, 0, "allow"),
        (ld, arg2, 0, 0),  # the owner: a pid, or minus a group
        *((jeq, -pid & 0xFFFFFFFF, "deny", 0) for pid in pids),
        (ja, 0, "pid", "pid"),
        "ioctl",
        (ld, arg1, 0, 0),
        (jeq, _FIOSETOWN, "deny", 0),
        (jeq, _SIOCSPGRP, "deny", "allow"),
        "first",
        (ld, arg0, 0, 0),
        "pid",
        *((jeq, pid, "deny", 0) for pid in pids),
        (ja, 0, "allow", "allow"),
        "refuse",
        (ret, _RET_ERRNO | errno.EACCES, 0, 0),
        "allow",
        (ret, _RET_ALLOW, 0, 0),
        "deny",
        (ret, _RET_ERRNO | errno.EPERM, 0, 0),
    ]
    code = _assemble(program)
    filters = (ctypes.c_uint64 * len(code))(
        *(op | jt << 16 | jf << 24 | k << 32 for op, jt, jf, k in code)
    )

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = _Prog(len(code), ctypes.addressof(filters))
    return bool(libc.prctl(PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) == 0)


def hide_process() -> None:
    """Make this process non-dumpable: processes of the same user without
    ``CAP_SYS_PTRACE`` (the plugins' workers) can no longer read its environment, memory,
    maps or open files through ``/proc``, nor attach to it; no core dump is written."""
    libc = _c()
    if libc is not None:
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _unshare(libc: ctypes.CDLL, flags: int, also: tuple[int, int] | None = None) -> bool:
    """``unshare(flags)``; where that is refused (a non-root process outside a user
    namespace of its own; root without ``CAP_SYS_ADMIN``, in a container), again in a new
    user namespace that maps the process's user and group to themselves (root: and
    ``also``, the user it will switch to). ``True`` when this process is in the new
    namespaces."""
    if libc.unshare(flags) == 0:  # root, or a process already in its own user namespace
        return True
    uid, gid = os.getuid(), os.getgid()
    if uid == 0 and also is not None and also != (0, 0):
        return _unshare_mapped(libc, flags, also)
    if libc.unshare(CLONE_NEWUSER | flags) != 0:
        return False
    _map_self(uid, gid)
    return True


def _map_self(uid: int, gid: int) -> None:
    """Map this process's user and group to themselves in the user namespace it has just
    entered: its files stay its own inside (unmapped, they would show as nobody's)."""
    for name, line in (
        ("setgroups", "deny"),
        ("uid_map", f"{uid} {uid} 1"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        try:
            with open(f"/proc/self/{name}", "w") as file:
                file.write(line)
        except OSError:
            continue  # (written already by the mapping child, or refused: left unmapped)


def _unshare_mapped(libc: ctypes.CDLL, flags: int, also: tuple[int, int]) -> bool:
    """As root, ``unshare(CLONE_NEWUSER | flags)`` with root and ``also`` mapped to
    themselves, so that :func:`become` works inside. A process may map only its own ids
    in its new user namespace: the others are written by a child it forks first, which
    keeps root's ``CAP_SETUID`` in the parent namespace (as ``newuidmap`` does)."""
    parent = os.getpid()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: single-threaded, leaves by os._exit only
        code = 1
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) == b"+":
                for name, other in (("uid_map", also[0]), ("gid_map", also[1])):
                    ids = sorted({0, other})
                    with open(f"/proc/{parent}/{name}", "w") as file:
                        file.write("".join(f"{i} {i} 1\n" for i in ids))
                code = 0
        finally:
            os._exit(code)
    os.close(ready_r)
    done = bool(libc.unshare(CLONE_NEWUSER | flags) == 0)
    os.write(ready_w, b"+" if done else b"-")
    os.close(ready_w)
    _, status = os.waitpid(pid, 0)
    if done and os.waitstatus_to_exitcode(status) != 0:
        _map_self(0, 0)  # root alone, then: become() fails, and says so
    return done


def isolate_network(also: tuple[int, int] | None = None) -> bool:
    """Move this process into a new, empty network namespace; ``True`` when that worked.

    Root gets a plain ``CLONE_NEWNET``; others (and root without ``CAP_SYS_ADMIN``) try a
    user namespace with it (where :func:`confine_mounts` then has the rights it needs;
    ``also``: the user and group root will switch to, mapped there too). Must run before
    any thread starts.
    """
    libc = _c()
    return libc is not None and _unshare(libc, CLONE_NEWNET, also)


def _set_read_only(libc: ctypes.CDLL, path: str, read_only: bool, recursive: bool) -> bool:
    """Set (or clear) the read-only flag of the mount at ``path`` (and, ``recursive``, of
    every mount below it), leaving its other flags as they are."""
    flag = _MOUNT_ATTR_RDONLY
    attr = struct.pack("QQQQ", flag if read_only else 0, 0 if read_only else flag, 0, 0)
    done: int = libc.syscall(
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(_AT_RECURSIVE if recursive else 0),
        ctypes.c_char_p(attr),
        ctypes.c_size_t(len(attr)),
    )
    return done == 0


def confine_mounts(
    writable: Iterable[str],
    cover: Iterable[str] = (),
    keep: Iterable[str] = (),
    private: Iterable[str] = (),
    private_mb: int = 64,
    owner: tuple[int, int] | None = None,
) -> bool:
    """Give this process (and its future children) its own view of the mounts: every
    filesystem read-only but the ``writable`` directories' trees, and each ``cover``
    directory (the server's data dir; directories the worker's user may not search) under an
    empty read-only ``tmpfs``, into which only the ``keep`` paths inside it (the plugin's
    copy and data dir, the interpreter) are put back; each ``private`` directory
    (``/dev/shm``) replaced by an empty ``tmpfs`` of its own, of at most ``private_mb`` MiB,
    for ``owner`` (user, group; default this process's) alone; and System V IPC of its own
    (shared memory, semaphores, message queues: gone with the last process in it), its
    shared memory of at most ``private_mb`` MiB too where it may set that; ``True`` when in
    force.

    It closes what Landlock does not govern: ``chmod``, ``chown``, ``utime`` and extended
    attributes of files the process's user owns (a root server's worker: all of the
    system's), and ``stat`` of the server's files. Must run before any thread starts, before
    Landlock (which forbids mounting) and while capabilities are held (a non-root process
    gets them in a new user namespace). Paths that do not exist are skipped.
    """
    libc = _c()
    if libc is None or not _unshare(libc, CLONE_NEWNS, owner):
        return False
    # System V shared memory is /dev/shm by another name: its segments, detached, count
    # against no address space and outlive their maker, found by key by any process of the
    # user (a plugin of 256 MiB left 400 MiB of them to the host: found by a bug hunt). In
    # the user namespace the mount namespace may have needed, which gives the right to it.
    # (a kernel without IPC namespaces keeps the host's: the mount view is no less worth it)
    if libc.unshare(CLONE_NEWIPC) == 0:
        _limit_shared_memory(private_mb)
    # Private first: nothing done here may reach the mounts of other processes.
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return False
    cwd = os.getcwd()
    covers = sorted({os.path.realpath(c) for c in cover if os.path.isdir(c)})
    if not _cover_all(libc, covers, {os.path.realpath(p) for p in keep}):
        return False
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    for path in {os.path.realpath(p) for p in private if os.path.isdir(p)}:
        # (the owner's ids are not mapped in a user namespace a root process fell back to:
        # then its own)
        for uid, gid in dict.fromkeys(
            [owner or (os.getuid(), os.getgid()), (os.getuid(), os.getgid())]
        ):
            options = f"size={private_mb}m,mode=0700,uid={uid},gid={gid}".encode()
            if libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", flags, options) == 0:
                break
        else:
            return False
    # Its own /proc, where only processes it may trace show (itself and what it starts: not
    # the server, other plugins' workers, other users'). "ptraceable", not "invisible",
    # which shows everything to the mount's gid (0: a worker that stays root). Mounting one
    # needs CAP_SYS_ADMIN over the PID namespace: a worker in a user namespace of its own
    # keeps the host's.
    libc.mount(b"proc", b"/proc", b"proc", flags, b"hidepid=ptraceable")
    dirs = sorted({os.path.realpath(p) for p in writable if os.path.isdir(p)})
    for path in dirs:  # each its own mount, to be made writable again below
        if libc.mount(os.fsencode(path), os.fsencode(path), None, _MS_BIND | _MS_REC, None) != 0:
            return False
    if not _set_read_only(libc, "/", True, recursive=True):
        return False
    for path in dirs:  # a tree that was read-only before stays so (the kernel locks it)
        _set_read_only(libc, path, False, recursive=False)
    try:
        os.chdir(cwd)  # through the new mounts: a directory under the cover is gone
    except OSError:
        os.chdir("/")
    return True


def _limit_shared_memory(mb: int) -> None:
    """Bound the System V shared memory of this process's IPC namespace, all segments
    together, at ``mb`` MiB. Only the namespace's root may (a root server's worker, before
    /proc is read-only): a worker in a user namespace of its own, where its user is not
    root, keeps the kernel's limits, its segments still going with it."""
    pages = mb * (1 << 20) // resource.getpagesize()
    for name, value in (("shmmax", mb << 20), ("shmall", pages)):
        with contextlib.suppress(OSError), open(f"/proc/sys/kernel/{name}", "w") as file:
            file.write(str(value))


def processes_hidden() -> bool:
    """Whether this process's ``/proc`` hides the processes it may not trace: its parent
    (the server: non-dumpable, outside its Landlock domain) is not there."""
    return os.path.isdir("/proc/self") and not os.path.exists(f"/proc/{os.getppid()}")


def unsearchable(paths: Iterable[str], uid: int, gid: int) -> list[str]:
    """The directories above ``paths`` that user ``uid`` (group ``gid``, no other groups)
    may not search, so cannot reach them through (a venv's interpreter under a ``0700``
    home): covered by :func:`confine_mounts`, they are traversable again."""
    found: set[str] = set()
    for path in {os.path.realpath(p) for p in paths if os.path.exists(p)}:
        here = os.path.dirname(path)
        while here != os.path.dirname(here):  # up to, not including, "/"
            try:
                st = os.stat(here)
            except OSError:
                break
            if st.st_uid == uid:
                bit = stat.S_IXUSR
            else:
                bit = stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
            if not st.st_mode & bit:
                found.add(here)
            here = os.path.dirname(here)
    return sorted(found)


_CAP_CHOWN, _CAP_SETGID, _CAP_SETUID = 0, 6, 7


def can_become(uid: int, gid: int) -> bool:
    """Whether :func:`become` would work here, before anything is changed for it: this
    process holds ``CAP_SETUID``, ``CAP_SETGID`` and ``CAP_CHOWN`` (to hand its data dir
    over first), may set its groups, and ``uid`` and ``gid`` are mapped in its user
    namespace."""
    try:
        with open("/proc/self/status") as file:
            held = next(line for line in file if line.startswith("CapEff:"))
        with open("/proc/self/setgroups") as file:
            groups = file.read().strip()
        maps = []
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/self/{name}") as file:
                maps.append([tuple(map(int, line.split())) for line in file if line.strip()])
    except (OSError, StopIteration, ValueError):
        return False
    needed = 1 << _CAP_CHOWN | 1 << _CAP_SETGID | 1 << _CAP_SETUID
    if int(held.split()[1], 16) & needed != needed or groups != "allow":
        return False
    return all(
        any(inside <= wanted < inside + count for inside, _, count in lines)
        for wanted, lines in zip((uid, gid), maps, strict=True)
    )


def become(uid: int, gid: int, parent_pid: int) -> bool:
    """Switch this process to user ``uid`` and group ``gid`` with no other groups (a root
    server's worker: root's files are not its own then); ``True`` when that held. The
    kernel clears the parent-death signal on the change: it is set again."""
    libc = _c()
    groups, gids = os.getgroups(), os.getresgid()
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        switched = True
    except OSError:
        switched = False
        with contextlib.suppress(OSError):  # (half switched: its groups back)
            os.setresgid(*gids)
            os.setgroups(groups)
    # (either way: a change of group alone clears it too)
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)
    return switched


def _cover_all(libc: ctypes.CDLL, covers: list[str], kept: set[str]) -> bool:
    """Mount an empty tmpfs on each of ``covers``, outermost first, and bind back in place
    the ``kept`` paths inside it. A cover inside what an outer one put back (the server's
    data dir inside a project kept whole, under a home covered for ``nobody``) is covered
    again; one the outer cover left out of sight needs nothing."""
    held: dict[str, int] = {}
    umask = os.umask(0o022)  # the way to what is put back: searchable by a worker's user
    try:
        # Opened before anything is covered: what they name is out of sight after
        for path in sorted(kept):
            if any(path != c and is_within(path, c) for c in covers):
                try:
                    held[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        for secret in covers:
            if not os.path.isdir(secret):
                continue  # (under an outer cover, and nothing of it put back)
            if libc.mount(b"tmpfs", os.fsencode(secret), b"tmpfs", flags, b"size=64k,mode=0755"):
                return False
            for path, fd in held.items():
                if path == secret or not is_within(path, secret):
                    continue
                if not os.path.lexists(path):  # (an outer kept path may hold this one)
                    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                    if stat.S_ISDIR(os.fstat(fd).st_mode):
                        os.mkdir(path, 0o755)
                    else:
                        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
                source = os.fsencode(f"/proc/self/fd/{fd}")
                if libc.mount(source, os.fsencode(path), None, _MS_BIND | _MS_REC, None) != 0:
                    return False
        return True
    finally:
        os.umask(umask)
        for fd in held.values():
            os.close(fd)


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers; 0 when it has none (or it is disabled)."""
    libc = _c()
    if libc is None:
        return 0
    version = libc.syscall(
        _SYS_LANDLOCK_CREATE_RULESET,
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(version), 0)


def _beneath_except(root: str, hidden: str) -> list[str]:
    """Paths whose trees together are ``root``'s tree without ``hidden``'s (its descendant).

    Symbolic links are left out: Landlock judges an access by the path it reaches, so a
    link needs no rule of its own, and one into ``hidden`` must not get one.
    """
    paths: list[str] = []
    here = root
    for part in os.path.relpath(hidden, root).split(os.sep):
        try:
            with os.scandir(here) as entries:
                paths.extend(e.path for e in entries if e.name != part and not e.is_symlink())
        except OSError:
            return paths
        here = os.path.join(here, part)
    return paths


def is_within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (by name)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confine_files(read: Iterable[str], write: Iterable[str], hidden: str = "") -> int:
    """Restrict this process and its future children to reading and executing under
    ``read`` and to anything under ``write`` (Landlock); returns the ABI version enforced,
    0 when the kernel has no Landlock (nothing is restricted then).

    Paths that do not exist are skipped. No ``read`` or ``write`` tree reaches into the
    ``hidden`` one (the server's data dir): a tree that holds it is granted without it,
    while a tree inside it (the plugin's own directories) is granted as asked. From ABI 6
    the process also cannot signal, or connect to the abstract sockets of, processes outside
    its domain (the server). Must run before any thread starts, after ``PR_SET_NO_NEW_PRIVS``.
    """
    abi = landlock_abi()
    libc = _c()
    if abi < 1 or libc is None:
        return 0
    handled = _FS_RIGHTS[max(v for v in _FS_RIGHTS if v <= abi)]
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("QQQ", handled, 0, scoped)[: 24 if abi >= 6 else 8]
    ruleset = libc.syscall(
        _SYS_LANDLOCK_CREATE_RULESET,
        ctypes.c_char_p(attr),
        ctypes.c_size_t(len(attr)),
        ctypes.c_uint32(0),
    )
    if ruleset < 0:
        return 0
    secret = os.path.realpath(hidden) if hidden else ""
    try:
        for rights, roots in ((_READ, read), (handled, write)):
            for root in roots:
                path = os.path.realpath(root)
                if secret and is_within(secret, path):
                    allowed = _beneath_except(path, secret) if path != secret else []
                else:
                    allowed = [path]
                for each in allowed:
                    _allow(libc, ruleset, each, rights & handled)
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)):
            return 0
    finally:
        os.close(ruleset)
    return abi


def _allow(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    """Grant ``rights`` under ``path`` (only a file's rights when it is a file)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        rule = struct.pack("=Qi", rights, fd)
        libc.syscall(
            _SYS_LANDLOCK_ADD_RULE,
            ctypes.c_int(ruleset),
            ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
            ctypes.c_char_p(rule),
            ctypes.c_uint32(0),
        )
    finally:
        os.close(fd)


__all__ = [
    "MEASURES",
    "apply_rlimits",
    "become",
    "can_become",
    "confine_files",
    "confine_mounts",
    "drop_bounding_set",
    "drop_capabilities",
    "hide_process",
    "is_within",
    "isolate_network",
    "landlock_abi",
    "processes_hidden",
    "restrict_syscalls",
    "tie_to_parent",
    "unsearchable",
]
