"""Agents: spawn, list, get, attach a plugin, execute, snapshot, recover, rotate the token,
terminate.

An agent is a principal with a bearer token (kept only as a hash), the plugins
attached to it, and free-form state. Every change is an audited action.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from mcp_zero.audit.log import AuditLog
from mcp_zero.errors import (
    AgentNotFound,
    Conflict,
    InvalidParams,
    PluginNotFound,
    SnapshotNotFound,
    StorageError,
    Unauthorized,
    shown,
)
from mcp_zero.kernel.action import Outcome, Principal, Verb
from mcp_zero.kernel.admin import AdminDecision, admin_decision, admin_event, decided_together
from mcp_zero.kernel.admin_token import ADMIN_TOKEN_RECORDED, recorded_token_digest
from mcp_zero.policy.store import PolicyStore
from mcp_zero.security.tokens import hash_token, new_token
from mcp_zero.storage.base import AgentRecord, SnapshotRecord, Store

JSON = dict[str, Any]
T = TypeVar("T")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# How long a token's agent is remembered before the store is asked again. Changes made
# through this process invalidate at once; changes by another process (the CLI) within this.
PRINCIPAL_TTL_S = 2.0


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An agent and the bearer token it was just given (by a spawn or a rotation)."""

    agent: AgentRecord
    token: str  # shown once; only its hash is stored


@dataclass(frozen=True, slots=True)
class Admission:
    """The principal a token (or the anonymous agent) was found to stand for, remembered
    until ``until`` (``time.monotonic()``) unless its agent changes first:
    :meth:`AgentService.stands` tells whether it still is, without hashing the token again."""

    principal: Principal
    until: float
    key: str  # (its place among the remembered principals)
    # the hash of the agent's token as the store held it then ("" for none): a session or
    # stream opened with another token ends (the token was rotated since)
    token_hash: str = ""


@dataclass(frozen=True, slots=True)
class Recovery:
    """An agent restored from a snapshot, and the plugins it had then that were not
    attached again (name -> why): the plugin installed under that name now is another."""

    agent: AgentRecord
    not_restored: dict[str, str]


def recovery_view(recovery: Recovery) -> JSON:
    """A recovery as the admin API and ``--json`` output show it: the agent and
    ``not_restored``."""
    return {**agent_view(recovery.agent), "not_restored": _listed(recovery.not_restored)}


def _listed(not_restored: dict[str, str]) -> list[JSON]:
    """``not_restored`` as the answers and the audit record show it: a list of
    ``{"plugin", "reason"}``."""
    return [{"plugin": plugin, "reason": reason} for plugin, reason in not_restored.items()]


def agent_view(agent: AgentRecord) -> JSON:
    """An agent as the admin API and ``--json`` output show it (never the token hash)."""
    return {
        "name": agent.name,
        "plugins": list(agent.plugins),
        "state": agent.state,
        "status": agent.status,
        "created_at": agent.created_at,
    }


def issued_view(issued: IssuedToken) -> JSON:
    """A spawn's or a rotation's answer (admin API, ``--json``): the agent and its token."""
    return {**agent_view(issued.agent), "token": issued.token}


def check_name(name: str, what: str = "agent") -> str:
    if not _NAME.match(name):
        raise InvalidParams(
            f"invalid {what} name {shown(name)}: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def check_new_name(name: str) -> str:
    """``name``, if a new agent may be given it. Raises InvalidParams."""
    check_name(name)
    if name.lower() == "admin":
        # the administrator is Agent::"admin" to Cedar and "admin" in audit records
        raise InvalidParams(
            "'admin' names the administrator in policies and audit records; choose "
            "another agent name"
        )
    return name


def require_agent(store: Store, name: str) -> AgentRecord:
    """Agent ``name`` from ``store``. Raises AgentNotFound."""
    agent = store.get_agent(name)
    if agent is None:
        raise AgentNotFound(f"no agent named {shown(name)}: 'mcp0 agent list' shows them")
    return agent


def _not_terminated(agent: AgentRecord) -> None:
    if agent.status == "terminated":
        raise Conflict(
            f"agent {agent.name!r} is already terminated; recover it from a snapshot "
            "('mcp0 agent recover SNAPSHOT_ID') to use it again",
            data={"agent": agent.name},
        )


# orjson writes 254 levels of nesting; the answers that carry an agent's state hold it at
# most 2 levels down (GET /agents: a list of agents; a snapshot: its "data"), so a state
# (itself a level) may nest 252, or some answer that shows it could not be written.
MAX_STATE_DEPTH = 252


def _check_state(state: JSON, what: str = '"state"') -> None:
    """Refuse a state that could be stored but not shown again: JSON answers (orjson) end
    at 254 levels, and the listing of agents and snapshots nest it 2 levels down."""
    try:
        orjson.dumps([[state]])  # as deep as the deepest answer that carries it
    except TypeError as exc:
        raise InvalidParams(
            f"{what} cannot be stored: it may nest at most {MAX_STATE_DEPTH} levels, since "
            f"agent listings and snapshots show it 2 levels down in the 254 a JSON answer "
            f"may have ({exc})",
            data={"path": "/state", "max_depth": MAX_STATE_DEPTH},
        ) from None


def state_digest(state: JSON) -> str:
    """What an audit record keeps of an agent's state, as of a tool call's arguments: their
    SHA-256 (of canonical JSON), not the state, which may hold personal data."""
    return hashlib.sha256(orjson.dumps(state, option=orjson.OPT_SORT_KEYS)).hexdigest()


class _AttachedAlready(Exception):
    """The plugin is attached to the agent already: nothing to change, nor to record."""

    def __init__(self, agent: AgentRecord) -> None:
        super().__init__(agent.name)
        self.agent = agent


class AgentService:
    """Agent lifecycle on a store, audited through an audit log."""

    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        *,
        policy: PolicyStore | None = None,
        anonymous_agent: str | None = None,
        count_denials: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.policy = policy
        self.anonymous_agent = anonymous_agent
        self._count_denials = count_denials  # (the metrics' denial counter)
        self._principals: dict[str, Admission] = {}
        # Told when an agent's plugins or status change here (the transports' list-change
        # checks: its sessions hear of it, or end, at once rather than within a second).
        self.on_change: Callable[[], None] | None = None

    # -- authentication -------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal:
        """The principal a bearer token stands for; the anonymous agent for no token when
        one is configured. Raises Unauthorized."""
        return self.admit(token).principal

    def admit(self, token: str | None) -> Admission:
        """:meth:`authenticate`, with how long its answer holds (:meth:`stands`)."""
        if not token:
            if self.anonymous_agent is None:
                raise Unauthorized(
                    "missing bearer token: send 'Authorization: Bearer <token>' "
                    "(create one with 'mcp0 agent create NAME')"
                )
            return self._admit(self.anonymous_agent, anonymous=True)
        token_hash = hash_token(token)
        now = time.monotonic()
        cached = self._principals.get(token_hash)
        if cached is not None and cached.until > now:
            return cached
        agent = self.store.agent_by_token_hash(token_hash)
        if agent is None or agent.status != "active":
            raise Unauthorized(self._refusal(token))
        principal = Principal(agent.name, frozenset(agent.plugins))
        if cached is not None and cached.principal == principal:
            # The same object while nothing changed: caches keyed by the principal (policy
            # decisions, sessions) then find it by identity, without comparing fields.
            principal = cached.principal
        if len(self._principals) > 10_000:
            self._principals.clear()
        admitted = self._principals[token_hash] = Admission(
            principal, now + PRINCIPAL_TTL_S, token_hash, token_hash
        )
        return admitted

    def stands(self, admitted: Admission) -> bool:
        """Whether :meth:`admit` would give ``admitted`` again now (its agent unchanged here,
        and not to be read again from the store yet): one look-up, no hash."""
        return self._principals.get(admitted.key) is admitted and admitted.until > time.monotonic()

    def _refusal(self, token: str) -> str:
        """Why ``token`` is no agent's: also when it is the admin token, which a newcomer
        sends to /mcp (that tells its sender nothing it did not know: it sent the token)."""
        try:
            admin = self.store.recorded(ADMIN_TOKEN_RECORDED)  # (as the log last recorded it)
        except StorageError:
            admin = None
        if admin and hmac.compare_digest(admin, recorded_token_digest(token)):
            return (
                "this is the admin token, for the admin API (/api/v1); MCP takes an agent's "
                "token ('mcp0 agent create NAME' prints one)"
            )
        return "invalid or revoked bearer token"

    def _admit(self, name: str, *, anonymous: bool = False) -> Admission:
        # The anonymity is part of the key: a token-less caller and the admin's execute may
        # name the same agent, and each must be audited (and judged by policy) as it is.
        key = ("anon:" if anonymous else "name:") + name
        now = time.monotonic()
        cached = self._principals.get(key)
        if cached is not None and cached.until > now:
            return cached
        agent = self.store.get_agent(name)
        if agent is None or agent.status != "active":
            raise Unauthorized(f"agent {name!r} does not exist or was terminated")
        principal = Principal(agent.name, frozenset(agent.plugins), anonymous=anonymous)
        admitted = self._principals[key] = Admission(
            principal, now + PRINCIPAL_TTL_S, key, agent.token_hash
        )
        return admitted

    def principal(self, name: str, *, anonymous: bool = False) -> Principal:
        """The principal of agent ``name`` (stdio sessions, the admin's execute)."""
        return self._admit(name, anonymous=anonymous).principal

    def admission(self, name: str, *, anonymous: bool = False) -> Admission:
        """:meth:`principal`, with the hash of the agent's token now (``token_hash``): what
        the list-change checks compare a session's token with. Raises Unauthorized."""
        return self._admit(name, anonymous=anonymous)

    def forget(self, name: str) -> None:
        """Drop what is remembered of agent ``name`` (another process changed it): its next
        authentication reads the store."""
        self._forget(name)

    def forget_all(self) -> None:
        """Drop what is remembered of every agent: their next authentications read the store
        (the plugins changed: a removal detached a plugin from its agents in another process,
        and one installed under its name must not be taken for the one they had)."""
        self._principals = {}

    def _forget(self, name: str) -> None:
        self._principals = {k: v for k, v in self._principals.items() if v.principal.agent != name}

    def _changed(self, name: str) -> None:
        self._forget(name)
        if self.on_change is not None:
            self.on_change()

    # -- lifecycle --------------------------------------------------------------------------

    async def spawn(
        self,
        name: str,
        plugins: list[str] | None = None,
        state: JSON | None = None,
        *,
        via: str = "admin",
    ) -> IssuedToken:
        """Create agent ``name``. Raises Conflict, InvalidParams, PluginNotFound."""
        check_new_name(name)
        decided = [await self._authorize(Verb.SPAWN_AGENT, name, via)]
        plugins = list(dict.fromkeys(plugins or []))
        for plugin in plugins:  # each as a standalone attach: a policy on it holds here too
            decided.append(await self._authorize(Verb.ATTACH_PLUGIN, name, via, plugin=plugin))
        _check_state(state or {})
        token = new_token()
        record = AgentRecord(
            name=name,
            token_hash=hash_token(token),
            plugins=plugins,
            state=state or {},
            status="active",
            created_at=time.time(),
        )

        def create() -> None:
            # in the write transaction: a plugin removed meanwhile is refused, not granted
            self._check_plugins(plugins)
            self.store.create_agent(record)

        await self._audited(
            Verb.SPAWN_AGENT,
            name,
            via,
            decided_together(decided),
            create,
            lambda _: {"plugins": plugins, "state_sha256": state_digest(record.state)},
        )
        return IssuedToken(record, token)

    def list_agents(self, after: str = "", limit: int | None = None) -> list[AgentRecord]:
        """The agents named after ``after``, by name; at most ``limit`` (None: all)."""
        return self.store.list_agents(after, limit)

    def get(self, name: str) -> AgentRecord:
        return require_agent(self.store, name)

    async def attach(self, name: str, plugin: str, *, via: str = "admin") -> AgentRecord:
        """Attach ``plugin`` to agent ``name``. Raises AgentNotFound, PluginNotFound, and
        Conflict for a terminated agent. A plugin attached already is left so, and its
        attach not recorded again (nothing changed; a denial is recorded all the same)."""
        self.get(name)
        decided = await self._authorize(Verb.ATTACH_PLUGIN, name, via, plugin=plugin)

        def attach(agent: AgentRecord) -> None:
            # checked in the write transaction: a remove of the plugin that commits after
            # this attach began is either seen here or waits for it, and then detaches it
            self._check_plugins([plugin])
            _not_terminated(agent)  # (its token no longer works: recover it from a snapshot)
            if plugin in agent.plugins:
                raise _AttachedAlready(agent)  # (its transaction ends, writing nothing)
            agent.plugins.append(plugin)

        try:
            agent = await self._audited(
                Verb.ATTACH_PLUGIN,
                name,
                via,
                decided,
                lambda: self.store.change_agent(name, attach),
                lambda _: {"attached": plugin},
            )
        except _AttachedAlready as already:
            return already.agent
        self._changed(name)
        return agent

    async def terminate(self, name: str, *, via: str = "admin") -> AgentRecord:
        """Revoke agent ``name``: its token stops working at once (in this process).

        Raises AgentNotFound, and Conflict when the agent is terminated already (also by
        another process at the same time): it is not terminated, nor audited, twice.
        """
        self.get(name)
        decided = await self._authorize(Verb.TERMINATE_AGENT, name, via)

        def terminate(agent: AgentRecord) -> None:
            _not_terminated(agent)
            agent.status = "terminated"  # only that: its plugins are as stored now

        agent = await self._audited(
            Verb.TERMINATE_AGENT,
            name,
            via,
            decided,
            lambda: self.store.change_agent(name, terminate),
            lambda _: {},
        )
        self._changed(name)
        return agent

    async def rotate_token(self, name: str, *, via: str = "admin") -> IssuedToken:
        """Give agent ``name`` a new token: the old one stops working at once in this
        process, within ``PRINCIPAL_TTL_S`` in another that serves it. The record says
        nothing of either token (as a spawn's).

        A terminated agent's token is rotated too, and it stays terminated: a recover brings
        it back with the new token, not with one that was terminated for leaking.

        Raises AgentNotFound.
        """
        self.get(name)
        decided = await self._authorize(Verb.ROTATE_AGENT_TOKEN, name, via)
        token = new_token()

        def rotate(agent: AgentRecord) -> None:
            agent.token_hash = hash_token(token)

        agent = await self._audited(
            Verb.ROTATE_AGENT_TOKEN,
            name,
            via,
            decided,
            lambda: self.store.change_agent(name, rotate),
            lambda _: {},
        )
        self._changed(name)
        return IssuedToken(agent, token)

    async def snapshot(self, name: str, *, via: str = "admin") -> SnapshotRecord:
        """Persist the agent's plugins (and which installed copy of each), state and status;
        returns the snapshot (with its id)."""
        self.get(name)
        decided = await self._authorize(Verb.SNAPSHOT_AGENT, name, via)

        def take() -> SnapshotRecord:
            # read in the write transaction its record is made in: the agent as it is at the
            # record's place in the log, not before a terminate or attach that came between
            agent = self.get(name)
            copies = {}
            for plugin in agent.plugins:
                record = self.store.get_plugin(plugin)
                if record is not None:
                    copies[plugin] = {"version": record.version, "sha256": record.digest}
            snap = SnapshotRecord(
                id="snap_" + secrets.token_hex(12),
                agent=name,
                data={
                    "plugins": list(agent.plugins),
                    "plugin_copies": copies,
                    "state": agent.state,
                    "status": agent.status,
                },
                created_at=time.time(),
            )
            self.store.put_snapshot(snap)
            return snap

        return await self._audited(
            Verb.SNAPSHOT_AGENT,
            name,
            via,
            decided,
            take,
            lambda snap: {"snapshot_id": snap.id},
        )

    async def recover(self, snapshot_id: str, *, via: str = "admin") -> Recovery:
        """Restore an agent from a snapshot (also after terminate); its token is kept.

        A plugin is attached again only if the policy lets the admin attach it (the
        ``attach_plugin`` decision of a standalone attach, a denial audited as one) and the
        copy installed under its name is the one the snapshot saw (same files), checked in
        the write transaction; one refused, removed, upgraded or replaced by another plugin
        since is left out and reported in ``not_restored``, as in the audit record:
        granting the agent a plugin it never had is an attach, for the admin to decide.

        A snapshot of the agent terminated, recovered while it is active, terminates it:
        that is decided as a terminate too (``terminate_agent``), and a denial of it refuses
        the recover. Bringing a terminated agent back is what ``recover_agent`` decides.

        Raises SnapshotNotFound, AgentNotFound, PolicyDenied, InvalidParams for a snapshot
        whose state nests too deep to be shown (taken before that was refused), and Conflict
        when another process made the agent active after that was decided.
        """
        snap = self.store.get_snapshot(snapshot_id)
        if snap is None:
            raise SnapshotNotFound(f"no snapshot {shown(snapshot_id)}")
        current = self.get(snap.agent)
        name = current.name
        status = str(snap.data.get("status", "active"))
        terminates = status == "terminated" and current.status == "active"
        decided = [await self._authorize(Verb.RECOVER_AGENT, name, via)]
        if terminates:  # (the recover allowed: no await since, so decided by the same set)
            decided.append(await self._authorize(Verb.TERMINATE_AGENT, name, via))
        state = dict(snap.data.get("state", {}))
        _check_state(state, f"the state of snapshot {snapshot_id!r}")
        wanted = list(dict.fromkeys(snap.data.get("plugins", [])))
        # every attach decided before a denial is audited (an await, during which another
        # set may come into force): the recover and its attaches are decided by one set
        decisions = {
            plugin: admin_decision(
                self.policy, Verb.ATTACH_PLUGIN, name, via, plugin, count=self._count_denials
            )
            for plugin in wanted
        }
        refused = {}
        attach_decided = {}  # (of the plugins the policy lets the admin attach)
        for plugin, decision in decisions.items():
            if decision.denial is not None:
                await self.audit.append(decision.denial[0])
                why = decision.denial[1].message
                refused[plugin] = f"the policy does not let the admin attach it: {why}"
            else:
                attach_decided[plugin] = decision.record
        copies = snap.data.get("plugin_copies") or {}
        not_restored: dict[str, str] = {}

        def restore(agent: AgentRecord) -> None:
            if status == "terminated" and agent.status == "active" and not terminates:
                # (terminated when the recover was decided: its terminate was not)
                raise Conflict(
                    f"agent {name!r} was recovered by another process meanwhile; recover "
                    f"{snapshot_id!r} again to terminate it",
                    data={"agent": name},
                )
            not_restored.clear()  # (run again if the audit chain moved meanwhile)
            plugins = []
            for plugin in wanted:
                why = refused.get(plugin) or self._changed_since(plugin, copies.get(plugin))
                if why is None:
                    plugins.append(plugin)
                else:
                    not_restored[plugin] = why
            agent.plugins = plugins
            agent.state = state
            agent.status = status

        def detail(agent: AgentRecord) -> JSON:
            # the decisions that allowed what was done: the recover (and the terminate it
            # makes) and the attaches again
            done: JSON = decided_together([*decided, *(attach_decided[p] for p in agent.plugins)])
            # what the agent became: its token works again, or no more, by this record
            done.update(
                snapshot_id=snapshot_id,
                status=agent.status,
                plugins=agent.plugins,
                state_sha256=state_digest(agent.state),
            )
            if not_restored:
                done["not_restored"] = _listed(not_restored)
            return done

        agent = await self._audited(
            Verb.RECOVER_AGENT,
            name,
            via,
            {},
            lambda: self.store.change_agent(name, restore),
            detail,
        )
        self._changed(name)
        return Recovery(agent, dict(not_restored))

    def _changed_since(self, plugin: str, then: Any) -> str | None:
        """Why plugin ``plugin`` as installed now is not the copy a snapshot saw (``then``:
        its ``{"version", "sha256"}``), or None when it is."""
        now = self.store.get_plugin(plugin)
        if now is None:
            return "it is not installed any more"
        again = "attach it again ('mcp0 agent attach') if the agent is to have it"
        if not isinstance(then, dict) or not then.get("sha256") or not now.digest:
            return f"which copy of it the snapshot saw is not known (an older install); {again}"
        if then["sha256"] == now.digest:
            return None
        if then.get("version") != now.version:
            return (
                f"the plugin installed under this name now (version {now.version}) is not the "
                f"one the snapshot saw (version {then.get('version')}); {again}"
            )
        return (
            f"the plugin installed under this name now has other files than the one the "
            f"snapshot saw (both version {now.version}); {again}"
        )

    def _check_plugins(self, plugins: list[str]) -> None:
        for plugin in plugins:
            if self.store.get_plugin(plugin) is None:
                raise PluginNotFound(
                    f"no plugin named {shown(plugin)} is installed: 'mcp0 plugin list' shows them"
                )

    async def _authorize(
        self, verb: Verb, resource: str, via: str, *, plugin: str | None = None
    ) -> JSON:
        """Ask the policy whether the admin may do this here: what the action's record is to
        say of the decision (``AdminDecision.record``); a denial is audited and raised."""
        decision = await self._decide(verb, resource, via, plugin)
        if decision.denial is not None:
            raise decision.denial[1]
        return decision.record

    async def _decide(
        self, verb: Verb, resource: str, via: str, plugin: str | None = None
    ) -> AdminDecision:
        """The policy's decision on whether the admin may do this here, a denial audited."""
        decision = admin_decision(
            self.policy, verb, resource, via, plugin, count=self._count_denials
        )
        if decision.denial is not None:
            await self.audit.append(decision.denial[0])
        return decision

    async def _audited(
        self,
        verb: Verb,
        resource: str,
        via: str,
        decided: JSON,
        change: Callable[[], T],
        detail: Callable[[T], JSON],
    ) -> T:
        """Make ``change`` and its ``allowed`` record (what ``decided`` it, and ``detail``
        of its result) in one transaction: no change without its record, even if the process
        dies in between.

        In a thread: the transaction may wait for another process's write lock (a CLI
        command), up to the store's busy timeout, and the loop serves calls meanwhile."""
        return await asyncio.to_thread(
            self.audit.append_with,
            change,
            lambda done: admin_event(
                verb, resource, via, Outcome.ALLOWED, {**decided, **detail(done)}
            ),
        )
