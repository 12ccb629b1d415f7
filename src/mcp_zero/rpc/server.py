"""MCP method dispatch, independent of transport.

A transport authenticates the caller, finds or makes the session, decodes one
message and hands it here with a :class:`Channel` for messages related to it.
Every governed method goes to the kernel; this layer only speaks MCP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, NoReturn

from mcp_zero import __version__
from mcp_zero.errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    RESOURCE_NOT_FOUND,
    SERVER_STOPPING,
    SHUTTING_DOWN,
    UNAUTHORIZED,
    InvalidArguments,
    InvalidParams,
    InvalidRequest,
    McpZeroError,
    MethodNotFound,
    QuotaExceeded,
    UnsupportedProtocolVersion,
)
from mcp_zero.kernel.action import Principal, Verb
from mcp_zero.kernel.pipeline import Kernel, completion_arguments
from mcp_zero.rpc import jsonrpc
from mcp_zero.rpc.bridge import RequestBridge
from mcp_zero.rpc.envelope import (
    HANDSHAKE_VERSIONS,
    MODERN_VERSIONS,
    SERVER_INFO_META,
    SUBSCRIPTION_ID,
    SUPPORTED_VERSIONS,
    HttpHeaders,
    check_param_headers,
    has_envelope,
    open_envelope,
)
from mcp_zero.rpc.list_changes import Listener, versions
from mcp_zero.rpc.resume import Continuation, Request, Resumptions, RetryRefused
from mcp_zero.rpc.session import (
    JSON,
    LOG_LEVELS,
    MAX_SUBSCRIBED_BYTES,
    MAX_SUBSCRIPTIONS,
    SUBSCRIPTION_OVERHEAD,
    Channel,
    Session,
    SubscriptionBudget,
    kept_capabilities,
    kept_client_info,
    subscription_cost,
)
from mcp_zero.sandbox.manifest import MAX_NAME_LENGTH, MAX_URI_LENGTH
from mcp_zero.sandbox.results import error_result
from mcp_zero.uri import normal_uri

Handler = Callable[[Session, JSON, Channel, Any], Awaitable[JSON]]
# The methods that take the governed path, and the verb each is audited as.
_GOVERNED = {
    "tools/call": Verb.CALL_TOOL,
    "resources/read": Verb.READ_RESOURCE,
    "prompts/get": Verb.GET_PROMPT,
    "completion/complete": Verb.COMPLETE,
}

SERVER_INFO = {"name": "mcp-zero", "title": "MCP-ZERO governed runtime", "version": __version__}
INSTRUCTIONS = (
    "Tools here run under MCP-ZERO governance: every call is checked against policy, "
    "sandboxed, and recorded in an audit log. A denied call's error says which policy denied it."
)


# Results a 2026-07-28 client may cache: they carry ttlMs and cacheScope. What an agent
# sees depends on its token ("private") and changes with plugins (announced, so ttl 0).
_CACHEABLE = frozenset(
    (
        "server/discover",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "prompts/list",
    )
)
# The first version answering arguments that fail a tool's inputSchema with a tool execution
# error (SEP-1303): the model sees it, and can correct its call; 2025-06-18 answers -32602.
ARGUMENT_ERRORS_AS_RESULTS_FROM = "2025-11-25"
# Resources one subscriptions/listen may name (each is decided and audited).
MAX_LISTEN_RESOURCES = 1000
# The longest string progressToken: it is copied into each progress notification of the call.
MAX_PROGRESS_TOKEN_LENGTH = 256
# What subscriptions/listen may ask for: its flag and the notice it brings.
_LISTEN_FLAGS = {
    "toolsListChanged": "notifications/tools/list_changed",
    "resourcesListChanged": "notifications/resources/list_changed",
    "promptsListChanged": "notifications/prompts/list_changed",
}


def negotiate_version(requested: Any) -> str:
    """The spec's rule: echo a version the handshake supports, else offer our newest one.
    (2026-07-28 has no handshake: a client asking for it gets 2025-11-25.)"""
    if isinstance(requested, str) and requested in HANDSHAKE_VERSIONS:
        return requested
    return HANDSHAKE_VERSIONS[0]


def _page(items: list[JSON], cursor: Any, size: int, key: str, method: str, version: str) -> JSON:
    start = 0 if cursor is None else _read_cursor(cursor, method, version, len(items))
    page: JSON = {key: items[start : start + size]}
    if start + size < len(items):
        page["nextCursor"] = _cursor(method, version, start + size)
    return page


# A cursor is opaque to the client: the list method that made it, the version of the list it
# pages through (its digest: see Kernel.listing) and where the next page starts, in base64url.
# Nothing is kept per cursor. It is not signed: a forged one can only choose where to start
# in a list the client may see whole anyway.


def _cursor(method: str, version: str, start: int) -> str:
    return base64.urlsafe_b64encode(f"{method} {version} {start}".encode()).decode().rstrip("=")


def _read_cursor(cursor: Any, method: str, version: str, length: int) -> int:
    """Where the page a ``nextCursor`` of ``method`` asks for starts. Raises InvalidParams
    when it is not one, is another method's, or the list changed since it was made."""
    # (not repr of anything else: a deeply nested list would recurse)
    shown = (
        repr(cursor[:64]) if isinstance(cursor, str) else f"of JSON type {type(cursor).__name__}"
    )
    try:
        if not isinstance(cursor, str) or len(cursor) > 256:
            raise ValueError(cursor)
        padded = cursor + "=" * (-len(cursor) % 4)
        made_by, made_of, start = base64.urlsafe_b64decode(padded).decode().split(" ")
        if not start.isascii() or not start.isdigit():
            raise ValueError(start)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidParams(
            f"invalid cursor {shown}: pass a nextCursor we sent", data={"path": "/cursor"}
        ) from None
    if made_by != method:
        raise InvalidParams(
            f"cursor {shown} was made by {made_by[:40]!r}, not {method}: pass a nextCursor "
            f"that {method} sent",
            data={"path": "/cursor"},
        )
    if made_of != version:
        raise InvalidParams(
            "cursor is stale: the list changed since it was made; list again from the start "
            "(without a cursor)",
            data={"path": "/cursor", "stale": True},
        )
    if not 0 < int(start) < length:  # a version fixes the length: only a forged one gets here
        raise InvalidParams(f"cursor {shown} is out of range", data={"path": "/cursor"})
    return int(start)


def _require_str(params: JSON, name: str, limit: int | None = None, where: str = "") -> str:
    """``params[name]``, a non-empty string of at most ``limit`` characters (``where``: the
    path of ``params`` in the request's params, as ``ref.``); InvalidParams otherwise."""
    value = params.get(name)
    path = "/" + f"{where}{name}".replace(".", "/")
    if not isinstance(value, str) or not value:
        raise InvalidParams(f"params.{where}{name} must be a non-empty string", data={"path": path})
    if limit is not None and len(value) > limit:
        # refused before it is echoed or audited: the audit log keeps what it is given
        raise InvalidParams(
            f"params.{where}{name} has {len(value)} characters; at most {limit} are allowed",
            data={"path": path, "limit": limit},
        )
    return value


def _audited_target(verb: Verb, params: JSON) -> str:
    """What a governed request names (tool, prompt, URI), as its audit record keeps it: ""
    when that is not a string within its limit."""
    target: Any
    if verb is Verb.COMPLETE:
        ref = params.get("ref")
        ref = ref if isinstance(ref, dict) else {}
        if ref.get("type") == "ref/prompt":
            target, limit = ref.get("name"), MAX_NAME_LENGTH
        else:
            target, limit = ref.get("uri"), MAX_URI_LENGTH
    elif verb is Verb.READ_RESOURCE:
        target, limit = params.get("uri"), MAX_URI_LENGTH
    else:
        target, limit = params.get("name"), MAX_NAME_LENGTH
    return target if isinstance(target, str) and len(target) <= limit else ""


def _progress_token(params: JSON) -> Any:
    """The request's ``_meta.progressToken`` (None without one); InvalidParams when it is
    not one."""
    meta = params.get("_meta")
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    if token is not None and (type(token) is not int and type(token) is not str):
        raise InvalidParams(
            "params._meta.progressToken must be a string or an integer",
            data={"path": "/_meta/progressToken"},
        )
    if type(token) is str and len(token) > MAX_PROGRESS_TOKEN_LENGTH:
        # each progress notification of the call repeats it, and its stream keeps them
        raise InvalidParams(
            f"params._meta.progressToken has {len(token)} characters; at most "
            f"{MAX_PROGRESS_TOKEN_LENGTH} are allowed",
            data={"path": "/_meta/progressToken", "limit": MAX_PROGRESS_TOKEN_LENGTH},
        )
    return token


def _optional_dict(params: JSON, name: str) -> JSON:
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidParams(f"params.{name} must be an object", data={"path": f"/{name}"})
    return value


class McpServer:
    """Answers MCP requests for sessions; the governed ones through the kernel."""

    def __init__(
        self,
        kernel: Kernel,
        *,
        page_size: int = 100,
        transport: str = "http",
        max_listeners: int = 1000,
        max_listeners_per_agent: int = 100,
    ) -> None:
        self.kernel = kernel
        self.page_size = page_size
        self.max_listeners = max_listeners
        self.max_listeners_per_agent = max_listeners_per_agent
        # what the resource subscriptions of all sessions and listen streams hold together
        self.subscription_budget = SubscriptionBudget()
        self.transport = transport
        # The sessions that may hear of resource changes; a transport registers its own.
        self.sessions: Callable[[], Iterable[tuple[Session, Channel | None]]] = lambda: ()
        self._handlers: dict[str, Handler] = {
            "initialize": self._initialize,
            "ping": self._ping,
            "tools/list": self._lister("tools/list", "tools"),
            "tools/call": self._tools_call,
            "resources/list": self._lister("resources/list", "resources"),
            "resources/templates/list": self._lister(
                "resources/templates/list", "resourceTemplates"
            ),
            "resources/read": self._resources_read,
            "resources/subscribe": self._resources_subscribe,
            "resources/unsubscribe": self._resources_unsubscribe,
            "prompts/list": self._lister("prompts/list", "prompts"),
            "prompts/get": self._prompts_get,
            "completion/complete": self._complete,
            "logging/setLevel": self._set_level,
        }
        # MCP 2026-07-28: no handshake, ping, setLevel or subscribe (subscriptions/listen
        # replaces the last and the GET stream).
        removed = {
            "initialize",
            "ping",
            "logging/setLevel",
            "resources/subscribe",
            "resources/unsubscribe",
        }
        self._stateless_handlers: dict[str, Handler] = {
            **{k: v for k, v in self._handlers.items() if k not in removed},
            "server/discover": self._discover,
            "subscriptions/listen": self._listen,
            # these may ask the client (input_required), across requests
            "tools/call": self._resumable("tools/call", self._tools_call),
            "resources/read": self._resumable("resources/read", self._resources_read),
            "prompts/get": self._resumable("prompts/get", self._prompts_get),
        }
        self.resumptions = Resumptions()
        # 2026-07-28 requests running now, with their request's session (for termination)
        self.stateless_calls: dict[asyncio.Task[Any], Session] = {}
        # by (channel, request id): over stdio one channel carries every listen stream
        self.listeners: dict[tuple[Channel, Any], Listener] = {}
        self._listens_starting = 0  # listens decided but not yet added to listeners
        self.keepalive_s = 25.0  # a quiet listen stream gets a comment this often (HTTP)

    # -- entry points -------------------------------------------------------------------------

    def handle_request(
        self, session: Session, request: jsonrpc.Request, channel: Channel
    ) -> Coroutine[Any, Any, JSON | None]:
        """Run one request of a session opened by ``initialize``: await what this returns
        for its response message, or None if it was cancelled. (The coroutine that runs it,
        not one around it: a level less to resume at each suspension of the request.)"""
        handler = self._handlers.get(request.method)
        refusal: McpZeroError | None = None
        if handler is None:
            refusal = MethodNotFound(f"unknown method {request.method!r}")
        elif request.method != "initialize" and has_envelope(request.params):
            refusal = InvalidRequest(
                "this session was opened with initialize (MCP "
                f"{session.protocol_version}); a request carrying the 2026-07-28 envelope "
                "(params._meta protocolVersion) does not belong in it"
            )
        return self._run(session, request, channel, handler, refusal)

    async def handle_stateless_request(
        self,
        connection: Session,
        request: jsonrpc.Request,
        channel: Channel,
        headers: HttpHeaders | None = None,
    ) -> JSON | None:
        """Run one MCP 2026-07-28 request, which carries its own protocol version and client
        capabilities. ``connection`` holds what outlives the request (the principal, and on
        stdio the requests in flight); ``headers`` are the HTTP request's."""
        if request.method == "initialize":
            how = (
                "MCP 2026-07-28 has no initialize: send server/discover, or initialize with "
                f"one of {', '.join(HANDSHAKE_VERSIONS)} on a new connection"
            )
            if headers is not None:  # HTTP: a method this revision removed (404)
                return jsonrpc.error_from_exception(
                    request.id, MethodNotFound(f"{how} (without MCP-Protocol-Version 2026-07-28)")
                )
            # stdio: this connection chose 2026-07-28 with its first request (as the SDKs)
            asked = request.params.get("protocolVersion")
            return jsonrpc.error_from_exception(
                request.id,
                UnsupportedProtocolVersion(
                    how, data={"supported": list(MODERN_VERSIONS), "requested": str(asked)[:100]}
                ),
            )
        try:
            envelope = open_envelope(request.method, request.params, headers)
            if headers is not None and request.method == "tools/call":
                name = request.params.get("name")
                entry = self.kernel.plugins.tools.get(name) if isinstance(name, str) else None
                if entry is not None and entry.spec.param_headers:
                    arguments = request.params.get("arguments")
                    check_param_headers(entry.spec.param_headers, arguments, headers)
        except McpZeroError as exc:
            return jsonrpc.error_from_exception(request.id, exc)
        if envelope.log_level is not None and envelope.log_level not in LOG_LEVELS:
            return jsonrpc.error_from_exception(
                request.id,
                InvalidParams(
                    f"params._meta log level {envelope.log_level[:40]!r} is not one of "
                    f"{', '.join(LOG_LEVELS)}",
                    data={"path": "/_meta/io.modelcontextprotocol~1logLevel"},
                ),
            )
        handler = self._stateless_handlers.get(request.method)
        if handler is None:
            return jsonrpc.error_from_exception(
                request.id,
                MethodNotFound(
                    f"unknown method {request.method!r}"
                    + (" in MCP 2026-07-28" if request.method in self._handlers else "")
                ),
            )
        session = Session(
            connection.principal,
            id="ephemeral",
            credential=connection.credential,
            protocol_version=envelope.protocol_version,
            client_info=kept_client_info(envelope.client_info),
            client_capabilities=kept_capabilities(envelope.client_capabilities),
            log_level=envelope.log_level or "off",
            inflight=connection.inflight,
            cancelled=connection.cancelled,
        )
        del envelope  # (what the session keeps of it is cut: a listen stream may last)
        with self.running_alone(session):
            response = await self._run(session, request, channel, handler)
        if response is None:
            return None
        if "result" not in response:
            error = response["error"]
            if error["code"] == RESOURCE_NOT_FOUND:  # 2026-07-28 (SEP-2164): invalid params
                error["code"] = INVALID_PARAMS
            return response
        result: JSON = response["result"]
        meta = result.get("_meta")
        stamped: JSON = {
            **result,
            "_meta": {**meta, SERVER_INFO_META: SERVER_INFO}
            if isinstance(meta, dict)
            else {SERVER_INFO_META: SERVER_INFO},
            "resultType": result.get("resultType", "complete"),
        }
        if request.method in _CACHEABLE:
            stamped.setdefault("ttlMs", 0)
            stamped.setdefault("cacheScope", "private")
        response["result"] = stamped
        return response

    def cancel(self, session: Session, request_id: Any) -> bool:
        """Cancel a request in flight, as the client asked: it ends without an answer."""
        if isinstance(request_id, bool) or not isinstance(request_id, str | int):
            return False  # not a request id (an object would not even hash): nothing to cancel
        task = session.inflight.get(request_id)
        if task is None:
            return False
        session.cancelled.add(request_id)
        task.cancel()
        return True

    async def _run(
        self,
        session: Session,
        request: jsonrpc.Request,
        channel: Channel,
        handler: Handler | None,
        refusal: McpZeroError | None = None,
    ) -> JSON | None:
        """Run ``request`` with ``handler``; its response message, or None if the client
        cancelled it. A request with a ``refusal`` is answered with that error at once."""
        if refusal is not None or handler is None:
            return jsonrpc.error_from_exception(
                request.id, refusal or MethodNotFound(f"unknown method {request.method!r}")
            )
        task = asyncio.current_task()
        refused = self.admit(session, request, task)
        if refused is not None:
            return refused
        try:
            result = await handler(session, request.params, channel, request.id)
            return jsonrpc.result_message(request.id, result)
        except InvalidArguments as exc:  # (audited as invalid_params all the same)
            if session.protocol_version >= ARGUMENT_ERRORS_AS_RESULTS_FROM:
                return jsonrpc.result_message(request.id, error_result(exc.message))
            return jsonrpc.error_from_exception(request.id, exc)
        except McpZeroError as exc:
            return jsonrpc.error_from_exception(request.id, exc)
        except asyncio.CancelledError as exc:
            if task is not None and task.cancelling() and request.id in session.cancelled:
                return None  # cancelled by the client: the spec says send nothing
            if task is not None and task.cancelling() and exc.args == (SHUTTING_DOWN,):
                # Cut off by a stopping server after its grace period: say so, so that the
                # client can retry, instead of a dropped connection.
                task.uncancel()
                return jsonrpc.error_message(
                    request.id,
                    SERVER_STOPPING,
                    "server_stopping",
                    "the server is shutting down and stopped this request; retry it",
                )
            if task is not None and task.cancelling() and session.closed:
                # The session ended under the request (DELETE, expiry): answer instead of
                # failing the HTTP exchange with a 500 and an error in the server's log.
                task.uncancel()
                return jsonrpc.error_message(
                    request.id,
                    UNAUTHORIZED,
                    "session_ended",
                    "the session ended (or its agent was terminated) while this request was "
                    "running",
                )
            raise
        except Exception as exc:  # a bug of ours must not kill the session
            self.kernel.log_internal_error(request.method, exc)
            return jsonrpc.error_message(
                request.id, INTERNAL_ERROR, "internal", f"internal error handling {request.method}"
            )
        finally:
            if session.inflight.get(request.id) is task:
                del session.inflight[request.id]
            session.cancelled.discard(request.id)

    def admit(
        self, session: Session, request: jsonrpc.Request, task: asyncio.Task[Any] | None
    ) -> JSON | None:
        """Register ``request`` as in flight in ``session``, run by ``task``, so that
        ``notifications/cancelled`` finds it; the error answer instead when its id is taken.

        A transport that reads requests faster than they start (stdio) admits each one as it
        reads it: a cancel right behind it must find it, and keep it from running.
        """
        running = session.inflight.get(request.id)
        if running is not None and running is not task:
            # ids are unique per session (MCP): a second one would take over the first's
            # cancellation, and the client could not tell the two answers apart
            return jsonrpc.error_from_exception(
                request.id,
                InvalidRequest(f"request id {request.id!r} is in use by a request in flight"),
            )
        if task is not None and request.method != "initialize":
            # MCP: "the initialize request MUST NOT be cancelled by clients"; a request that
            # is not registered is one notifications/cancelled cannot find
            session.inflight[request.id] = task
        return None

    async def audit_unstarted(self, session: Session, request: jsonrpc.Request) -> None:
        """Audit a governed request that the client cancelled before it started (others are
        not audited when they run either)."""
        verb = _GOVERNED.get(request.method)
        if verb is None:
            return
        params = request.params
        arguments = params.get("arguments")
        if verb is Verb.COMPLETE:
            arguments = completion_arguments(params.get("argument"), params.get("context"))
        await self.kernel.audit_cancelled(
            session.principal,
            verb,
            _audited_target(verb, params),
            method=request.method,
            request_id=request.id,
            transport=self.transport,
            arguments=arguments if isinstance(arguments, dict) else None,
        )

    def handle_notification(self, session: Session, note: jsonrpc.Notification) -> None:
        if note.method == "notifications/initialized":
            session.initialized = True
        elif note.method == "notifications/cancelled":
            self.cancel(session, note.params.get("requestId"))  # never an initialize: admit
        # notifications/roots/list_changed and unknown notifications need no action

    async def announce_resource_updated(self, uri: str) -> None:
        """``notifications/resources/updated`` to every session subscribed to ``uri``, on the
        channel its transport gives for server-initiated messages (dropped where none).
        Subscriptions hold URIs in normal form, and so does the notification."""
        uri = normal_uri(uri)  # (announced as test://x/%31, it reached no one: by review)
        note = {
            "jsonrpc": "2.0",
            "method": "notifications/resources/updated",
            "params": {"uri": uri},
        }
        for session, channel in self.sessions():
            if (
                uri in session.subscriptions
                and channel is not None
                and self._may_watch(session.principal, uri)  # the policy may have changed
            ):
                await channel.send(note)
        for listener in self.listeners.values():
            # checked again: the policy, or the agent's plugins, may have changed since
            if uri in listener.uris and self._may_watch(listener.principal, uri):
                listener.mailbox.put_nowait(note)

    def end_listener(self, channel: Channel, request_id: Any) -> bool:
        """End the listen stream of request ``request_id`` on ``channel`` with its result
        (False: there is none)."""
        listener = self.listeners.get((channel, request_id))
        if listener is not None:
            listener.mailbox.put_nowait(None)
        return listener is not None

    @contextlib.contextmanager
    def running_alone(self, session: Session) -> Iterator[None]:
        """Count the current task among the calls that run with no session to end (a POST
        without ``Mcp-Session-Id``, the admin API's execute) while the block runs: its
        agent's termination cancels it (:meth:`end_agent`), ``session.closed`` set."""
        task = asyncio.current_task()
        if task is not None:
            self.stateless_calls[task] = session
        try:
            yield
        finally:
            if task is not None:
                self.stateless_calls.pop(task, None)

    def principals_at_work(self) -> list[Principal]:
        """Whose calls with no session run (2026-07-28's, POSTs without a session, the
        admin API's execute), or wait for their client now (sessions are the transports' to
        watch)."""
        running = [session.principal for session in self.stateless_calls.values()]
        return running + self.resumptions.principals()

    def end_agent(self, agent: str) -> None:
        """Agent ``agent`` was terminated: its calls with no session stop (answered as
        ended), and so do those that wait for its client's input_required answer."""
        for task, session in list(self.stateless_calls.items()):
            if session.principal.agent == agent:
                session.closed = True
                task.cancel()
        self.resumptions.end_agent(agent)

    def end_listeners(self) -> list[asyncio.Task[Any]]:
        """The server is stopping: every listen stream ends with its result, and calls that
        wait for a client's input_required answer are cancelled: their tasks, to wait for
        (no request runs them)."""
        cancelled: list[asyncio.Task[Any]] = self.resumptions.close()
        for listener in self.listeners.values():
            listener.mailbox.put_nowait(None)
        return cancelled

    def handle_response(self, session: Session, response: jsonrpc.Response) -> None:
        session.resolve(response.id, response.result, response.error, response.problem)

    def _lister(self, method: str, key: str) -> Handler:
        """The paginated ``method``: the list ``key`` as the kernel lets the principal see it."""

        async def handler(session: Session, params: JSON, channel: Channel, rid: Any) -> JSON:
            # Rate-limited as calls are, but not audited: a list changes nothing and shows
            # only what policy lets the agent see (a record each would flood the log).
            self.kernel.charge(session.principal)
            items, version = self.kernel.listing(session.principal, key, self.transport)
            cursor = params.get("cursor")
            return _page(items, cursor, self.page_size, key, method, version)

        return handler

    # -- lifecycle ------------------------------------------------------------------------------

    async def _initialize(self, session: Session, params: JSON, channel: Channel, rid: Any) -> JSON:
        if not isinstance(params.get("protocolVersion"), str):
            raise InvalidParams(
                "params.protocolVersion must be a string: the MCP version the client speaks",
                data={"path": "/protocolVersion"},
            )
        session.protocol_version = negotiate_version(params.get("protocolVersion"))
        # Kept as long as the session: what is consulted, not what the client sent.
        session.client_capabilities = kept_capabilities(params.get("capabilities"))
        session.client_info = kept_client_info(params.get("clientInfo"))
        return {
            "protocolVersion": session.protocol_version,
            "capabilities": self._capabilities(),
            "serverInfo": SERVER_INFO,
            "instructions": INSTRUCTIONS,
        }

    @staticmethod
    def _capabilities() -> JSON:
        return {
            "tools": {"listChanged": True},
            "resources": {"subscribe": True, "listChanged": True},
            "prompts": {"listChanged": True},
            # 2026-07-28 deprecates logging but still requires a server that sends
            # notifications/message to declare it (the request asks for them in its _meta).
            "logging": {},
            "completions": {},
        }

    async def _discover(self, session: Session, params: JSON, channel: Channel, rid: Any) -> JSON:
        return {
            "supportedVersions": list(SUPPORTED_VERSIONS),
            "capabilities": self._capabilities(),
            "serverInfo": SERVER_INFO,
            "instructions": INSTRUCTIONS,
        }

    async def _listen(self, session: Session, params: JSON, channel: Channel, rid: Any) -> JSON:
        """``subscriptions/listen``: acknowledge what we will send, then send it on this
        request's stream until the client closes it (or cancels it) or the server stops."""
        wanted = params.get("notifications")
        if not isinstance(wanted, dict):
            raise InvalidParams(
                "params.notifications must be an object (toolsListChanged, "
                "resourcesListChanged, promptsListChanged, resourceSubscriptions)",
                data={"path": "/notifications"},
            )
        uris = wanted.get("resourceSubscriptions", [])
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            raise InvalidParams(
                "params.notifications.resourceSubscriptions must be a list of URIs",
                data={"path": "/notifications/resourceSubscriptions"},
            )
        if any(len(uri) > MAX_URI_LENGTH for uri in uris):  # (refused before it is audited)
            raise InvalidParams(
                f"params.notifications.resourceSubscriptions names a URI of more than "
                f"{MAX_URI_LENGTH} characters",
                data={"path": "/notifications/resourceSubscriptions", "limit": MAX_URI_LENGTH},
            )
        if len(uris) > MAX_LISTEN_RESOURCES:  # each is audited: one request, bounded records
            raise InvalidParams(
                f"params.notifications.resourceSubscriptions names {len(uris)} resources; a "
                f"listen may name at most {MAX_LISTEN_RESOURCES}",
                data={"path": "/notifications/resourceSubscriptions"},
            )
        uris = list(dict.fromkeys(uris))
        cost = subscription_cost(uris)
        if cost > MAX_SUBSCRIBED_BYTES:
            await self._refuse_listen(
                session,
                uris,
                rid,
                InvalidParams(
                    f"params.notifications.resourceSubscriptions names {cost} bytes of URIs "
                    f"(each counted with {SUBSCRIPTION_OVERHEAD} more); a listen may name at "
                    f"most {MAX_SUBSCRIBED_BYTES}",
                    data={
                        "path": "/notifications/resourceSubscriptions",
                        "limit": MAX_SUBSCRIBED_BYTES,
                    },
                ),
            )
        # (an agent at its own limit takes the place of its oldest stream: no more in all)
        at_own_limit = len(self._listening(session.principal)) >= self.max_listeners_per_agent
        # Listens still being decided count too: they wait for their records before their
        # streams are added, and several decided at once all passed this (found by a hunt).
        open_or_starting = len(self.listeners) + self._listens_starting
        if open_or_starting >= self.max_listeners and not at_own_limit:
            raise QuotaExceeded(
                f"this server has {open_or_starting} open subscriptions/listen streams (or "
                "being opened), its limit; retry later"
            )
        starting = 0 if at_own_limit else 1
        self._listens_starting += starting
        try:
            listener, key, granted, held = await self._start_listen(
                session, params, wanted, uris, cost, channel, rid
            )
        finally:
            self._listens_starting -= starting
        # A stream may stay open for days: it keeps nothing of its request (a body's size).
        del wanted, uris
        tag = {SUBSCRIPTION_ID: rid}
        try:
            await channel.send(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/subscriptions/acknowledged",
                    "params": {"notifications": granted, "_meta": tag},
                }
            )
            if rid in session.cancelled or session.closed:
                # cancelled (by its client, by its agent's end) while its records were
                # committed, which withdrew the cancel (Kernel.subscribe): acknowledged as
                # they say, it ends now
                return {"_meta": tag}
            keepalive = getattr(channel, "keepalive", None)
            while True:
                try:
                    async with asyncio.timeout(self.keepalive_s if keepalive else None):
                        note = await listener.mailbox.get()
                except TimeoutError:
                    assert keepalive is not None
                    await keepalive()
                    continue
                if note is None:
                    return {"_meta": tag}
                await channel.send({**note, "params": {**note.get("params", {}), "_meta": tag}})
        finally:
            del self.listeners[key]
            self.subscription_budget.release(held)

    def _listening(self, principal: Principal) -> list[Listener]:
        """The principal's agent's listen streams that are not ending, oldest first
        (token-less callers of --anonymous-agent and the agent's token holders count apart,
        as their sessions do)."""
        return [
            lis
            for lis in self.listeners.values()
            if lis.principal.agent == principal.agent
            and lis.principal.anonymous == principal.anonymous
            and not lis.mailbox.ended
        ]

    async def _start_listen(
        self,
        session: Session,
        params: JSON,
        wanted: JSON,
        uris: list[str],
        cost: int,
        channel: Channel,
        rid: Any,
    ) -> tuple[Listener, tuple[Channel, Any], JSON, int]:
        """Decide and audit a listen's subscriptions and add its stream: the stream, its key
        in ``self.listeners``, what its acknowledgement grants, and the subscription budget
        it holds."""
        try:
            held = self._hold_subscriptions(cost)
        except QuotaExceeded as exc:
            await self._refuse_listen(session, uris, rid, exc)
        # Rate-limited, and each resource named decided and audited, as resources/subscribe
        # (the notices each stream is sent later are checked again, not audited).
        try:
            verdicts = await self.kernel.subscribe(
                session.principal,
                uris,
                method="subscriptions/listen",
                request_id=rid,
                transport=self.transport,
            )
        except BaseException:
            self.subscription_budget.release(held)
            raise
        flags = sorted(flag for flag in _LISTEN_FLAGS if wanted.get(flag) is True)
        honoured = frozenset(
            normal_uri(uri) for uri, refused in zip(uris, verdicts, strict=True) if refused is None
        )
        self.subscription_budget.release(held - subscription_cost(honoured))
        held = subscription_cost(honoured)
        granted: JSON = dict.fromkeys(flags, True)
        if "resourceSubscriptions" in wanted:
            granted["resourceSubscriptions"] = sorted(honoured)
        params.clear()  # (see _listen)
        notices = frozenset(_LISTEN_FLAGS[flag] for flag in flags)
        listener = Listener(session.principal, notices, honoured, session.credential)
        listener.views = versions(self.kernel, session.principal, self.transport)
        key = (channel, rid)
        if key in self.listeners:  # (a request id in use is refused before this)
            self.subscription_budget.release(held)
            raise InvalidRequest(f"request id {rid!r} is in use by a listen stream")
        # Past the agent's limit its oldest streams end (with their result), as its least
        # recently used session is dropped for a new one: kept open for as long as their
        # clients like, they would lock the agent out, its owner after a token rotation too.
        # (Counted here, where no await comes before the stream is added: listens decided
        # concurrently cannot overshoot the limit together.)
        mine = self._listening(session.principal)
        for oldest in mine[: max(0, len(mine) + 1 - self.max_listeners_per_agent)]:
            oldest.mailbox.put_nowait(None)
        self.listeners[key] = listener
        return listener, key, granted, held

    async def _refuse_listen(
        self, session: Session, uris: list[str], rid: Any, refusal: McpZeroError
    ) -> NoReturn:
        """Audit a listen refused by a subscription byte budget as a subscribe refused by one
        is (under its first resource, with ``uri_count`` as over the rate limit), then raise."""
        await self.kernel.refuse(
            session.principal,
            Verb.READ_RESOURCE,
            uris[0] if uris else "",
            refusal,
            method="subscriptions/listen",
            request_id=rid,
            transport=self.transport,
            detail={"method": "subscriptions/listen", "uri_count": len(uris)},
        )

    def _hold_subscriptions(self, cost: int) -> int:
        """Take ``cost`` of the server's subscription budget; QuotaExceeded when it is spent."""
        if not self.subscription_budget.take(cost):
            raise QuotaExceeded(
                "this server's resource subscriptions (of all sessions and listen streams) "
                f"hold {self.subscription_budget.held} of their {self.subscription_budget.limit}"
                " bytes of URIs; unsubscribe, or retry later"
            )
        return cost

    def _may_watch(self, principal: Principal, uri: str) -> bool:
        try:
            # (as the subscribe was decided: a policy may name the transport)
            self.kernel.check_resource(principal, uri, transport=self.transport)
        except McpZeroError:
            return False
        return True

    async def _ping(self, session: Session, params: JSON, channel: Channel, rid: Any) -> JSON:
        return {}

    async def _set_level(self, session: Session, params: JSON, channel: Channel, rid: Any) -> JSON:
        level = params.get("level")
        if not isinstance(level, str) or level not in LOG_LEVELS:
            # (not its repr whole: a client's 1,000-deep list broke the answer, and a
            # megabyte string would come back in it)
            given = repr(level[:40]) if isinstance(level, str) else f"a {type(level).__name__}"
            raise InvalidParams(
                f"unknown log level {given}; use one of {', '.join(LOG_LEVELS)}",
                data={"path": "/level"},
            )
        session.log_level = level
        return {}

    # -- tools ----------------------------------------------------------------------------------

    def _tools_call(
        self, session: Session, params: JSON, channel: Channel, rid: Any
    ) -> Awaitable[JSON]:
        # The kernel's coroutine itself (not awaited here: a level less to resume each time
        # the call waits); the parameters are checked now, when _run calls this.
        try:
            name = _require_str(params, "name", MAX_NAME_LENGTH)
            arguments = _optional_dict(params, "arguments")
            bridge = self._bridge(session, params, channel, rid)
        except InvalidParams as exc:
            return self._refuse(session, "tools/call", params, rid, exc)
        return self.kernel.call_tool(
            session.principal,
            name,
            arguments,
            bridge,
            request_id=rid,
            transport=self.transport,
        )

    # -- resources ------------------------------------------------------------------------------

    async def _resources_read(
        self, session: Session, params: JSON, channel: Channel, rid: Any
    ) -> JSON:
        try:
            uri = _require_str(params, "uri", MAX_URI_LENGTH)
            bridge = self._bridge(session, params, channel, rid)
        except InvalidParams as exc:
            await self._refuse(session, "resources/read", params, rid, exc)
        return await self.kernel.read_resource(
            session.principal, uri, bridge, request_id=rid, transport=self.transport
        )

    async def _resources_subscribe(
        self, session: Session, params: JSON, channel: Channel, rid: Any
    ) -> JSON:
        uri = _require_str(params, "uri", MAX_URI_LENGTH)
        watched = normal_uri(uri)
        held = 0
        if watched not in session.subscriptions and not session.closed:
            refusal: QuotaExceeded | None = None
            cost = subscription_cost((watched,))
            if len(session.subscriptions) >= MAX_SUBSCRIPTIONS:
                refusal = QuotaExceeded(
                    f"this session is subscribed to {MAX_SUBSCRIPTIONS} resources, as many as "
                    "it may; unsubscribe from one first"
                )
            elif session.subscribed_bytes + cost > MAX_SUBSCRIBED_BYTES:
                refusal = QuotaExceeded(
                    f"this session's subscriptions hold {session.subscribed_bytes} bytes of "
                    f"URIs (each counted with {SUBSCRIPTION_OVERHEAD} more), {cost} more would "
                    f"pass its {MAX_SUBSCRIBED_BYTES}; unsubscribe from some first"
                )
            else:
                try:
                    held = self._hold_subscriptions(cost)
                except QuotaExceeded as exc:
                    refusal = exc
            if refusal is not None:  # audited as a refused subscribe (over the rate limit: as such)
                await self.kernel.refuse(
                    session.principal,
                    Verb.READ_RESOURCE,
                    uri,
                    refusal,
                    method="resources/subscribe",
                    request_id=rid,
                    transport=self.transport,
                    detail={"method": "resources/subscribe"},
                )
            session.subscribed_bytes += held  # (held while decided: concurrent ones count)
            session.budget = self.subscription_budget
        try:
            [refused] = await self.kernel.subscribe(
                session.principal,
                [uri],
                method="resources/subscribe",
                request_id=rid,
                transport=self.transport,
            )
        except BaseException:
            self._unhold(session, held)
            raise
        if refused is not None or session.closed or watched in session.subscriptions:
            self._unhold(session, held)  # (or a second subscribe of it came first)
            if refused is not None:
                raise refused
            return {}
        session.subscriptions.add(watched)
        return {}

    def _unhold(self, session: Session, held: int) -> None:
        if not session.closed:  # (closing gave back what the session held)
            session.subscribed_bytes -= held
            self.subscription_budget.release(held)

    async def _resources_unsubscribe(
        self, session: Session, params: JSON, channel: Channel, rid: Any
    ) -> JSON:
        uri = normal_uri(_require_str(params, "uri", MAX_URI_LENGTH))
        if uri in session.subscriptions:
            session.subscriptions.discard(uri)
            cost = subscription_cost((uri,))
            session.subscribed_bytes -= cost
            self.subscription_budget.release(cost)
        return {}

    # -- prompts and completion -----------------------------------------------------------------

    async def _prompts_get(
        self, session: Session, params: JSON, channel: Channel, rid: Any
    ) -> JSON:
        try:
            name = _require_str(params, "name", MAX_NAME_LENGTH)
            arguments = _optional_dict(params, "arguments")
            if not all(isinstance(v, str) for v in arguments.values()):
                raise InvalidParams("prompt arguments must be strings", data={"path": "/arguments"})
            bridge = self._bridge(session, params, channel, rid)
        except InvalidParams as exc:
            await self._refuse(session, "prompts/get", params, rid, exc)
        return await self.kernel.get_prompt(
            session.principal,
            name,
            arguments,
            bridge,
            request_id=rid,
            transport=self.transport,
        )

    async def _complete(self, session: Session, params: JSON, channel: Channel, rid: Any) -> JSON:
        try:
            ref = _optional_dict(params, "ref")
            argument = _optional_dict(params, "argument")
            if ref.get("type") == "ref/prompt":
                _require_str(ref, "name", MAX_NAME_LENGTH, where="ref.")
            elif ref.get("type") == "ref/resource":
                _require_str(ref, "uri", MAX_URI_LENGTH, where="ref.")
            else:
                raise InvalidParams(
                    'params.ref.type must be "ref/prompt" or "ref/resource"',
                    data={"path": "/ref/type"},
                )
            for key in ("name", "value"):
                if not isinstance(argument.get(key), str):
                    raise InvalidParams(
                        f"params.argument.{key} must be a string", data={"path": f"/argument/{key}"}
                    )
            context = _optional_dict(params, "context")
            given = context.get("arguments", {})
            if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
                raise InvalidParams(
                    "params.context.arguments must map argument names to strings",
                    data={"path": "/context/arguments"},
                )
        except InvalidParams as exc:
            await self._refuse(session, "completion/complete", params, rid, exc)
        return await self.kernel.complete(
            session.principal,
            ref,
            argument,
            context if params.get("context") is not None else None,
            request_id=rid,
            transport=self.transport,
        )

    async def _refuse(
        self, session: Session, method: str, params: JSON, rid: Any, refusal: InvalidParams
    ) -> NoReturn:
        """Audit a governed request refused for its params before it named an action (as
        refused calls are), then raise ``refusal``."""
        verb = _GOVERNED[method]
        await self.kernel.refuse(
            session.principal,
            verb,
            _audited_target(verb, params),
            refusal,
            method=method,
            request_id=rid,
            transport=self.transport,
        )

    def _resumable(self, method: str, handler: Handler) -> Handler:
        async def run(session: Session, params: JSON, channel: Channel, rid: Any) -> JSON:
            try:
                token = _progress_token(params)
            except InvalidParams as exc:
                await self._refuse(session, method, params, rid, exc)
            try:
                request = Request(channel, session, token)
                return await self.resumptions.run(
                    (session.principal.agent, session.principal.anonymous),
                    method,
                    params,
                    request,
                    lambda call: handler(session, params, call, rid),
                )
            except RetryRefused as exc:  # (an agent trying others' states leaves a trace)
                await self._refuse(session, method, params, rid, exc)

        return run

    def _bridge(self, session: Session, params: JSON, channel: Channel, rid: Any) -> RequestBridge:
        asker = channel if isinstance(channel, Continuation) else None
        # A call that may span requests has the token of the request being answered in its
        # Continuation (checked as the request came); most others carry no _meta at all.
        token = None if asker is not None or "_meta" not in params else _progress_token(params)
        return RequestBridge(session, channel, token, rid, self.announce_resource_updated, asker)
