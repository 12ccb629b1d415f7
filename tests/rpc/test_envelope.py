"""The MCP 2026-07-28 envelope and header checks, as functions (the wire tests are in
test_stateless_protocol.py)."""

from __future__ import annotations

from typing import Any

import pytest

from mcp_zero.errors import HeaderMismatch, UnsupportedProtocolVersion
from mcp_zero.rpc.envelope import (
    CLIENT_CAPABILITIES,
    PROTOCOL_VERSION,
    HttpHeaders,
    check_param_headers,
    decode_header_value,
    open_envelope,
)
from mcp_zero.sandbox.manifest import ParamHeader

COUNT = ParamHeader(("count",), "Count", "integer")
DRY = ParamHeader(("opts", "dry"), "Dry", "boolean")


def headers(**values: str) -> HttpHeaders:
    return HttpHeaders.from_asgi(
        [(f"mcp-param-{k.lower()}".encode(), v.encode()) for k, v in values.items()]
    )


@pytest.mark.parametrize(
    ("arguments", "sent"),
    [
        ({"count": 42}, {"Count": "42"}),
        ({"count": 42.0}, {"Count": "42"}),  # an integral number is the integer
        ({"count": 42}, {"Count": "42.00"}),
        ({"opts": {"dry": True}}, {"Dry": "true"}),
        ({}, {}),  # absent on both sides
        ({"count": None}, {}),  # null is absent
        ({"count": [1]}, {}),  # no header can carry a list: none is sent
    ],
)
def test_headers_that_agree(arguments: dict[str, Any], sent: dict[str, str]) -> None:
    check_param_headers((COUNT, DRY), arguments, headers(**sent))


@pytest.mark.parametrize(
    ("arguments", "sent", "says"),
    [
        ({"count": 42}, {"Count": "43"}, "does not match"),
        ({"count": 42}, {"Count": "42.5"}, "does not match"),
        ({"count": 42}, {"Count": "4.2e1"}, "does not match"),
        ({"count": 42}, {}, "needs its Mcp-Param-Count"),
        ({}, {"Count": "42"}, "is sent but"),
        ({"opts": {"dry": True}}, {"Dry": "True"}, "does not match"),
        ({"opts": "flat"}, {"Dry": "true"}, "is sent but"),
    ],
)
def test_headers_that_disagree(arguments: dict[str, Any], sent: dict[str, str], says: str) -> None:
    with pytest.raises(HeaderMismatch) as info:
        check_param_headers((COUNT, DRY), arguments, headers(**sent))
    assert says in info.value.message


def test_a_repeated_header_is_refused_when_read() -> None:
    twice = HttpHeaders.from_asgi([(b"Mcp-Method", b"a"), (b"mcp-method", b"b"), (b"x", b"1")])
    assert twice.get("x") == "1"
    with pytest.raises(HeaderMismatch):
        twice.get("mcp-method")


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("plain", "plain"),
        ("=?base64?aMOp?=", "hé"),
        ("=?base64?aMOp=?=", None),  # not canonical base64
        ("=?base64?//79?=", None),  # not UTF-8
        (None, None),
    ],
)
def test_header_values_decode(raw: str | None, decoded: str | None) -> None:
    assert decode_header_value(raw) == decoded


@pytest.mark.parametrize("version", ["2025-11-25", "2099-01-01"])
def test_an_envelope_is_told_the_versions_an_envelope_may_name(version: str) -> None:
    # "2025-11-25" was refused with "this server speaks 2026-07-28, 2025-11-25, …" and
    # listed as supported: true of initialize, not of an envelope (found by review).
    params = {"_meta": {PROTOCOL_VERSION: version, CLIENT_CAPABILITIES: {}}}
    with pytest.raises(UnsupportedProtocolVersion) as info:
        open_envelope("tools/list", params)
    assert info.value.data == {"supported": ["2026-07-28"], "requested": version}
    assert "a request names 2026-07-28 there" in info.value.message
