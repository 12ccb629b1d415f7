"""The data dirs removed plugins left: set aside in plugin-data/ as ``<name>.removed-<UTC
time>`` (a name no plugin can have: plugin names hold no dot) until a plugin installed under
the name adopts one, or the operator purges it.

A purge renames the dir out of the way (``.purging-<the audit head's seq>-<its name>``) in the
transaction of its ``purge_plugin_data`` record, then deletes it, under a lock on plugin-data/.
The record is the commit point: a purge a crash cut short is finished — the dir deleted if its
record is in the log, renamed back if not — by :func:`finish_purges`, which every runtime runs
as it opens, as ``mcp0 plugin removed-data`` does before it lists."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mcp_zero import fdio
from mcp_zero.audit.chain import readable_event
from mcp_zero.errors import Conflict, NotFound, StorageError
from mcp_zero.kernel.action import Verb
from mcp_zero.storage.base import Store

log = logging.getLogger("mcp_zero.plugins")

REMOVED = ".removed-"
_STAMP = "%Y%m%dT%H%M%S.%fZ"
_PURGING = ".purging-"
# <the audit head's seq when the purge began>-<the set-aside dir's name>
_PURGING_NAME = re.compile(r"\.purging-(\d+)-(.+)")


@dataclass(frozen=True, slots=True)
class SetAside:
    """The data dir of plugin ``plugin`` that a removal at ``removed_at`` set aside: ``dir``,
    its name under plugin-data/, ``path``, and the ``bytes`` of its files."""

    plugin: str
    dir: str
    path: Path
    removed_at: datetime.datetime
    bytes: int

    def to_json(self) -> dict[str, object]:
        """Its shape in ``mcp0 plugin removed-data --json`` (docs/cli.md)."""
        return {
            "name": self.plugin,
            "dir": self.dir,
            "path": str(self.path),
            "removed_at": self.removed_at.isoformat().replace("+00:00", "Z"),
            "bytes": self.bytes,
        }


def aside_name(plugin: str, when: datetime.datetime) -> str:
    """The name plugin ``plugin``'s data dir is set aside under by a removal at ``when``
    (UTC: the names of one plugin sort by time)."""
    return f"{plugin}{REMOVED}{when.strftime(_STAMP)}"


def set_aside(plugin_data_dir: Path, plugin: str | None = None) -> list[SetAside]:
    """The data dirs set aside in ``plugin_data_dir`` (of plugin ``plugin`` only, if given),
    by name then removal time. Raises StorageError when the directory cannot be read."""
    found = []
    for entry in _entries(plugin_data_dir):
        name, removed, stamp = entry.partition(REMOVED)
        if not removed or entry.startswith(_PURGING) or (plugin is not None and name != plugin):
            continue
        try:
            when = datetime.datetime.strptime(stamp, _STAMP).replace(tzinfo=datetime.UTC)
        except ValueError:
            continue  # not a removal's name: not ours to list, adopt or delete
        path = plugin_data_dir / entry
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                found.append(SetAside(name, entry, path, when, fdio.tree_bytes(path)))
    return sorted(found, key=lambda aside: (aside.plugin, aside.removed_at))


def find(plugin_data_dir: Path, directory: str, plugin: str | None = None) -> SetAside:
    """The set-aside data dir named ``directory`` (of plugin ``plugin``, if given). Raises
    NotFound, naming the command that lists them."""
    for aside in set_aside(plugin_data_dir, plugin):
        if aside.dir == directory:
            return aside
    whose = f" of plugin {plugin!r}" if plugin is not None else ""
    raise NotFound(
        f"{plugin_data_dir} holds no data dir {directory!r}{whose} set aside by a removal; "
        "'mcp0 plugin removed-data' lists them"
    )


def holds_data(path: Path) -> bool:
    """Whether the data dir at ``path`` holds data: more than the empty ``.tmp`` its workers
    are given (one that cannot be read is taken to hold some)."""
    try:
        entries = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    if entries == [".tmp"]:
        try:
            entries = os.listdir(path / ".tmp")
        except OSError:
            return True
    return bool(entries)


def to_adopt(plugin_data_dir: Path, plugin: str, choice: bool | str) -> SetAside | None:
    """The set-aside data dir a plugin ``plugin`` installed anew is given: the one named
    ``choice``, or with ``choice`` True the one that holds data (None if none does). Raises
    NotFound for a ``choice`` that is not one, Conflict when several hold data (which
    one is the operator's to say)."""
    if isinstance(choice, str):
        return find(plugin_data_dir, choice, plugin)
    held = [aside for aside in set_aside(plugin_data_dir, plugin) if holds_data(aside.path)]
    if len(held) > 1:
        raise Conflict(
            f"{len(held)} removed plugins {plugin!r} left data in {plugin_data_dir}: "
            f"{', '.join(aside.dir for aside in held)}; name the one to adopt with "
            "--adopt-data DIR ('mcp0 plugin removed-data' lists them)"
        )
    return held[0] if held else None


def purge(
    plugin_data_dir: Path,
    directory: str,
    store: Store,
    commit: Callable[[Callable[[], SetAside]], SetAside],
) -> SetAside:
    """Delete the set-aside data dir named ``directory``. It is renamed out of the way in
    ``commit``'s transaction (which records the purge in ``store``'s log; rolled back, it is
    renamed back), then deleted. Raises NotFound, StorageError."""
    with _purges_held(plugin_data_dir):
        _finish(plugin_data_dir, store)  # a purge cut short first: its record comes before ours
        aside = find(plugin_data_dir, directory)
        head = store.audit_head()
        trash = plugin_data_dir / f"{_PURGING}{head.seq if head else 0}-{directory}"
        moved: list[Path] = []

        def write() -> SetAside:
            if moved:  # an earlier try's transaction was rolled back
                _rename(moved.pop(), aside.path)
            _rename(aside.path, trash)
            moved.append(trash)
            return aside

        try:
            commit(write)
        except BaseException:
            # a failed commit may still have landed: the log says whether the dir goes
            with contextlib.suppress(Exception):
                _finish(plugin_data_dir, store)
            raise
    fdio.remove_tree(trash, ignore_errors=True)
    return aside


def finish_purges(plugin_data_dir: Path, store: Store) -> None:
    """Finish the purges in ``plugin_data_dir`` that a crash cut short: a set-aside dir whose
    purge is recorded in ``store``'s log is deleted, one whose purge is not is renamed back
    (listed, adoptable and purged again as before). Nothing to do (one directory listing)
    unless a purge was cut short. Raises StorageError."""
    if _cut_short(plugin_data_dir):
        with _purges_held(plugin_data_dir):
            _finish(plugin_data_dir, store)


def _entries(plugin_data_dir: Path) -> list[str]:
    """The names in ``plugin_data_dir`` (none if there is none). Raises StorageError."""
    try:
        return os.listdir(plugin_data_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read {plugin_data_dir}: {exc}") from exc


def _cut_short(plugin_data_dir: Path) -> list[tuple[int, str, Path]]:
    """The set-aside dirs renamed out of the way by purges not finished: (audit seq when the
    purge began, the dir's name, its path now)."""
    found = []
    for entry in _entries(plugin_data_dir):
        match = _PURGING_NAME.fullmatch(entry)
        if match is not None:
            found.append((int(match[1]), match[2], plugin_data_dir / entry))
    return found


def _finish(plugin_data_dir: Path, store: Store) -> None:
    for after_seq, directory, path in _cut_short(plugin_data_dir):
        if _purge_recorded(store, after_seq, directory):
            fdio.remove_tree(path, ignore_errors=True)
        else:
            _rename(path, plugin_data_dir / directory)
            log.warning(
                "a purge of %s was cut short before it was recorded: the data dir is set "
                "aside again",
                plugin_data_dir / directory,
            )


def _purge_recorded(store: Store, after_seq: int, directory: str) -> bool:
    """Whether the log holds, after seq ``after_seq``, the record of a purge of the set-aside
    dir ``directory``."""
    marker = directory.encode()
    while entries := store.read_audit(after_seq, 1000):
        for entry in entries:
            if marker in entry.body:  # (a record is parsed only if it may be the one)
                body = readable_event(entry)
                if (
                    body.get("verb") == Verb.PURGE_PLUGIN_DATA
                    and body.get("data_purged") == directory
                ):
                    return True
        after_seq = entries[-1].seq
    return False


@contextlib.contextmanager
def _purges_held(plugin_data_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``plugin_data_dir`` itself (no lock file among the data
    dirs) while the block runs: a purge from its rename to its commit, or the finishing of
    those cut short, in any process."""
    try:
        fd = os.open(plugin_data_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise StorageError(f"cannot open {plugin_data_dir}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _rename(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
    except OSError as exc:
        raise StorageError(f"cannot rename {source} to {target}: {exc}") from exc
