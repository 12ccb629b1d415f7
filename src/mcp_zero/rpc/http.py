"""Streamable HTTP: MCP at ``/mcp``, the admin API at ``/api/v1``, ``/healthz``, ``/readyz``,
``/metrics`` — a lean ASGI application (no framework on the hot path).

POST /mcp carries one JSON-RPC message. A request is answered with
``application/json`` when its result comes before anything else; if the call
first sends progress, a log message or a request to the client, the answer
switches to an SSE stream (priming event first from MCP 2025-11-25; resumable with GET and
``Last-Event-ID``). GET /mcp without ``Last-Event-ID`` opens the session's
stream for server-initiated notifications, resumable in the same way (what it is
sent while no connection carries it is kept); DELETE ends the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from typing import Any

import orjson

from mcp_zero import memory
from mcp_zero.config import is_loopback
from mcp_zero.errors import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    MISSING_CLIENT_CAPABILITY,
    PARSE_ERROR,
    SHUTTING_DOWN,
    UNSUPPORTED_PROTOCOL_VERSION,
    HeaderMismatch,
    InvalidRequest,
    Unauthorized,
)
from mcp_zero.kernel.action import Principal
from mcp_zero.kernel.agents import Admission
from mcp_zero.rpc import jsonrpc
from mcp_zero.rpc.admin import AdminApi
from mcp_zero.rpc.asgi import (
    JSON_HEADERS,
    SSE_HEADERS,
    Receive,
    Scope,
    Send,
    accepts,
    header,
    headers_of,
    hostname,
    list_field,
    media_type,
    read_body,
    respond,
    respond_json,
)
from mcp_zero.rpc.envelope import (
    HANDSHAKE_VERSIONS,
    MODERN_VERSIONS,
    HttpHeaders,
    has_envelope,
    unsupported,
)
from mcp_zero.rpc.list_changes import ListChanges
from mcp_zero.rpc.server import McpServer
from mcp_zero.rpc.session import HEADER_VERSIONS, Session
from mcp_zero.rpc.streams import (
    MAX_BUFFERED_NOTICES,
    EventStream,
    ExchangeChannel,
    FinishedStreams,
    NoticeChannel,
    PostChannel,
    parse_event_id,
    session_header,
)
from mcp_zero.runtime import STARTUP_WAIT_S, Runtime

log = logging.getLogger("mcp_zero.http")
DROP_LOG_INTERVAL_S = 60.0  # an agent's dropped sessions are logged once a minute
READY_BLOCKED_S = 1.0  # /readyz says not ready once audit records wait this long for a lock
PARKED_CANCEL_WAIT_S = 5.0  # for parked calls cancelled at shutdown to record their end
_LOOPBACK_HOSTS = frozenset(("localhost", "127.0.0.1", "[::1]", "::1"))
_ALLOW = [(b"allow", b"GET, POST, DELETE, OPTIONS")]
_ALLOW_GET = [(b"allow", b"GET, HEAD")]
_PROBES = frozenset(("/healthz", "/readyz", "/metrics"))
_FORBIDDEN_ORIGIN = {"error": {"code": "forbidden_origin", "message": "origin not allowed"}}
_ALLOWED_HEADERS = (
    b"authorization, content-type, accept, mcp-session-id, mcp-protocol-version, "
    b"last-event-id, mcp-method, mcp-name"
)
_PREFLIGHT = [
    *_ALLOW,
    (b"access-control-allow-methods", b"GET, POST, DELETE"),
    (b"access-control-max-age", b"600"),
]
_PARAM_HEADER = re.compile(r"mcp-param-[0-9a-z!#$%&'*+.^_`|~-]+")  # an RFC 9110 token
_CORS_EXPOSED = (b"access-control-expose-headers", b"mcp-session-id, mcp-protocol-version")


# MCP 2026-07-28: the HTTP status of an error answered as JSON, so that proxies see it.
_ERROR_STATUS = {
    PARSE_ERROR: 400,
    INVALID_REQUEST: 400,
    INVALID_PARAMS: 400,
    HEADER_MISMATCH: 400,
    MISSING_CLIENT_CAPABILITY: 400,
    UNSUPPORTED_PROTOCOL_VERSION: 400,
    METHOD_NOT_FOUND: 404,
}

_MediaHeaders = tuple[bytes | None, bytes | None, bytes | None]
_MEDIA_REFUSALS = {406: "not_acceptable", 415: "unsupported_media_type"}  # data.code by status
# Verdicts by (Content-Type, Content-Encoding, Accept): a client sends the same ones on every
# call, and parsing Accept each time was ~1 µs of the hot path. Bounded: cleared when full.
_media_verdicts: dict[_MediaHeaders, tuple[int, str] | None] = {}


EPHEMERAL = "ephemeral"  # the id of a throwaway session (a POST without Mcp-Session-Id)
# The error that answers the POST of a request the client cancelled (as the MCP SDKs answer it)
REQUEST_CANCELLED = -32800
# What a throwaway session cannot do: a subscription is a session's, its updates go out on
# the session's GET stream, and what it holds is given back when the session ends.
_SESSION_METHODS = frozenset(("resources/subscribe", "resources/unsubscribe"))
# What a 401 carries (RFC 9110 11.6.1): the scheme that would be accepted
CHALLENGE = [(b"www-authenticate", b'Bearer realm="mcp0"')]


class _Allowed:
    """What ``allowed_origins`` lets in, lower-cased (origins and hosts are case-insensitive).

    An origin entry (``https://mcp.example.com``) is that Origin, and its host a Host: a proxy
    that passes on the Host and the Origin of one public name needs one entry. A host entry
    (``mcp.example.com``, ``mcp.example.com:8443``) is a Host, and the host of an Origin of any
    scheme. An entry without a port takes the host on any port."""

    __slots__ = ("hosts", "origin_hosts", "origins")

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.origins: set[str] = set()
        self.origin_hosts: set[str] = set()
        self.hosts: set[str] = set()
        for entry in entries:
            lowered = entry.strip().lower().rstrip("/")
            if "://" in lowered:
                self.origins.add(lowered)
                self.origin_hosts.add(lowered.split("://", 1)[1])
            else:
                self.hosts.add(lowered)

    def origin(self, origin: str) -> bool:
        lowered = origin.lower()
        return lowered in self.origins or self._host(lowered.split("://", 1)[-1], self.hosts)

    def host(self, host: str) -> bool:
        lowered = host.lower()
        return self._host(lowered, self.hosts) or self._host(lowered, self.origin_hosts)

    @staticmethod
    def _host(authority: str, listed: set[str]) -> bool:
        name = hostname(authority)
        return _loopback_host(name) or authority in listed or name in listed


# A host of digits, dots and 0x is an IPv4 address to a browser (127.1, 0x7f.0.0.1: the URL
# standard's IPv4 parser), never a DNS name; inet_aton reads the same forms (and ignores
# what follows a space, which this keeps out).
_IPV4_NUMBERS = re.compile(r"[0-9A-Fa-fXx.]+")


def _loopback_host(name: str) -> bool:
    """Whether ``name`` (a Host's or an origin's host, without its port) names loopback by
    what it is: ``localhost``, or a loopback IP address (``127.0.0.2``, ``127.1``,
    ``[::1]``). A DNS name never does, whatever it resolves to now: it can be made to
    resolve there (DNS rebinding); allowed_origins may name one."""
    if name in _LOOPBACK_HOSTS:
        return True
    if name.startswith("["):
        return name.endswith("]") and is_loopback(name[1:-1])
    if _IPV4_NUMBERS.fullmatch(name):
        try:
            return socket.inet_aton(name)[0] == 127
        except OSError:
            return False
    return False


def _unreadable_post(scope: Scope) -> tuple[int, str] | None:
    """The status (415, 406) and reason when a POST to /mcp is not sent as MCP's streamable
    HTTP transport asks (one JSON message; answers as JSON or an SSE stream); else None."""
    headers = headers_of(scope)
    accept = headers.get(b"accept")
    if accept is not None and len(headers) != len(scope["headers"]):  # (a field came twice)
        accept = list_field(scope, b"accept")
    sent = (headers.get(b"content-type"), headers.get(b"content-encoding"), accept)
    try:
        return _media_verdicts[sent]
    except KeyError:
        pass
    verdict = _media_verdict(*(None if v is None else v.decode("latin-1") for v in sent))
    if len(_media_verdicts) >= 64:
        _media_verdicts.clear()
    _media_verdicts[sent] = verdict
    return verdict


def _media_verdict(
    content_type: str | None, encoding: str | None, accept: str | None
) -> tuple[int, str] | None:
    if encoding is not None and encoding.strip().lower() != "identity":
        return 415, (
            f"Content-Encoding {encoding[:100]!r} is not supported: send the JSON-RPC message "
            "uncompressed"
        )
    if content_type is None or media_type(content_type) != "application/json":
        got = "none" if content_type is None else repr(content_type[:100])
        return 415, (
            "a POST to /mcp carries one JSON-RPC message as 'Content-Type: application/json' "
            f"(got {got})"
        )
    if not (accepts(accept, "application/json") and accepts(accept, "text/event-stream")):
        return 406, (
            "the answer to a POST to /mcp is JSON or an SSE stream: send 'Accept: "
            f"application/json, text/event-stream' (got {(accept or '')[:100]!r})"
        )
    return None


def _with_cors(send: Send, origin: str) -> Send:
    """``send`` with the CORS headers that let a page from ``origin`` use the response."""
    extra = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        _CORS_EXPOSED,
        (b"vary", b"origin"),
    ]

    async def cors_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return cors_send


def _preflight(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The answer to a CORS preflight: the headers we take, and the ``Mcp-Param-*`` headers
    (MCP 2026-07-28) the request asks for — a header list cannot name a prefix."""
    asked = header(scope, b"access-control-request-headers") or ""
    params = sorted(
        name
        for name in {h.strip().lower() for h in asked.split(",")}
        if _PARAM_HEADER.fullmatch(name)
    )
    allowed = ", ".join([_ALLOWED_HEADERS.decode(), *params]).encode("latin-1")
    return [*_PREFLIGHT, (b"access-control-allow-headers", allowed)]


def _stateless(version: str | None) -> bool:
    """Whether an MCP-Protocol-Version header asks for MCP 2026-07-28's rules: that version,
    or one we do not know (its rules answer with the versions we speak)."""
    return version is not None and version not in HEADER_VERSIONS


async def _unknown_session(send: Send, request_id: Any) -> None:
    """404 for a session id that names no session of the principal's (expired, ended, or
    another agent's): the client initializes a new one."""
    await respond_json(
        send,
        404,
        jsonrpc.error_message(
            request_id,
            -32001,
            "unknown_session",
            "unknown or expired session: initialize a new one",
        ),
    )


def _credential(admitted: Admission) -> str | None:
    """What binds a session opened by ``admitted`` to its token (Session.credential): the
    token's hash; None for a token-less caller (its anonymous agent has no token to rotate)."""
    return None if admitted.principal.anonymous else admitted.key


def _owns(session: Session, principal: Principal) -> bool:
    """Whether ``principal`` may use ``session``: the same agent, and token-less callers
    (--anonymous-agent) never a token holder's session, nor the other way round."""
    return (
        session.principal.agent == principal.agent
        and session.principal.anonymous == principal.anonymous
    )


def _busy(session: Session) -> bool:
    """Whether the session runs a request or has a stream that a connection carries."""
    return bool(session.inflight) or any(s.attached for s in session.streams.values())


async def _until_disconnect(receive: Receive) -> dict[str, Any]:
    """The ``http.disconnect`` message, once it comes (the body was read already)."""
    message = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()
    return message


# A quiet GET stream gets an SSE comment this often: proxies that drop idle connections
# (nginx: 60 s) keep it, and a client that vanished is found when the write fails.
SSE_KEEPALIVE_S = 25.0


class HttpApp:
    """The ASGI application of one runtime."""

    def __init__(self, runtime: Runtime, *, on_loopback_only: bool | None = None) -> None:
        """``on_loopback_only``: whether every address the server listens on is a loopback
        one (None: whether its host resolves to loopback addresses only)."""
        self.runtime = runtime
        self.settings = runtime.settings
        self.server = McpServer(
            runtime.kernel,
            page_size=runtime.settings.page_size,
            # a listen stream is to 2026-07-28 what a session's GET stream is to 2025
            max_listeners=runtime.settings.max_sessions,
            max_listeners_per_agent=runtime.settings.max_sessions_per_agent,
        )
        self.server.sessions = self._listening_sessions
        self.admin = AdminApi(runtime, self.server)
        self.sessions: dict[str, Session] = {}
        self.ready = False
        self._janitor: asyncio.Task[None] | None = None
        self.list_changes = ListChanges(
            runtime.kernel,
            runtime.agents,
            self._listening_sessions,
            lambda: self.server.listeners.values(),
            self._end_revoked,
            self.server.principals_at_work,
            self.server.end_agent,
            self.server.transport,
        )
        self._list_watch: asyncio.Task[None] | None = None
        self._loopback_only = (
            runtime.settings.on_loopback_only() if on_loopback_only is None else on_loopback_only
        )
        self._allowed = _Allowed(runtime.settings.allowed_origins)
        self.sse_keepalive_s = SSE_KEEPALIVE_S
        self.finished = FinishedStreams()  # finished SSE streams, kept a minute for a resume
        # per agent: when its sessions were last logged as dropped, and how many since
        self._drops_logged: dict[str, tuple[float, int]] = {}
        #: How often an agent's dropped sessions are logged (a line, with the count since).
        self.drop_log_interval_s = DROP_LOG_INTERVAL_S

    # -- lifespan ---------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        await self.runtime.start(wait=STARTUP_WAIT_S)
        self.runtime.plugins.on_change = self.list_changes.poke
        self.runtime.plugins.on_resource_updated = self.server.announce_resource_updated
        self.runtime.agents.on_change = self.list_changes.poke
        self._janitor = asyncio.create_task(self._expire_sessions())
        self._list_watch = asyncio.create_task(self.list_changes.run())
        self.ready = True
        memory.trim()  # what the start left in the heap (plugin indexes, policies): ~1 MiB

    async def shutdown(self) -> None:
        self.ready = False
        self.runtime.plugins.on_change = None
        self.runtime.plugins.on_resource_updated = None
        self.runtime.agents.on_change = None
        # calls parked on a 2026-07-28 client's retry run in no request the server waits
        # for: cancelled here, they record their end before the audit log closes (found
        # by a bug hunt: on stdio, where nothing else gave them the time, they did not)
        parked = self.server.end_listeners()
        if parked:
            await asyncio.wait(parked, timeout=PARKED_CANCEL_WAIT_S)
        for task in (self._janitor, self._list_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for session in self.sessions.values():
            session.close()
        await self.runtime.aclose()

    async def _expire_sessions(self) -> None:
        # every minute, or a quarter of a shorter idle time (a session goes at most that
        # late), but not more than once a second (the setting may be a millisecond)
        period = max(1.0, min(60.0, self.settings.session_idle_s / 4))
        while True:
            await asyncio.sleep(period)
            await self.expire_idle()
            memory.trim()  # what ended sessions, streams and answers left in the heap

    async def expire_idle(self, now: float | None = None) -> list[str]:
        """End the sessions idle for ``session_idle_s`` at ``now`` (default: now, on the
        monotonic clock); their ids. A session is idle while the client sends it nothing,
        runs no request in it and holds none of its streams open."""
        cutoff = (time.monotonic() if now is None else now) - self.settings.session_idle_s
        idle = [s.id for s in self.sessions.values() if s.last_seen < cutoff and not _busy(s)]
        for sid in idle:
            await self._close_session(self.sessions.pop(sid))
        return idle

    async def _make_room_for(self, principal: Principal) -> bool:
        """Drop the principal's least recently used session that runs no request if it has
        as many as it may (token-less callers of --anonymous-agent and the agent's token
        holder count apart: neither may use, nor push out, the other's sessions); False
        when every one runs one (a running call is not cut off for a new session: the new
        one is refused). A GET stream held open does not keep its session: kept open by
        keepalives for as long as its client likes, it would lock the agent out."""
        mine = [s for s in self.sessions.values() if _owns(s, principal)]
        if len(mine) < self.settings.max_sessions_per_agent:
            return True
        idle = [s for s in mine if not s.inflight]
        if not idle:
            return False
        oldest = min(idle, key=lambda s: s.last_seen)
        self._log_dropped(principal.agent, oldest.id)
        await self._close_session(self.sessions.pop(oldest.id))
        return True

    def _log_dropped(self, agent: str, session_id: str) -> None:
        """Log that ``agent``'s session was dropped for a new one, once a minute an agent
        (a client opening sessions in a loop must not fill the log), with the count since."""
        now = time.monotonic()
        interval = self.drop_log_interval_s
        last, since = self._drops_logged.get(agent, (now - interval, 0))
        if now - last < interval:
            self._drops_logged[agent] = (last, since + 1)
            return
        if len(self._drops_logged) >= 1024:  # terminated agents' entries go in time
            for name, (when, _) in list(self._drops_logged.items()):
                if now - when >= interval:
                    del self._drops_logged[name]
        self._drops_logged[agent] = (now, 0)
        more = f" ({since} more dropped since its last such line)" if since else ""
        log.info(
            "agent %r opened more sessions than it may: dropping %s%s", agent, session_id, more
        )

    def _listening_sessions(self) -> list[tuple[Session, NoticeChannel | None]]:
        return [
            (s, NoticeChannel(s.notices) if s.notices is not None else None)
            for s in self.sessions.values()
        ]

    # -- routing ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one ASGI connection: the lifespan's events, or an HTTP request by its path
        (routed here, not in a method of its own: every level of ``await`` is paid again at
        each suspension of a call)."""
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/mcp" or path == "/mcp/":
            origin = header(scope, b"origin")
            if not self._origin_allowed(scope, origin):
                await respond_json(
                    send,
                    403,
                    jsonrpc.error_message(
                        None,
                        -32600,
                        "forbidden_origin",
                        "request refused: Host/Origin is not an allowed origin of this server "
                        "(DNS-rebinding protection); add it to allowed_origins if it is yours",
                    ),
                )
                return
            if origin is not None:
                # A browser's page from an allowed origin (checked above): let it read the
                # answers and the session header (CORS); other clients send no Origin.
                send = _with_cors(send, origin)
            version = header(scope, b"mcp-protocol-version")
            if method == "POST":
                await self._post(scope, receive, send, version)
            elif (
                method in ("GET", "DELETE")
                and _stateless(version)
                and version not in MODERN_VERSIONS
            ):
                # a version we do not speak: 400, as the transport asks of an unsupported one
                assert version is not None
                await respond_json(
                    send, 400, jsonrpc.error_from_exception(None, unsupported(version[:100]))
                )
            elif method in ("GET", "DELETE") and version is not None and _stateless(version):
                await respond(
                    send,
                    405,
                    f"MCP {version[:40]} has no sessions: POST each request (server-sent "
                    "notifications come on a subscriptions/listen request)".encode(),
                    [(b"allow", b"POST"), (b"content-type", b"text/plain; charset=utf-8")],
                )
            elif method == "GET":
                await self._get(scope, receive, send)
            elif method == "DELETE":
                await self._delete(scope, send)
            elif method == "OPTIONS":  # a CORS preflight, or a client asking what we take
                await respond(send, 204, b"", _preflight(scope) if origin is not None else _ALLOW)
            else:
                await respond(send, 405, b"", _ALLOW)
        elif path in _PROBES and method not in ("GET", "HEAD"):
            await respond(send, 405, b"", _ALLOW_GET)  # (they answered anything: by review)
        elif path == "/healthz":
            await respond_json(send, 200, {"status": "ok"})
        elif path == "/readyz":
            # not ready while the audit log cannot be written (calls are refused then), nor
            # while its records have waited a while for another process's lock (calls wait)
            audit = self.runtime.audit
            writable = audit.writable()
            since = audit.stats.blocked_since
            blocked = since is not None and time.monotonic() - since >= READY_BLOCKED_S
            ready = self.ready and writable and not blocked
            answer: dict[str, Any] = {"ready": ready}
            if not writable:
                answer["audit"] = "failing"
            elif blocked:
                answer["audit"] = "blocked"
            await respond_json(send, 200 if ready else 503, answer)
        elif path == "/metrics":
            if not self._origin_allowed(scope, header(scope, b"origin")):
                # (a page on another host, through DNS rebinding, read a loopback server's
                # counters: found by review)
                await respond_json(send, 403, _FORBIDDEN_ORIGIN)
                return
            if not (self._loopback_only or self.settings.metrics_public):
                # Beyond loopback the counters (agents' activity, policy ids) are the
                # administrator's: the admin token, unless metrics_public says otherwise.
                try:
                    self.admin.check_admin(header(scope, b"authorization"), "/metrics")
                except Unauthorized as exc:
                    self.runtime.metrics.count_unauthorized("metrics")
                    await respond_json(
                        send,
                        401,
                        {"error": exc.to_dict()},
                        CHALLENGE,
                    )
                    return
            body, content_type = self.runtime.metrics.render()
            await respond(send, 200, body, [(b"content-type", content_type.encode())])
        elif path.startswith("/api/v1/"):
            if not self._origin_allowed(scope, header(scope, b"origin")):
                await respond_json(send, 403, _FORBIDDEN_ORIGIN)
                return
            body, error = await read_body(receive, self.settings.max_body_bytes)
            if error is not None:
                await respond_json(send, error.http_status, {"error": error.to_dict()})
                return
            try:
                status, payload, headers = await self.admin.handle(
                    method,
                    path[len("/api/v1") :],
                    header(scope, b"authorization"),
                    body,
                    scope.get("query_string", b"").decode(),
                )
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or not task.cancelling() or exc.args != (SHUTTING_DOWN,):
                    raise
                # Cut off by a stopping server after its grace period: an answer to retry
                # on, as an MCP call gets, not a connection closed with none
                task.uncancel()
                message = "the server is shutting down and stopped this request; retry it"
                status, payload = 503, {"error": {"code": "server_stopping", "message": message}}
                headers = []
            if status == 401:
                headers = CHALLENGE
            if payload is None:  # (204)
                await respond(send, status, b"", headers)
            else:
                await respond_json(send, status, payload, headers)
        else:
            await respond_json(
                send, 404, {"error": {"code": "not_found", "message": f"no route {path}"}}
            )

    def _origin_allowed(self, scope: Scope, origin: str | None) -> bool:
        """Whether the request's Origin (``origin``) and Host may reach this server. An
        opaque origin (``null``: a sandboxed iframe's, a file:// page's) is no allowed one:
        its page could be anyone's."""
        if origin is not None and not self._allowed.origin(origin):
            return False
        if self._loopback_only:
            host = header(scope, b"host")
            if host is not None and not _loopback_host(hostname(host)):
                return self._allowed.host(host)
        return True

    # -- MCP --------------------------------------------------------------------------------

    def _admission(self, scope: Scope) -> Admission:
        """The agent the request's bearer token stands for. Raises Unauthorized."""
        auth = header(scope, b"authorization")
        token = None
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("the Authorization header must be 'Bearer <token>'")
            token = value.strip()
        return self.runtime.agents.admit(token)

    def _authenticate(self, scope: Scope) -> Admission:
        """:meth:`_admission`; a refusal is counted."""
        try:
            admitted = self._admission(scope)
        except Unauthorized:
            self.runtime.metrics.count_unauthorized("mcp")
            raise
        if scope.get("mcp0.body_withheld"):  # (its token became valid while it was sent)
            raise Unauthorized("the request's token was not valid when it came: send it again")
        return admitted

    def vet_body(self, scope: Scope) -> bool:
        """Whether the body of the request whose head is ``scope`` is worth reading (the
        HTTP server asks as the head comes, rpc/wire.py): only what carries the credentials
        its path needs; others are answered 401 from their headers, their bodies dropped."""
        path = scope["path"]
        try:
            if path == "/mcp" or path == "/mcp/":
                scope["mcp0.admitted"] = self._admission(scope)
                return True
            if path.startswith("/api/v1/"):
                self.admin.check_admin(header(scope, b"authorization"))
                return True
        except Unauthorized:
            return False
        return False  # (no other path reads a body)

    async def _post(self, scope: Scope, receive: Receive, send: Send, version: str | None) -> None:
        """A POST to /mcp; ``version`` is its MCP-Protocol-Version header."""
        t0 = time.perf_counter()
        body, error = await read_body(receive, self.settings.max_body_bytes)
        if error is not None:
            await respond_json(send, 413, jsonrpc.error_from_exception(None, error))
            return
        admitted: Admission | None = scope.get("mcp0.admitted")
        try:
            if admitted is None or not self.runtime.agents.stands(admitted):
                # No body, or what its head was found to stand for no longer holds: its agent
                # changed while the body came (a terminate: its token works no more, for a
                # request under way too: found by review), or is due to be read again
                admitted = self._authenticate(scope)
            principal = admitted.principal
        except Unauthorized as exc:
            await respond_json(
                send,
                401,
                jsonrpc.error_from_exception(None, exc),
                CHALLENGE,
            )
            return
        self.runtime.metrics.observe_stage("auth", time.perf_counter() - t0)
        refused = _unreadable_post(scope)
        if refused is not None:
            status, reason = refused
            answer = jsonrpc.error_message(None, -32600, _MEDIA_REFUSALS[status], reason)
            await respond_json(send, status, answer)
            return
        try:
            message = jsonrpc.decode(body)
        except InvalidRequest as exc:
            await respond_json(send, 400, jsonrpc.error_from_exception(jsonrpc.error_id(exc), exc))
            return
        del body  # (decoded: a request that lasts, a listen stream, keeps not its bytes too)
        session_id = header(scope, b"mcp-session-id")
        if _stateless(version) or (
            version is None
            and session_id is None
            and isinstance(message, jsonrpc.Request)
            and has_envelope(message.params)
        ):
            await self._post_stateless(scope, receive, send, admitted, message, version)
            return
        if (
            session_id is None
            and isinstance(message, jsonrpc.Request)
            and has_envelope(message.params)  # (a 2025 header on a 2026-07-28 request)
        ):
            mismatch = HeaderMismatch(
                f"the MCP-Protocol-Version header says {version}, but the request carries "
                "MCP 2026-07-28's envelope (params._meta protocolVersion)"
            )
            await respond_json(send, 400, jsonrpc.error_from_exception(message.id, mismatch))
            return
        if isinstance(message, jsonrpc.Request) and message.method == "initialize":
            # (only for one McpServer._initialize takes: a refused one pushes out none)
            taken = isinstance(message.params.get("protocolVersion"), str)
            if taken and not await self._make_room_for(principal):
                busy = (
                    f"agent {principal.agent!r} has {self.settings.max_sessions_per_agent} "
                    "sessions open (max_sessions_per_agent), each running a request: end one "
                    "(DELETE) or retry when one has answered"
                )
                await respond_json(
                    send,
                    503,
                    jsonrpc.error_message(message.id, -32000, "too_many_sessions", busy),
                )
                return
            if len(self.sessions) >= self.settings.max_sessions:
                await respond_json(
                    send,
                    503,
                    jsonrpc.error_message(
                        message.id,
                        -32000,
                        "too_many_sessions",
                        "too many open sessions; retry later",
                    ),
                )
                return
            session = Session(principal, credential=_credential(admitted))
            self.list_changes.seen(session)
            self.sessions[session.id] = session
        elif session_id is not None:
            found = self.sessions.get(session_id)
            if found is None or not _owns(found, principal):
                await _unknown_session(send, getattr(message, "id", None))
                return
            session = found
            session.last_seen = time.monotonic()  # a notification or an answer counts too
            # The agent's plugins may have changed since initialize. (Not compared: an equal
            # principal is as good, and the same object makes the policy's cache key cheap.)
            if found.principal is not principal:
                session.principal = principal
        else:
            # No session header: a self-contained request (curl, stateless clients), under the
            # version it declares (a 2025-06-18 client's schema failure is -32602: found by
            # review)
            session = Session(principal, id=EPHEMERAL, credential=_credential(admitted))
            if version in HANDSHAKE_VERSIONS:
                session.protocol_version = version
        if isinstance(message, jsonrpc.Notification):
            self.server.handle_notification(session, message)
            await respond(send, 202, b"", [])
            return
        if isinstance(message, jsonrpc.Response):
            self.server.handle_response(session, message)
            if message.problem is not None:
                # (the transport's error for an answer has no id: it answers no request)
                malformed = jsonrpc.error_from_exception(None, InvalidRequest(message.problem))
                await respond_json(send, 400, malformed)
            else:
                await respond(send, 202, b"", [])
            return
        channel = PostChannel(session, send, self.settings.sse_buffer_bytes)
        if session.id == EPHEMERAL:  # no session to end: its agent's termination stops it
            if message.method in _SESSION_METHODS:
                # (a subscription it took would be lost: no stream to deliver on, and the
                # server's budget never given back: found by review)
                refusal = InvalidRequest(
                    f"{message.method} needs a session: initialize one and send its "
                    "Mcp-Session-Id (resource updates come on the session's GET stream)"
                )
                await respond_json(send, 400, jsonrpc.error_from_exception(message.id, refusal))
                return
            with self.server.running_alone(session):
                response = await self.server.handle_request(session, message, channel)
        else:
            response = await self.server.handle_request(session, message, channel)
        session.last_seen = time.monotonic()  # idle from the end of a long call, not its start
        if response is None:
            # Cancelled by notifications/cancelled, which MCP answers with nothing; but the
            # POST of a request is answered with JSON or a stream, and a stream (replayed
            # too) ends with the answer to its request.
            response = jsonrpc.error_message(
                message.id, REQUEST_CANCELLED, "cancelled", "Request cancelled"
            )
        elif message.method == "initialize" and "error" in response:
            self.sessions.pop(session.id, None)  # a refused initialize opens no session
            session.id = EPHEMERAL  # (and its answer names none)
        stream = channel.stream
        if stream is None:
            await respond(send, 200, orjson.dumps(response), JSON_HEADERS + session_header(session))
            return
        await stream.push(response, wait=True)  # after the call: it holds up no one
        await channel.finish()
        if session.id == EPHEMERAL:
            session.streams.pop(stream.id, None)  # no session to resume it in: not kept
        else:
            # keep the finished stream a little for a client that is about to resume
            self.finished.keep(session.streams, stream.id)

    async def _post_stateless(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        admitted: Admission,
        request: jsonrpc.Message,
        version: str | None,
    ) -> None:
        """A POST of MCP 2026-07-28 (or of a version we do not know, which its rules
        answer): every request stands alone. Notifications have nothing to act on (a client
        cancels by closing the request's stream), and no request of ours awaits an answer."""
        if not isinstance(request, jsonrpc.Request):
            if version is not None and version not in MODERN_VERSIONS:
                # (a cancel or an answer with a version we do not speak: refused, not lost)
                await respond_json(
                    send, 400, jsonrpc.error_from_exception(None, unsupported(version[:100]))
                )
            else:
                await respond(send, 202, b"", [])
            return
        if (
            version is not None
            and version not in MODERN_VERSIONS
            and not has_envelope(request.params)
        ):
            # neither a version we speak nor a 2026-07-28 request: say which we speak
            answer = jsonrpc.error_from_exception(request.id, unsupported(version))
            await respond_json(send, 400, answer)
            return
        connection = Session(admitted.principal, id=EPHEMERAL, credential=_credential(admitted))
        channel = ExchangeChannel(send)

        async def until_disconnect() -> None:
            message = await _until_disconnect(receive)
            ended = self.server.end_listener(channel, request.id)
            if not ended and not message.get("mcp0.server_stopping"):
                if message.get("mcp0.dropped"):
                    return  # we dropped a client that stopped reading: the call goes on
                # Closing the stream is how a 2026-07-28 client cancels (audited as such).
                channel.gone = True
                self.server.cancel(connection, request.id)

        watcher = asyncio.create_task(until_disconnect())
        try:
            response = await self.server.handle_stateless_request(
                connection, request, channel, HttpHeaders.from_asgi(scope["headers"])
            )
        finally:
            watcher.cancel()
        if channel.started:
            await channel.finish(response)
        elif response is None:
            with contextlib.suppress(OSError):  # the client left: nobody to answer
                await respond(send, 202, b"", [])
        else:
            error = response.get("error")
            status = _ERROR_STATUS.get(error.get("code"), 200) if error else 200
            await respond(send, status, orjson.dumps(response), JSON_HEADERS)

    async def _get(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            principal = self._authenticate(scope).principal
        except Unauthorized as exc:
            await respond_json(send, 401, jsonrpc.error_from_exception(None, exc), CHALLENGE)
            return
        # RFC 9110, as for POST: "text/plain, */*;q=0" refuses it, no Accept takes anything
        accept = list_field(scope, b"accept")
        if not accepts(None if accept is None else accept.decode("latin-1"), "text/event-stream"):
            await respond(
                send,
                406,
                b"GET /mcp answers with an SSE stream: send 'Accept: text/event-stream'",
                [(b"content-type", b"text/plain")],
            )
            return
        session = await self._session_of(scope, principal, send)
        if session is None:
            return
        last = header(scope, b"last-event-id")
        if last is not None:
            parsed = parse_event_id(last)
            stream = session.streams.get(parsed[0]) if parsed else None
            # a finished stream whose events the total bound took is gone, as after its minute
            if stream is None or parsed is None or (stream.spent and parsed[1] < stream.count):
                await respond_json(
                    send,
                    404,
                    jsonrpc.error_message(
                        None,
                        -32001,
                        "unknown_stream",
                        f"no stream to resume for Last-Event-ID {last[:100]!r}",
                    ),
                )
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": SSE_HEADERS + session_header(session),
                }
            )
            # the headers go out now, not with the first event: there may be none for long
            await send({"type": "http.response.body", "body": b"", "more_body": True})
            await self._carry(session, stream, parsed[1], receive, send)
            return
        previous = session.notices
        if previous is not None and previous.attached:
            await respond_json(
                send,
                409,
                jsonrpc.error_message(
                    None, -32600, "conflict", "this session already has an open GET stream"
                ),
            )
            return
        if previous is not None:  # not resumed: what it kept for a resume is not wanted
            session.streams.pop(previous.id, None)
        # Kept after its connection drops, with what it is sent meanwhile, for a resume.
        stream = EventStream(keep=MAX_BUFFERED_NOTICES, keep_total=self.settings.sse_buffer_bytes)
        session.streams[stream.id] = stream
        session.notices = stream
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": SSE_HEADERS + session_header(session),
            }
        )
        primed = stream.priming(session.protocol_version)
        await send({"type": "http.response.body", "body": primed, "more_body": True})
        await self._carry(session, stream, 0, receive, send)

    async def _carry(
        self, session: Session, stream: EventStream, after: int, receive: Receive, send: Send
    ) -> None:
        """Carry ``stream`` on this response from event number ``after`` on, taking it over
        from the connection it had, until the stream is done with this one (it closed, or a
        newer resume took it over) or the client goes; keepalive comments while it is quiet.
        The session is not idle meanwhile: it is idle from the end of this."""
        session.last_seen = time.monotonic()
        conn = await stream.attach(after, send)
        watcher = asyncio.create_task(_until_disconnect(receive))
        ended = asyncio.create_task(conn.ended.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {ended, watcher},
                    timeout=self.sse_keepalive_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if conn.ended.is_set():  # perhaps before ``ended`` had its turn to see it
                    return
                if watcher in done:
                    stream.lost(conn)
                    return
                try:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b": keepalive\n\n",
                            "more_body": True,
                        }
                    )
                except OSError:
                    stream.lost(conn)
                    return
        finally:
            watcher.cancel()
            ended.cancel()
            session.last_seen = time.monotonic()

    async def _delete(self, scope: Scope, send: Send) -> None:
        try:
            principal = self._authenticate(scope).principal
        except Unauthorized as exc:
            await respond_json(send, 401, jsonrpc.error_from_exception(None, exc), CHALLENGE)
            return
        session = await self._session_of(scope, principal, send)
        if session is None:
            return
        await self._close_session(self.sessions.pop(session.id))
        await respond(send, 204, b"", [])

    async def _session_of(self, scope: Scope, principal: Principal, send: Send) -> Session | None:
        """The principal's session the GET or DELETE names; None when there is none, and
        the request was answered: 400 without ``Mcp-Session-Id`` (a 404 tells a client its
        session expired, and it would initialize again), 404 for one unknown or not its."""
        session_id = header(scope, b"mcp-session-id")
        if session_id is None:
            message = "this request needs the Mcp-Session-Id header of an initialized session"
            await respond_json(
                send, 400, jsonrpc.error_message(None, -32600, "invalid_request", message)
            )
            return None
        session = self.sessions.get(session_id)
        if session is None or not _owns(session, principal):
            await _unknown_session(send, None)
            return None
        return session

    async def _end_revoked(self, session: Session, why: str) -> None:
        """The session's agent was terminated, or its token rotated (``why``): end it (its
        calls, its streams)."""
        if self.sessions.get(session.id) is session:
            log.info("agent %r %s: ending its session %s", session.principal.agent, why, session.id)
            await self._close_session(self.sessions.pop(session.id))

    async def _close_session(self, session: Session) -> None:
        """End ``session``: its calls, and its GET stream's connection (its client would
        otherwise hold it open for a session that is gone). A call's own stream stays open
        until the call has answered (-32001 session_ended, once audited): its POST ends it
        then, as it ends every call's stream (MCP: a server should not close a request's
        stream before its response)."""
        session.close()
        if session.notices is not None:
            await session.notices.close()
