"""JSON-RPC framing as functions (the transports' tests send it over the wire)."""

from __future__ import annotations

import pytest

from mcp_zero.errors import InvalidParams, InvalidRequest
from mcp_zero.rpc.jsonrpc import (
    MAX_ID_LENGTH,
    Request,
    Response,
    decode,
    error_id,
    wide_integer,
)

CALL = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"arguments":%s}}'


@pytest.mark.parametrize(
    ("arguments", "path"),
    [
        (b'{"n":18446744073709551616}', "/arguments/n"),  # 2**64
        (b'{"n":-9223372036854775809}', "/arguments/n"),  # -2**63 - 1
        (b'{"a/b~":[1, 123456789012345678901234567890]}', "/arguments/a~1b~0/1"),
    ],
)
def test_an_integer_past_64_bits_is_refused_where_it_is(arguments: bytes, path: str) -> None:
    # orjson reads it as a float: the call went on with a changed value (found by review)
    with pytest.raises(InvalidParams) as info:
        decode(CALL % arguments)
    assert info.value.data == {"path": path, "id": 7}
    assert "integer past 64 bits" in info.value.message


def test_what_orjson_reads_exactly_passes_whatever_its_digits() -> None:
    arguments = (
        b'{"max":18446744073709551615,"min":-9223372036854775808,'
        b'"text":"12345678901234567890123","x":1.2345678901234567890e5,'
        b'"12345678901234567890":0}'
    )
    message = decode(CALL % arguments)
    assert isinstance(message, Request)
    assert message.params["arguments"]["max"] == 2**64 - 1
    assert message.params["arguments"]["min"] == -(2**63)
    assert message.params["arguments"]["text"] == "12345678901234567890123"


def test_an_answer_holding_an_integer_past_64_bits_is_no_answer() -> None:
    answer = decode(b'{"jsonrpc":"2.0","id":3,"result":{"x":[99999999999999999999]}}')
    assert isinstance(answer, Response)
    assert answer.result is None
    assert answer.problem is not None
    assert 'at /x/0 in "result"' in answer.problem


def test_a_long_path_is_cut_short() -> None:
    body = b'{"%s":123456789012345678901234567890}' % (b"k" * 1000)
    where = wide_integer(body)
    assert where is not None
    assert len(where) < 210
    assert where.endswith("…")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        # (read as an answer of nothing, it was told "an answer needs exactly one of result
        # and error": to a client that forgot the method, no help; found by review)
        (b'{"jsonrpc":"2.0","id":1}', 'needs a "method" (a request)'),
        (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{}}', "not both"),
    ],
)
def test_a_message_with_an_id_and_no_method_says_what_it_lacks(body: bytes, says: str) -> None:
    message = decode(body)
    assert isinstance(message, Response)
    assert message.problem is not None
    assert says in message.problem


@pytest.mark.parametrize("first_fault", [b'"jsonrpc":"1.0"', b'"jsonrpc":"2.0","params":[]'])
def test_an_over_long_id_is_not_echoed_whatever_else_is_wrong(first_fault: bytes) -> None:
    # (found by review: with a wrong "jsonrpc", a 300,000-character id came back whole)
    for length, echoed in ((MAX_ID_LENGTH, True), (MAX_ID_LENGTH + 1, False), (300_000, False)):
        msg_id = "A" * length
        body = b'{%s,"id":"%s","method":"tools/list"}' % (first_fault, msg_id.encode())
        with pytest.raises(InvalidRequest) as caught:
            decode(body)
        assert error_id(caught.value) == (msg_id if echoed else None)
