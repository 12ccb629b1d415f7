"""Per-agent request rate limits: a token bucket for each agent.

Each agent's bucket holds up to ``burst`` tokens and refills at ``rate``
tokens per second; a call takes one token or fails with RateLimited telling
when to retry. Memory is bounded: a bucket idle long enough to have refilled
is the same as a new one and is dropped when the table fills.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from mcp_zero.errors import RateLimited

DEFAULT_MAX_BUCKETS = 10_000


# The longest retry_after said: a year (a rate far below a call a year says no more)
_MAX_RETRY_AFTER_S = 365 * 86_400.0


class RateLimiter:
    """Token buckets keyed by agent name.

    ``clock`` returns monotonic seconds (``time.monotonic`` by default; tests
    pass their own function). Raises ValueError for a non-positive rate or a
    burst below 1. Not thread-safe; use it from one event loop.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"rate must be a positive number of calls per second, not {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be at least 1, not {max_buckets}")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._max_buckets = max_buckets
        # Seconds an empty bucket takes to fill: after that it equals a new bucket.
        self._refill_s = burst / self.rate
        # agent -> [tokens, time of last update]; a list so it is updated in place.
        self._buckets: dict[str, list[float]] = {}

    def check(self, agent: str) -> None:
        """Take one token from ``agent``'s bucket.

        Raises RateLimited with ``data={"retry_after": seconds}`` (seconds until
        a token is back, rounded up to the millisecond) when the bucket is empty.
        """
        now = self._clock()
        bucket = self._buckets.get(agent)
        if bucket is None:
            if len(self._buckets) >= self._max_buckets:
                self._evict(now)
            self._buckets[agent] = [self.burst - 1.0, now]
            return
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            bucket[1] = now
            return
        bucket[0] = tokens
        bucket[1] = now
        # (a rate so small the wait overflows, 1e-320, made the ceil fail: found by review)
        wait = min((1.0 - tokens) / self.rate, _MAX_RETRY_AFTER_S)
        retry_after = math.ceil(wait * 1000.0) / 1000.0
        raise RateLimited(
            f'agent "{agent}" is over its rate limit of {self.rate:g} calls/s '
            f"(burst {self.burst}); retry after {retry_after:.3f} s",
            data={"retry_after": retry_after},
        )

    def __len__(self) -> int:
        """Buckets held now."""
        return len(self._buckets)

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        full = [agent for agent, (_, last) in buckets.items() if now - last >= self._refill_s]
        for agent in full:
            del buckets[agent]
        if len(buckets) >= self._max_buckets:
            # Every bucket is busy: drop the oldest half. Those agents get a fresh
            # burst, a small leniency that keeps memory bounded under a flood of names.
            for agent in list(buckets)[: max(1, len(buckets) // 2)]:
                del buckets[agent]
