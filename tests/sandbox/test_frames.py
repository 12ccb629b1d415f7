"""The frames' own helpers, without a worker."""

from __future__ import annotations

import orjson
import pytest

from mcp_zero.sandbox.frames import frame_values


@pytest.mark.parametrize(
    ("value", "outside"),
    [
        ({"a": "x,y:z{[", "b": [1, 2]}, 6),  # { : , : [ ,
        ({"a": 'q"[,', "b": "\\", "c": '\\"', "d": 1}, 8),  # escaped quotes end no string
        ({"text": "a\n\t,b", "n": [[], {}]}, 8),  # { : , : [ [ , {
        ("just, a: string", 0),
    ],
)
def test_only_what_is_outside_strings_counts_once_over_the_limit(value, outside):
    line = orjson.dumps(value)
    assert frame_values(line, 0) == outside
    # under the limit, the count is a bound: what strings hold counts too
    assert frame_values(line, 1 << 20) == sum(line.count(c) for c in (b"[", b"{", b",", b":"))


def test_a_long_text_of_many_commas_counts_as_one_value():
    line = orjson.dumps({"id": 1, "result": {"text": 'a, b: [c] {d} "e" \\ ' * 500_000}})
    assert frame_values(line, 1000) == 6  # { : , : { :
