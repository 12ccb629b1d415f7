"""The shared ASGI helpers: content negotiation as RFC 9110 has it."""

from __future__ import annotations

import pytest

from mcp_zero.rpc.asgi import accepts, media_type


@pytest.mark.parametrize(
    ("accept", "media", "taken"),
    [
        (None, "text/event-stream", True),  # no Accept header: anything
        ("application/json, text/event-stream", "text/event-stream", True),
        ("application/json", "text/event-stream", False),
        ("*/*", "text/event-stream", True),
        ("text/*", "text/event-stream", True),
        ("text/*;q=0", "text/event-stream", False),
        ("*/*, text/event-stream;q=0", "text/event-stream", False),  # the specific range decides
        ("text/event-stream;q=0, text/*", "text/event-stream", False),  # in any order
        ("text/*;q=0, text/event-stream", "text/event-stream", True),
        ("TEXT/Event-Stream ; Q=0.2", "text/event-stream", True),
        ("text/event-stream;q=bogus", "text/event-stream", True),  # unreadable weight: 1
        ("", "application/json", False),
        ("application/jsonl", "application/json", False),
    ],
)
def test_accepts(accept: str | None, media: str, taken: bool) -> None:
    assert accepts(accept, media) is taken


def test_media_type_drops_parameters_and_case() -> None:
    assert media_type(" Application/JSON ; charset=UTF-8") == "application/json"
