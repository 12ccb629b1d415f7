"""Every error MCP-ZERO raises on purpose.

Each error has a stable string ``code`` (for logs, audit records and scripts),
the JSON-RPC error code it maps to on the MCP endpoint, the HTTP status it maps
to on the admin API, and a message that tells the user what to do next.

    McpZeroError
    ├── ConfigError              bad mcp0.toml / environment / data dir
    ├── StorageError             the store cannot read or write (disk full, locked)
    ├── InvalidRequest           malformed JSON-RPC or MCP request
    │   ├── ParseError           body is not JSON
    │   ├── MethodNotFound       unknown JSON-RPC method
    │   ├── InvalidParams        params fail the method's schema
    │   │   └── InvalidArguments a tool's arguments fail its inputSchema
    │   ├── HeaderMismatch       an HTTP header disagrees with the body (MCP 2026-07-28)
    │   ├── UnsupportedProtocolVersion   a request's protocol version is not one we speak
    │   ├── MissingClientCapability      the call needs what the request did not declare
    │   └── PayloadTooLarge      body over the size limit
    ├── NotFound
    │   ├── AgentNotFound
    │   ├── PluginNotFound
    │   ├── ToolNotFound
    │   ├── ResourceNotFound
    │   ├── PromptNotFound
    │   └── SnapshotNotFound
    ├── Conflict                 the name is taken
    ├── Unauthorized             missing or wrong bearer token
    ├── PolicyDenied             a Cedar policy denied the action (carries reasons)
    ├── PolicyError              a policy file does not parse or validate
    ├── RateLimited              the agent's request rate is over its limit
    ├── QuotaExceeded            concurrency or other quota exhausted
    ├── ManifestError            a plugin manifest is missing or invalid
    └── PluginFailure            the plugin's sandbox failed
        ├── PluginCrashed        the worker died; it is restarted
        └── ToolTimeout          the call ran past its wall-clock limit
"""

from __future__ import annotations

from typing import Any


def shown(value: str) -> str:
    """``value`` as a message shows it: whole when short, its start when long (a name or
    an id a client sent, which may be any size)."""
    return repr(value) if len(value) <= 80 else f"{value[:64]!r}… ({len(value)} characters)"


# JSON-RPC 2.0 standard codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# MCP (2026-07-28) splits JSON-RPC's server-error range: -32000..-32019 is ours
# (stable across releases), -32020..-32099 is the specification's.
UNAUTHORIZED = -32001
RESOURCE_NOT_FOUND = -32002  # the MCP spec's code for an unknown resource URI
POLICY_DENIED = -32003
RATE_LIMITED = -32004
QUOTA_EXCEEDED = -32005
TOOL_TIMEOUT = -32008
PLUGIN_CRASHED = -32010
PLUGIN_FAILURE = -32011
STORAGE_FAILURE = -32012
SERVER_STOPPING = -32013  # the server stopped the request at shutdown: retry it elsewhere/later
# Defined by MCP 2026-07-28.
HEADER_MISMATCH = -32020  # an HTTP header disagrees with the request body
MISSING_CLIENT_CAPABILITY = -32021  # data: {"requiredCapabilities": {"sampling": {}}}
UNSUPPORTED_PROTOCOL_VERSION = -32022  # data: {"supported": [...], "requested": "..."}

#: The cancel message of requests a stopping server cuts off after its grace period
#: (``Task.cancel(SHUTTING_DOWN)``), so that they answer SERVER_STOPPING instead of nothing.
SHUTTING_DOWN = "the server is shutting down"


class McpZeroError(Exception):
    """Root of every error MCP-ZERO raises on purpose."""

    code: str = "internal"
    rpc_code: int = INTERNAL_ERROR
    http_status: int = 500

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        """The error as the admin API and `--json` output render it."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data:
            out["data"] = self.data
        return out


class ConfigError(McpZeroError):
    code = "config"
    http_status = 500


class StorageError(McpZeroError):
    code = "storage"
    rpc_code = STORAGE_FAILURE
    http_status = 503


class InvalidRequest(McpZeroError):
    code = "invalid_request"
    rpc_code = INVALID_REQUEST
    http_status = 400


class ParseError(InvalidRequest):
    code = "parse_error"
    rpc_code = PARSE_ERROR


class MethodNotFound(InvalidRequest):
    code = "method_not_found"
    rpc_code = METHOD_NOT_FOUND
    http_status = 404


class InvalidParams(InvalidRequest):
    code = "invalid_params"
    rpc_code = INVALID_PARAMS


class InvalidArguments(InvalidParams):
    """A tool's arguments fail its inputSchema. From MCP 2025-11-25 on (SEP-1303) the client
    is answered with a tool execution error (``isError``), which the model sees and can
    correct its call by; 2025-06-18 answers -32602."""


class HeaderMismatch(InvalidRequest):
    code = "header_mismatch"
    rpc_code = HEADER_MISMATCH


class MissingClientCapability(InvalidRequest):
    """``data`` holds ``requiredCapabilities``, a ClientCapabilities object."""

    code = "missing_client_capability"
    rpc_code = MISSING_CLIENT_CAPABILITY


class UnsupportedProtocolVersion(InvalidRequest):
    """``data`` holds ``supported`` (the versions we speak) and ``requested``."""

    code = "unsupported_protocol_version"
    rpc_code = UNSUPPORTED_PROTOCOL_VERSION


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"
    http_status = 413


class NotFound(McpZeroError):
    code = "not_found"
    rpc_code = INVALID_PARAMS
    http_status = 404


class AgentNotFound(NotFound):
    code = "agent_not_found"


class PluginNotFound(NotFound):
    code = "plugin_not_found"


class ToolNotFound(NotFound):
    code = "tool_not_found"


class ResourceNotFound(NotFound):
    code = "resource_not_found"
    rpc_code = RESOURCE_NOT_FOUND


class PromptNotFound(NotFound):
    code = "prompt_not_found"


class SnapshotNotFound(NotFound):
    code = "snapshot_not_found"


class Conflict(McpZeroError):
    code = "conflict"
    rpc_code = INVALID_PARAMS
    http_status = 409


class Unauthorized(McpZeroError):
    code = "unauthorized"
    rpc_code = UNAUTHORIZED
    http_status = 401


class PolicyDenied(McpZeroError):
    """A policy denied the action; ``data`` holds ``policies`` and ``reasons``."""

    code = "policy_denied"
    rpc_code = POLICY_DENIED
    http_status = 403


class PolicyError(McpZeroError):
    code = "policy_invalid"
    http_status = 400


class RateLimited(McpZeroError):
    code = "rate_limited"
    rpc_code = RATE_LIMITED
    http_status = 429


class QuotaExceeded(McpZeroError):
    code = "quota_exceeded"
    rpc_code = QUOTA_EXCEEDED
    http_status = 429


class ManifestError(McpZeroError):
    code = "manifest_invalid"
    rpc_code = INVALID_PARAMS
    http_status = 400


class PluginFailure(McpZeroError):
    code = "plugin_failure"
    rpc_code = PLUGIN_FAILURE
    http_status = 502


class PluginLoadFailure(PluginFailure):
    """The plugin's code failed to load (its import raised): no new start of it can do
    better, a new install of it can."""


class PluginCrashed(PluginFailure):
    code = "plugin_crashed"
    rpc_code = PLUGIN_CRASHED


class ToolTimeout(PluginFailure):
    code = "tool_timeout"
    rpc_code = TOOL_TIMEOUT
    http_status = 504
