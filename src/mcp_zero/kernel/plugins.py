"""The installed plugins: their runtimes, and which plugin owns each tool, resource and prompt.

Installing copies the plugin directory into the data dir (so later edits to the
source do not change what runs) and records the manifest in the store. A
running server notices installs and removals made by another process (the CLI)
through the store's ``plugins_version`` and rebuilds its index.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import fcntl
import fnmatch
import functools
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jsonschema_rs

from mcp_zero import fdio
from mcp_zero.config import DEFAULT_MAX_WORKERS
from mcp_zero.errors import (
    Conflict,
    ManifestError,
    PluginFailure,
    PluginNotFound,
    StorageError,
    shown,
)
from mcp_zero.fdio import file_kind
from mcp_zero.kernel import plugin_data
from mcp_zero.sandbox.base import PluginRuntime
from mcp_zero.sandbox.manifest import (
    PluginManifest,
    ToolSpec,
    load_manifest,
    parse_manifest,
    schema_validator,
)
from mcp_zero.sandbox.ownership import WORKER_USER, readable_to_all
from mcp_zero.sandbox.process import MAX_RESTART_BACKOFF_S, ProcessRuntime, retried
from mcp_zero.security.files import sync_directory
from mcp_zero.storage.base import PluginRecord, Store
from mcp_zero.uri import normal_uri

JSON = dict[str, Any]
log = logging.getLogger("mcp_zero.plugins")


@dataclass(frozen=True, slots=True)
class ToolEntry:
    plugin: str
    spec: ToolSpec
    listing: JSON  # the MCP Tool object, built once
    validator: Validator  # of the arguments
    output_validator: Validator | None  # of structuredContent, when the tool declares a schema


@dataclass(frozen=True, slots=True)
class TemplateEntry:
    plugin: str
    pattern: re.Pattern[str]
    listing: JSON


def _fingerprint(record: PluginRecord) -> tuple[Any, ...]:
    """What identifies an installed copy: a new install changes it."""
    return (record.version, record.path, record.installed_at)


def _template_parts(template: str) -> Iterator[tuple[str, bool | None]]:
    """An RFC 6570 level-1/2 template as (literal text, None) and ("", reserved) parts:
    ``{var}`` (not reserved) is one segment, ``{+var}`` (reserved) any characters."""
    pos = 0
    for m in re.finditer(r"\{(\+?)([A-Za-z0-9_.]+)\}", template):
        yield template[pos : m.start()], None
        yield "", bool(m.group(1))
        pos = m.end()
    yield template[pos:], None


@functools.lru_cache(maxsize=2048)
def _template_pattern(template: str) -> re.Pattern[str]:
    """Match URIs of an RFC 6570 level-1/2 template: ``{var}`` is one segment, ``{+var}`` any."""
    out = [
        re.escape(text) if reserved is None else "(.+)" if reserved else "([^/]+)"
        for text, reserved in _template_parts(template)
    ]
    return re.compile("".join(out) + r"\Z")


Validator = jsonschema_rs.Validator


#: How long a replaced copy no server deleted is kept before a start sweeps it: past the
#: longest call (timeout_ms is at most an hour), so no server still drains calls on it.
#: An install's staging copy (``.install-STARTED-VERSION-xxxx``, STARTED in Unix seconds) is
#: swept after as long: an install copies at most MAX_PLUGIN_BYTES, seconds to minutes, so
#: one that old was killed midway. Its age is in its name: ``copytree`` gives the directory
#: its source's modification time, which may be years old.
REPLACED_COPY_KEPT_S = 2 * 3600.0
MAX_PLUGIN_BYTES = 512 << 20  # a plugin directory's files, as copied at install
_IGNORED = ("__pycache__", "*.pyc", ".*")  # not copied at install
_NOT_COPIED = shutil.ignore_patterns(*_IGNORED)
_STAGING = ".install-"
#: A plugin refused for want of workers names this many of the plugins that hold them.
_HOLDERS_NAMED = 5


def _copy_time(copy: Path) -> float:
    """When ``copy`` was made: a staging copy's start, from its name; an installed copy's
    modification time (set at install, and when it was replaced). Raises OSError."""
    if copy.name.startswith(_STAGING):
        started = copy.name[len(_STAGING) :].split("-", 1)[0]
        if started.isdigit():
            return float(started)
    return copy.stat().st_mtime


# An installed copy in use: every process running workers from it holds a shared flock on
# its directory (the process itself, not its workers: the descriptor is close-on-exec), and
# a process deletes a copy only under an exclusive one, taken without waiting. So a copy is
# never deleted under another process's calls (`mcp0 agent exec`, a `serve --stdio` session
# on the same data dir); the last process to let go of a copy no install names deletes it.
_COPY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _lease(copy: Path) -> int | None:
    """Take a shared lease on ``copy``: the descriptor holding it (close it to let go), or
    None when the copy is gone or being deleted."""
    try:
        fd = os.open(copy, _COPY_FLAGS)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # a process holds it exclusively: it is deleting the copy
        os.close(fd)
        return None
    return fd


def _delete_unleased(copy: Path) -> bool:
    """Delete ``copy`` unless a process holds a lease on it; True when it is gone."""
    try:
        fd = os.open(copy, _COPY_FLAGS)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # in use by another process: the last to let go deletes it
            return False
        fdio.remove_tree(copy, ignore_errors=True)
        return not copy.exists()
    finally:
        os.close(fd)


def _check_holds_no_data_dir(source: Path, data_dir: Path) -> None:
    """Refuse a plugin directory that holds the server's data dir where it would be copied
    (``cd myplugin && mcp0 plugin install . --data-dir ./data``): the admin token, the
    signing key and the audit log would become part of the plugin's code, which its workers
    read. A data dir left out of copies by name (the default ``.mcp0``) is no matter."""
    try:
        relative = data_dir.resolve().relative_to(source)
    except ValueError:
        return
    if all(_copied(part) for part in relative.parts):
        raise ManifestError(
            f"plugin directory {source} holds the server's data dir ({data_dir}): its "
            "secrets (admin token, signing key, audit log) would be copied with the plugin, "
            "where the plugin reads them; keep the data dir outside the plugin's directory, "
            "or give it a name starting with '.' (such as the default .mcp0), which "
            "installs leave out"
        )


def _check_tree(source: Path) -> None:
    """Refuse what must not be copied into the data dir: a symbolic link (one to ``/`` would
    copy the whole file system), a special file (a FIFO or a socket cannot be copied; a
    device must not be read), a tree over MAX_PLUGIN_BYTES, and one deeper than
    ``fdio.MAX_DEPTH`` levels (what the copy, ``fdio.walk``, goes down)."""
    total = 0
    for root, dirs, files in os.walk(source):  # does not follow links
        ignored = _NOT_COPIED(root, dirs + files)
        dirs[:] = [d for d in dirs if d not in ignored]
        if dirs and len(Path(root).relative_to(source).parts) >= fdio.MAX_DEPTH:
            # (checked before os.walk goes down: it recurses, RecursionError ~1,000 down)
            raise ManifestError(
                f"{_shown(Path(root, dirs[0]).relative_to(source))} in {_shown(source)} is "
                f"more than {fdio.MAX_DEPTH} levels deep, deeper than a plugin's files may be"
            )
        for name in dirs + [f for f in files if f not in ignored]:
            path = Path(root, name)
            if not _utf8(name):
                raise ManifestError(
                    f"{_shown(path.relative_to(source))} in {_shown(source)}: the name is not "
                    "valid UTF-8 (bytes that cannot be decoded are shown escaped); rename the "
                    "file, or move it out of the plugin"
                )
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                raise ManifestError(
                    f"{path.relative_to(source)} in {source} is a symbolic link (to "
                    f"{os.readlink(path)}): a plugin is installed as a copy of its files; put "
                    "the file itself there"
                )
            kind = None if stat.S_ISDIR(info.st_mode) else file_kind(info.st_mode)
            if kind is not None:
                raise ManifestError(
                    f"{path.relative_to(source)} in {source} is {kind}: a plugin directory "
                    "may hold only regular files and directories; remove it, or move it "
                    "out of the plugin"
                )
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
        if total > MAX_PLUGIN_BYTES:
            raise ManifestError(
                f"plugin directory {source} holds over {MAX_PLUGIN_BYTES >> 20} MiB of files, "
                "more than a plugin may"
            )


def _copied(name: str) -> bool:
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in _IGNORED)


def _copy_tree(source: Path, into: Path) -> None:
    """Copy the plugin directory ``source`` into the empty directory ``into``, leaving out
    what ``_IGNORED`` names. The source may be a user's to change while root installs it:
    it is read through directory descriptors without following a link (``fdio.walk``), so
    a file swapped for a link (to ``/etc/shadow``) or for a FIFO after ``_check_tree`` saw
    it is refused, not copied (it was: ``copytree`` follows links). Anything that cannot be
    copied fails the copy, naming the file (``shutil.Error``, as copytree's)."""
    top = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    owners = {os.fstat(top).st_uid, os.geteuid()}
    total = 0
    try:
        for fd, name, st, relative in fdio.walk(top, include=_copied, strict=True):
            target = into / relative
            if stat.S_ISDIR(st.st_mode):
                target.mkdir(mode=0o700)
                continue
            now = file_kind(st.st_mode) if not stat.S_ISLNK(st.st_mode) else "a symbolic link"
            changed = ManifestError(
                f"{relative} in {source} changed while it was being copied"
                + (f" (it is {now} now)" if now else "")
                + ": install again"
            )
            if not stat.S_ISREG(st.st_mode):
                raise changed
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                src = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link now
                    raise changed from exc
                raise shutil.Error([(str(source / relative), str(target), str(exc))]) from exc
            try:
                info = os.fstat(src)
                if not (stat.S_ISREG(info.st_mode) and os.path.samestat(info, st)):
                    raise changed
                if info.st_nlink > 1 and info.st_uid not in owners:
                    # Where the kernel lets anyone link any file (fs.protected_hardlinks=0),
                    # a user's plugin could hold /etc/shadow as a link, read as root here
                    # and given to the plugin's workers: a file of a third user that is a
                    # hard link is no file of the plugin's
                    raise ManifestError(
                        f"{_shown(relative)} in {_shown(source)} is a hard link to a file of "
                        f"another user (uid {info.st_uid}), not the directory's owner's: put "
                        "a copy of the file there"
                    )
                total += _copy_file(src, target, info)
            except OSError as exc:  # (named as copytree names them: see _copy_failure)
                raise shutil.Error([(str(source / relative), str(target), str(exc))]) from exc
            finally:
                os.close(src)
            if total > MAX_PLUGIN_BYTES:
                raise ManifestError(
                    f"plugin directory {source} holds over {MAX_PLUGIN_BYTES >> 20} MiB of "
                    "files, more than a plugin may"
                )
    except OSError as exc:  # from the walk: its filename is the entry's, relative
        if isinstance(exc, shutil.Error):
            raise
        relative = exc.filename if isinstance(exc.filename, str) else ""
        raise shutil.Error([(str(source / relative), str(into / relative), str(exc))]) from exc
    finally:
        os.close(top)


def _copy_file(src: int, target: Path, info: os.stat_result) -> int:
    """Copy the open file ``src`` to a new file ``target``; the bytes copied."""
    mode = 0o700 if info.st_mode & stat.S_IXUSR else 0o600  # (readable_to_all adds the rest)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    copied = 0
    try:
        while chunk := os.read(src, 1 << 20):
            copied += len(chunk)
            if copied > MAX_PLUGIN_BYTES:  # (grown since it was checked)
                break
            fdio.write_all(dst, chunk)
        os.fsync(dst)  # durable before the install's record is: not empty after a power loss
    finally:
        os.close(dst)
    return copied


def _sync_dirs(root: Path) -> None:
    """Flush the entries of ``root`` and of every directory below it to disk."""
    for directory, _, _ in os.walk(root):
        sync_directory(Path(directory))


def _utf8(name: str) -> bool:
    """Whether a file name read from the file system was valid UTF-8 (Python decodes the
    others with lone surrogates standing for the bytes it could not decode)."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: Path | str) -> str:
    """``path`` for a message: bytes that are not UTF-8 escaped (``\\xff``)."""
    return os.fsencode(path).decode(errors="backslashreplace")


def _tree_digest(root: Path) -> str:
    """sha256 over the paths and contents of the files under ``root``: which copy it is."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = os.fsencode(path.relative_to(root).as_posix())  # any name a file system has
        digest.update(len(name).to_bytes(4, "big") + name)
        with path.open("rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


def _check_unique(manifest: PluginManifest, installed: list[PluginRecord], replace: bool) -> None:
    """Raise Conflict when ``manifest``'s name is installed (unless ``replace``), or one of its
    tool or prompt names is another installed plugin's, or a URI could be served by it and by
    another installed plugin (see ``_clashes``)."""
    existing = next((r for r in installed if r.name == manifest.name), None)
    if existing is not None and not replace:
        raise Conflict(
            f"plugin {manifest.name!r} is already installed (version {existing.version}); "
            "remove it first or install with --replace"
        )
    mine = _Offer.of(manifest)
    for record in installed:
        if record.name == manifest.name:
            continue
        for clash in _clashes(mine, _Offer.of_record(record.manifest)):
            raise Conflict(
                f"{clash.what} of plugin {manifest.name!r} {clash.how} plugin {record.name!r}; "
                "a name or URI is served by one plugin only: rename it, or remove the other "
                "plugin"
            )


@dataclass(frozen=True, slots=True)
class _Offer:
    """What a plugin serves under names and URIs that no other plugin may serve."""

    tools: tuple[str, ...]
    prompts: tuple[str, ...]
    resources: tuple[str, ...]
    templates: tuple[str, ...]

    @classmethod
    def of(cls, manifest: PluginManifest) -> _Offer:
        return cls(
            tuple(t.name for t in manifest.tools),
            tuple(p.name for p in manifest.prompts),
            tuple(r.uri for r in manifest.resources),
            tuple(t.uri_template for t in manifest.resource_templates),
        )

    @classmethod
    def of_record(cls, manifest: JSON) -> _Offer:
        """Of a manifest as recorded (``PluginManifest.to_dict``)."""

        def values(key: str, field: str) -> tuple[str, ...]:
            items = manifest.get(key, [])
            return tuple(item[field] for item in items if isinstance(item.get(field), str))

        return cls(
            values("tools", "name"),
            values("prompts", "name"),
            values("resources", "uri"),
            values("resourceTemplates", "uriTemplate"),
        )


@dataclass(frozen=True, slots=True)
class _Clash:
    """One thing two plugins both serve: ``mine`` and ``theirs`` are (kind, name or URI)."""

    mine: tuple[str, str]
    theirs: tuple[str, str]
    what: str  # of mine, for a message
    how: str  # "... of" the other plugin


def _clashes(mine: _Offer, theirs: _Offer) -> Iterator[_Clash]:
    """What of ``mine`` ``theirs`` also serves: the same tool or prompt name, the same
    resource URI, a template matching the other's resource, or two templates some one URI
    matches (a ``{+var}`` catch-all included). URIs and templates are compared in normal form
    (normal_uri), the form a read is looked up in: ``mem://%61bc`` is ``mem://abc``."""
    for tool in mine.tools:
        if tool in theirs.tools:
            yield _Clash(("tool", tool), ("tool", tool), f"tool {tool!r}", "is already provided by")
    for prompt in mine.prompts:
        if prompt in theirs.prompts:
            yield _Clash(
                ("prompt", prompt),
                ("prompt", prompt),
                f"prompt {prompt!r}",
                "is already provided by",
            )
    served = {normal_uri(uri): uri for uri in theirs.resources}
    # Each template in normal form, with the literal text its URIs all begin and end with:
    # two templates whose beginnings (or ends) differ match no URI in common, and a resource
    # must begin and end as a template does to match it. Compared first, so that the walks
    # and matches are few: a plugin of 1,500 templates beside another took 30 s of pairs,
    # within the install's transaction, and as long on the server's loop (found by review).
    their_templates = [(t, *_ends(normal_uri(t))) for t in theirs.templates]
    for uri in mine.resources:
        normal = normal_uri(uri)
        other = served.get(normal)
        if other is not None:
            how = (
                "is already served by"
                if other == uri
                else f"is resource {other!r} (one URI, escaped otherwise), already served by"
            )
            yield _Clash(("resource", uri), ("resource", other), f"resource {uri!r}", how)
        for template, normal_t, first, last in their_templates:
            if (
                normal.startswith(first)
                and normal.endswith(last)
                and _template_pattern(normal_t).match(normal)
            ):
                yield _Clash(
                    ("resource", uri),
                    ("template", template),
                    f"resource {uri!r}",
                    f"matches resource template {template!r} of",
                )
    for template in mine.templates:
        normal_t, first, last = _ends(normal_uri(template))
        for normal, uri in served.items():
            if (
                normal.startswith(first)
                and normal.endswith(last)
                and _template_pattern(normal_t).match(normal)
            ):
                yield _Clash(
                    ("template", template),
                    ("resource", uri),
                    f"resource template {template!r}",
                    f"matches resource {uri!r} of",
                )
        for other, normal_o, other_first, other_last in their_templates:
            if not (
                (first.startswith(other_first) or other_first.startswith(first))
                and (last.endswith(other_last) or other_last.endswith(last))
            ):
                continue  # no URI begins (or ends) as both do
            overlap = _templates_overlap(normal_t, normal_o)
            if overlap is None:
                yield _Clash(
                    ("template", template),
                    ("template", other),
                    f"resource template {template!r}",
                    f"is held to match URIs that resource template {other!r} matches too (too "
                    "long to compare: shorten either), of",
                )
            elif overlap:
                yield _Clash(
                    ("template", template),
                    ("template", other),
                    f"resource template {template!r}",
                    f"matches URIs that resource template {other!r} matches too, of",
                )


def _ends(template: str) -> tuple[str, str, str]:
    """``template``, and the literal text every URI it matches begins and ends with (the
    whole of it when it has no variable)."""
    parts = list(_template_parts(template))
    return template, parts[0][0], parts[-1][0]


# A template as a sequence of steps over the characters of a URI: a literal character, or a
# class (one character of it, or any number of them) that {var} and {+var} stand for.
_SEGMENT, _ANY = "[^/]", "."


def _template_steps(template: str) -> list[tuple[str, str]]:
    """``template`` as ("lit", char), ("one", class) and ("star", class) steps: ``{var}`` is
    one or more characters but ``/``, ``{+var}`` one or more of any (as _template_pattern)."""
    steps: list[tuple[str, str]] = []
    for text, reserved in _template_parts(template):
        if reserved is None:
            steps.extend(("lit", c) for c in text)
        else:
            cls = _ANY if reserved else _SEGMENT
            steps += [("one", cls), ("star", cls)]
    return steps


def _common_char(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether one character can be taken by both steps (neither a "star" skipped)."""
    (kind_a, a_val), (kind_b, b_val) = a, b
    if kind_a == "lit" and kind_b == "lit":
        return a_val == b_val
    if kind_a == "lit":
        return a_val != "/" or b_val == _ANY
    if kind_b == "lit":
        return b_val != "/" or a_val == _ANY
    return True  # two classes: both take any character but "/"


#: How many states of two templates' walk (_walk_templates) are visited before they are held
#: to overlap (a few ms; installs say so when they refuse for it): real templates take dozens,
#: a catch-all beside one of 200 literal characters a thousand.
MAX_OVERLAP_STEPS = 4_000


@functools.lru_cache(maxsize=2048)
def _templates_overlap(first: str, second: str) -> bool | None:
    """Whether some URI matches both templates; None past MAX_OVERLAP_STEPS (not known: to
    be held as overlapping). Cached: each reindex and install asks again of the same pairs."""
    return _walk_templates(first, second)[0]


def _walk_templates(first: str, second: str) -> tuple[bool | None, int]:
    """Whether some URI matches both templates (None: not known past MAX_OVERLAP_STEPS), and
    how many states it took: a walk of the two in step (the product of their automata),
    from both starts to both ends."""
    a, b = _template_steps(first), _template_steps(second)
    seen: set[tuple[int, int]] = set()
    todo = [(0, 0)]
    while todo:
        i, j = todo.pop()
        if (i, j) in seen:
            continue
        if len(seen) >= MAX_OVERLAP_STEPS:
            return None, len(seen)
        seen.add((i, j))
        if i == len(a) and j == len(b):
            return True, len(seen)
        # a "star" may take no character
        if i < len(a) and a[i][0] == "star":
            todo.append((i + 1, j))
        if j < len(b) and b[j][0] == "star":
            todo.append((i, j + 1))
        if i < len(a) and j < len(b) and _common_char(a[i], b[j]):
            todo.append((i if a[i][0] == "star" else i + 1, j if b[j][0] == "star" else j + 1))
    return False, len(seen)


_T = TypeVar("_T")

#: How an install's or removal's store write is made: given the write, make it (and what
#: else belongs in its transaction) and return what it returned. The write may be made again
#: when its transaction is rolled back (the audit log retries it after another process's).
Commit = Callable[[Callable[[], _T]], _T]


@dataclass(frozen=True)
class Installed:
    """What an install did: the plugin it installed, the record it replaced, and the data
    dir it gave the plugin (``adopt_data``: the name it had, under plugin-data/), if any."""

    manifest: PluginManifest
    replaced: PluginRecord | None
    adopted_data: str | None


@dataclass(frozen=True)
class Removal:
    """What a removal did: the agents it detached the plugin from, and where it set its data
    dir aside (None: it had none)."""

    detached: list[str]
    data_kept: Path | None


def _now(write: Callable[[], _T]) -> _T:
    return write()


class PluginHost:
    """Runtimes of the installed plugins and the index from names to plugins."""

    def __init__(
        self,
        store: Store,
        plugins_dir: Path,
        plugin_data_dir: Path,
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
        protect: Path | None = None,
        worker_user: str = WORKER_USER,
        max_restart_backoff_s: float = MAX_RESTART_BACKOFF_S,
    ) -> None:
        self.store = store
        # Who a root server's workers run as (the worker_user setting)
        self.worker_user = worker_user
        self.max_restart_backoff_s = max_restart_backoff_s
        # Workers must not reach this directory (the server's data dir) but for their own
        # parts of it: their plugin's copy and data dir.
        self.protect = protect
        # Absolute: a record must name the same copy whatever directory mcp0 is run from.
        self.plugins_dir = plugins_dir.absolute()
        self.plugin_data_dir = plugin_data_dir
        self.max_workers = max_workers
        self.manifests: dict[str, PluginManifest] = {}
        self.runtimes: dict[str, PluginRuntime] = {}
        self.tools: dict[str, ToolEntry] = {}
        self.resources: dict[str, tuple[str, JSON]] = {}
        self.templates: list[TemplateEntry] = []
        self.prompts: dict[str, tuple[str, JSON]] = {}
        self.version = -1
        self.failed: dict[str, str] = {}  # plugins whose runtime could not start, and why
        self.starting: set[str] = set()  # plugins whose runtime is starting
        self._unstarted: set[str] = set()  # refused for want of workers: retried on refresh
        # The plugins whose runtimes are started (None: all installed, as a server's). A stdio
        # session serves one agent, who calls only its attached plugins: it starts those,
        # and those attached later as it sees them (take_up); the others stay idle, their
        # runtimes made (their manifests index the lists) but no worker started.
        self.starts_only: set[str] | None = None
        self._idle: set[str] = set()  # made and not started (``only``, ``starts_only``)
        self._fingerprints: dict[str, tuple[Any, ...]] = {}
        self.on_change: Callable[[], None] | None = None  # told after the index changed
        # told as the index changes, before anything is decided under it: what was read of
        # the store under the old one (agents' attachments) is read again
        self.on_reindex: Callable[[], None] | None = None
        self.on_restart: Callable[[str], None] | None = None  # a plugin's worker replaced
        # told, after the index changed, of each runtime that left (replaced or removed)
        self.on_leave: Callable[[PluginRuntime], None] | None = None
        # tells a resource's subscribers that it changed (the transport's; see _updated)
        self.on_resource_updated: Callable[[str], Awaitable[None]] | None = None
        # URIs whose subscribers are being told, each by one task: True when it changed again
        # since the task began to tell them (it tells them once more)
        self._updating: dict[str, bool] = {}
        self._announcing: set[asyncio.Task[None]] = set()
        self._start_tasks: set[asyncio.Task[None]] = set()  # runtimes' starts (_start)
        self._lock = asyncio.Lock()
        self._leaving: dict[asyncio.Task[None], PluginRuntime] = {}  # replaced, draining
        self._copies: dict[str, Path] = {}  # the installed copy each runtime runs
        # each runtime's copy and the lease held on it while its workers may run (_lease)
        self._leases: dict[PluginRuntime, tuple[Path, int]] = {}

    # -- installing (works without a running server) -----------------------------------------

    def install(
        self,
        source: Path,
        *,
        replace: bool = False,
        adopt_data: bool | str = False,
        commit: Commit[Installed] | None = None,
        decided: PluginManifest | None = None,
    ) -> Installed:
        """Validate the plugin at ``source``, copy it into the data dir and record it;
        return what the install did. ``decided``: the manifest a decision to install was
        made on (the policy's, read from ``source`` before): a ManifestError if what is
        there now is not that one, so what is installed is what was decided and audited.

        ``commit`` runs the store write it is given (and may make more in its transaction:
        the install's audit record); the copy is made before, outside any transaction.
        Raises ManifestError for an invalid plugin, Conflict when the name is
        installed (unless ``replace``) or another plugin serves one of its names or URIs
        (``_check_unique``), or when a removed plugin of its name left data, which it gets
        only if ``adopt_data`` (``_check_data``); of two installs racing (from two
        processes), one gets Conflict. StorageError when the copy cannot be made. With
        ``adopt_data``, a plugin of a name none is installed under is given, in its
        transaction, a data dir a removal of the name set aside (``remove``): the one
        ``adopt_data`` names (NotFound if it is none), or with ``adopt_data`` True the one
        that holds data (Conflict if several do: which one is the operator's to say).
        Naming one for a plugin installed, or one whose data dir holds data, is a Conflict.
        """
        source = source.resolve()  # (a link to the directory names it; copied without one)
        _check_holds_no_data_dir(source, self.protect or self.plugins_dir.parent)
        _check_tree(source)  # first: reading a named pipe as plugin.json would never end
        manifest = load_manifest(source)
        if decided is not None and manifest.to_dict() != decided.to_dict():
            raise ManifestError(
                f"{_shown(source / 'plugin.json')} changed after the install of plugin "
                f"{decided.name!r} {decided.version} was decided (it is plugin "
                f"{manifest.name!r} {manifest.version} now): nothing installed; install again"
            )

        def check(installed: list[PluginRecord]) -> None:
            _check_unique(manifest, installed, replace)
            if adopt_data:
                self._check_adoptable(manifest.name, installed, adopt_data)
            else:
                self._check_data(manifest.name, installed)

        check(self.store.list_plugins())  # before copying it all
        parent = self.plugins_dir / manifest.name
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocking = next(
                (p for p in (self.plugins_dir, parent) if p.exists() and not p.is_dir()), None
            )
            if blocking is None:
                raise StorageError(f"cannot install plugin {manifest.name!r}: {exc}") from exc
            raise StorageError(
                f"cannot install plugin {manifest.name!r}: {blocking} is a file, where mcp0 "
                "keeps installed plugins' copies in a directory; move it out of the data dir"
            ) from exc
        # Each install copies into a directory of its own, so two installs at once never
        # write into the same one; the record says which copy is installed.
        staging = Path(
            tempfile.mkdtemp(prefix=f"{_STAGING}{int(time.time())}-{manifest.version}-", dir=parent)
        )
        target = parent / f"{manifest.version}-{staging.name.rsplit('-', 1)[1]}"
        try:
            try:
                _copy_tree(source, staging)
                if load_manifest(staging).to_dict() != manifest.to_dict():
                    raise ManifestError(
                        f"{source / 'plugin.json'} changed while the plugin was being copied: "
                        "install again"
                    )
                readable_to_all(staging)  # a root server's workers run as nobody
                # copytree gave it the source's time; the sweep reads it as the copy's age
                os.utime(staging)
                digest = _tree_digest(staging)
                _sync_dirs(staging)
                staging.rename(target)
                sync_directory(parent)  # the copy is where its record will say, durably
            except OSError as exc:  # an unreadable file, a full disk…
                raise StorageError(
                    f"cannot copy plugin {manifest.name!r} from {source} into {parent}: "
                    f"{_copy_failure(exc)}"
                ) from exc
            record = PluginRecord(
                name=manifest.name,
                version=manifest.version,
                manifest=manifest.to_dict(),
                path=str(target),
                installed_at=time.time(),
                digest=digest,
            )
            adopted: list[Path] = []  # the set-aside data dir this try gave the plugin

            def write() -> Installed:
                if adopted:  # an earlier try's transaction was rolled back
                    self._rename_data(manifest.name, adopted.pop())
                # again, where no other install can come in between
                replaced = self.store.put_plugin(record, check=check)
                if replaced is not None or not adopt_data:
                    return Installed(manifest, replaced, None)
                if self.left_data(manifest.name) is not None:
                    # left by a removal before set-asides
                    return Installed(manifest, None, manifest.name)
                aside = plugin_data.to_adopt(self.plugin_data_dir, manifest.name, adopt_data)
                if aside is None:
                    return Installed(manifest, None, None)
                self._rename_data(aside.dir, self.plugin_data_dir / manifest.name)
                adopted.append(aside.path)
                return Installed(manifest, None, aside.dir)

            try:
                done = (commit or _now)(write)
            except BaseException:
                if adopted:
                    self._rename_data(manifest.name, adopted.pop())
                raise
        except BaseException:
            fdio.remove_tree(staging, ignore_errors=True)
            fdio.remove_tree(target, ignore_errors=True)
            raise
        replaced = done.replaced
        if replaced is not None and self.copy_path(replaced) != target:
            # A running server may still be finishing calls on the old copy: it deletes the
            # copy once they are done, else a later start sweeps it. Its time says when it
            # was replaced, so the sweep waits out any drain.
            with contextlib.suppress(OSError):
                os.utime(self.copy_path(replaced))
        return done

    def _check_data(self, name: str, installed: list[PluginRecord]) -> None:
        """Raise Conflict when no plugin ``name`` is installed and its data dir holds what a
        removed one left: its users' data, which a new plugin of that name read as its own,
        whoever wrote it (found by review). The operator gives it to the plugin if it is to
        have it (``--adopt-data``: the same plugin installed again), or moves it away."""
        left = None if any(r.name == name for r in installed) else self.left_data(name)
        if left is not None:
            raise Conflict(
                f"{left} holds the data of a plugin {name!r} removed earlier, which a new "
                f"plugin {name!r} is not given unless told: install with --adopt-data if "
                "this plugin is to have it (the same plugin installed again), or move it "
                "out of the way first"
            )

    def _check_adoptable(
        self, name: str, installed: list[PluginRecord], choice: bool | str
    ) -> None:
        """Raise what adopting ``choice`` (``install``'s ``adopt_data``) would: Conflict when
        a set-aside data dir is named for a plugin installed (it has its own) or whose data
        dir holds data, or when several may be meant; NotFound when the one named is none."""
        if any(r.name == name for r in installed):
            if isinstance(choice, str):
                raise Conflict(
                    f"plugin {name!r} is installed, with a data dir of its own: --adopt-data "
                    f"{choice} gives set-aside data only to a plugin installed anew (remove "
                    "it first)"
                )
            return  # (a replace keeps its data dir)
        left = self.left_data(name)
        if left is not None and isinstance(choice, str):
            raise Conflict(
                f"{left} holds data already, which {choice} would replace: move it out of "
                "the way first"
            )
        if left is None:
            plugin_data.to_adopt(self.plugin_data_dir, name, choice)

    def _rename_data(self, name: str, to: Path) -> None:
        """Rename ``name`` under plugin-data/ to ``to``, whose place may hold an empty data
        dir (no more than an empty ``.tmp``: no plugin's data), which goes."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.rmdir(to / ".tmp")
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(to)
        try:
            os.rename(self.plugin_data_dir / name, to)
        except OSError as exc:
            raise StorageError(
                f"cannot rename {self.plugin_data_dir / name} to {to}: {exc}"
            ) from exc

    def left_data(self, name: str) -> Path | None:
        """The data dir of plugin ``name`` if it holds data (``plugin_data.holds_data``; a
        file in its way is no plugin's data: its start says so)."""
        data_dir = self.plugin_data_dir / name
        return data_dir if plugin_data.holds_data(data_dir) else None

    def copy_path(self, record: PluginRecord) -> Path:
        """The directory of ``record``'s installed copy: always ``plugins/<name>/<copy>`` of
        this data dir. The record's own path only names the copy: it may have been written
        relative to another directory (older installs), or in another place this data dir was
        copied or moved from, or through a symlink — a path taken as written could load
        another data dir's code, or delete its files."""
        return self.plugins_dir / record.name / Path(record.path).name

    def record_digests(self) -> None:
        """Give each copy installed before digests were kept the digest install would have
        recorded (from its installed files), so that snapshots can name which copy they saw."""
        for record in self.store.list_plugins():
            path = self.copy_path(record)
            if record.digest or not path.is_dir():
                continue
            try:
                digest = _tree_digest(path)
            except OSError as exc:
                log.warning("cannot read plugin %r at %s: %s", record.name, path, exc)
                continue
            self.store.set_plugin_digest(record.name, record.path, digest)

    def sweep_copies(self) -> None:
        """Delete the copies under ``plugins/<name>/`` that no record names, replaced over
        ``REPLACED_COPY_KEPT_S`` ago (an install without a running server leaves them), and
        the staging copies (dotted) of installs that began as long ago and were killed."""
        if not self.plugins_dir.is_dir():
            return
        used = {self.copy_path(record) for record in self.store.list_plugins()}
        before = time.time() - REPLACED_COPY_KEPT_S
        for parent in self.plugins_dir.iterdir():
            if not parent.is_dir():
                continue
            for copy in parent.iterdir():
                # a dotted one is an install being copied: young, or its install was killed
                if copy in used or not copy.is_dir():
                    continue
                with contextlib.suppress(OSError):
                    if _copy_time(copy) < before:
                        _delete_unleased(copy)

    def _delete_if_unused(self, copies: Collection[Path]) -> None:
        """Delete those of ``copies`` that no install names and no process runs."""
        used = {self.copy_path(record) for record in self.store.list_plugins()}
        for copy in copies:
            if copy not in used:
                _delete_unleased(copy)

    def remove(self, name: str, *, commit: Commit[Removal] | None = None) -> Removal:
        """Forget plugin ``name`` and detach it from every agent. Its installed files go as a
        replaced copy's do: a running server deletes them once its calls on them are done, a
        later start sweeps them. Its data dir is renamed to ``<name>.removed-<UTC time>``
        in the removal's transaction, before it commits (rolled back, it is renamed back):
        a later plugin of the name starts with none of it, but one installed with
        ``adopt_data``, and a call of the removed one still running writes into it there
        (its worker's mount and Landlock rule hold the directory, not its path).
        ``commit`` is as ``install``'s."""
        aside: list[Path] = []  # where this try set the data dir aside
        removed: list[PluginRecord] = []

        def write() -> Removal:
            if aside:  # an earlier try's transaction was rolled back
                self._rename_data(aside.pop().name, self.plugin_data_dir / name)
            record = self.store.get_plugin(name)
            detached = self.store.delete_plugin(name) if record is not None else None
            if record is None or detached is None:
                raise PluginNotFound(f"no plugin named {shown(name)} is installed")
            removed[:] = [record]
            if not os.path.lexists(self.plugin_data_dir / name):
                return Removal(detached, None)
            now = datetime.datetime.now(datetime.UTC)
            to = self.plugin_data_dir / plugin_data.aside_name(name, now)
            self._rename_data(name, to)
            aside.append(to)
            return Removal(detached, to)

        try:
            removal = (commit or _now)(write)
        except BaseException:
            if aside:
                self._rename_data(aside.pop().name, self.plugin_data_dir / name)
            raise
        with contextlib.suppress(OSError):
            os.utime(self.copy_path(removed[0]))  # when it stopped being used
        return removal

    # -- running -------------------------------------------------------------------------------

    async def refresh(
        self,
        *,
        force: bool = False,
        only: Collection[str] | None = None,
        wait: float | None = None,
        wait_for: Collection[str] | None = None,
    ) -> bool:
        """Bring runtimes and index in line with the store; True when something changed.

        New runtimes are started (those named in ``only``, if given: a one-off call needs
        one plugin; else those of ``starts_only``, if set), and those named in ``wait_for``
        (default: all) waited for ``wait``
        seconds at most (None: until all started or failed; 0: not at all): one that takes
        longer goes on starting, its calls wait for it, and a failure is recorded when it
        comes. A plugin that hangs while it loads must not keep a server from serving the
        others for its whole start timeout."""
        version = self.store.plugins_version()
        if version == self.version and not force:
            return False
        async with self._lock:
            if version == self.version and not force:
                return False
            records = {r.name: r for r in self.store.list_plugins()}
            left = []
            for name in list(self.runtimes):
                record = records.get(name)
                # A reinstall (even of the same version) replaces the code: restart it; one
                # that found no free workers tries again (a removal may have freed some).
                if (
                    record is None
                    or _fingerprint(record) != self._fingerprints.get(name)
                    or name in self._unstarted
                ):
                    runtime = self.runtimes.pop(name)
                    copy = self._copies.pop(name)
                    self.manifests.pop(name, None)
                    self._fingerprints.pop(name, None)
                    self.failed.pop(name, None)
                    self.starting.discard(name)
                    self._unstarted.discard(name)
                    self._idle.discard(name)
                    # New calls go to the new code at once; the calls the old one is running
                    # finish there (an upgrade must not cut a tool off mid-way).
                    self._leave(runtime, copy)
                    left.append(runtime)
            fresh: list[tuple[str, PluginRuntime]] = []
            for name, record in records.items():
                if name in self.runtimes:
                    continue
                try:
                    manifest = parse_manifest(record.manifest)
                except ManifestError as exc:  # recorded by an older, looser version
                    log.warning("plugin %r is not served: %s", name, exc)
                    continue
                copy = self.copy_path(record)
                runtime = self._runtime(manifest, copy)
                lease = _lease(copy)  # before any worker runs from it (they start below)
                if lease is not None:
                    self._leases[runtime] = (copy, lease)
                self._copies[name] = copy
                self.manifests[name] = manifest
                self.runtimes[name] = runtime
                self._fingerprints[name] = _fingerprint(record)
                fresh.append((name, runtime))
            self._reindex()
            if self.on_reindex is not None:
                self.on_reindex()
            if self.on_leave is not None:
                for runtime in left:
                    self.on_leave(runtime)
            self.version = version
            if only is None:
                only = self.starts_only
            if only is not None:
                self._idle.update(name for name, _ in fresh if name not in only)
                fresh = [(name, runtime) for name, runtime in fresh if name in only]
            fresh = self._within_worker_budget(fresh)
            # Only the new runtimes start (a running one would get a second set of workers);
            # one plugin that cannot start must not keep the others, or the server, down.
            starting = {}
            for name, runtime in fresh:
                task = self._start(name, runtime)
                if wait_for is None or name in wait_for:
                    starting[name] = task
            if starting and wait != 0:
                await asyncio.wait(starting.values(), timeout=wait)
                for name, task in starting.items():
                    if not task.done():
                        log.warning(
                            "plugin %r is still starting after %g s; serving the others, its "
                            "calls wait for it",
                            name,
                            wait,
                        )
        if self.on_change is not None:
            self.on_change()
        return True

    async def start_plugin(self, name: str) -> None:
        """Start plugin ``name``'s runtime, which ``refresh(only=...)`` left unstarted, and
        wait for it; a failure is recorded as ``refresh`` records it."""
        runtime = self.runtimes.get(name)
        if runtime is None or name not in self._idle:
            return
        self._idle.discard(name)
        if self._within_worker_budget([(name, runtime)]):
            await asyncio.wait([self._start(name, runtime)])

    def take_up(self, names: Collection[str]) -> None:
        """(On the loop.) With ``starts_only`` set: start, from now on, the runtimes of the
        plugins ``names`` as well (an agent's attachments, which may have changed since the
        session began), not waiting for them: their calls wait for them, as for a plugin a
        server's watcher took up. Within ``max_workers``, as at a refresh."""
        if self.starts_only is None or self.starts_only.issuperset(names):
            return
        self.starts_only.update(names)
        fresh = [(name, self.runtimes[name]) for name in sorted(self._idle.intersection(names))]
        self._idle.difference_update(names)
        for name, runtime in self._within_worker_budget(fresh):
            self._start(name, runtime)

    def _start(self, name: str, runtime: PluginRuntime) -> asyncio.Task[None]:
        """Start ``runtime`` (plugin ``name``) in a task of its own, which :meth:`close`
        ends: a start nobody waits for (the watcher's) outlived the host, and the workers it
        made after the host closed were left running when the loop closed."""
        task = asyncio.ensure_future(runtime.start())
        self.starting.add(name)
        self._start_tasks.add(task)
        task.add_done_callback(self._start_tasks.discard)
        task.add_done_callback(functools.partial(self._started, name, runtime))
        return task

    def _started(self, name: str, runtime: PluginRuntime, task: asyncio.Future[None]) -> None:
        """A runtime's start ended: record its failure, if it is still the one installed and
        no new start can mend it (after any other the runtime, which logged it, starts its
        workers again: its calls wait for them)."""
        if self.runtimes.get(name) is runtime:
            self.starting.discard(name)
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None and self.runtimes.get(name) is runtime and not retried(failure):
            self.failed[name] = str(failure)
            log.error("plugin %r could not start: %s", name, failure)

    def _within_worker_budget(
        self, fresh: list[tuple[str, PluginRuntime]]
    ) -> list[tuple[str, PluginRuntime]]:
        """The fresh runtimes whose workers fit in ``max_workers`` beside the running ones
        (in name order); the others are marked failed, with what to change, and not started."""
        starting = {name for name, _ in fresh}
        holding = {
            name: self.manifests[name].quotas.workers
            for name in self.runtimes
            if name not in starting and name not in self.failed and name not in self._idle
        }
        in_use = sum(holding.values())
        fits = []
        for name, runtime in sorted(fresh, key=lambda item: item[0]):
            need = self.manifests[name].quotas.workers
            if in_use + need <= self.max_workers:
                in_use += need
                holding[name] = need
                fits.append((name, runtime))
                continue
            self._unstarted.add(name)
            self.failed[name] = (
                f"it needs {need} worker process{'es' if need > 1 else ''} (quotas.workers) "
                f"and {max(self.max_workers - in_use, 0)} of the server's max_workers = "
                f"{self.max_workers} are free{self._holders(holding)}; lower its "
                "quotas.workers, remove a plugin, or raise max_workers"
            )
            log.error("plugin %r not started: %s", name, self.failed[name])
        return fits

    def _holders(self, holding: dict[str, int]) -> str:
        """`` (held by …)``: which plugins hold the server's workers (``holding``: how many
        each), the most first. One failing to start holds its workers too: they are for when
        it starts again (a backoff), and counted so that they are there then."""
        if not holding:
            return ""
        ranked = sorted(holding, key=lambda name: (-holding[name], name))
        held = []
        for name in ranked[:_HOLDERS_NAMED]:
            failing = getattr(self.runtimes.get(name), "start_failure", None) is not None
            note = ", failing to start: kept for when it starts" if failing else ""
            held.append(f"{name} ({holding[name]}{note})")
        rest = ranked[_HOLDERS_NAMED:]
        if rest:
            others = "1 other plugin" if len(rest) == 1 else f"{len(rest)} other plugins"
            held.append(f"{others} ({sum(holding[name] for name in rest)})")
        return f" (held by {', '.join(held)})"

    def _runtime(self, manifest: PluginManifest, path: Path) -> PluginRuntime:
        if manifest.runtime != "process":
            raise ManifestError(
                f"plugin {manifest.name!r}: runtime {manifest.runtime!r} is unknown"
            )
        data_dir = self.plugin_data_dir / manifest.name  # made as it starts (its failure)
        return ProcessRuntime(
            manifest,
            path,
            data_dir,
            on_restart=self._restarted,
            on_update=self._updated,
            protect=self.protect,
            worker_user=self.worker_user,
            max_restart_backoff_s=self.max_restart_backoff_s,
        )

    def _updated(self, plugin: str, uri: str) -> None:
        """``plugin`` said, outside any call, that resource ``uri`` changed: its subscribers
        are told as of an update during a call, if the resource is the plugin's own (no
        spoofed updates of another's). One not told yet is told once, however often it
        changed meanwhile, and one being told is told once more after: a plugin that sends
        many costs each session a look, not each, and a client that does not read holds up
        one announcement of the URI, not one per change."""
        uri = normal_uri(uri)
        if self.on_resource_updated is None or self.resource_owner(uri) != plugin:
            return
        if uri in self._updating:
            self._updating[uri] = True
            return
        self._updating[uri] = False
        task = asyncio.get_running_loop().create_task(self._tell_updated(uri))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _tell_updated(self, uri: str) -> None:
        """Tell the subscribers of ``uri`` that it changed, again while it changed again
        meanwhile (``_updated``)."""
        try:
            while (announce := self.on_resource_updated) is not None:
                self._updating[uri] = False  # a change from now on is one they have not heard of
                try:
                    await announce(uri)
                except Exception:  # a session's trouble must not leave the task's error unread
                    log.exception("telling the subscribers of %s that it changed failed", uri)
                if not self._updating[uri]:
                    return
        finally:
            del self._updating[uri]

    def _restarted(self, plugin: str) -> None:
        if self.on_restart is not None:
            self.on_restart(plugin)

    def _reindex(self) -> None:
        tools: dict[str, ToolEntry] = {}
        resources: dict[str, tuple[str, JSON]] = {}
        templates: list[TemplateEntry] = []
        prompts: dict[str, tuple[str, JSON]] = {}
        shared = self._shared()
        for name in sorted(self.manifests):
            manifest = self.manifests[name]
            withheld = shared.get(name, set())
            for spec in manifest.tools:
                if ("tool", spec.name) in withheld:
                    continue
                tools.setdefault(
                    spec.name,
                    ToolEntry(
                        name,
                        spec,
                        spec.to_mcp(),
                        schema_validator(spec.input_schema),
                        schema_validator(spec.output_schema) if spec.output_schema else None,
                    ),
                )
            # by the normal form a read is looked up in (listed as declared)
            for resource in manifest.resources:
                if ("resource", resource.uri) not in withheld:
                    resources.setdefault(normal_uri(resource.uri), (name, resource.to_mcp()))
            for template in manifest.resource_templates:
                if ("template", template.uri_template) not in withheld:
                    pattern = _template_pattern(normal_uri(template.uri_template))
                    templates.append(TemplateEntry(name, pattern, template.to_mcp()))
            for prompt in manifest.prompts:
                if ("prompt", prompt.name) not in withheld:
                    prompts.setdefault(prompt.name, (name, prompt.to_mcp()))
        self.tools, self.resources, self.templates, self.prompts = (
            tools,
            resources,
            templates,
            prompts,
        )

    def _shared(self) -> dict[str, set[tuple[str, str]]]:
        """What each plugin serves that another serves too, which neither may then serve:
        installs refuse it, but a data dir may hold plugins installed before they did (or
        before a check covered prompts, resources and templates). Serving it from one of them
        would hand one plugin's callers to the other."""
        offers = {name: _Offer.of(manifest) for name, manifest in self.manifests.items()}
        names = sorted(offers)
        shared: dict[str, set[tuple[str, str]]] = {}
        for i, name in enumerate(names):
            for other in names[i + 1 :]:
                for clash in _clashes(offers[name], offers[other]):
                    shared.setdefault(name, set()).add(clash.mine)
                    shared.setdefault(other, set()).add(clash.theirs)
                    log.error(
                        "%s of plugin %r %s plugin %r: neither plugin serves it until one of "
                        "them is removed, or reinstalled without it",
                        clash.what,
                        name,
                        clash.how,
                        other,
                    )
        return shared

    def resource_owner(self, uri: str) -> str | None:
        """The plugin serving ``uri`` (in normal form: normal_uri), by exact resource or by
        template."""
        hit = self.resources.get(uri)
        if hit is not None:
            return hit[0]
        for template in self.templates:
            if template.pattern.match(uri):
                return template.plugin
        return None

    def template_owner(self, text: str) -> str | None:
        """The plugin with a template whose own text is ``text`` (``files://{path}``: what a
        completion of it, and policy, know it by), if one has."""
        for template in self.templates:
            if template.listing.get("uriTemplate") == text:
                return template.plugin
        return None

    def runtime(self, name: str) -> PluginRuntime:
        """The running runtime of plugin ``name``. Raises PluginNotFound, or PluginFailure
        (with the reason) when the plugin cannot start until it is reinstalled (its code
        fails to load) or until workers are free."""
        runtime = self.runtimes.get(name)
        if runtime is None:
            raise PluginNotFound(f"plugin {shown(name)} is not installed")
        reason = self.failed.get(name)
        if reason is not None and name in self._unstarted:
            raise PluginFailure(f"plugin {name!r} is not running: {reason}")
        if reason is not None:
            raise PluginFailure(
                f"plugin {name!r} could not start ({reason}); fix it and reinstall it "
                "with 'mcp0 plugin install --replace'"
            )
        return runtime

    def _leave(self, runtime: PluginRuntime, copy: Path) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(runtime, copy))
        self._leaving[task] = runtime
        task.add_done_callback(self._left)

    async def _drain(self, runtime: PluginRuntime, copy: Path) -> None:
        """Let ``runtime``'s calls finish, then delete its copy if no install names it."""
        await runtime.drain()
        self._let_go(runtime)
        await asyncio.to_thread(self._delete_if_unused, [copy])

    def _let_go(self, runtime: PluginRuntime) -> None:
        """Release ``runtime``'s lease on its copy: its workers are gone."""
        leased = self._leases.pop(runtime, None)
        if leased is not None:
            os.close(leased[1])

    def _left(self, task: asyncio.Task[None]) -> None:
        runtime = self._leaving.pop(task, None)
        if runtime is not None and not task.cancelled() and task.exception() is not None:
            log.error("plugin %r did not stop cleanly: %s", runtime.name, task.exception())

    async def close(self) -> None:
        starts = list(self._start_tasks)  # (a start cancelled closes its runtime)
        for task in starts:
            task.cancel()
        await asyncio.gather(*starts, return_exceptions=True)
        runtimes, self.runtimes = list(self.runtimes.values()), {}
        leaving, self._leaving = dict(self._leaving), {}
        for task in leaving:
            task.cancel()
        runtimes += list(leaving.values())
        await asyncio.gather(*(rt.close() for rt in runtimes), return_exceptions=True)
        copies = {self._leases[rt][0] for rt in runtimes if rt in self._leases}
        for runtime in runtimes:
            self._let_go(runtime)
        # a copy replaced while this process ran it, whose other users let go before it did
        try:
            await asyncio.to_thread(self._delete_if_unused, copies)
        except StorageError as exc:
            log.warning("cannot tell which plugin copies are still installed: %s", exc)


def _copy_failure(exc: OSError) -> str:
    """What went wrong in a copy, in words (shutil.Error holds a list of them)."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        failures = exc.args[0]
        if failures and isinstance(failures[0], tuple) and len(failures[0]) == 3:
            src, _, why = failures[0]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            return f"{src}: {why}{more}"
    return str(exc)
