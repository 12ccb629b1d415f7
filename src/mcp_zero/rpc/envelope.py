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
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mcp_zero.errors import HeaderMismatch, InvalidParams, UnsupportedProtocolVersion
from mcp_zero.sandbox.manifest import ParamHeader

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

_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?\Z")
# The body parameter each method's Mcp-Name header repeats.
NAMED_BY = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


@dataclass(frozen=True, slots=True)
class HttpHeaders:
    """A request's headers by lower-cased name, and which names came more than once (a
    proxy reading the first copy and we the last would disagree)."""

    values: dict[str, str]
    repeated: frozenset[str]

    @classmethod
    def from_asgi(cls, raw: Iterable[tuple[bytes, bytes]]) -> HttpHeaders:
        values: dict[str, str] = {}
        repeated: set[str] = set()
        for name, value in raw:
            key = name.decode("latin-1").lower()
            if key in values:
                repeated.add(key)
            values[key] = value.decode("latin-1")
        return cls(values, frozenset(repeated))

    def get(self, name: str) -> str | None:
        if name in self.repeated:
            raise HeaderMismatch(f"the {name} header must be sent once")
        return self.values.get(name)


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
    """The refusal of an MCP-Protocol-Version header that names a version we do not speak."""
    return UnsupportedProtocolVersion(
        f"protocol version {requested[:100]!r} is not supported; this server speaks "
        f"{', '.join(SUPPORTED_VERSIONS)}",
        data={"supported": list(SUPPORTED_VERSIONS), "requested": requested[:100]},
    )


def _unsupported_in_envelope(requested: str) -> UnsupportedProtocolVersion:
    """The refusal of an envelope's version: only 2026-07-28's are valid there (the
    handshake's are negotiated by initialize, not named in a request)."""
    return UnsupportedProtocolVersion(
        f"protocol version {requested[:100]!r} is not supported in params._meta: a request "
        f"names {', '.join(MODERN_VERSIONS)} there ({', '.join(HANDSHAKE_VERSIONS)} are "
        "negotiated with initialize)",
        data={"supported": list(MODERN_VERSIONS), "requested": requested[:100]},
    )


def open_envelope(method: str, params: JSON, headers: HttpHeaders | None = None) -> Envelope:
    """The request's envelope, checked; ``headers`` are the HTTP request's (None on stdio).
    Raises InvalidParams, HeaderMismatch or UnsupportedProtocolVersion."""
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
    if headers is not None:
        _check_headers(method, params, version, headers)
    if not isinstance(version, str):
        raise InvalidParams(
            f"params._meta[{PROTOCOL_VERSION!r}] must be a string",
            data={"path": f"/_meta/{PROTOCOL_VERSION}"},
        )
    if version not in MODERN_VERSIONS:
        raise _unsupported_in_envelope(version)
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


def _check_headers(method: str, params: JSON, version: Any, headers: HttpHeaders) -> None:
    sent = headers.get("mcp-protocol-version")
    if sent is None or sent != version:
        raise HeaderMismatch(
            f"the MCP-Protocol-Version header ({_shown(sent)}) must equal the protocol "
            f"version in params._meta ({_shown(version)})"
        )
    sent = headers.get("mcp-method")
    if sent != method:
        raise HeaderMismatch(
            f"the Mcp-Method header ({_shown(sent)}) must equal the request's method "
            f"({_shown(method)})"
        )
    field = NAMED_BY.get(method)
    if field is not None and params.get(field) is not None:
        sent = decode_header_value(headers.get("mcp-name"))
        shown = _shown(params[field])
        if sent != params[field]:
            raise HeaderMismatch(f"the Mcp-Name header must equal params.{field} ({shown})")


def _shown(value: Any) -> str:
    """A client's value for a message: a string quoted and cut short, else only its type
    (repr of a deeply nested list would recurse, and of a long one would be long)."""
    if isinstance(value, str):
        return repr(value[:100])
    return "none" if value is None else f"a JSON {type(value).__name__}"


def check_param_headers(marks: Iterable[ParamHeader], arguments: Any, headers: HttpHeaders) -> None:
    """Each argument the tool's schema marks with ``x-mcp-header`` and its ``Mcp-Param-*``
    header must agree: both absent, or equal (integers compared as numbers). Intermediaries
    route and filter on these headers, so a body that says otherwise is refused."""
    for mark in marks:
        name = f"mcp-param-{mark.token.lower()}"
        sent = headers.get(name)
        value: Any = arguments
        for key in mark.path:
            value = value.get(key) if isinstance(value, dict) else None
        where = ".".join(mark.path)
        shown = _header_text(value)
        if shown is None:  # absent (or not a value a header can carry)
            if sent is not None:
                raise HeaderMismatch(
                    f"the Mcp-Param-{mark.token} header is sent but argument {where!r} is not"
                )
            continue
        if sent is None:
            raise HeaderMismatch(
                f"argument {where!r} needs its Mcp-Param-{mark.token} header (the tool's "
                "schema marks it with x-mcp-header)"
            )
        decoded = decode_header_value(sent)
        if not (decoded == shown or _same_integer(mark, value, decoded)):
            raise HeaderMismatch(
                f"the Mcp-Param-{mark.token} header does not match argument {where!r}"
            )


def _header_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        try:
            return str(value)
        except ValueError:  # an int past Python's digit limit
            return None
    return None


def _same_integer(mark: ParamHeader, value: Any, sent: str | None) -> bool:
    """``42`` in the header matches ``42.0`` in the body for an integer argument."""
    if mark.type != "integer" or sent is None or not _DECIMAL.match(sent):
        return False
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    whole, _, fraction = sent.partition(".")
    return not fraction.strip("0") and float(value).is_integer() and int(whole) == int(value)


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
