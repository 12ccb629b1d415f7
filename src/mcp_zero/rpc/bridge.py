"""The ``ClientBridge`` a tool call uses to reach its MCP client, over the request's channel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mcp_zero.errors import McpZeroError
from mcp_zero.rpc.session import (
    JSON,
    Channel,
    ClientRequestFailed,
    Session,
    too_deep_for_plugin,
)

# Which client capability each server→client request needs (the kernel's
# CLIENT_REQUEST_METHODS: what a plugin may ask).
_CAPABILITY = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}
CLIENT_REQUEST_TIMEOUT_S = 600.0  # a person may be answering an elicitation


class Asker(Protocol):
    """Where an MCP 2026-07-28 call's questions to the client go (rpc/resume.py), and which
    of its requests is being answered: its session (what it declared) and progress token."""

    session: Session
    progress_token: Any

    async def ask(self, method: str, params: JSON, key: str | None) -> JSON: ...

    def lacks(self, capability: str) -> None:
        """The call was refused ``capability``, which its request did not declare."""


class RequestBridge:
    """Progress, log messages and requests to the client, tied to one incoming request."""

    __slots__ = ("_announce", "_ask", "_channel", "_progress_token", "_related", "_session")

    def __init__(
        self,
        session: Session,
        channel: Channel,
        progress_token: Any,
        related: Any,
        announce: Callable[[str], Awaitable[None]],
        asker: Asker | None = None,
    ) -> None:
        self._announce = announce  # tells the subscribers of a resource that it changed
        self._ask = asker  # MCP 2026-07-28: the question goes into an input_required answer
        self._session = session
        self._channel = channel
        self._progress_token = progress_token
        self._related = related

    def _answering(self) -> Session:
        """The session of the request being answered: a 2026-07-28 retry's own (what it
        declared, its log level), else the call's."""
        return self._session if self._ask is None else self._ask.session

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        token = self._progress_token if self._ask is None else self._ask.progress_token
        if token is None:
            return
        params: JSON = {"progressToken": token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        await self._channel.send(
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}
        )

    async def log(self, level: str, data: Any, logger: str | None) -> None:
        if not self._answering().wants_log(level):
            return
        params: JSON = {"level": level, "data": data}
        if logger is not None:
            params["logger"] = logger
        await self._channel.send(
            {"jsonrpc": "2.0", "method": "notifications/message", "params": params}
        )

    async def close_stream(self) -> None:
        await self._channel.close_stream()

    async def resource_updated(self, uri: str) -> None:
        await self._announce(uri)

    async def request(self, method: str, params: JSON, key: str | None = None) -> JSON:
        capability = _CAPABILITY.get(method)
        if capability is None:
            raise McpZeroError(f"plugins may not send {method!r} to the client")
        declared = self._answering().client_capabilities.get(capability)
        needed = capability if declared is None else _missing_part(capability, declared, params)
        if needed is not None:
            if self._ask is not None:
                self._ask.lacks(needed)
            raise ClientRequestFailed(
                f"the client did not declare the {needed!r} capability, so it cannot "
                f"answer this {method}"
            )
        if self._session.stateless:
            if self._ask is None:  # a method that cannot answer input_required
                raise ClientRequestFailed(
                    f"MCP {self._session.protocol_version} lets only tools/call, prompts/get "
                    f"and resources/read ask the client ({method})"
                )
            return _forwardable(method, await self._ask.ask(method, params, key))
        request_id, future = self._session.new_request()
        try:
            await self._channel.send(
                {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
            )
            async with asyncio.timeout(CLIENT_REQUEST_TIMEOUT_S):
                return _forwardable(method, await future)
        except TimeoutError:
            await self._abandon(request_id, "the server waited too long for the answer")
            raise ClientRequestFailed(
                f"the client did not answer {method} within {CLIENT_REQUEST_TIMEOUT_S:.0f} s"
            ) from None
        except asyncio.CancelledError:  # the call ended (timeout, cancel, crash)
            if future.cancelled() or not future.done():  # (not answered: cancelled with us)
                await self._abandon(request_id, "the call that asked ended")
            raise
        finally:
            self._session.pending.pop(request_id, None)

    async def _abandon(self, request_id: int, reason: str) -> None:
        """Tell the client an unanswered request is abandoned (its form or model call need
        not stay open: found by review); best effort, the stream may be gone."""
        note = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": request_id, "reason": reason},
        }
        with contextlib.suppress(Exception):
            await self._channel.send(note)


def _missing_part(capability: str, declared: JSON, params: JSON) -> str | None:
    """The part of ``capability`` (declared with ``declared``'s parts) that the request's
    ``params`` need and the client did not declare, as "capability.part"; None if none.
    Elicitation's mode (an elicitation declared with no mode is form only) and sampling
    with tools, or with context from servers (MCP 2025-11-25: a server MUST NOT send what
    the client did not declare)."""
    if capability == "elicitation":
        mode = params.get("mode", "form")
        if mode == "url":
            return None if "url" in declared else "elicitation.url"
        return None if "form" in declared or not declared else "elicitation.form"
    if capability == "sampling":
        if ("tools" in params or "toolChoice" in params) and "tools" not in declared:
            return "sampling.tools"
        if params.get("includeContext", "none") != "none" and "context" not in declared:
            return "sampling.context"
    return None


def _forwardable(method: str, answer: JSON) -> JSON:
    """The client's ``answer``, unless it cannot be passed on to the plugin (its call gets
    the error at once, instead of waiting for an answer that never comes)."""
    if too_deep_for_plugin(answer):
        raise ClientRequestFailed(
            f"the client's answer to {method} nests too deep to be passed to the plugin"
        )
    return answer
