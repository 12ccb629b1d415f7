"""The data dirs removed plugins left: set aside in plugin-data/ as ``<name>.removed-<UTC
time>`` (a name no plugin can have: plugin names hold no dot) until a plugin installed under
the name adopts one, or the operator purges it."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mcp_zero.errors import Conflict, NotFound, StorageError

REMOVED = ".removed-"
_STAMP = "%Y%m%dT%H%M%S.%fZ"
# A set-aside dir being purged is renamed to this prefix first (in the purge's transaction);
# one a crash left there is deleted by the next purge.
_PURGING = ".purging-"


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
    try:
        entries = os.listdir(plugin_data_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read {plugin_data_dir}: {exc}") from exc
    found = []
    for entry in entries:
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
                found.append(SetAside(name, entry, path, when, _tree_bytes(path)))
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
    commit: Callable[[Callable[[], SetAside]], SetAside],
) -> SetAside:
    """Delete the set-aside data dir named ``directory``. It is renamed out of the way in
    ``commit``'s transaction (which records the purge; rolled back, it is renamed back), then
    deleted. Raises NotFound, StorageError."""
    aside = find(plugin_data_dir, directory)
    trash = plugin_data_dir / f"{_PURGING}{directory}"
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
        if moved:
            _rename(moved.pop(), aside.path)
        raise
    _delete_purged(plugin_data_dir)
    return aside


def _delete_purged(plugin_data_dir: Path) -> None:
    """Delete the set-aside dirs purges renamed out of the way (this one's, and any a crash
    left)."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(plugin_data_dir):
            if entry.startswith(_PURGING):
                shutil.rmtree(plugin_data_dir / entry, ignore_errors=True)


def _rename(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
    except OSError as exc:
        raise StorageError(f"cannot rename {source} to {target}: {exc}") from exc


def _tree_bytes(root: Path) -> int:
    """The bytes of the files under ``root`` (links not followed; what cannot be read, not
    counted)."""
    total = 0
    for parent, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total
