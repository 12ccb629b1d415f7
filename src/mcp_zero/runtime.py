"""One MCP-ZERO instance on a data dir: storage, audit, policy, plugins, agents and the kernel,
built from ``Settings``, started and stopped together.

The data dir holds ``mcp0.db`` (SQLite), ``keys/``, ``admin.token`` (mode 0600),
``policies/*.cedar``, ``plugins/`` (installed copies) and ``plugin-data/``
(each plugin's private files).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

from mcp_zero import PACKAGE_ROOT
from mcp_zero.audit.log import AuditLog
from mcp_zero.config import Settings
from mcp_zero.data_dir import claim_data_dir
from mcp_zero.errors import ConfigError, Conflict, PolicyError, StorageError
from mcp_zero.kernel import plugin_data
from mcp_zero.kernel.action import Outcome, Verb
from mcp_zero.kernel.admin import CHANGE_ADMIN_TOKEN, LOAD_POLICIES, admin_decision, admin_event
from mcp_zero.kernel.admin_token import (
    ADMIN_TOKEN_RECORDED,
    finish_admin_token_rotations,
    recorded_token_digest,
    rotation_recorded,
    rotations_held_off,
)
from mcp_zero.kernel.agents import AgentService, state_digest
from mcp_zero.kernel.pipeline import Kernel
from mcp_zero.kernel.plugin_data import SetAside
from mcp_zero.kernel.plugins import Installed, PluginHost, Removal
from mcp_zero.kernel.quotas import QuotaGate
from mcp_zero.policy.defaults import write_default_policies
from mcp_zero.policy.loader import policy_files
from mcp_zero.policy.store import PolicyStore
from mcp_zero.rpc.metrics import Metrics
from mcp_zero.rpc.ratelimit import RateLimiter
from mcp_zero.sandbox import isolation
from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.worker_process import worker_outputs
from mcp_zero.security.files import make_private
from mcp_zero.security.tokens import hash_token, new_token, write_secret_file
from mcp_zero.storage.base import AgentRecord
from mcp_zero.storage.sqlite import SqliteStore, holds_no_store

log = logging.getLogger("mcp_zero")
EXAMPLES_DIR = Path(__file__).parent / "examples" / "plugins"
REFRESH_INTERVAL_S = 1.0
#: How often a server copies its WAL into mcp0.db (``SqliteStore.checkpoint``): a copy of
#: mcp0.db alone, a backup that left out mcp0.db-wal, lacks at most that much.
CHECKPOINT_INTERVAL_S = 60.0
#: How long a server waits for its plugins to start before it serves: one that takes longer
#: (hanging as it loads) goes on starting, and its calls wait for it.
STARTUP_WAIT_S = 3.0
_UNSEEN = object()


class FirstStart(NamedTuple):
    """What a data dir's first start did: the example plugins it installed, and the token
    of agent ``default`` (to be shown once) if it made it or gave it a new one."""

    installed: list[str]
    token: str | None
    reissued: bool = False  # the token is a new one for a ``default`` made before


def example_plugins() -> list[Path]:
    """The plugins bundled with the package."""
    return sorted(p.parent for p in EXAMPLES_DIR.glob("*/plugin.json"))


def _create_signing_key(path: Path) -> None:
    """Create the signing key in a child process (see :mod:`mcp_zero.security.keys`):
    cryptography would stay resident in this one, ~10 MiB for a key nothing here uses yet."""
    done = subprocess.run(
        [sys.executable, "-m", "mcp_zero.security.keys", str(path)],
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not path.exists():
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"cannot create the signing key {path}: {last}")


#: Store.recorded's name of the policy set in force (its digest)
POLICIES_RECORDED = "policies"


class _RecordedAlready(Exception):
    """The change of a governing file is recorded already (``Runtime._record_file``)."""


def _found_by(by: str) -> dict[str, Any]:
    """What a record of governing files found unrecorded says of who found them: a server
    as it started (``at_start``), or a command about to decide under them (which may run
    beside a server that records the same change itself, a moment later)."""
    return {"at_start": True} if by == "start" else {"found_by_command": by}


#: In the data dir, once its mcp0.db holds a store (check_store_not_lost)
STORE_MADE = "store-made"


def check_store_not_lost(settings: Settings) -> None:
    """Refuse a data dir whose database is missing or empty (``holds_no_store``: also a
    copy of ``mcp0.db`` without its ``mcp0.db-wal``) while it holds ``STORE_MADE`` (written
    once the database holds a store) or installed plugins' copies (``plugins/NAME/VERSION-…``,
    made only by an install, which needs a database; what tells of a store in a data dir an
    earlier release made): laid out again as new, its agents, plugins and audit history were
    silently gone, and a fresh chain looked valid (found by review). A first start killed
    before its database was made, or a data dir the operator prepared (``plugin-data/``
    mounted on a file system of its own, with its ``lost+found``), holds neither and goes
    on."""
    db = settings.db_path
    if not holds_no_store(db):
        return
    try:
        copies = [
            f"{plugin.name}/{copy.name}"
            for plugin in settings.plugins_dir.iterdir()
            if plugin.is_dir() and not plugin.name.startswith(".")
            for copy in plugin.iterdir()
            if copy.is_dir() and not copy.name.startswith(".")
        ]
    except FileNotFoundError:
        copies = []
    except OSError as exc:
        raise ConfigError(f"cannot read {settings.plugins_dir}: {exc.strerror or exc}") from exc
    # (without plugins installed, copies told nothing: a lost store was laid out anew, its
    # agents and audit history gone, and the fresh chain verified: found by a bug hunt)
    made = settings.data_dir / STORE_MADE
    if copies or os.path.lexists(made):
        state = "missing" if not db.exists() else "empty"
        if state == "empty" and db.stat().st_size > 0:  # (the main file of a WAL, alone)
            state = "without tables (copied without its mcp0.db-wal?)"
        held = (
            f"{settings.plugins_dir} holds copies of installed plugins "
            f"({', '.join(sorted(copies)[:3])}{', …' if len(copies) > 3 else ''}): the "
            "agents, plugins and audit log recorded with them are gone"
            if copies
            else f"this data dir held a store ({made} says so): the agents, plugins and audit "
            "log recorded in it are gone"
        )
        raise ConfigError(
            f"the database {db} is {state}, but {held}. Restore mcp0.db (and mcp0.db-wal) if "
            "you have a backup; else move the data dir aside to start anew"
        )


def _note_store_made(data_dir: Path) -> None:
    """Write ``STORE_MADE`` in ``data_dir`` (once), whose database now holds a store: from
    now on, a data dir without it is one whose store was lost, not a new one. Raises
    ConfigError when it cannot be written."""
    made = data_dir / STORE_MADE
    if os.path.lexists(made):
        return
    try:
        made.write_text(
            "mcp0.db beside this file holds this data dir's store (agents, plugins, the audit "
            "log): without it, mcp0 refuses the data dir rather than start a new store in it. "
            "Restore mcp0.db from a backup (docs/operations.md)\n",
            encoding="utf-8",
        )
    except OSError as exc:
        raise ConfigError(f"cannot prepare data dir {data_dir}: {exc}") from exc


def _make_private(path: Path, more: str = "") -> None:
    """Make the secret file ``path`` 0600 if others may read or write it, with a warning that
    ends in ``more``: a restore leaves such files (``VACUUM INTO`` writes the database under
    the umask, 0644 as a rule), and they were used as they were (found by review)."""
    try:
        was = make_private(path)
    except OSError as exc:
        log.warning(
            "%s is open to others, and cannot be made private (%s): chmod 600 it%s",
            path,
            exc.strerror or exc,
            more,
        )
        return
    if was is not None:
        # (what it gave its owner is kept: 0444 becomes 0400, not 0600: found by review)
        log.warning("%s was mode %04o, open to others: made %04o%s", path, was, was & 0o700, more)


#: In the data dir: how many audit events failed (their calls had acted) that no record
#: says yet; the log's resumption record, or the next start's, says so (audit.log)
LOST_EVENTS_NOTE = "audit-lost.json"


class Runtime:
    """Everything one server process (or one CLI command) works with."""

    def __init__(self, settings: Settings, *, create: bool = True, hold_new: bool = False) -> None:
        """The runtime on ``settings``' data dir, laid out if it is new; made if there is
        none and ``create``. ``hold_new``: keep the claim on a data dir this process laid
        out (``self.claim``: others wait) for the caller to release, or to abandon if what
        it does with the runtime fails (which removes the data dir if this process made it).

        Raises ConfigError and StorageError (the data dir cannot be laid out or opened); a
        data dir this process made is removed then.
        """
        self.settings = settings
        try:
            # before anything is read or laid out: of processes started together where no
            # data dir is, one lays it out (data_dir.py)
            self.claim = claim_data_dir(settings.data_dir, make=create)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and not create:
                # (it was there as the command began: removed by the one that made it)
                raise ConfigError(
                    f"no MCP-ZERO data dir at {os.path.abspath(settings.data_dir)} any more: "
                    "the command that was laying it out failed, and removed it"
                ) from exc
            raise ConfigError(f"cannot prepare data dir {settings.data_dir}: {exc}") from exc
        try:
            # an existing store is opened first: another program's mcp0.db is refused before
            # anything (keys, token, policies) is laid out beside it
            check_store_not_lost(settings)
            # (before the store opens: SQLite makes its -wal and -shm with the database's mode)
            db = settings.db_path
            for suffix in ("", "-wal", "-shm"):
                _make_private(db.with_name(db.name + suffix))
            _make_private(settings.keys_dir / "signing.key")
            opened = self._open_store() if settings.db_path.exists() else None
            try:
                self.created = self._prepare_data_dir()
            except BaseException:
                if opened is not None:
                    opened.close()
                raise
            self.store = opened or self._open_store()
            _note_store_made(settings.data_dir)
            self.audit = AuditLog(
                self.store,
                window=settings.audit_window_ms / 1000,
                max_batch=settings.audit_max_batch,
                lost_path=settings.data_dir / LOST_EVENTS_NOTE,
            )
            self.policy = PolicyStore(settings.policy_dir)
            if not policy_files(settings.policy_dir):
                log.warning(
                    "no policy in %s: every action is denied, the admin's too; docs/policy.md "
                    "shows the default policy to start from",
                    settings.policy_dir,
                )
            self.plugins = PluginHost(
                self.store,
                settings.plugins_dir,
                settings.plugin_data_dir,
                max_workers=settings.max_workers,
                protect=settings.data_dir,
                worker_user=settings.worker_user,
                max_restart_backoff_s=settings.max_restart_backoff_s,
            )
            self.plugins.record_digests()  # copies installed before digests were kept
            self.plugins.sweep_copies()  # replaced copies no server deleted
            self.metrics = Metrics(inflight=lambda: self.quotas.total_inflight)
            self.plugins.on_restart = self.metrics.count_plugin_restart
            self.quotas = QuotaGate(
                agent_concurrency=settings.max_concurrency,
                max_timeout_s=settings.max_timeout_s,
            )
            limiter = (
                RateLimiter(settings.rate_limit, settings.rate_burst)
                if settings.rate_limit > 0
                else None
            )
            self.agents = AgentService(
                self.store,
                self.audit,
                policy=self.policy,
                anonymous_agent=settings.anonymous_agent,
                count_denials=self.metrics.count_denials,
            )
            # (a removal by a command detached its plugin in the store: agents' principals, kept
            # for up to PRINCIPAL_TTL_S, would still list it for a plugin installed under its name)
            self.plugins.on_reindex = self.agents.forget_all
            self.kernel = Kernel(
                plugins=self.plugins,
                policy=self.policy,
                audit=self.audit,
                quotas=self.quotas,
                metrics=self.metrics,
                limiter=limiter,
                agents=self.agents,
            )
            self.admin_token_hash: str | None = None  # None: the admin API refuses everyone
            self._admin_token_seen: object = _UNSEEN  # the file's (inode, mtime, size) last read
            self._admin_token: str | None = None  # the token in force
            # a rotation a crash cut short: in force if its record was committed, else dropped
            finish_admin_token_rotations(settings.admin_token_path, self.store)
            # a purge of set-aside data a crash cut short: deleted if recorded, else set back
            plugin_data.finish_purges(settings.plugin_data_dir, self.store)
            head = self.store.audit_head()
            self._admin_token_since = head.seq if head is not None else 0  # when it was taken up
            self._admin_token_unrecorded: int | None = None  # (_refresh_admin_token_and_audit)
            self._admin_token_refreshing = asyncio.Lock()
            self.refresh_admin_token()
            self._refresher: asyncio.Task[None] | None = None
            self.audit.start()
        except BaseException:  # (it may have made keys, a token, policies, a store)
            self.claim.abandon()
            raise
        if not (hold_new and self.created):
            self.claim.release()

    def record_what_governs(self, by: str = "start") -> None:
        """Record the policy set and the admin token in force when they are not what the
        log last recorded of them: changed while no server ran, or in the moments before
        one was killed (they were taken up unrecorded: found by review). Called before a
        server serves and before a CLI command changes anything, so that no action is
        decided, and no admin request taken, under what the log lacks. Raises StorageError
        when the record cannot be written."""
        engine = self.policy.engine
        if self.store.recorded(POLICIES_RECORDED) != engine.digest:
            detail = {
                "policies_sha256": engine.digest,
                "generation": self.policy.generation,
                **_found_by(by),
            }
            self._record_file(
                LOAD_POLICIES,
                self.policy.policy_dir.name,
                Outcome.ALLOWED,
                detail,
                (POLICIES_RECORDED, engine.digest),
            )
        token = self._admin_token
        if self.store.recorded(ADMIN_TOKEN_RECORDED) != recorded_token_digest(token):
            self._record_admin_token(token, _found_by(by))

    def _record_admin_token(self, token: str | None, detail: dict[str, Any]) -> None:
        """Record ``token`` (None: no token) as the admin token in force (``_record_file``)."""
        self._record_file(
            CHANGE_ADMIN_TOKEN,
            self.settings.admin_token_path.name,
            Outcome.ALLOWED if token is not None else Outcome.ERROR,
            detail | ({} if token is not None else {"code": "no_admin_token"}),
            (ADMIN_TOKEN_RECORDED, recorded_token_digest(token)),
        )

    def _record_file(
        self,
        verb: str,
        resource: str,
        outcome: Outcome,
        detail: dict[str, Any],
        recorded: tuple[str, str],
    ) -> None:
        """Append the record of a change of a file that governs the server (it came from
        the data dir's files, not through an API), and keep its digest with it; nothing if
        the log has recorded that digest last already: another process noticed the change
        first (a command about to decide under it), and it is recorded once."""
        event = admin_event(verb, resource, "files", outcome, detail)
        name, digest = recorded

        def keep() -> None:
            # in the record's write transaction: of two processes, the second sees the first's
            if self.store.recorded(name) == digest:
                raise _RecordedAlready
            self.store.set_recorded(name, digest)

        with contextlib.suppress(_RecordedAlready):
            self.audit.append_with(keep, lambda _: event)

    def _open_store(self) -> SqliteStore:
        s = self.settings
        return SqliteStore(s.db_path, max_size_bytes=s.db_max_mb * 2**20 or None)

    def _prepare_data_dir(self) -> bool:
        """Create the data dir layout (in the claimed directory) and keys, and for a new one
        (True) the admin token and default policy."""
        s = self.settings
        created = not s.db_path.exists()
        try:
            s.keys_dir.mkdir(exist_ok=True)
            key_path = s.keys_dir / "signing.key"
            if not key_path.exists():
                _create_signing_key(key_path)
            if created:
                if not s.admin_token_path.exists():  # (a first start killed after it: kept)
                    write_secret_file(s.admin_token_path, new_token() + "\n")
                write_default_policies(s.policy_dir)
            else:
                # Neither again: an admin who removed every policy meant "deny everything",
                # and one who removed the token closed the admin API, as the running server
                # took it; a restart, or another command, must not open either (a token is
                # for 'mcp0 admin rotate-token' to write).
                s.policy_dir.mkdir(exist_ok=True)
            s.plugins_dir.mkdir(exist_ok=True)
            s.plugin_data_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot prepare data dir {s.data_dir}: {exc}") from exc
        return created

    def admin_token(self) -> str:
        """The token in the admin token file. Raises OSError, and UnicodeDecodeError for a
        file that is not UTF-8 text."""
        return self.settings.admin_token_path.read_text(encoding="utf-8").strip()

    def refresh_admin_token(self) -> bool:
        """Take up the admin token file again if it changed; True when it did.

        The token can be rotated without a restart (``mcp0 admin rotate-token``, or by
        rewriting the file). A missing, empty or unreadable file (not UTF-8 text, say)
        closes the admin API; it is logged once per change of the file.
        """
        path = self.settings.admin_token_path
        try:
            st = path.stat()
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._admin_token_seen:
            return False
        first, self._admin_token_seen = self._admin_token_seen is _UNSEEN, seen
        if seen is not None:  # (a token written by hand takes the umask)
            _make_private(path, "; if others could read it, replace it: mcp0 admin rotate-token")
        unreadable = None
        try:
            token = self.admin_token() if seen is not None else ""
        except (OSError, UnicodeDecodeError) as exc:
            unreadable, token = str(exc), ""
            log.error(
                "cannot read the admin token file %s (%s): the admin API refuses every "
                "request until it holds a token ('mcp0 admin rotate-token' writes a new one)",
                path,
                unreadable,
            )
        new_hash = hash_token(token) if token else None
        if new_hash == self.admin_token_hash:
            return False
        self.admin_token_hash = new_hash
        self._admin_token = token or None
        if new_hash is None and unreadable is None:
            log.warning("%s holds no token: the admin API refuses every request", path)
        elif not first:
            log.info("the admin token in %s changed: the old one no longer works", path)
        return True

    def install_examples(self) -> list[str]:
        """Install the bundled example plugins."""
        return [self.install_plugin(path, replace=True).manifest.name for path in example_plugins()]

    async def finish_first_start(self, *, record: bool = True) -> FirstStart:
        """Do the data dir's first start if it has not finished: install the example plugins
        (unless ``settings.examples`` is false) and, when there is no agent yet, create agent
        ``default`` with them. Returns the plugins installed and the new agent's token (shown
        once), or nothing when the first start was done before.

        Recorded as done only at the end (``record``; else by the caller, once it has shown
        the token), so a first start that died midway (kill -9, a full disk) is finished by
        the next one; if it died after making agent ``default``, whose token may never have
        been shown, that agent gets a new token (audited as ``spawn_agent`` with
        ``token_reissued``). Raises what the install and the spawn raise.
        """
        if self.store.first_start_done():
            return FirstStart([], None)
        installed = self.install_examples() if self.settings.examples else []
        token = None
        reissued = False
        default = self.store.get_agent("default")
        if default is not None and default.status == "active":
            token, reissued = self._reissue_token(default), True
        elif installed and not self.store.list_agents(limit=1):
            token = (await self.agents.spawn("default", installed, via="cli")).token
        if record:
            self.store.finish_first_start()
        return FirstStart(installed, token, reissued)

    def _reissue_token(self, agent: AgentRecord) -> str:
        """A new token for ``agent`` (the old one stops working), decided and audited as its
        spawn was."""
        decided = self._authorize(Verb.SPAWN_AGENT, agent.name, "cli")
        token = new_token()

        def reissue(stored: AgentRecord) -> None:
            if stored.status != "active" or stored.token_hash != agent.token_hash:
                raise Conflict(f"agent {agent.name!r} changed meanwhile: start again")
            stored.token_hash = hash_token(token)

        self.audit.append_with(
            lambda: self.store.change_agent(agent.name, reissue),
            lambda _: admin_event(
                Verb.SPAWN_AGENT,
                agent.name,
                "cli",
                Outcome.ALLOWED,
                {
                    **decided,
                    "plugins": agent.plugins,
                    "state_sha256": state_digest(agent.state),
                    "token_reissued": True,
                },
            ),
        )
        return token

    def install_plugin(
        self,
        path: Path,
        *,
        replace: bool = False,
        adopt_data: bool | str = False,
        via: str = "cli",
    ) -> Installed:
        """Install the plugin at ``path`` as the admin: decided by policy, audited. With
        ``adopt_data`` it gets data a removed plugin of its name left: the set-aside dir it
        names, or (True) the one there is (its record and the answer say which:
        ``adopted_data``, the directory's name under plugin-data/).

        Raises PolicyDenied, ManifestError, Conflict (see ``PluginHost.install``).
        """
        manifest = load_manifest(path)
        decided = self._authorize(Verb.INSTALL_PLUGIN, manifest.name, via)
        event = admin_event(
            Verb.INSTALL_PLUGIN,
            manifest.name,
            via,
            Outcome.ALLOWED,
            {**decided, "version": manifest.version},
        )

        def recorded(installed: Installed) -> dict[str, Any]:
            if installed.adopted_data is not None:
                return {**event, "adopted_data": installed.adopted_data}
            return event

        # the record is written in the transaction that records the plugin (the copy before)
        return self.plugins.install(
            path,
            replace=replace,
            adopt_data=adopt_data,
            commit=lambda write: self.audit.append_with(write, recorded),
            decided=manifest,  # (the file may have changed since: that one is not installed)
        )

    def remove_plugin(self, name: str, *, via: str = "cli") -> Removal:
        """Remove plugin ``name`` as the admin: decided by policy, audited (with the name its
        data dir was set aside under, ``data_kept``: a later install of the name gets it only
        when told to adopt it). Returns the agents it was detached from and that dir."""
        decided = self._authorize(Verb.REMOVE_PLUGIN, name, via)
        return self.plugins.remove(
            name,
            commit=lambda write: self.audit.append_with(
                write,
                lambda removal: admin_event(
                    Verb.REMOVE_PLUGIN,
                    name,
                    via,
                    Outcome.ALLOWED,
                    {
                        **decided,
                        "detached_from": removal.detached,
                        "data_kept": None if removal.data_kept is None else removal.data_kept.name,
                    },
                ),
            ),
        )

    def purge_plugin_data(self, directory: str, *, via: str = "cli") -> SetAside:
        """Delete ``directory``, a data dir a removal set aside in plugin-data/, as the admin:
        decided by policy (``purge_plugin_data`` on its plugin), audited (``data_purged``:
        its name, with its ``bytes``). Raises NotFound, PolicyDenied, StorageError."""
        where = self.settings.plugin_data_dir
        aside = plugin_data.find(where, directory)
        decided = self._authorize(Verb.PURGE_PLUGIN_DATA, aside.plugin, via)
        return plugin_data.purge(
            where,
            directory,
            self.store,
            lambda write: self.audit.append_with(
                write,
                lambda purged: admin_event(
                    Verb.PURGE_PLUGIN_DATA,
                    purged.plugin,
                    via,
                    Outcome.ALLOWED,
                    {**decided, "data_purged": purged.dir, "bytes": purged.bytes},
                ),
            ),
        )

    def _authorize(self, verb: Verb, resource: str, via: str) -> dict[str, Any]:
        """Ask the policy whether the admin may do this here: what the action's record is to
        say of the decision; a denial is audited and raised."""
        decision = admin_decision(
            self.policy, verb, resource, via, resource, count=self.metrics.count_denials
        )
        if decision.denial is not None:
            self.audit.append_sync(decision.denial[0])
            raise decision.denial[1]
        return decision.record

    async def start(
        self,
        *,
        wait: float | None = None,
        only: Collection[str] | None = None,
        wait_for: Collection[str] | None = None,
    ) -> None:
        """Start the plugin runtimes (those named in ``only``, if given), waiting ``wait``
        seconds at most for them, or for those named in ``wait_for`` (see
        ``PluginHost.refresh``), and the watcher that picks up plugin and policy changes.
        From here on the process is non-dumpable: its plugins' workers, though run by the
        same user, cannot read its environment or memory through ``/proc``. First, what
        governs it is recorded if the log lacks it (``record_what_governs``)."""
        await asyncio.to_thread(self.record_what_governs)
        try:
            # events an earlier run could not record (its calls had acted): said in the log
            await asyncio.to_thread(self.audit.record_lost_before)
        except StorageError as exc:  # (kept in the note for a later start, or resumption)
            log.error("could not record the audit events an earlier run lost: %s", exc)
        if self.audit.stats.failing:  # (found as it started: a full disk, a damaged record)
            log.error(
                "the audit log cannot be written (%s): every call is refused until it can",
                self.audit.stats.last_failure,
            )
        isolation.hide_process()
        # (the workers' answers wake the loop once per batch: WorkerOutputs)
        outputs = worker_outputs()
        outputs.on_call = self.audit.expect
        outputs.quick_s = self.settings.audit_window_ms / 1000
        self.audit.gather_from(outputs)
        self.kernel.answers = outputs
        await self.plugins.refresh(force=True, only=only, wait=wait, wait_for=wait_for)
        self._refresher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        next_checkpoint = 0.0  # the first at once: the records of the start
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            if time.monotonic() >= next_checkpoint:
                next_checkpoint = time.monotonic() + CHECKPOINT_INTERVAL_S
                try:
                    await asyncio.to_thread(self.store.checkpoint)
                except StorageError as exc:  # (a full disk: said where it matters, at writes)
                    log.warning("%s; trying again in %g s", exc, CHECKPOINT_INTERVAL_S)
            try:  # room for the audit log: none, and calls are refused before they act
                await asyncio.to_thread(self.audit.check_room)
                # (on the loop: its calls wait while another process holds the lock)
                self.audit.watch_lock()
            except Exception:
                log.exception("checking the audit log's room failed; looking again later")
            try:
                # not waiting for new plugins to start (their calls wait): a slow import
                # must not hold up the policies and the admin token below (found by review)
                if await self.plugins.refresh(wait=0):
                    # replaced copies no process can still run (as at start): a server up
                    # for months under frequent replaces keeps two hours' worth, not all
                    await asyncio.to_thread(self.plugins.sweep_copies)
            except Exception:
                log.exception("reloading plugins failed; serving the previous set")
            try:
                await self.refresh_policies()
            except Exception:
                log.exception("reloading policies failed; the previous set stays in force")
            # each step on its own: one that fails must not stop the watcher (the others
            # would never again be taken up until a restart)
            try:
                await self._refresh_admin_token_and_audit()
            except Exception:
                log.exception("taking up the admin token file failed; looking again later")

    async def _refresh_admin_token_and_audit(self) -> None:
        # one at a time: the watcher's and another caller's would both record a change
        async with self._admin_token_refreshing:
            await self._refresh_admin_token_and_audit_now()

    async def _refresh_admin_token_and_audit_now(self) -> None:
        # the log's position before a change taken up whose record could not be written yet
        # (a full disk): tried again at each poll until it is
        pending = self._admin_token_unrecorded
        # with no rotation between its record and its rename: else the position taken would
        # pass a record whose token is not in the file yet, and it would be recorded twice
        with rotations_held_off(self.settings.admin_token_path) as held_off:
            if not held_off:
                return  # a rotation is under way: look again at the next poll
            head = self.store.audit_head()
            changed = self.refresh_admin_token()
            # (read under the lock: no rotation's record can land between this and the file)
            quiet = not changed and pending is None
            recorded = self.store.recorded(ADMIN_TOKEN_RECORDED) if quiet else None
        token = self._admin_token
        if quiet:
            if recorded is not None and recorded != recorded_token_digest(token):
                # the log's last word is a token a command wrote and that was changed back
                # before this server looked: it records the one in force again (found by
                # review, as for the policies)
                await asyncio.to_thread(self._record_admin_token, token, {"restated": True})
            return
        since = self._admin_token_since if pending is None else pending
        if changed:
            self._admin_token_since = head.seq if head is not None else 0
        self._admin_token_unrecorded = since
        # a rotation (mcp0 admin rotate-token) recorded the change before putting it in force
        if token is None or not await asyncio.to_thread(
            rotation_recorded, self.store, token, since
        ):
            await asyncio.to_thread(self._record_admin_token, token, {})
        self._admin_token_unrecorded = None

    async def refresh_policies(self) -> bool:
        """Put changed policy files in force, or keep the old set if they do not load; the
        outcome is logged and audited. True when a new set was put in force."""
        resource = self.policy.policy_dir.name
        try:
            # in a thread: parsing and validating thousands of policies takes a second
            engine = await asyncio.to_thread(self.policy.changed)
        except PolicyError as exc:
            log.error("policy files changed but do not load; the previous set stays: %s", exc)
            await self._audit_file_change(
                LOAD_POLICIES, resource, Outcome.ERROR, {"code": exc.code, "message": exc.message}
            )
            return False
        if engine is None:
            if self.policy.files_in_force:
                await self._restate_policies(resource)
            return False
        detail = {"policies_sha256": engine.digest, "generation": self.policy.generation + 1}
        try:
            # recorded before it is in force: no call is decided by a set the log lacks
            await self._record_policies(resource, engine.digest, detail)
        except StorageError as exc:
            log.error(
                "policy files changed, but the audit log could not record it (%s): the "
                "previous set stays in force until it can",
                exc,
            )
            return False
        self.policy.put_in_force(engine)
        log.info("policy files changed: %d policies in force (%s)", len(engine.policies), resource)
        return True

    async def _restate_policies(self, resource: str) -> None:
        """Record the set in force again if the log's last word on the policies is another
        set: one a command recorded, changed back before this server looked (the log said it
        governed, while this server decided under its own: found by review)."""
        in_force = self.policy.engine.digest
        recorded = await asyncio.to_thread(self.store.recorded, POLICIES_RECORDED)
        if recorded is None or recorded == in_force:
            return
        detail = {"policies_sha256": in_force, "generation": self.policy.generation}
        try:
            await self._record_policies(resource, in_force, {**detail, "restated": True})
        except StorageError as exc:
            log.error("the policies in force could not be recorded again (%s)", exc)

    async def _record_policies(self, resource: str, digest: str, detail: dict[str, Any]) -> None:
        """Record the policy set of ``digest`` (``load_policies``), keeping its digest with
        it. Raises StorageError."""
        await asyncio.to_thread(
            self._record_file,
            LOAD_POLICIES,
            resource,
            Outcome.ALLOWED,
            detail,
            (POLICIES_RECORDED, digest),
        )

    async def _audit_file_change(
        self, verb: str, resource: str, outcome: Outcome, detail: dict[str, Any]
    ) -> None:
        # the change came from files in the data dir, not through an API
        await self.audit.submit(admin_event(verb, resource, "files", outcome, detail))

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.kernel.settle()  # (before the audit log closes: their records)
        await self.plugins.close()
        await self.audit.aclose()
        self.store.close()

    def close(self) -> None:
        """Close without a running loop (CLI commands): drain the audit log, close the store."""
        self.audit.close()
        self.store.close()
