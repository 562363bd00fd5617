"""``CircuitBreaker.trip()``: a liveness probe that timed out opens the breaker at once (issue 13,
item 9), on a fake clock."""

from __future__ import annotations

from proxy.resilience.breaker import BreakerSettings, BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_trip_opens_a_closed_breaker_without_failures() -> None:
    clock = FakeClock()
    seen: list[tuple[BreakerState, BreakerState]] = []
    b = CircuitBreaker(
        "db/primary", BreakerSettings(), clock, on_transition=lambda _, a, z: seen.append((a, z))
    )
    b.trip()
    assert b.state is BreakerState.OPEN and b.trips == 1
    assert not b.allow() and b.retry_after() == 1.0
    assert seen == [(BreakerState.CLOSED, BreakerState.OPEN)]


def test_trip_while_open_changes_nothing_and_half_open_reopens_with_backoff() -> None:
    clock = FakeClock()
    b = CircuitBreaker("db/primary", BreakerSettings(), clock)
    b.trip()
    clock.now += 0.5
    b.trip()  # already open: the open period is not extended, no second trip counted
    assert b.trips == 1 and b.retry_after() == 0.5
    clock.now += 0.5
    assert b.allow() and b.state is BreakerState.HALF_OPEN  # the probe request
    b.trip()  # the watchdog found the server still frozen
    assert b.state is BreakerState.OPEN and b.trips == 2 and b.retry_after() == 2.0
    clock.now += 2.0
    assert b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED
