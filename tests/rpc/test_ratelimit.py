"""Per-agent token buckets, driven by a clock the test moves by hand."""

from __future__ import annotations

import pytest

from mcp_zero.errors import RateLimited
from mcp_zero.rpc.ratelimit import RateLimiter


class Clock:
    """Monotonic seconds that advance only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def retry_after(limiter: RateLimiter, agent: str) -> float:
    with pytest.raises(RateLimited) as caught:
        limiter.check(agent)
    assert caught.value.data is not None
    value = caught.value.data["retry_after"]
    assert isinstance(value, float)
    return value


def test_burst_then_refill_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("bob")
    assert retry_after(limiter, "bob") == 0.5
    clock.now += 0.2
    assert retry_after(limiter, "bob") == 0.3
    clock.now += 0.3
    limiter.check("bob")
    assert retry_after(limiter, "bob") == 0.5


def test_refill_never_exceeds_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10.0, burst=2, clock=clock)
    limiter.check("bob")
    clock.now += 3600
    limiter.check("bob")
    limiter.check("bob")
    assert retry_after(limiter, "bob") == 0.1


def test_agents_have_their_own_buckets() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=Clock())
    limiter.check("bob")
    retry_after(limiter, "bob")
    limiter.check("alice")


def test_error_tells_the_limit_and_when_to_retry() -> None:
    limiter = RateLimiter(rate=0.5, burst=1, clock=Clock())
    limiter.check("bob")
    with pytest.raises(RateLimited) as caught:
        limiter.check("bob")
    err = caught.value
    assert err.code == "rate_limited"
    assert err.http_status == 429
    assert err.message == (
        'agent "bob" is over its rate limit of 0.5 calls/s (burst 1); retry after 2.000 s'
    )
    assert err.data == {"retry_after": 2.0}


def test_refused_calls_take_no_token() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    limiter.check("bob")
    for _ in range(5):
        retry_after(limiter, "bob")
    clock.now += 1.0
    limiter.check("bob")


def test_idle_buckets_are_evicted_without_changing_answers() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock, max_buckets=3)
    for agent in ("a", "b", "c"):
        limiter.check(agent)
    clock.now += 1.0
    limiter.check("c")  # c is busy again, a and b will be full after 2 s
    clock.now += 1.5
    limiter.check("d")  # table full: the refilled buckets a and b go
    assert len(limiter) == 2
    # An evicted agent gets exactly the burst a kept bucket would have had.
    limiter.check("a")
    limiter.check("a")
    retry_after(limiter, "a")


def test_a_flood_of_names_keeps_memory_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=5, clock=Clock(), max_buckets=100)
    for i in range(10_000):
        limiter.check(f"agent-{i}")
        assert len(limiter) <= 100


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("nan"), 1), (float("inf"), 1), (1.0, 0)]
)
def test_bad_settings_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        RateLimiter(rate, burst)


def test_a_rate_too_small_to_wait_for_says_a_year_not_an_overflow() -> None:
    # (1e-320 calls/s made the wait infinite, and its ceil an OverflowError: the caller
    # got an internal error; found by review)
    clock = Clock()
    limiter = RateLimiter(rate=1e-320, burst=1, clock=clock)
    limiter.check("a")
    assert retry_after(limiter, "a") == 365 * 86_400.0
