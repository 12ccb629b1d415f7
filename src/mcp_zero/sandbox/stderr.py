"""How much of a plugin's stderr reaches the server's log.

A plugin's ``print()`` output and tracebacks are worth logging, but a plugin
writing stderr in a loop must not fill the server's disk through its log.
:class:`StderrBudget` is a token bucket over lines and bytes, shared by all the
workers of one plugin (and by the workers that replace them, so a plugin that
crashes in a loop gets no fresh allowance per restart). Lines over it are
dropped, and counted in one log line a second while they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

#: A plugin's stderr is logged at this steady rate at most (all its workers together) ...
LINES_PER_S = 10
BYTES_PER_S = 8 * 1024
#: ... after a burst of up to this much (a traceback or two), which refills at that rate.
BURST_LINES = 100
BURST_BYTES = 64 * 1024
_REPORT_EVERY_S = 1.0


class StderrBudget:
    """Logs the stderr lines of one plugin's workers to ``log`` within the rates above;
    counts the others and reports them (``warning``) within a second."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        lines_per_s: float = LINES_PER_S,
        bytes_per_s: float = BYTES_PER_S,
        burst_lines: float = BURST_LINES,
        burst_bytes: float = BURST_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._rates = (lines_per_s, bytes_per_s)
        self._bursts = (burst_lines, burst_bytes)
        self._lines, self._bytes = burst_lines, burst_bytes
        self._clock = clock
        self._refilled_at = clock()
        self.dropped_lines = 0  # since the last report
        self.dropped_bytes = 0
        self._report: asyncio.TimerHandle | None = None

    def emit(self, raw: bytes) -> bool:
        """Log one stderr line (without its newline), or count it as dropped (``False``)."""
        now = self._clock()
        elapsed, self._refilled_at = now - self._refilled_at, now
        self._lines = min(self._bursts[0], self._lines + elapsed * self._rates[0])
        self._bytes = min(self._bursts[1], self._bytes + elapsed * self._rates[1])
        size = max(len(raw), 1)
        # While a report of lines dropped is due, the lines after them are dropped too: the
        # count comes first in the log, once a second (not once per line a flood slowed to
        # the budget's rate gets logged)
        if self._lines < 1 or self._bytes < size or self._report is not None:
            self.drop(1, len(raw))
            return False
        self._lines -= 1
        self._bytes -= size
        if self.dropped_lines:
            self.report()  # the count first, so the log reads in order
        self._log.info("%s", raw.decode("utf-8", "replace"))
        return True

    def drop(self, lines: int, size: int) -> None:
        """Count ``lines`` lines of ``size`` bytes as dropped, unseen (a flood's)."""
        self.dropped_lines += lines
        self.dropped_bytes += size
        if self._report is None:
            self._schedule_report()

    def report(self) -> None:
        """Log how many lines were dropped since the last report, if any."""
        if self._report is not None:
            self._report.cancel()
            self._report = None
        if not self.dropped_lines:
            return
        self._log.warning(
            "stderr over its budget (%g lines and %d KiB a second, bursts of %g lines): "
            "%d lines (%d bytes) dropped",
            self._rates[0],
            self._rates[1] // 1024,
            self._bursts[0],
            self.dropped_lines,
            self.dropped_bytes,
        )
        self.dropped_lines = self.dropped_bytes = 0

    def _schedule_report(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a direct caller): the next logged line reports
            return
        self._report = loop.call_later(_REPORT_EVERY_S, self.report)


__all__ = ["BURST_BYTES", "BURST_LINES", "BYTES_PER_S", "LINES_PER_S", "StderrBudget"]
