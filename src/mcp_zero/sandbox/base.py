"""What the kernel needs from a plugin runtime, and what a running tool may ask of the client.

Runtimes (``process`` now; ``wasm`` and ``upstream`` later) implement
:class:`PluginRuntime`. The kernel hands each call a :class:`ClientBridge`
through which the tool reports progress, logs, and makes requests of the MCP
client (sampling, elicitation, roots) — the rpc layer implements the bridge, so
the sandbox never sees the transport.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol

#: What a timed-out call's message advises (the kernel says otherwise when the server's
#: max_timeout_s, not the plugin's timeout_ms, was the limit)
TIMEOUT_HINT = "raise the plugin's timeout_ms quota or make it faster"


def seconds(value: float) -> str:
    """``value`` seconds as a message shows them: to the hundredth, with no trailing zeros
    (a time limit left after a wait, 0.997701 s, is "1"), what is under 0.1 s to 2 digits."""
    if value < 0.1:
        return f"{value:.2g}"
    return f"{value:.2f}".rstrip("0").rstrip(".")


#: MCP's log levels, least severe first: what a plugin may log at (the PDK's LOG_LEVELS).
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")

JSON = dict[str, Any]

#: True while a :meth:`ClientBridge.request` comes from a plain (threaded) handler: one of
#: its worker's threads waits for the answer, so its call still occupies the plugin.
REQUEST_HOLDS_THREAD: ContextVar[bool] = ContextVar("mcp0_request_holds_thread", default=False)


class ClientBridge(Protocol):
    """The calling client, as seen from inside one tool call."""

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        """Send a ``notifications/progress`` for this call (dropped if the client gave no token)."""

    async def log(self, level: str, data: Any, logger: str | None) -> None:
        """Send a ``notifications/message`` at ``level`` (dropped below the session's level)."""

    async def resource_updated(self, uri: str) -> None:
        """Send ``notifications/resources/updated`` to every session subscribed to ``uri``."""

    async def close_stream(self) -> None:
        """Close the client's event stream now; the client resumes it and gets the rest of
        the call (streamable HTTP, SEP-1699). A no-op where there is no stream to resume."""

    async def request(self, method: str, params: JSON, key: str | None = None) -> JSON:
        """Send a request to the client (``sampling/createMessage``, ``elicitation/create``,
        ``roots/list``) and return its result; raises :class:`~mcp_zero.errors.McpZeroError`
        when the client answers with an error or cannot be reached. ``key`` is the plugin's
        name for the question (MCP 2026-07-28 ``inputRequests``), if it gave one."""
        ...


class CallBridge(ClientBridge, Protocol):
    """The bridge a runtime gets with a call (the kernel's ``GovernedBridge``): the client,
    and the call's hold on its plugin."""

    def handler_runs_on(self) -> Callable[[], None]:
        """The call ends (its client cancelled it, or it timed out) while its handler, told
        to stop, still runs: what the call holds of its plugin (one of its
        ``max_concurrency`` slots) is held until the function returned is called, once the
        handler has ended. So calls cancelled and sent again cannot pile up in a plugin."""
        ...


class PluginRuntime(Protocol):
    """A started plugin. All methods are safe to call concurrently.

    Results are MCP result objects, ready to send: ``call_tool`` returns a
    ``CallToolResult`` (``content``, optional ``structuredContent``, ``isError``);
    ``read_resource`` a ``ReadResourceResult``; ``get_prompt`` a ``GetPromptResult``;
    ``complete`` a ``CompleteResult``.

    Raises ``ToolTimeout`` when ``timeout`` (seconds) passes (the call is abandoned
    and the worker killed or told to cancel), ``PluginCrashed`` when the worker
    dies mid-call (it is restarted for later calls), ``ResourceNotFound`` /
    ``PromptNotFound`` for unknown names. A call cancelled (its task) is answered at
    once; its handler is told to stop, and may run on until its time is up
    (:meth:`CallBridge.handler_runs_on`).
    """

    name: str

    async def start(self) -> None: ...

    def ready(self) -> bool:
        """Whether a worker can take a call now (else a call waits for one to start)."""

    async def until_ready(self, timeout: float, label: str) -> float:
        """Wait for a worker to take calls (one is starting: :meth:`ready` said none can);
        returns what is left of ``timeout``. Raises ToolTimeout (naming ``label``) when it
        is not up in time, PluginFailure when the plugin was stopped meanwhile."""

    async def call_tool(
        self, tool: str, arguments: JSON, *, agent: str, bridge: CallBridge, timeout: float
    ) -> JSON: ...

    async def read_resource(
        self, uri: str, *, agent: str, bridge: CallBridge, timeout: float
    ) -> JSON: ...

    async def get_prompt(
        self,
        name: str,
        arguments: dict[str, str],
        *,
        agent: str,
        bridge: CallBridge,
        timeout: float,
    ) -> JSON: ...

    async def complete(
        self, ref: JSON, argument: JSON, context: JSON | None, *, agent: str, timeout: float
    ) -> JSON: ...

    async def drain(self) -> None:
        """Take no more calls, let the calls in flight finish (within their time limits),
        then stop: how a replaced or removed plugin leaves."""

    async def close(self) -> None: ...
