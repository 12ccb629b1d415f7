"""The installed plugins: their runtimes, and which plugin owns each tool, resource and prompt.

Installing copies the plugin directory into the data dir (so later edits to the
source do not change what runs) and records the manifest in the store. A
running server notices installs and removals made by another process (the CLI)
through the store's ``plugins_version`` and rebuilds its index.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs

from mcp_zero.config import DEFAULT_MAX_WORKERS
from mcp_zero.errors import (
    Conflict,
    ManifestError,
    PluginFailure,
    PluginNotFound,
    StorageError,
)
from mcp_zero.sandbox.base import PluginRuntime
from mcp_zero.sandbox.manifest import PluginManifest, ToolSpec, load_manifest, parse_manifest
from mcp_zero.sandbox.process import ProcessRuntime
from mcp_zero.storage.base import PluginRecord, Store

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


def _template_pattern(template: str) -> re.Pattern[str]:
    """Match URIs of an RFC 6570 level-1/2 template: ``{var}`` is one segment, ``{+var}`` any."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\+?)([A-Za-z0-9_.]+)\}", template):
        out.append(re.escape(template[pos : m.start()]))
        out.append("(.+)" if m.group(1) else "([^/]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z")


Validator = jsonschema_rs.Validator


def _validator(schema: JSON) -> Validator:
    # jsonschema-rs: ~0.5 µs a check where the pure-Python jsonschema took ~28 µs (notes_add);
    # the dialect follows "$schema", 2020-12 when absent (as MCP specifies); never fetches $refs.
    return jsonschema_rs.validator_for(schema, offline=True)


#: How long a replaced copy no server deleted is kept before a start sweeps it: past the
#: longest call (timeout_ms is at most an hour), so no server still drains calls on it.
#: An install's staging copy (``.install-STARTED-VERSION-xxxx``, STARTED in Unix seconds) is
#: swept after as long: an install copies at most MAX_PLUGIN_BYTES, seconds to minutes, so
#: one that old was killed midway. Its age is in its name: ``copytree`` gives the directory
#: its source's modification time, which may be years old.
REPLACED_COPY_KEPT_S = 2 * 3600.0
MAX_PLUGIN_BYTES = 512 << 20  # a plugin directory's files, as copied at install
_NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
_STAGING = ".install-"


def _copy_time(copy: Path) -> float:
    """When ``copy`` was made: a staging copy's start, from its name; an installed copy's
    modification time (set at install, and when it was replaced). Raises OSError."""
    if copy.name.startswith(_STAGING):
        started = copy.name[len(_STAGING) :].split("-", 1)[0]
        if started.isdigit():
            return float(started)
    return copy.stat().st_mtime


def _special_kind(mode: int) -> str | None:
    """What a file that is neither regular nor a directory is, for an error message."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "not a regular file"


def _check_tree(source: Path) -> None:
    """Refuse what must not be copied into the data dir: a symbolic link (one to ``/`` would
    copy the whole file system), a special file (a FIFO or a socket cannot be copied; a
    device must not be read), and a tree over MAX_PLUGIN_BYTES."""
    total = 0
    for root, dirs, files in os.walk(source):  # does not follow links
        ignored = _NOT_COPIED(root, dirs + files)
        dirs[:] = [d for d in dirs if d not in ignored]
        for name in dirs + [f for f in files if f not in ignored]:
            path = Path(root, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                raise ManifestError(
                    f"{path.relative_to(source)} in {source} is a symbolic link (to "
                    f"{os.readlink(path)}): a plugin is installed as a copy of its files; put "
                    "the file itself there"
                )
            kind = _special_kind(info.st_mode)
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


def _tree_digest(root: Path) -> str:
    """sha256 over the paths and contents of the files under ``root``: which copy it is."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(4, "big") + name)
        with path.open("rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


def _check_unique(manifest: PluginManifest, installed: list[PluginRecord], replace: bool) -> None:
    """Raise Conflict when ``manifest``'s name is installed (unless ``replace``) or one of its
    tool names is another installed plugin's."""
    existing = next((r for r in installed if r.name == manifest.name), None)
    if existing is not None and not replace:
        raise Conflict(
            f"plugin {manifest.name!r} is already installed (version {existing.version}); "
            "remove it first or install with --replace"
        )
    taken = {
        tool["name"]: record.name
        for record in installed
        if record.name != manifest.name
        for tool in record.manifest.get("tools", [])
    }
    for tool in manifest.tools:
        if tool.name in taken:
            raise Conflict(
                f"tool {tool.name!r} of plugin {manifest.name!r} is already provided by "
                f"plugin {taken[tool.name]!r}; tool names must be unique across plugins"
            )


#: How an install's store write is made: given the write, make it (and what else belongs in
#: its transaction) and return what it returned.
Commit = Callable[[Callable[[], PluginRecord | None]], PluginRecord | None]


def _now(write: Callable[[], PluginRecord | None]) -> PluginRecord | None:
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
    ) -> None:
        self.store = store
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
        self._fingerprints: dict[str, tuple[Any, ...]] = {}
        self.on_change: Callable[[], None] | None = None  # told after the index changed
        self.on_restart: Callable[[str], None] | None = None  # a plugin's worker replaced
        self._lock = asyncio.Lock()
        self._leaving: dict[asyncio.Task[None], PluginRuntime] = {}  # replaced, draining
        self._copies: dict[str, Path] = {}  # the installed copy each runtime runs

    # -- installing (works without a running server) -----------------------------------------

    def install(
        self, source: Path, *, replace: bool = False, commit: Commit | None = None
    ) -> PluginManifest:
        """Validate the plugin at ``source``, copy it into the data dir and record it.

        ``commit`` runs the store write it is given (and may make more in its transaction:
        the install's audit record); the copy is made before, outside any transaction.
        Raises ManifestError for an invalid plugin, Conflict when the name is
        installed (unless ``replace``) or a tool name is taken by another plugin;
        of two installs racing (from two processes), one gets Conflict.
        """
        manifest = load_manifest(source)
        _check_unique(manifest, self.store.list_plugins(), replace)  # before copying it all
        _check_tree(source)
        parent = self.plugins_dir / manifest.name
        parent.mkdir(parents=True, exist_ok=True)
        # Each install copies into a directory of its own, so two installs at once never
        # write into the same one; the record says which copy is installed.
        staging = Path(
            tempfile.mkdtemp(prefix=f"{_STAGING}{int(time.time())}-{manifest.version}-", dir=parent)
        )
        target = parent / f"{manifest.version}-{staging.name.rsplit('-', 1)[1]}"
        try:
            try:
                shutil.copytree(source, staging, ignore=_NOT_COPIED, dirs_exist_ok=True)
                # copytree gave it the source's time; the sweep reads it as the copy's age
                os.utime(staging)
                digest = _tree_digest(staging)
                staging.rename(target)
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
            replaced = (commit or _now)(
                lambda: self.store.put_plugin(
                    record,
                    # again, where no other install can come in between
                    check=lambda installed: _check_unique(manifest, installed, replace),
                )
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            raise
        if replaced is not None and self.copy_path(replaced) != target:
            # A running server may still be finishing calls on the old copy: it deletes the
            # copy once they are done, else a later start sweeps it. Its time says when it
            # was replaced, so the sweep waits out any drain.
            with contextlib.suppress(OSError):
                os.utime(self.copy_path(replaced))
        return manifest

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
                        shutil.rmtree(copy)

    def _delete_if_unused(self, copy: Path) -> None:
        if copy not in {self.copy_path(record) for record in self.store.list_plugins()}:
            shutil.rmtree(copy, ignore_errors=True)

    def remove(self, name: str) -> list[str]:
        """Forget plugin ``name`` and detach it from every agent; returns the agents it was
        detached from. Its installed files go as a replaced copy's do: a running server
        deletes them once its calls on them are done, a later start sweeps them (its data
        dir stays)."""
        record = self.store.get_plugin(name)
        detached = self.store.delete_plugin(name) if record is not None else None
        if record is None or detached is None:
            raise PluginNotFound(f"no plugin named {name!r} is installed")
        with contextlib.suppress(OSError):
            os.utime(self.copy_path(record))  # when it stopped being used
        return detached

    # -- running -------------------------------------------------------------------------------

    async def refresh(
        self,
        *,
        force: bool = False,
        only: Collection[str] | None = None,
        wait: float | None = None,
    ) -> bool:
        """Bring runtimes and index in line with the store; True when something changed.

        New runtimes are started (those named in ``only``, if given: a one-off call needs
        one plugin), and waited for ``wait`` seconds at most (None: until all started or
        failed): one that takes longer goes on starting, its calls wait for it, and a
        failure is recorded when it comes. A plugin that hangs while it loads must not keep
        a server from serving the others for its whole start timeout."""
        version = self.store.plugins_version()
        if version == self.version and not force:
            return False
        async with self._lock:
            if version == self.version and not force:
                return False
            records = {r.name: r for r in self.store.list_plugins()}
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
                    # New calls go to the new code at once; the calls the old one is running
                    # finish there (an upgrade must not cut a tool off mid-way).
                    self._leave(runtime, copy)
            fresh: list[tuple[str, PluginRuntime]] = []
            for name, record in records.items():
                if name in self.runtimes:
                    continue
                try:
                    manifest = parse_manifest(record.manifest)
                except ManifestError:
                    continue  # recorded by an older, looser version: not served
                copy = self.copy_path(record)
                runtime = self._runtime(manifest, copy)
                self._copies[name] = copy
                self.manifests[name] = manifest
                self.runtimes[name] = runtime
                self._fingerprints[name] = _fingerprint(record)
                fresh.append((name, runtime))
            self._reindex()
            self.version = version
            fresh = self._within_worker_budget(fresh)
            # Only the new runtimes start (a running one would get a second set of workers);
            # one plugin that cannot start must not keep the others, or the server, down.
            starting = {}
            for name, runtime in fresh:
                if only is None or name in only:
                    task = asyncio.ensure_future(runtime.start())
                    self.starting.add(name)
                    task.add_done_callback(functools.partial(self._started, name, runtime))
                    starting[name] = task
            if starting:
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
        """Start plugin ``name``'s runtime, which ``refresh(only=...)`` left unstarted; a
        failure is recorded as ``refresh`` records it."""
        runtime = self.runtimes.get(name)
        if runtime is None:
            return
        task = asyncio.ensure_future(runtime.start())
        self.starting.add(name)
        task.add_done_callback(functools.partial(self._started, name, runtime))
        await asyncio.wait([task])

    def _started(self, name: str, runtime: PluginRuntime, task: asyncio.Future[None]) -> None:
        """A runtime's start ended: record its failure, if it is still the one installed."""
        if self.runtimes.get(name) is runtime:
            self.starting.discard(name)
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None and self.runtimes.get(name) is runtime:
            self.failed[name] = str(failure)
            log.error("plugin %r could not start: %s", name, failure)

    def _within_worker_budget(
        self, fresh: list[tuple[str, PluginRuntime]]
    ) -> list[tuple[str, PluginRuntime]]:
        """The fresh runtimes whose workers fit in ``max_workers`` beside the running ones
        (in name order); the others are marked failed, with what to change, and not started."""
        starting = {name for name, _ in fresh}
        in_use = sum(
            self.manifests[name].quotas.workers
            for name in self.runtimes
            if name not in starting and name not in self.failed
        )
        fits = []
        for name, runtime in sorted(fresh, key=lambda item: item[0]):
            need = self.manifests[name].quotas.workers
            if in_use + need <= self.max_workers:
                in_use += need
                fits.append((name, runtime))
                continue
            self._unstarted.add(name)
            self.failed[name] = (
                f"it needs {need} worker process{'es' if need > 1 else ''} (quotas.workers) "
                f"and {max(self.max_workers - in_use, 0)} of the server's max_workers = "
                f"{self.max_workers} are free; lower its quotas.workers, remove a plugin, or "
                "raise max_workers"
            )
            log.error("plugin %r not started: %s", name, self.failed[name])
        return fits

    def _runtime(self, manifest: PluginManifest, path: Path) -> PluginRuntime:
        if manifest.runtime != "process":
            raise ManifestError(
                f"plugin {manifest.name!r}: runtime {manifest.runtime!r} is unknown"
            )
        data_dir = self.plugin_data_dir / manifest.name
        data_dir.mkdir(parents=True, exist_ok=True)
        return ProcessRuntime(
            manifest, path, data_dir, on_restart=self._restarted, protect=self.protect
        )

    def _restarted(self, plugin: str) -> None:
        if self.on_restart is not None:
            self.on_restart(plugin)

    def _reindex(self) -> None:
        tools: dict[str, ToolEntry] = {}
        resources: dict[str, tuple[str, JSON]] = {}
        templates: list[TemplateEntry] = []
        prompts: dict[str, tuple[str, JSON]] = {}
        for name in sorted(self.manifests):
            manifest = self.manifests[name]
            for spec in manifest.tools:
                tools.setdefault(
                    spec.name,
                    ToolEntry(
                        name,
                        spec,
                        spec.to_mcp(),
                        _validator(spec.input_schema),
                        _validator(spec.output_schema) if spec.output_schema else None,
                    ),
                )
            for resource in manifest.resources:
                resources.setdefault(resource.uri, (name, resource.to_mcp()))
            for template in manifest.resource_templates:
                templates.append(
                    TemplateEntry(name, _template_pattern(template.uri_template), template.to_mcp())
                )
            for prompt in manifest.prompts:
                prompts.setdefault(prompt.name, (name, prompt.to_mcp()))
        self.tools, self.resources, self.templates, self.prompts = (
            tools,
            resources,
            templates,
            prompts,
        )

    def resource_owner(self, uri: str) -> str | None:
        """The plugin serving ``uri``, by exact resource or by template."""
        hit = self.resources.get(uri)
        if hit is not None:
            return hit[0]
        for template in self.templates:
            if template.pattern.match(uri):
                return template.plugin
        return None

    def runtime(self, name: str) -> PluginRuntime:
        """The running runtime of plugin ``name``. Raises PluginNotFound, or PluginFailure
        (with the reason) when the plugin could not start."""
        runtime = self.runtimes.get(name)
        if runtime is None:
            raise PluginNotFound(f"plugin {name!r} is not installed")
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
        await asyncio.to_thread(self._delete_if_unused, copy)

    def _left(self, task: asyncio.Task[None]) -> None:
        runtime = self._leaving.pop(task, None)
        if runtime is not None and not task.cancelled() and task.exception() is not None:
            log.error("plugin %r did not stop cleanly: %s", runtime.name, task.exception())

    async def close(self) -> None:
        runtimes, self.runtimes = list(self.runtimes.values()), {}
        leaving, self._leaving = dict(self._leaving), {}
        for task in leaving:
            task.cancel()
        runtimes += list(leaving.values())
        await asyncio.gather(*(rt.close() for rt in runtimes), return_exceptions=True)


def _copy_failure(exc: OSError) -> str:
    """What went wrong in a copy, in words (shutil.Error holds a list of them)."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        failures = exc.args[0]
        if failures and isinstance(failures[0], tuple) and len(failures[0]) == 3:
            src, _, why = failures[0]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            return f"{src}: {why}{more}"
    return str(exc)
