"""The ``process`` runtime: a plugin served by long-lived, confined worker processes.

:class:`ProcessRuntime` implements :class:`~mcp_zero.sandbox.base.PluginRuntime`.
It keeps ``quotas.workers`` workers (each a :class:`WorkerProcess`) and sends
each call to the least busy one. A worker that dies is restarted with a small
backoff; one that ignores a cancel after a timeout is killed and restarted.

Each worker runs with a scrubbed environment, ``cwd`` = the plugin's private
data directory, its own process group, rlimits (address space from
``memory_mb``, no core dumps, few open files), no new privileges, and — when
``capabilities.network`` is false and the host allows it — an empty network
namespace (:attr:`ProcessRuntime.network_isolated` tells whether it held), and,
where the kernel has Landlock, file access confined to the system's files, its code
and its data dir (:attr:`ProcessRuntime.files_confined`), in a mount view of its own
where all else is read-only and the server's data dir covered
(:attr:`ProcessRuntime.mounts_confined`). A root server's workers run as
:data:`~mcp_zero.sandbox.ownership.WORKER_USER`: the runtime gives that user the
plugin's data dir and makes the plugin's code readable to all when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcp_zero import PACKAGE_ROOT
from mcp_zero.errors import (
    InvalidParams,
    ManifestError,
    McpZeroError,
    NotFound,
    PluginFailure,
    PluginLoadFailure,
    PromptNotFound,
    ResourceNotFound,
    ToolNotFound,
    ToolTimeout,
)
from mcp_zero.sandbox.base import CallBridge, seconds
from mcp_zero.sandbox.isolation import MEASURES
from mcp_zero.sandbox.manifest import PluginManifest
from mcp_zero.sandbox.ownership import (
    WORKER_USER,
    readable_to_all,
    worker_identity,
)
from mcp_zero.sandbox.stderr import StderrBudget
from mcp_zero.sandbox.worker_process import WorkerProcess
from mcp_zero.uri import normal_uri

JSON = dict[str, Any]
# A worker that dies sooner than this after starting counts as failing to start.
_EARLY_DEATH_S = 1.0
#: The longest wait before a worker that keeps dying as it starts is started again (the
#: server's ``max_restart_backoff_s``).
MAX_RESTART_BACKOFF_S = 2.0
# Past this many early deaths in a row, restart only when a call needs a worker.
_EAGER_RESTARTS = 5


logger = logging.getLogger(__name__)


def _backoff(failures: int, longest: float) -> float:
    """How long a slot waits before it starts a worker after ``failures`` in a row: 50 ms,
    doubling each time up to ``longest``. (The doubling stops at 2**30: 2.0 ** 1024 is an
    OverflowError, and a plugin crashing on every call gets there: found by review.)"""
    return min(0.05 * 2.0 ** min(failures - 1, 30), longest)


def retried(failure: BaseException) -> bool:
    """Whether a worker's failed start is tried again: not when the plugin's code failed
    to load, or serves other names than its manifest declares (only a new install can
    mend those), but when it was killed, not ready in time, or its sandbox or data dir
    could not be set up, which a later start may not meet."""
    return isinstance(failure, PluginFailure) and not isinstance(failure, PluginLoadFailure)


class ProcessRuntime:
    """A plugin run in ``quotas.workers`` worker processes; see the module docstring.

    ``plugin_dir`` holds ``plugin.json`` and the code; ``data_dir`` is the plugin's
    private writable directory (created if missing). All call methods are safe to
    use concurrently and raise what :class:`~mcp_zero.sandbox.base.PluginRuntime` says.
    A worker that keeps dying as it starts is started again after 50 ms, doubling each time
    up to ``max_restart_backoff_s``.
    """

    def __init__(
        self,
        manifest: PluginManifest,
        plugin_dir: str | Path,
        data_dir: str | Path,
        *,
        python: str | None = None,
        start_timeout: float = 15.0,
        cancel_grace: float = 0.5,
        on_restart: Callable[[str], None] | None = None,
        on_update: Callable[[str, str], None] | None = None,
        protect: str | Path | None = None,
        worker_user: str = WORKER_USER,
        max_restart_backoff_s: float = MAX_RESTART_BACKOFF_S,
    ) -> None:
        self.name = manifest.name
        #: Told (with the plugin's name) each time a worker that died or was killed (a call
        #: past its timeout) is replaced: the ``mcp0_plugin_restarts_total`` counter.
        self.on_restart = on_restart
        #: Told (the plugin's name, a URI) of a resource update a worker sent outside any call.
        self.on_update = on_update
        self.manifest = manifest
        self.plugin_dir = Path(plugin_dir).resolve()
        self.data_dir = Path(data_dir).resolve()
        #: Each of isolation.MEASURES: True when it held for every running worker.
        self.sandbox = dict.fromkeys(MEASURES, False)
        self._protect = str(Path(protect).resolve()) if protect is not None else ""
        self._start_timeout = start_timeout
        self._grace = cancel_grace
        self._max_backoff = max_restart_backoff_s
        n = manifest.quotas.workers
        self._slots: list[WorkerProcess | None] = [None] * n
        self._starting: list[asyncio.Task[WorkerProcess] | None] = [None] * n
        self._failures = [0] * n
        self._start_failure: str | None = None
        self._retired: set[WorkerProcess] = set()
        self._closed = False
        # One for all the workers, restarted ones too: a crash loop earns no fresh allowance.
        self._stderr_budget = StderrBudget(
            logging.getLogger(f"mcp_zero.sandbox.plugin.{self.name}")
        )
        self._argv = [
            python or sys.executable,
            "-P",  # no cwd (the writable data dir) on sys.path
            "-s",
            "-m",
            "mcp_zero.sandbox.worker",
            str(self.plugin_dir),
            manifest.entry,
        ]
        self._identity = worker_identity(worker_user)
        self._worker_user = worker_user
        self._warned_privileged = False
        self._env = self._worker_env()

    def _worker_env(self) -> dict[str, str]:
        """The worker's whole environment: nothing inherited from the server (secrets)."""
        tmp = self.data_dir / ".tmp"
        q = self.manifest.quotas
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.data_dir),
            "TMPDIR": str(tmp),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONPATH": str(PACKAGE_ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",  # the plugin dir is signed content: keep it as is
            "PYTHONUNBUFFERED": "1",
            "MALLOC_ARENA_MAX": "2",  # glibc's per-thread arenas would eat RLIMIT_AS
            "MCP0_PLUGIN_DIR": str(self.plugin_dir),
            "MCP0_PLUGIN_ENTRY": self.manifest.entry,
            "MCP0_DATA_DIR": str(self.data_dir),
            "MCP0_MEMORY_MB": str(q.memory_mb),
            "MCP0_MAX_THREADS": str(q.max_concurrency),
            "MCP0_NETWORK": "1" if self.manifest.capabilities.network else "0",
            "MCP0_FILESYSTEM": self.manifest.capabilities.filesystem,
            "MCP0_PROTECT": self._protect,
            "MCP0_PARENT_PID": str(os.getpid()),
        }
        if self._identity is not None:
            env["MCP0_WORKER_UID"], env["MCP0_WORKER_GID"] = map(str, self._identity)
        return env

    def _prepare(self) -> None:
        """Let the workers' user read the plugin's code (a server's copies are made readable
        when installed, not those of earlier releases). The data dir is the worker's to
        settle: only it knows whether it can switch (``ownership.settle``)."""
        if self._identity is not None:
            readable_to_all(self.plugin_dir)

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [w.pid for w in self._slots if w is not None and w.alive]

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raises :class:`PluginFailure` or :class:`ManifestError`
        (code and manifest disagree) when one could not start. A failure of the plugin's
        code (that, or :class:`PluginLoadFailure`) closes the runtime: no new start can do
        better. Any other (a worker killed or not ready in time, its data dir not made)
        leaves it open, the worker started again as a crashed one is (see ``retried``)."""
        self._closed = False
        await asyncio.to_thread(self._prepare)
        if self._closed:  # closed meanwhile (its plugin removed, the server stopping)
            raise PluginFailure(f"plugin '{self.name}' runtime was closed as it started")
        failure: Exception | None = None
        try:
            for started in asyncio.as_completed([self._kick(i) for i in range(len(self._slots))]):
                try:
                    await started
                except Exception as exc:
                    if not retried(exc):
                        raise
                    failure = failure or exc
        except BaseException:
            await self.close()
            raise
        if failure is not None:
            raise failure

    def _make_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.data_dir.chmod(0o700)
        except OSError as exc:  # this plugin fails; the server and other plugins go on
            raise PluginFailure(
                f"plugin {self.manifest.name!r}: cannot make its data dir {self.data_dir}: "
                f"{exc.strerror or exc}"
            ) from exc

    async def drain(self) -> None:
        """Take no more calls; let those in flight finish, then stop the workers.

        A call runs for the manifest's ``timeout_ms`` at most, and an abandoned one (timed
        out, cancelled) is killed once past that and the cancel grace, so this ends by then;
        what is left is killed.
        """
        self._closed = True  # no new calls, no restarts
        for t in self._starting:
            if t is not None:
                t.cancel()
        workers = [w for w in self._slots if w is not None] + list(self._retired)
        for worker in workers:
            worker.retire()
        if workers:
            limit = self.manifest.quotas.timeout_ms / 1000 + 2 * self._grace + 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit):
                    await asyncio.gather(*(w.wait_gone() for w in workers))
        await self.close()

    async def close(self) -> None:
        """Stop all workers (calls in flight fail with PluginCrashed, calls waiting for a
        worker to start with PluginFailure); workers still starting are killed."""
        self._closed = True
        starting = [t for t in self._starting if t is not None]
        for t in starting:
            t.cancel()
        workers = [w for w in self._slots if w is not None] + list(self._retired)
        self._slots = [None] * len(self._slots)
        self._retired.clear()
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
        if starting:  # each kills its child as it is cancelled: wait until they are gone
            await asyncio.wait(starting)

    def _kick(self, slot: int) -> asyncio.Task[WorkerProcess]:
        task = self._starting[slot]
        if task is None:
            task = asyncio.get_running_loop().create_task(self._start_slot(slot))
            # A failed background restart is reported to the next caller, not logged as lost.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._starting[slot] = task
        return task

    async def _start_slot(self, slot: int) -> WorkerProcess:
        try:
            failures = self._failures[slot]
            if failures:
                await asyncio.sleep(_backoff(failures, self._max_backoff))
            worker = WorkerProcess(
                self.name,
                self._argv,
                self._env,
                self.data_dir,
                cancel_grace=self._grace,
                on_exit=self._on_exit,
                on_retire=self._on_retire,
                on_update=self._updated,
                stderr_budget=self._stderr_budget,
            )
            try:
                self._make_data_dir()
                ready = await worker.start(self._start_timeout)
                self._check_ready(ready)
            except McpZeroError as exc:
                self._failures[slot] += 1
                worker.kill("its plugin could not be served")
                await worker.wait_gone()
                self._start_failed(slot, exc)
                raise
            if self._closed:
                await worker.close()
                raise PluginFailure(f"plugin '{self.name}' runtime is closed")
            self._slots[slot] = worker
            self._start_failure = None
            self._update_isolation()
            if self._identity is not None and not worker.sandbox.get("unprivileged"):
                self._warn_privileged()
            return worker
        finally:
            self._starting[slot] = None

    def _start_failed(self, slot: int, exc: McpZeroError) -> None:
        """Say in ``exc`` how often the slot's start failed in a row and, if it is retried,
        when it starts again: at once (after the backoff) the first _EAGER_RESTARTS times,
        as a crashed worker's slot, then when a call needs it. A worker killed as it started
        (an OOM kill) left its plugin failed until a reinstall or restart (found by review)."""
        failures = self._failures[slot]
        wait = _backoff(failures, self._max_backoff)
        notes = [f"failed {failures} times in a row"] if failures > 1 else []
        again = retried(exc) and not self._closed
        if again and failures <= _EAGER_RESTARTS:
            notes.append(f"started again in {wait:g} s")
            asyncio.get_running_loop().call_soon(self._restart_slot, slot)
        elif again:
            notes.append(f"started again by the next call, after {wait:g} s")
        if notes:
            exc.message = f"{exc.message} ({'; '.join(notes)})"
            exc.args = (exc.message,)
        self._start_failure = exc.message
        if again:  # (one no new start can mend is for the host to record and log)
            logger.warning("%s", exc.message)

    def _restart_slot(self, slot: int) -> None:
        if not self._closed and self._slots[slot] is None:
            self._kick(slot)

    @property
    def start_failure(self) -> str | None:
        """Why the last start of a worker failed, while none runs (a failure a new start
        may not have: it is started again); None once one runs."""
        return None if self.pids else self._start_failure

    def _check_ready(self, ready: JSON) -> None:
        """Refuse a plugin whose code serves other tools, resources, templates or prompts
        than its manifest declares. URIs are compared in normal form: the manifest's
        ``mem://x/%61bc`` is the code's ``mem://x/abc`` (it was held a difference: found
        by review)."""
        m = self.manifest
        declared = {
            "tools": [t.name for t in m.tools],
            "resources": [normal_uri(r.uri) for r in m.resources],
            "templates": [normal_uri(t.uri_template) for t in m.resource_templates],
            "prompts": [p.name for p in m.prompts],
        }
        for kind, names in declared.items():
            served = ready.get(kind) or []
            if kind in ("resources", "templates"):
                served = [normal_uri(str(uri)) for uri in served]
            missing = sorted(set(names) - set(served))
            extra = sorted(set(served) - set(names))
            if missing or extra:
                differences = [f"declared but not registered: {missing}"] if missing else []
                if extra:
                    differences.append(f"registered but not declared: {extra}")
                raise ManifestError(
                    f"plugin '{self.name}': {kind} in plugin.json and in {m.entry} differ "
                    f"({'; '.join(differences)})",
                    data={"field": kind},
                )

    def _warn_privileged(self) -> None:
        """Say once that a root server's worker could not leave root: without its mount view
        (no mount namespace: no CAP_SYS_ADMIN, and user namespaces refused) it cannot reach
        the plugin's code as nobody, or it may not switch (no CAP_SETUID, nobody unmapped)."""
        if not self._warned_privileged:
            self._warned_privileged = True
            logger.warning(
                "plugin %r: its worker runs as root (without capabilities): it could not "
                "switch to %r (it had no mount view, or may not switch: see docs/plugins.md), "
                "so it can read root's files where it may read: run the server as an "
                "unprivileged user",
                self.name,
                self._worker_user,
            )

    def _update_isolation(self) -> None:
        running = [w for w in self._slots if w is not None and w.alive]
        self.sandbox = {
            m: bool(running) and all(w.sandbox.get(m, False) for w in running) for m in MEASURES
        }

    @property
    def network_isolated(self) -> bool:
        """Every running worker sits in its own empty network namespace."""
        return self.sandbox["network_isolated"]

    @property
    def files_confined(self) -> bool:
        """Every running worker's file access is confined (Landlock)."""
        return self.sandbox["files_confined"]

    @property
    def mounts_confined(self) -> bool:
        """Every running worker sees every filesystem read-only but its data dir, and the
        server's data dir covered but for the plugin's own directories."""
        return self.sandbox["mounts_confined"]

    @property
    def syscalls_restricted(self) -> bool:
        """Every running worker has the seccomp filter (no Unix sockets, io_uring, keyring)."""
        return self.sandbox["syscalls_restricted"]

    def _on_exit(self, worker: WorkerProcess) -> None:
        self._retired.discard(worker)
        for i, w in enumerate(self._slots):
            if w is worker:
                self._slots[i] = None
                if time.monotonic() - worker.started_at < _EARLY_DEATH_S:
                    self._failures[i] += 1
                else:
                    self._failures[i] = 0
                if not self._closed:
                    self._restarting()
                    if self._failures[i] <= _EAGER_RESTARTS:
                        self._kick(i)

    def _updated(self, uri: str) -> None:
        if self.on_update is not None:
            self.on_update(self.name, uri)

    def _on_retire(self, worker: WorkerProcess) -> None:
        for i, w in enumerate(self._slots):
            if w is worker:
                self._slots[i] = None
                self._retired.add(worker)
                # One that asks to be replaced as soon as it starts, again and again, backs
                # off as a crash loop does (it restarted several times a second)
                early = time.monotonic() - worker.started_at < _EARLY_DEATH_S
                self._failures[i] = self._failures[i] + 1 if early else 0
                if not self._closed:
                    self._restarting()
                    if self._failures[i] <= _EAGER_RESTARTS:
                        self._kick(i)

    @property
    def failures_in_a_row(self) -> int:
        """How many times in a row a worker of this plugin died (or asked to be replaced)
        soon after it started, or failed to start: 0 for a healthy plugin."""
        return max(self._failures, default=0)

    def _restarting(self) -> None:
        """A worker is being replaced (at once, or by the next call after a crash loop)."""
        if self.on_restart is not None:
            self.on_restart(self.name)

    def _running(self) -> WorkerProcess | None:
        """The running worker with the fewest calls in flight, None while none runs; a slot
        whose worker is gone gets one started."""
        if self._closed:
            raise PluginFailure(f"plugin '{self.name}' runtime is closed; start it first")
        best: WorkerProcess | None = None
        for i, w in enumerate(self._slots):
            if w is None or not w.alive:
                self._kick(i)
            elif best is None or w.inflight < best.inflight:
                best = w
        return best

    def ready(self) -> bool:
        return self._running() is not None

    async def until_ready(self, timeout: float, label: str) -> float:
        return (await self._started(timeout, label))[1]

    async def _started(self, timeout: float, label: str) -> tuple[WorkerProcess, float]:
        """A worker being started, once it runs (when :meth:`_running` found none), and what
        is left of the call's ``timeout``: a start that takes longer (a plugin whose import
        hangs takes the start timeout) fails the call as its quota says."""
        task = next(t for t in self._starting if t is not None)
        began = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                worker = await asyncio.shield(task)
            return worker, max(timeout - (time.monotonic() - began), 0.001)
        except TimeoutError:
            raise ToolTimeout(
                f"{label} of plugin '{self.name}' did not finish within {seconds(timeout)} s: its "
                "worker was still starting"
            ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # this call itself was cancelled (its client gave up)
            # The start was cancelled under it: drain or close, the plugin removed or replaced.
            raise PluginFailure(
                f"plugin '{self.name}' was stopped (removed or replaced) while it was still "
                "starting; call again: a replaced plugin's new version serves the call"
            ) from None

    # -- calls ----------------------------------------------------------------

    async def _call(
        self, frame: JSON, bridge: CallBridge | None, timeout: float, label: str
    ) -> JSON:
        worker = self._running()
        if worker is None:
            worker, timeout = await self._started(timeout, label)
        return self._result(await worker.call(frame, bridge, timeout, label), label)

    def _result(self, reply: JSON, label: str) -> JSON:
        """The result a worker's reply carries; raises the error it carries instead."""
        result = reply.get("result")
        if isinstance(result, dict):
            return result
        error = reply.get("error")
        if not isinstance(error, dict):
            raise PluginFailure(f"plugin '{self.name}' answered {label} with no result")
        message = str(error.get("message"))
        kind = error.get("kind")
        if kind == "not_found":
            raise NotFound(message)
        if kind == "invalid":
            raise InvalidParams(f"{label}: {message}")
        raise PluginFailure(f"plugin '{self.name}' failed in {label}: {message}")

    async def call_tool(
        self, tool: str, arguments: JSON, *, agent: str, bridge: CallBridge, timeout: float
    ) -> JSON:
        """Run ``tool``; returns its ``CallToolResult`` (handler errors are ``isError``)."""
        frame = {"op": "call_tool", "name": tool, "arguments": arguments, "agent": agent}
        label = f"tool '{tool}'"
        # (_call's work without its coroutine: one level less to resume when the reply comes)
        worker = self._running()
        if worker is None:
            worker, timeout = await self._started(timeout, label)
        try:
            result = self._result(await worker.call(frame, bridge, timeout, label), label)
        except NotFound as exc:
            raise ToolNotFound(exc.message) from None
        if not isinstance(result.get("content"), list):
            raise PluginFailure(f"plugin '{self.name}' returned a malformed result for '{tool}'")
        return result

    async def read_resource(
        self, uri: str, *, agent: str, bridge: CallBridge, timeout: float
    ) -> JSON:
        """Read ``uri``; returns its ``ReadResourceResult``."""
        frame = {"op": "read_resource", "uri": uri, "agent": agent}
        try:
            return await self._call(frame, bridge, timeout, f"resource '{uri}'")
        except NotFound as exc:
            raise ResourceNotFound(exc.message, data={"uri": uri}) from None

    async def get_prompt(
        self,
        name: str,
        arguments: dict[str, str],
        *,
        agent: str,
        bridge: CallBridge,
        timeout: float,
    ) -> JSON:
        """Render prompt ``name``; returns its ``GetPromptResult``."""
        frame = {"op": "get_prompt", "name": name, "arguments": arguments, "agent": agent}
        try:
            return await self._call(frame, bridge, timeout, f"prompt '{name}'")
        except NotFound as exc:
            raise PromptNotFound(exc.message) from None

    async def complete(
        self, ref: JSON, argument: JSON, context: JSON | None, *, agent: str, timeout: float
    ) -> JSON:
        """Complete a prompt argument or template variable; returns a ``CompleteResult``."""
        frame = {
            "op": "complete",
            "ref": ref,
            "argument": argument,
            "context": context,
            "agent": agent,
        }
        return await self._call(frame, None, timeout, "completion")


__all__ = ["ProcessRuntime"]
