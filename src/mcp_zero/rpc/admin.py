"""The admin API under ``/api/v1`` (bearer: the admin token from ``<data dir>/admin.token``).

GET    /agents?after=NAME&limit=N      list agents
POST   /agents                         spawn {name, plugins?, state?} → agent + token (once)
GET    /agents/{name}                  one agent
DELETE /agents/{name}                  terminate
POST   /agents/{name}/token            rotate its token → agent + new token (once)
POST   /agents/{name}/plugins          attach {plugin}
POST   /agents/{name}/execute          call a tool as the agent {tool, arguments?}
POST   /agents/{name}/snapshot         → {snapshot_id}
POST   /snapshots/{id}/recover         restore the agent from a snapshot
GET    /plugins                        installed plugins
GET    /plugins/{name}                 one plugin with its tools
GET    /audit?after=N&limit=M          audit records
GET    /audit/verify                   verify the hash chain
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload
from urllib.parse import parse_qs

import orjson

from mcp_zero.audit.chain import (
    HASH_MISMATCH,
    NOT_CANONICAL,
    ChainBroken,
    canonical,
    hash_matches,
    read_event,
    verify_store,
)
from mcp_zero.errors import (
    Conflict,
    InvalidRequest,
    McpZeroError,
    NotFound,
    PluginNotFound,
    Unauthorized,
    shown,
)
from mcp_zero.kernel.agents import agent_view, issued_view, recovery_view
from mcp_zero.rpc.jsonrpc import WIDE_INTEGER, wide_integer
from mcp_zero.rpc.session import Session
from mcp_zero.sandbox.isolation import MEASURES
from mcp_zero.security.tokens import hash_token

if TYPE_CHECKING:
    from mcp_zero.rpc.server import McpServer
    from mcp_zero.runtime import Runtime
    from mcp_zero.storage.base import AuditEntry

JSON = dict[str, Any]
Headers = list[tuple[bytes, bytes]]
AUDIT_PAGE_MAX = 10_000  # records one GET /audit returns at most
AGENT_PAGE_MAX = 10_000  # agents one GET /agents?limit=N returns at most
Route = Callable[[re.Match[str], JSON, dict[str, list[str]]], Awaitable[tuple[int, Any]]]


def _fields(names: str) -> frozenset[str]:
    return frozenset(names.split())


_NO_BODY: frozenset[str] = frozenset()


def _check_fields(payload: JSON, fields: frozenset[str]) -> None:
    unknown = sorted(set(payload) - fields)
    if unknown:
        takes = f"it takes {', '.join(sorted(fields))}" if fields else "it takes no body"
        shown = ", ".join(repr(f[:64]) for f in unknown[:10])
        raise InvalidRequest(f"unknown field(s) {shown} in the request body: {takes}")


def _check_params(query: dict[str, list[str]], params: frozenset[str]) -> None:
    unknown = sorted(set(query) - params)
    if unknown:
        takes = f"it takes {', '.join(sorted(params))}" if params else "it takes none"
        shown = ", ".join(repr(p[:64]) for p in unknown[:10])
        raise InvalidRequest(f"unknown query parameter(s) {shown}: {takes}")


@dataclass(frozen=True, slots=True)
class _Route:
    """An admin route: its method and path, its handler, and the body fields and query
    parameters it takes. Any other is refused, and nothing done: a mistyped "plugin" for
    "plugins" must not create an agent without its plugins, nor "limt" for "limit" give a
    page other than the one asked for."""

    method: str
    path: re.Pattern[str]
    handler: Route
    fields: frozenset[str] = _NO_BODY
    params: frozenset[str] = frozenset()


def _allowed(methods: list[str]) -> str:
    """The Allow header of a path whose routes take ``methods``: HEAD with GET, and OPTIONS."""
    allowed: list[str] = []
    for method in methods:
        allowed += ("GET", "HEAD") if method == "GET" else (method,)
    return ", ".join([*allowed, "OPTIONS"])


class _NoBridge:
    """The admin's execute has no MCP client behind it: no progress, no sampling."""

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        return None

    async def log(self, level: str, data: Any, logger: str | None) -> None:
        return None

    async def close_stream(self) -> None:
        return None

    async def resource_updated(self, uri: str) -> None:
        return None

    async def request(self, method: str, params: JSON, key: str | None = None) -> JSON:
        raise McpZeroError(f"{method} needs an MCP client; call this tool over /mcp instead")


def plugin_view(record_manifest: JSON, *, tools: bool) -> JSON:
    out: JSON = {
        "name": record_manifest["name"],
        "version": record_manifest["version"],
        "runtime": record_manifest.get("runtime"),
        "description": record_manifest.get("description", ""),
    }
    if tools:
        out["tools"] = record_manifest.get("tools", [])
        out["resources"] = record_manifest.get("resources", [])
        out["resourceTemplates"] = record_manifest.get("resourceTemplates", [])
        out["prompts"] = record_manifest.get("prompts", [])
        out["quotas"] = record_manifest.get("quotas", {})
        out["capabilities"] = record_manifest.get("capabilities", {})
    return out


class AdminApi:
    def __init__(self, runtime: Runtime, server: McpServer | None = None) -> None:
        self.runtime = runtime
        self.server = server  # whose end_agent stops an execute when its agent is terminated
        page = _fields("after limit")  # (the query parameters of a route that lists)
        one_agent = r"/agents/(?P<name>[^/]+)"
        self._routes = [
            _Route("GET", re.compile(r"/agents/?\Z"), self._list_agents, params=page),
            _Route("POST", re.compile(r"/agents/?\Z"), self._spawn, _fields("name plugins state")),
            _Route("GET", re.compile(rf"{one_agent}\Z"), self._get_agent),
            _Route("DELETE", re.compile(rf"{one_agent}\Z"), self._terminate),
            _Route("POST", re.compile(rf"{one_agent}/token\Z"), self._rotate_token),
            _Route("POST", re.compile(rf"{one_agent}/plugins\Z"), self._attach, _fields("plugin")),
            _Route(
                "POST",
                re.compile(rf"{one_agent}/execute\Z"),
                self._execute,
                _fields("tool arguments request_id"),
            ),
            _Route("POST", re.compile(rf"{one_agent}/snapshot\Z"), self._snapshot),
            _Route("POST", re.compile(r"/snapshots/(?P<id>[^/]+)/recover\Z"), self._recover),
            _Route("GET", re.compile(r"/plugins/?\Z"), self._list_plugins),
            _Route("GET", re.compile(r"/plugins/(?P<name>[^/]+)\Z"), self._get_plugin),
            _Route("GET", re.compile(r"/audit/?\Z"), self._audit, params=page),
            _Route("GET", re.compile(r"/audit/verify\Z"), self._verify),
        ]

    async def handle(
        self, method: str, path: str, authorization: str | None, body: bytes, query: str
    ) -> tuple[int, Any, Headers]:
        """Route one admin request; returns (HTTP status, JSON body or None for none, headers
        to add). HEAD is run as GET (the HTTP server sends no body); OPTIONS is answered with
        the methods the path takes, and a method it does not take 405 with them (RFC 9110)."""
        try:
            try:
                self.check_admin(authorization)
            except Unauthorized:
                self.runtime.metrics.count_unauthorized("admin")
                raise
            asked = "GET" if method == "HEAD" else method
            taken: list[str] = []  # the methods of the routes of this path
            for route in self._routes:
                match = route.path.match(path)
                if match is None:
                    continue
                taken.append(route.method)
                if route.method == asked:
                    payload: Any = orjson.loads(body) if body.strip() else {}
                    if not isinstance(payload, dict):
                        raise InvalidRequest("the request body must be a JSON object")
                    if (where := wide_integer(body)) is not None:  # (read as a float: changed)
                        raise InvalidRequest(
                            f"the value at {where} in the request body {WIDE_INTEGER}",
                            data={"path": where},
                        )
                    _check_fields(payload, route.fields)
                    # (blank values kept: "after=" is refused, not taken for absent)
                    query_params = parse_qs(query, keep_blank_values=True)
                    _check_params(query_params, route.params)
                    status, answer = await route.handler(match, payload, query_params)
                    return status, answer, []
            # (a path may be 64 KiB: its start, as agent names are shown)
            where = shown(f"/api/v1{path}")
            if not taken:
                raise NotFound(f"no admin route {method[:20]} {where}")
            allow = [(b"allow", _allowed(taken).encode())]
            if method == "OPTIONS":
                return 204, None, allow
            message = f"{where} takes {_allowed(taken)}, not {method[:20]}"
            return 405, {"error": {"code": "method_not_allowed", "message": message}}, allow
        except orjson.JSONDecodeError as exc:
            return 400, {"error": {"code": "parse_error", "message": f"invalid JSON: {exc}"}}, []
        except McpZeroError as exc:
            return exc.http_status, {"error": exc.to_dict()}, []

    def check_admin(self, authorization: str | None, what: str = "the admin API") -> None:
        """Raise Unauthorized unless ``authorization`` (the header) carries the admin token;
        ``what`` names what the token opens, for the error message."""
        scheme, _, token = (authorization or "").partition(" ")
        expected = self.runtime.admin_token_hash
        if expected is None:
            raise Unauthorized(
                f"{what} is closed: {self.runtime.settings.admin_token_path} holds no "
                "token ('mcp0 admin rotate-token' writes one)"
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            hash_token(token.strip()), expected
        ):
            raise Unauthorized(
                f"{what} needs 'Authorization: Bearer <admin token>' "
                "(the token is in <data dir>/admin.token)"
            )

    async def _list_agents(
        self, m: re.Match[str], body: JSON, q: dict[str, list[str]]
    ) -> tuple[int, Any]:
        # A page (?after=NAME&limit=N) or, without a limit, all: 21,000 agents are 2 MB, read
        # off the event loop; ?limit was ignored (found by review)
        after = _one(q, "after", "")
        limit = _page_size(q, None, AGENT_PAGE_MAX)
        agents = self.runtime.agents
        return 200, await asyncio.to_thread(
            lambda: [agent_view(a) for a in agents.list_agents(after, limit)]
        )

    async def _spawn(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        name = body.get("name")
        plugins = body.get("plugins", [])
        state = body.get("state", {})
        if not isinstance(name, str):
            raise InvalidRequest('"name" must be a string')
        if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
            raise InvalidRequest('"plugins" must be a list of plugin names')
        if not isinstance(state, dict):
            raise InvalidRequest('"state" must be an object')
        return 201, issued_view(await self.runtime.agents.spawn(name, plugins, state))

    async def _get_agent(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        return 200, agent_view(self.runtime.agents.get(m["name"]))

    async def _terminate(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        return 200, agent_view(await self.runtime.agents.terminate(m["name"]))

    async def _rotate_token(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        return 200, issued_view(await self.runtime.agents.rotate_token(m["name"]))

    async def _attach(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        plugin = body.get("plugin")
        if not isinstance(plugin, str):
            raise InvalidRequest('"plugin" must be a string')
        return 200, agent_view(await self.runtime.agents.attach(m["name"], plugin))

    async def _execute(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        tool = body.get("tool")
        arguments = body.get("arguments", {})
        # The caller's id for the call, so its audit record can be found; one is made up else.
        request_id = body.get("request_id", f"admin-{secrets.token_hex(8)}")
        if not isinstance(tool, str) or not isinstance(arguments, dict):
            raise InvalidRequest('"tool" must be a string and "arguments" an object')
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 200:
            raise InvalidRequest('"request_id" must be a string of 1 to 200 characters')
        # An unknown or terminated agent is the request's fault, not a bad admin token (401).
        agent = self.runtime.agents.get(m["name"])
        if agent.status != "active":
            raise Conflict(f"agent {agent.name!r} is {agent.status}; recover it from a snapshot")
        session = Session(self.runtime.agents.principal(agent.name), id="admin")
        alone = self.server.running_alone(session) if self.server else contextlib.nullcontext()
        with alone:
            try:
                result = await self.runtime.kernel.call_tool(
                    session.principal,
                    tool,
                    arguments,
                    _NoBridge(),
                    request_id=request_id,
                    transport="admin",
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not session.closed or task is None or not task.cancelling():
                    raise
                task.uncancel()  # (its agent was terminated: an answer, not a dropped one)
                raise Conflict(
                    f"agent {agent.name!r} was terminated while the call ran; it was stopped"
                ) from None
        return 200, result

    async def _snapshot(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        snap = await self.runtime.agents.snapshot(m["name"])
        return 201, {"snapshot_id": snap.id, "agent": snap.agent, "data": snap.data}

    async def _recover(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        return 200, recovery_view(await self.runtime.agents.recover(m["id"]))

    async def _list_plugins(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        return 200, [
            self._with_state(plugin_view(r.manifest, tools=False))
            for r in self.runtime.store.list_plugins()
        ]

    async def _get_plugin(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        record = self.runtime.store.get_plugin(m["name"])
        if record is None:
            raise PluginNotFound(f"no plugin named {shown(m['name'])} is installed")
        return 200, self._with_state(plugin_view(record.manifest, tools=True))

    def _with_state(self, view: JSON) -> JSON:
        """``view`` and whether this server serves the plugin (``starting``: not yet, its
        calls wait for it; ``error``: why not)."""
        host = self.runtime.plugins
        error = host.failed.get(view["name"])
        if error is None and view["name"] not in host.runtimes:
            error = "not loaded yet: the server takes installs up within a second"
        if error is None:  # (a start that failed, and is tried again)
            error = getattr(host.runtimes[view["name"]], "start_failure", None)
        starting = error is None and view["name"] in host.starting
        view["running"] = error is None and not starting
        if view["running"]:  # what of the sandbox held on this host (docs/plugins.md)
            held = getattr(host.runtimes[view["name"]], "sandbox", {})
            view["sandbox"] = {measure: bool(held.get(measure)) for measure in MEASURES}
        failing = getattr(host.runtimes.get(view["name"]), "failures_in_a_row", 0)
        if failing:  # (a crash loop: its calls wait for restarts, which back off)
            view["failures_in_a_row"] = failing
        if starting:
            view["starting"] = True
        if error is not None:
            view["error"] = error
        return view

    async def _audit(
        self, m: re.Match[str], body: JSON, q: dict[str, list[str]]
    ) -> tuple[int, Any]:
        after = _whole_number(q, "after", "0")
        if not 0 <= after < 1 << 63:  # (past 64 bits SQLite cannot bind the number at all)
            raise InvalidRequest("after must be from 0 to 2**63 - 1")
        limit = _page_size(q, "100", AUDIT_PAGE_MAX)
        store = self.runtime.store
        # a full page is tens of ms of reading and decoding: off the event loop too
        return 200, await asyncio.to_thread(
            lambda: [audit_view(e) for e in store.read_audit(after, limit)]
        )

    async def _verify(self, m: re.Match[str], body: JSON, q: Any) -> tuple[int, Any]:
        try:
            # ~8 µs a record: a log of millions takes minutes, which the event loop, serving
            # every governed call, must not spend; the store's reads are thread-safe.
            report = await asyncio.to_thread(verify_store, self.runtime.store)
        except ChainBroken as exc:
            return 200, {"ok": False, "seq": exc.seq, "reason": exc.reason}
        return 200, {
            "ok": True,
            "count": report.count,
            "head_seq": report.head_seq,
            "head_hash": report.head_hash,
        }


@overload
def _page_size(q: dict[str, list[str]], default: str, most: int) -> int: ...
@overload
def _page_size(q: dict[str, list[str]], default: None, most: int) -> int | None: ...
def _page_size(q: dict[str, list[str]], default: str | None, most: int) -> int | None:
    """Query parameter ``limit`` (``default`` if absent; None for none), at most ``most``;
    refused below 1 (SQLite reads a negative LIMIT as none: the whole table)."""
    if default is None and "limit" not in q:
        return None
    limit = _whole_number(q, "limit", default or "0")
    if limit < 1:
        raise InvalidRequest("limit must be 1 or more")
    return min(limit, most)


def _one(q: dict[str, list[str]], name: str, default: str) -> str:
    """Query parameter ``name`` (``default`` if absent), which may be given once."""
    given = q.get(name, [default])
    if len(given) > 1:
        raise InvalidRequest(f"{name} is given {len(given)} times; give it once")
    return given[0]


def _whole_number(q: dict[str, list[str]], name: str, default: str) -> int:
    """Query parameter ``name`` (``default`` if absent), in decimal digits only: int() also
    takes "1_0", " 40" and other scripts' digits, which no client means as a number."""
    text = _one(q, name, default)
    if not (text.isascii() and text.isdigit()):
        raise InvalidRequest(f"{name} must be a whole number in the digits 0-9, not {text!r}")
    digits = text.lstrip("0")
    # past 19 digits, more than any bound here (int() would refuse past 4,300)
    return int(digits or "0") if len(digits) <= 19 else 1 << 64


def audit_view(entry: AuditEntry) -> JSON:
    """An audit entry as the admin API and ``mcp0 audit list --json`` show it. One altered or
    damaged since it was written, as far as it alone tells (its hash does not match, its body
    holds no event or is not in canonical form), has ``"damaged"``: why, and what could be read
    of it; verifying the log tells more (``audit verify``: the chain)."""
    stored = {"seq": entry.seq, "hash": entry.hash, "prev_hash": entry.prev_hash}
    try:
        event = read_event(entry)
    except ChainBroken as exc:
        return {**stored, "damaged": exc.reason}
    try:
        in_form = canonical(event) == entry.body
    except TypeError:  # nested deeper than the encoder goes, as an answer would be
        return {**stored, "damaged": NOT_CANONICAL}
    # where a body names them too (none we wrote does), the store's seq and hashes stand
    view = {**stored, **event, **stored}
    if not hash_matches(entry):
        view["damaged"] = HASH_MISMATCH
    elif not in_form:
        view["damaged"] = NOT_CANONICAL
    return view
