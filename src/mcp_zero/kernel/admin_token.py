"""Rotating the admin token (a file) together with its audit record (a row of the store).

The two cannot share a transaction, so a rotation commits in three steps, under a lock:
the new token is staged beside the token file (``admin.token.<seq>-<id>.next``), its
``change_admin_token`` record (carrying ``rotation: <id>``) is committed, and the staged
file is renamed over the token file. The record is the commit point: a rotation a crash
cut short is finished — put in force if its record is in the log, dropped if not — by
:func:`finish_admin_token_rotations`, which every runtime runs as it opens. So, once that
has run, a new token is in force exactly when its record is in the log.

A rotation's id is a digest of the token it writes (:func:`rotation_id`), so a running
server that finds a new token in the file can tell whether a rotation's record explains it
(:func:`rotation_recorded`) or the file was edited by hand (a change it records itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from mcp_zero.audit.chain import readable_event
from mcp_zero.audit.log import AuditLog
from mcp_zero.errors import StorageError
from mcp_zero.kernel.action import Outcome
from mcp_zero.kernel.admin import CHANGE_ADMIN_TOKEN, admin_event
from mcp_zero.security.files import exclusive_lock, sync_directory
from mcp_zero.security.tokens import new_token, write_secret_file
from mcp_zero.storage.base import AuditEntry, Store

# (no "admin.token" in its name: it stays, and is no token)
_LOCK_NAME = ".rotate-token.lock"
# <the audit head's seq when it was staged>-<the rotation's id>
_STAGED = re.compile(r"\.(\d+)-([0-9a-f]{16})\.next")


def rotate_admin_token(path: Path, audit: AuditLog, store: Store, via: str = "cli") -> None:
    """Write a new admin token to ``path`` and record it in ``audit``: both, or (whatever
    stops the process, once a runtime has opened again) neither.

    Raises StorageError when the token cannot be written (the old one still works then) or
    its record cannot be committed (then the new token is not put in force either).
    """
    try:
        with exclusive_lock(path.parent / _LOCK_NAME):
            _finish(path, store)  # a rotation cut short first: its record comes before ours
            head = store.audit_head()
            token = new_token()
            rotation = rotation_id(token)
            staged = path.with_name(f"{path.name}.{head.seq if head else 0}-{rotation}.next")
            write_secret_file(staged, token + "\n")
            try:
                audit.append_with(
                    lambda: store.set_recorded(ADMIN_TOKEN_RECORDED, rotation),
                    lambda _: admin_event(
                        CHANGE_ADMIN_TOKEN, path.name, via, Outcome.ALLOWED, {"rotation": rotation}
                    ),
                )
            except BaseException:
                # a failed commit may still have landed: the log says whether it is in force
                with contextlib.suppress(Exception):
                    _finish(path, store)
                raise
            os.replace(staged, path)
            sync_directory(path.parent)
    except OSError as exc:
        raise StorageError(
            f"cannot write a new admin token to {path}: {exc.strerror or exc}; "
            "the old token still works"
        ) from exc


#: Store.recorded's name of the admin token in force (recorded_token_digest)
ADMIN_TOKEN_RECORDED = "admin_token"  # noqa: S105 - a name, not a token


def recorded_token_digest(token: str | None) -> str:
    """What the store keeps of the admin token the log last recorded: its rotation id, ""
    for none."""
    return rotation_id(token) if token else ""


def rotation_id(token: str) -> str:
    """The id of the rotation that wrote ``token``: 64 bits of a digest of it (no help in
    guessing a 256-bit random token, so the record may show it)."""
    return hashlib.sha256(b"mcp0 admin token rotation\0" + token.encode()).hexdigest()[:16]


#: How many audit entries rotation_recorded reads back at a time (its memory bound), and at
#: most in all: a rotation's record is committed just before its token is renamed into place
#: and the server looks every second, so it is among the newest. One that far back is not
#: found, and the change is recorded a second time, as a hand edit: a record more, none lost.
READ_BACK_PAGE = 1000
MAX_READ_BACK = 100_000


def rotation_recorded(store: Store, token: str, after_seq: int) -> bool:
    """Whether the log holds, after seq ``after_seq``, the record of a rotation that wrote
    ``token``. Read back from the head READ_BACK_PAGE entries at a time, MAX_READ_BACK at
    most (past them: False)."""
    head = store.audit_head()
    rotation = rotation_id(token)
    high = head.seq if head else 0
    stop = max(after_seq, high - MAX_READ_BACK)
    while high > stop:
        low = max(stop, high - READ_BACK_PAGE)
        if _holds_record(store.read_audit(low, high - low), rotation):
            return True
        high = low
    return False


@contextlib.contextmanager
def rotations_held_off(path: Path) -> Iterator[bool]:
    """Hold off rotations of the admin token at ``path`` while the block runs: yields True
    with their lock held, or False at once (without it) when a rotation holds it — it may be
    between committing its record and putting its token in force, so take nothing up yet.
    True without the lock when the lock file cannot be opened (as before there was one)."""
    try:
        fd = os.open(path.parent / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # releases the lock


def finish_admin_token_rotations(path: Path, store: Store) -> None:
    """Finish the rotations of the admin token at ``path`` that a crash cut short: a staged
    token whose record is in the log is put in force, one whose record is not is dropped.
    Nothing to do (one directory listing) unless a rotation was cut short. Raises
    StorageError."""
    try:
        if _staged(path):
            with exclusive_lock(path.parent / _LOCK_NAME):
                _finish(path, store)
    except OSError as exc:
        raise StorageError(
            f"cannot finish a rotation of the admin token at {path} that was cut short:"
            f" {exc.strerror or exc}; check the data dir's permissions"
        ) from exc


def _staged(path: Path) -> list[tuple[int, str, Path]]:
    """The staged tokens beside ``path``: (audit seq when staged, rotation id, file), in
    the order they were staged."""
    found = []
    prefix = path.name
    with os.scandir(path.parent) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            match = _STAGED.fullmatch(entry.name, len(prefix))
            if match is not None:
                found.append((int(match[1]), match[2], Path(entry.path)))
    return sorted(found)


def _finish(path: Path, store: Store) -> None:
    staged = _staged(path)
    for after_seq, rotation, file in staged:
        if _recorded(store, after_seq, rotation):
            os.replace(file, path)
        else:
            file.unlink()
    if staged:
        sync_directory(path.parent)


def _recorded(store: Store, after_seq: int, rotation: str) -> bool:
    """Whether the log holds the record of ``rotation``, committed after seq ``after_seq``."""
    while entries := store.read_audit(after_seq, 1000):
        if _holds_record(entries, rotation):
            return True
        after_seq = entries[-1].seq
    return False


def _holds_record(entries: list[AuditEntry], rotation: str) -> bool:
    marker = rotation.encode()
    for entry in entries:
        if marker in entry.body:  # (a record is parsed only if it may be the one)
            body = readable_event(entry)
            if body.get("verb") == CHANGE_ADMIN_TOKEN and body.get("rotation") == rotation:
                return True
    return False
