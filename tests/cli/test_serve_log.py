"""The server's log lines: what a terminal would act on is shown escaped."""

from __future__ import annotations

import logging
import sys

from mcp_zero.cli.serve import LogFormatter


def record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.LogRecord(
        "mcp_zero.test",
        logging.ERROR,
        __file__,
        1,
        message,
        args,
        sys.exc_info() if exc_info else None,
    )


def test_controls_are_escaped_in_the_message_and_in_a_traceback() -> None:
    formatter = LogFormatter()
    line = formatter.format(record("plugin said %s", "\x1b]52;c;cm0=\x07\ttabbed\rback\x9b"))
    assert line.endswith(
        r"ERROR mcp_zero.test: plugin said \x1b]52;c;cm0=\x07" + "\t" + r"tabbed\rback\x9b"
    )
    try:
        raise RuntimeError("from a plugin: \x1b[2J")
    except RuntimeError:
        logged = formatter.format(record("failed", exc_info=True))
    head, *traceback = logged.splitlines()  # the traceback keeps its lines
    assert head.endswith("ERROR mcp_zero.test: failed")
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == r"RuntimeError: from a plugin: \x1b[2J"
    assert "\x1b" not in logged
