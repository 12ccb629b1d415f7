"""Requests a plugin makes of the calling agent's MCP client, through the governed path.

A tool may ask the client for a completion (``sampling/createMessage``), for the
user's input (``elicitation/create``) or for its roots (``roots/list``). Each such
request is an action of its own: it takes a token of the agent's rate limit, Cedar
decides it (``client_request`` on ``ClientRequest::"<method>"`` in the plugin, with the
labels of what it would send the client: its params), and its outcome is audited, before
and after it travels to the client. While it waits for the answer, the call gives its
plugin slot back (``PluginSlot``): a call waiting on its client is not running — unless a
plain handler asked, whose worker thread stays taken meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mcp_zero.errors import InvalidParams, McpZeroError, PolicyDenied, shown
from mcp_zero.kernel.action import Action, Outcome, Principal, Verb
from mcp_zero.rpc.jsonrpc import RequestId
from mcp_zero.sandbox.base import REQUEST_HOLDS_THREAD, ClientBridge
from mcp_zero.uri import normal_uri

if TYPE_CHECKING:
    from mcp_zero.kernel.pipeline import Kernel, PluginSlot

JSON = dict[str, Any]

#: The requests a plugin may make of its client; any other is refused before policy.
CLIENT_REQUEST_METHODS = ("sampling/createMessage", "elicitation/create", "roots/list")
# A refused method is recorded cut to this many characters (a plugin chooses it).
_MAX_RECORDED_METHOD = 256


class GovernedBridge:
    """Wraps the transport's bridge for one call: progress and logs pass through; requests
    to the client are decided by policy and audited."""

    __slots__ = (
        "_inner",
        "_kernel",
        "_plugin",
        "_principal",
        "_request_id",
        "_slot",
        "_transport",
    )

    def __init__(
        self,
        kernel: Kernel,
        inner: ClientBridge,
        principal: Principal,
        plugin: str,
        slot: PluginSlot,
        *,
        request_id: RequestId,
        transport: str,
    ) -> None:
        self._kernel = kernel
        self._slot = slot
        self._inner = inner
        self._principal = principal
        self._plugin = plugin
        self._request_id = request_id
        self._transport = transport

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        await self._inner.progress(progress, total, message)

    async def log(self, level: str, data: Any, logger: str | None) -> None:
        await self._inner.log(level, data, logger)

    async def close_stream(self) -> None:
        await self._inner.close_stream()

    async def resource_updated(self, uri: str) -> None:
        # A plugin speaks only for its own resources: no spoofed updates of another's. Owned
        # as read, in normal form: mem://%61bc is mem://abc, whoever serves it.
        uri = normal_uri(uri)
        if self._kernel.plugins.resource_owner(uri) == self._plugin:
            await self._inner.resource_updated(uri)

    def handler_runs_on(self) -> Callable[[], None]:
        return self._slot.handler_runs_on()

    async def request(self, method: str, params: JSON, key: str | None = None) -> JSON:
        if REQUEST_HOLDS_THREAD.get():
            # A plain handler's thread waits: the call keeps its slot, so that the plugin is
            # never sent more plain calls than its worker has threads (max_concurrency).
            return await self._request(method, params, key)
        slot = self._slot
        slot.client_wait_started()
        try:
            result = await self._request(method, params, key)
        except asyncio.CancelledError:
            slot.client_wait_dropped()  # the call is ending
            raise
        except BaseException:
            await slot.client_wait_ended()  # the plugin goes on with the error
            raise
        await slot.client_wait_ended()
        return result

    async def _request(self, method: str, params: JSON, key: str | None) -> JSON:
        kernel = self._kernel
        # its params are what it would send to the client: labelled, as a call's arguments are
        action = Action(
            self._principal,
            Verb.CLIENT_REQUEST,
            method,
            self._plugin,
            params,
            {"transport": self._transport},
        )
        known = method in CLIENT_REQUEST_METHODS
        event: JSON = {
            "agent": self._principal.agent,
            "anonymous": self._principal.anonymous,
            "verb": Verb.CLIENT_REQUEST.value,
            "resource": method if known else method[:_MAX_RECORDED_METHOD],
            "plugin": self._plugin,
            "request_id": self._request_id,
            "transport": self._transport,
        }
        start = time.perf_counter()
        try:
            # A token of the agent's rate limit, as its calls take: each request is decided
            # and audited, and a call may make many (the runtime bounds how many)
            kernel.charge(self._principal)
            if not known:  # (it was decided by policy, then refused as "internal")
                raise InvalidParams(
                    f"plugins may not send {shown(method)} to the client, only "
                    + ", ".join(CLIENT_REQUEST_METHODS)
                )
            kernel.decide(action, event)
            result = await self._inner.request(method, params, key)
        except McpZeroError as exc:
            event["outcome"] = (
                Outcome.DENIED if isinstance(exc, PolicyDenied) else Outcome.ERROR
            ).value
            event["code"] = exc.code
            if isinstance(exc, PolicyDenied) and exc.data:
                event["policies"] = exc.data.get("policies", [])
                event["reasons"] = exc.data.get("reasons", [])
            event["duration_ms"] = round((time.perf_counter() - start) * 1000, 3)
            await kernel.audit.append(event)
            raise
        except (asyncio.CancelledError, Exception) as exc:
            # The call ended (timeout, cancel, crash, shutdown) while the client had the
            # question: it was decided, and went out, so it is audited all the same —
            # shielded, so that a second cancel cannot lose the record.
            event["outcome"] = Outcome.ERROR.value
            event["code"] = "cancelled" if isinstance(exc, asyncio.CancelledError) else "internal"
            event["duration_ms"] = round((time.perf_counter() - start) * 1000, 3)
            await asyncio.shield(kernel.audit.append(event))
            raise
        event["outcome"] = Outcome.ALLOWED.value
        event["duration_ms"] = round((time.perf_counter() - start) * 1000, 3)
        await kernel.audit.append(event)
        return result
