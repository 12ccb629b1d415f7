"""MCP 2026-07-28: a request carries its own protocol version and client capabilities.

That revision has no ``initialize`` handshake and no session: every request's
``params._meta`` names its protocol version and the client's capabilities (and,
optionally, the client and a log level), and over HTTP the headers
``MCP-Protocol-Version``, ``Mcp-Method`` and ``Mcp-Name`` repeat what the body says
so that proxies can route without parsing it. This module reads and checks that
envelope, in the specification's order: the envelope is there, the headers agree
with the body, the version is one we speak.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mcp_zero.errors import HeaderMismatch, InvalidParams, UnsupportedProtocolVersion

JSON = dict[str, Any]

MODERN_VERSIONS = ("2026-07-28",)
# Versions the initialize handshake negotiates, newest first.
HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18")
SUPPORTED_VERSIONS = (*MODERN_VERSIONS, *HANDSHAKE_VERSIONS)

PROTOCOL_VERSION = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL = "io.modelcontextprotocol/logLevel"
SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"
SUBSCRIPTION_ID = "io.modelcontextprotocol/subscriptionId"

# The body parameter each method's Mcp-Name header repeats.
NAMED_BY = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


@dataclass(frozen=True, slots=True)
class Envelope:
    protocol_version: str
    client_capabilities: JSON
    client_info: JSON
    log_level: str | None  # None: the client wants no log messages for this request


def has_envelope(params: JSON) -> bool:
    """Whether a request says it is a 2026-07-28 request (whatever else is wrong with it)."""
    meta = params.get("_meta")
    return isinstance(meta, dict) and PROTOCOL_VERSION in meta


def unsupported(requested: str) -> UnsupportedProtocolVersion:
    return UnsupportedProtocolVersion(
        f"protocol version {requested[:100]!r} is not supported; this server speaks "
        f"{', '.join(SUPPORTED_VERSIONS)}",
        data={"supported": list(SUPPORTED_VERSIONS), "requested": requested},
    )


def open_envelope(
    method: str, params: JSON, header: Callable[[str], str | None] | None = None
) -> Envelope:
    """The request's envelope, checked; ``header`` reads an HTTP request header (None on
    stdio). Raises InvalidParams, HeaderMismatch or UnsupportedProtocolVersion."""
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        raise InvalidParams(
            f"params._meta must be an object with {PROTOCOL_VERSION!r} and "
            f"{CLIENT_CAPABILITIES!r} (MCP 2026-07-28 has no initialize: every request "
            "carries them)",
            data={"path": "/_meta"},
        )
    missing = [key for key in (PROTOCOL_VERSION, CLIENT_CAPABILITIES) if key not in meta]
    if missing:
        raise InvalidParams(
            f"params._meta lacks {' and '.join(map(repr, missing))}", data={"path": "/_meta"}
        )
    version = meta[PROTOCOL_VERSION]
    if header is not None:
        _check_headers(method, params, version, header)
    if not isinstance(version, str):
        raise InvalidParams(
            f"params._meta[{PROTOCOL_VERSION!r}] must be a string",
            data={"path": f"/_meta/{PROTOCOL_VERSION}"},
        )
    if version not in MODERN_VERSIONS:
        raise unsupported(version)
    capabilities = meta[CLIENT_CAPABILITIES]
    if not isinstance(capabilities, dict):
        raise InvalidParams(
            f"params._meta[{CLIENT_CAPABILITIES!r}] must be an object",
            data={"path": f"/_meta/{CLIENT_CAPABILITIES}"},
        )
    info = meta.get(CLIENT_INFO)
    level = meta.get(LOG_LEVEL)
    if level is not None and not isinstance(level, str):
        raise InvalidParams(
            f"params._meta[{LOG_LEVEL!r}] must be a log level name",
            data={"path": f"/_meta/{LOG_LEVEL}"},
        )
    return Envelope(version, capabilities, info if isinstance(info, dict) else {}, level)


def _check_headers(
    method: str, params: JSON, version: Any, header: Callable[[str], str | None]
) -> None:
    sent = header("mcp-protocol-version")
    if sent is None or sent != version:
        raise HeaderMismatch(
            f"the MCP-Protocol-Version header ({sent!r}) must equal the protocol version in "
            f"params._meta ({version!r})"
        )
    sent = header("mcp-method")
    if sent != method:
        raise HeaderMismatch(
            f"the Mcp-Method header ({sent!r}) must equal the request's method ({method!r})"
        )
    field = NAMED_BY.get(method)
    if field is not None and params.get(field) is not None:
        sent = decode_header_value(header("mcp-name"))
        if sent != params[field]:
            raise HeaderMismatch(
                f"the Mcp-Name header must equal params.{field} ({str(params[field])[:100]!r})"
            )


def decode_header_value(value: str | None) -> str | None:
    """An MCP header value: as sent, or the UTF-8 text of a ``=?base64?…?=`` wrapper (used
    for values that are not printable ASCII). None when the wrapper is malformed."""
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    payload = value[len("=?base64?") : -2]
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            return None  # not the canonical encoding a client sends
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
