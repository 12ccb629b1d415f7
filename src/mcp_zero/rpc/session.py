"""One MCP session: what was negotiated, what the client can do, and the requests we have
sent it that await an answer."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from mcp_zero.errors import McpZeroError
from mcp_zero.kernel.action import Principal
from mcp_zero.rpc.envelope import HANDSHAKE_VERSIONS, MODERN_VERSIONS

if TYPE_CHECKING:
    from mcp_zero.rpc.streams import EventStream

JSON = dict[str, Any]

# Versions a client of the initialize handshake may name in the MCP-Protocol-Version header
# (older clients and test suites send 2025-03-26, whose messages we understand).
HEADER_VERSIONS = frozenset((*HANDSHAKE_VERSIONS, "2025-03-26"))
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
# "off" (above every level): a 2026-07-28 request that did not ask for log messages gets none.
LOG_RANK = {**{name: rank for rank, name in enumerate(LOG_LEVELS)}, "off": len(LOG_LEVELS)}
# The client capabilities the server consults (rpc/bridge.py: may a plugin ask the client),
# with the parts of each it consults (elicitation's modes, what sampling may be asked for); a
# session keeps only whether each was declared, not what the client sent under it.
CONSULTED_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "sampling": ("tools", "context"),
    "elicitation": ("form", "url"),
    "roots": (),
}
# clientInfo is kept for what it says (name, version, title), each at most this long.
CLIENT_INFO_FIELDS = ("name", "version", "title")
MAX_CLIENT_INFO_LENGTH = 256
# What resource subscriptions may hold: per session or listen stream (its URIs), and all
# of them together (SubscriptionBudget). A URI costs its length and an allowance for the
# objects that hold it, so that many short URIs are counted too.
MAX_SUBSCRIPTIONS = 1000
MAX_SUBSCRIBED_BYTES = 256 * 1024
SUBSCRIPTION_OVERHEAD = 100
MAX_ALL_SUBSCRIBED_BYTES = 64 * 1024 * 1024


class Channel(Protocol):
    """Where the messages related to one incoming request go (SSE stream, stdout…)."""

    async def send(self, message: JSON) -> None: ...

    async def close_stream(self) -> None:
        """End the client's connection, keeping the stream for a resume (if resumable)."""


class ClientRequestFailed(McpZeroError):
    code = "client_request_failed"


def kept_capabilities(capabilities: Any) -> JSON:
    """What a session keeps of the client's ``capabilities``: the consulted ones declared,
    each with the consulted parts it declares."""
    if not isinstance(capabilities, dict):
        return {}
    kept: JSON = {}
    for name, parts in CONSULTED_CAPABILITIES.items():
        if name in capabilities:
            declared = capabilities[name]
            declared = declared if isinstance(declared, dict) else {}
            kept[name] = {part: {} for part in parts if part in declared}
    return kept


def kept_client_info(info: Any) -> JSON:
    """What a session keeps of ``clientInfo``: its string name, version and title, cut."""
    if not isinstance(info, dict):
        return {}
    return {
        key: value[:MAX_CLIENT_INFO_LENGTH]
        for key in CLIENT_INFO_FIELDS
        if isinstance(value := info.get(key), str)
    }


def subscription_cost(uris: Iterable[str]) -> int:
    """What ``uris`` count against the subscription budgets."""
    return sum(len(uri) + SUBSCRIPTION_OVERHEAD for uri in uris)


class SubscriptionBudget:
    """The subscription cost all sessions and listen streams of a server hold together."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int = MAX_ALL_SUBSCRIBED_BYTES) -> None:
        self.held = 0
        self.limit = limit

    def take(self, cost: int) -> bool:
        """Hold ``cost`` more, unless that goes past the limit (False)."""
        if self.held + cost > self.limit:
            return False
        self.held += cost
        return True

    def release(self, cost: int) -> None:
        self.held -= cost


def too_deep_for_plugin(answer: Any) -> bool:
    """Whether a client's ``answer`` nests too deep to reach a plugin: its worker's frame
    holds it one level down, and orjson writes 254 levels (a JSON decoder reads 1,024)."""
    try:
        orjson.dumps([answer])
    except TypeError:
        return True
    return False


@dataclass(slots=True)
class Session:
    """State of one MCP session. Belongs to exactly one principal."""

    principal: Principal
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    # the hash of the bearer token that opened it (None: opened without one): when its agent's
    # token is rotated, the session ends, streams and all
    credential: str | None = None
    protocol_version: str = HANDSHAKE_VERSIONS[0]
    client_info: JSON = field(default_factory=dict)
    client_capabilities: JSON = field(default_factory=dict)
    initialized: bool = False
    log_level: str = "info"
    subscriptions: set[str] = field(default_factory=set)
    subscribed_bytes: int = 0  # subscription_cost(subscriptions), held in budget
    budget: SubscriptionBudget | None = None
    inflight: dict[Any, asyncio.Task[Any]] = field(default_factory=dict)
    cancelled: set[Any] = field(default_factory=set)
    pending: dict[int, asyncio.Future[JSON]] = field(default_factory=dict)
    streams: dict[str, Any] = field(default_factory=dict)  # SSE streams open for resumption
    notices: EventStream | None = None  # the standalone GET stream, once one was opened
    views: dict[str, str] = field(default_factory=dict)  # list versions the client knows of
    last_seen: float = field(default_factory=time.monotonic)
    closed: bool = False  # ended by DELETE, expiry or shutdown
    unanswerable: str | None = None  # why no answer from the client can come any more
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def stateless(self) -> bool:
        """A 2026-07-28 request's own session: no handshake, nothing kept, no requests to
        the client."""
        return self.protocol_version in MODERN_VERSIONS

    def wants_log(self, level: str) -> bool:
        return LOG_RANK.get(level, 0) >= LOG_RANK.get(self.log_level, 1)

    def new_request(self) -> tuple[int, asyncio.Future[JSON]]:
        """Allocate an id for a request to the client and the future its answer resolves;
        ClientRequestFailed when no answer can come any more."""
        if self.unanswerable is not None:
            raise ClientRequestFailed(self.unanswerable)
        request_id = next(self._ids)
        future: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        return request_id, future

    def resolve(
        self, request_id: Any, result: JSON | None, error: JSON | None, problem: str | None = None
    ) -> bool:
        """Deliver the client's answer (``problem``: what makes it no answer); False when no
        such request is pending."""
        future = self.pending.pop(request_id, None) if isinstance(request_id, int) else None
        if future is None or future.done():
            return False
        if problem is not None:
            future.set_exception(
                ClientRequestFailed(f"the client's answer is malformed: {problem}")
            )
        elif error is not None:
            future.set_exception(
                ClientRequestFailed(
                    f"the client answered with an error: {error.get('message', error)}",
                    data={"client_error": error},
                )
            )
        elif result is None:
            future.set_exception(
                ClientRequestFailed("the client answered with a null result, not an object")
            )
        else:
            future.set_result(result)
        return True

    def close(self) -> None:
        self.closed = True
        if self.budget is not None:  # (a session may be closed twice)
            self.budget.release(self.subscribed_bytes)
        self.subscribed_bytes = 0
        self.subscriptions.clear()
        for task in self.inflight.values():
            task.cancel()
        self.end_answers("the session was closed")

    def end_answers(self, reason: str) -> None:
        """No answer from the client can come any more (``reason``): the requests to it
        that wait for one fail now, and those asked later at once."""
        self.unanswerable = reason
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ClientRequestFailed(reason))
        self.pending.clear()
