"""Tests of proxy/breaker.py: every transition and boundary, to the millisecond, on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.resilience.breaker import BreakerSettings, BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: FakeClock, **settings: float) -> CircuitBreaker:
    return CircuitBreaker("db/primary", BreakerSettings(**settings), clock)  # type: ignore[arg-type]


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.record_failure()


def trip(breaker: CircuitBreaker) -> None:
    fail(breaker, breaker.settings.consecutive_failures)
    assert breaker.state is OPEN


def reopen_from_half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Wait out the open period, take the probe, fail it."""
    clock.advance(breaker.retry_after())
    assert breaker.allow()
    assert breaker.state is HALF_OPEN
    breaker.record_failure()
    assert breaker.state is OPEN


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- states and settings ------------------------------------------------------------------


def test_state_values_read_as_words() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half-open"]


def test_defaults() -> None:
    s = BreakerSettings()
    assert (s.consecutive_failures, s.failure_ratio, s.window_seconds) == (5, 0.5, 10.0)
    assert (s.min_calls_in_window, s.base_open_seconds, s.max_open_seconds) == (20, 1.0, 30.0)
    assert s.half_open_probes == 1


def test_invalid_settings_report_every_problem() -> None:
    with pytest.raises(ValueError) as info:
        BreakerSettings(
            consecutive_failures=0,
            failure_ratio=1.5,
            window_seconds=0,
            min_calls_in_window=0,
            base_open_seconds=-1,
            max_open_seconds=float("nan"),
            half_open_probes=0,
            window_buckets=0,
        )
    text = str(info.value)
    for name in (
        "consecutive_failures",
        "failure_ratio",
        "window_seconds",
        "min_calls_in_window",
        "base_open_seconds",
        "max_open_seconds",
        "half_open_probes",
        "window_buckets",
    ):
        assert name in text


def test_max_below_base_is_refused() -> None:
    with pytest.raises(ValueError, match="max_open_seconds must be >= base_open_seconds"):
        BreakerSettings(base_open_seconds=5, max_open_seconds=4)


def test_new_breaker_is_closed_and_admits(clock: FakeClock) -> None:
    b = make(clock)
    assert b.state is CLOSED and b.trips == 0
    assert b.allow() and b.would_allow()
    assert b.retry_after() == 0.0


# ---- consecutive failures -----------------------------------------------------------------


def test_opens_on_fifth_consecutive_failure_not_fourth(clock: FakeClock) -> None:
    b = make(clock)
    fail(b, 4)
    assert b.state is CLOSED and b.allow()
    assert b.consecutive_failures == 4
    b.record_failure()
    assert b.state is OPEN and b.trips == 1
    assert not b.allow()


def test_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    b = make(clock)
    fail(b, 4)
    b.record_success()
    fail(b, 4)
    assert b.state is CLOSED and b.consecutive_failures == 4
    b.record_failure()
    assert b.state is OPEN


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_consecutive_threshold_is_configurable(clock: FakeClock, n: int) -> None:
    b = make(clock, consecutive_failures=n)
    fail(b, n - 1)
    assert b.state is CLOSED
    b.record_failure()
    assert b.state is OPEN


# ---- open period: exact boundaries, backoff, cap ------------------------------------------


def test_stays_open_exactly_base_seconds(clock: FakeClock) -> None:
    b = make(clock)
    trip(b)
    assert b.retry_after() == pytest.approx(1.0)
    clock.advance(0.999)
    assert not b.would_allow()
    assert not b.allow()
    assert b.state is OPEN
    assert b.retry_after() == pytest.approx(0.001)
    clock.advance(0.001)
    assert b.retry_after() == 0.0
    assert b.state is OPEN  # lazy: nothing moves until someone asks
    assert b.would_allow() and b.state is OPEN
    assert b.allow()
    assert b.state is HALF_OPEN


def test_denied_calls_do_not_extend_the_open_period(clock: FakeClock) -> None:
    b = make(clock)
    trip(b)
    opened = clock.now
    for i in range(1, 11):
        clock.now = opened + i * 0.099
        assert not b.allow()
    clock.now = opened + 1.0
    assert b.allow()


def test_backoff_doubles_per_trip_in_a_row_and_caps(clock: FakeClock) -> None:
    b = make(clock, base_open_seconds=1.0, max_open_seconds=10.0)
    trip(b)
    periods = [b.retry_after()]
    for _ in range(6):
        reopen_from_half_open(b, clock)
        periods.append(b.retry_after())
    assert periods == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert b.trips == 7


@pytest.mark.parametrize(("trips_in_a_row", "seconds"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)])
def test_each_backoff_is_exact_to_the_millisecond(
    clock: FakeClock, trips_in_a_row: int, seconds: float
) -> None:
    b = make(clock)
    trip(b)
    for _ in range(trips_in_a_row - 1):
        reopen_from_half_open(b, clock)
    clock.advance(seconds - 0.001)
    assert not b.allow()
    clock.advance(0.001)
    assert b.allow()


def test_open_seconds_formula_and_huge_trip_counts() -> None:
    s = BreakerSettings(base_open_seconds=0.5, max_open_seconds=30.0)
    assert [s.open_seconds(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert s.open_seconds(10_000) == 30.0
    assert s.open_seconds(0) == 0.5


def test_success_after_probe_resets_the_backoff(clock: FakeClock) -> None:
    b = make(clock)
    trip(b)
    reopen_from_half_open(b, clock)
    reopen_from_half_open(b, clock)
    assert b.retry_after() == 4.0
    clock.advance(4.0)
    assert b.allow()
    b.record_success()
    assert b.state is CLOSED
    trip(b)
    assert b.retry_after() == 1.0  # back to base
    assert b.trips == 4


# ---- half-open probes ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_half_open_admits_exactly_k_probes(clock: FakeClock, k: int) -> None:
    b = make(clock, half_open_probes=k)
    trip(b)
    clock.advance(1.0)
    assert [b.allow() for _ in range(k + 2)] == [True] * k + [False, False]
    assert b.state is HALF_OPEN and b.probes_in_flight == k
    assert not b.would_allow()
    assert 0.0 < b.retry_after() <= 1.0


def test_successful_probe_closes(clock: FakeClock) -> None:
    b = make(clock)
    trip(b)
    clock.advance(1.0)
    assert b.allow()
    b.record_success()
    assert b.state is CLOSED
    assert b.allow() and b.allow()
    assert b.consecutive_failures == 0 and b.window_counts() == (0, 0)


def test_failed_probe_reopens_with_a_longer_period(clock: FakeClock) -> None:
    b = make(clock)
    trip(b)
    clock.advance(1.0)
    assert b.allow()
    b.record_failure()
    assert b.state is OPEN and b.trips == 2
    assert b.retry_after() == 2.0
    clock.advance(1.999)
    assert not b.allow()
    clock.advance(0.001)
    assert b.allow()


def test_one_probe_failure_reopens_even_with_several_probes(clock: FakeClock) -> None:
    b = make(clock, half_open_probes=3)
    trip(b)
    clock.advance(1.0)
    assert b.allow() and b.allow()
    b.record_failure()
    assert b.state is OPEN
    b.record_success()  # the other probe answering late changes nothing
    assert b.state is OPEN


def test_released_probe_frees_its_slot(clock: FakeClock) -> None:
    b = make(clock)
    trip(b)
    clock.advance(1.0)
    assert b.allow()
    assert not b.allow()
    b.release()
    assert b.state is HALF_OPEN and b.probes_in_flight == 0
    assert b.allow()
    b.release()
    b.release()  # more releases than probes never go negative
    assert b.probes_in_flight == 0


def test_lost_probe_is_presumed_lost_after_max_open_seconds(clock: FakeClock) -> None:
    b = make(clock, max_open_seconds=30.0)
    trip(b)
    clock.advance(1.0)
    assert b.allow()  # this probe never reports back
    clock.advance(29.999)
    assert not b.allow()
    assert b.retry_after() == pytest.approx(0.001)
    clock.advance(0.001)
    assert b.retry_after() == 0.0
    assert b.allow()
    assert b.probes_in_flight == 1
    assert not b.allow()


def test_outcomes_while_open_are_ignored(clock: FakeClock) -> None:
    b = make(clock)
    trip(b)
    b.record_success()
    b.record_failure()
    b.release()
    assert b.state is OPEN and b.trips == 1
    assert b.retry_after() == 1.0


# ---- failure ratio over the sliding window ------------------------------------------------


def mixed(b: CircuitBreaker, successes: int, failures: int) -> None:
    """Interleave (success first) so that the consecutive-failure rule never fires."""
    for i in range(max(successes, failures)):
        if i < successes:
            b.record_success()
        if i < failures:
            b.record_failure()


def test_ratio_trips_at_min_calls(clock: FakeClock) -> None:
    b = make(clock)
    mixed(b, successes=10, failures=9)
    assert b.window_counts() == (19, 9)
    assert b.state is CLOSED
    b.record_failure()  # 20 calls, 10 failures: ratio 0.5 >= 0.5
    assert b.state is OPEN and b.trips == 1


def test_ratio_needs_min_calls(clock: FakeClock) -> None:
    b = make(clock, consecutive_failures=100)
    mixed(b, successes=9, failures=10)  # ratio above 0.5 but only 19 calls
    assert b.state is CLOSED
    b.record_success()  # 20 calls, 10 failures: a success never trips
    assert b.state is CLOSED
    b.record_failure()
    assert b.state is OPEN


def test_ratio_below_threshold_stays_closed(clock: FakeClock) -> None:
    b = make(clock, consecutive_failures=100)
    for _ in range(30):  # ratio 1/3 < 0.5, far above min calls
        mixed(b, successes=2, failures=1)
    assert b.state is CLOSED
    assert b.window_counts() == (90, 30)


def test_ratio_exact_boundary_with_an_inexact_float(clock: FakeClock) -> None:
    b = make(clock, failure_ratio=0.3, min_calls_in_window=10, consecutive_failures=100)
    mixed(b, successes=7, failures=2)
    assert b.state is CLOSED
    b.record_failure()  # 3 of 10 = 0.3
    assert b.state is OPEN


def test_window_forgets_old_calls(clock: FakeClock) -> None:
    b = make(clock, consecutive_failures=100)
    clock.now = 1000.0
    mixed(b, successes=5, failures=14)  # 19 calls in bucket [1000, 1001)
    clock.now = 1009.999  # the bucket is still in the 10 s window
    assert b.window_counts() == (19, 14)
    clock.now = 1010.0  # now it has slid out
    assert b.window_counts() == (0, 0)
    b.record_failure()
    assert b.state is CLOSED


def test_window_counts_span_buckets(clock: FakeClock) -> None:
    b = make(clock, consecutive_failures=100)
    clock.now = 2000.0
    mixed(b, successes=5, failures=5)
    clock.now = 2004.5
    mixed(b, successes=5, failures=4)
    assert b.window_counts() == (19, 9)
    clock.now = 2009.999
    b.record_failure()  # 20 calls, 10 failures, all within the window
    assert b.state is OPEN


def test_window_partially_slides(clock: FakeClock) -> None:
    b = make(clock, consecutive_failures=100)
    clock.now = 3000.0
    mixed(b, successes=0, failures=3)
    clock.now = 3005.0
    mixed(b, successes=2, failures=0)
    clock.now = 3010.0
    assert b.window_counts() == (2, 0)
    clock.now = 3015.0
    assert b.window_counts() == (0, 0)


def test_window_reuses_slots_after_a_long_gap(clock: FakeClock) -> None:
    b = make(clock, consecutive_failures=100)
    clock.now = 0.0
    mixed(b, successes=1, failures=1)
    clock.now = 100.0  # same ring slot as t=0, a different bucket
    b.record_success()
    assert b.window_counts() == (1, 0)


def test_trip_clears_the_window(clock: FakeClock) -> None:
    b = make(clock)
    mixed(b, successes=10, failures=10)
    assert b.state is OPEN
    assert b.window_counts() == (0, 0) and b.consecutive_failures == 0
    clock.advance(1.0)
    assert b.allow()
    b.record_success()
    b.record_failure()  # one failure after closing must not re-trip on old history
    assert b.state is CLOSED


@given(st.lists(st.booleans(), max_size=400), st.integers(1, 30))
def test_window_memory_is_fixed(outcomes: list[bool], buckets: int) -> None:
    clock = FakeClock(0.0)
    b = CircuitBreaker(
        "x", BreakerSettings(consecutive_failures=10**6, window_buckets=buckets), clock
    )
    for i, failed in enumerate(outcomes):
        clock.now = i * 0.37
        if b.state is not CLOSED:
            break
        if failed:
            b.record_failure()
        else:
            b.record_success()
    window = b._window
    assert len(window._calls) == len(window._failures) == len(window._epochs) == buckets


# ---- transitions in one place, snapshot ---------------------------------------------------


def test_every_transition_goes_through_one_method(clock: FakeClock) -> None:
    seen: list[tuple[str, str, str]] = []
    b = CircuitBreaker(
        "db/r1",
        BreakerSettings(consecutive_failures=1),
        clock,
        on_transition=lambda name, old, new: seen.append((name, old.value, new.value)),
    )
    b.record_failure()
    clock.advance(1.0)
    b.allow()
    b.record_failure()
    clock.advance(2.0)
    b.allow()
    b.record_success()
    assert seen == [
        ("db/r1", "closed", "open"),
        ("db/r1", "open", "half-open"),
        ("db/r1", "half-open", "open"),
        ("db/r1", "open", "half-open"),
        ("db/r1", "half-open", "closed"),
    ]


def test_illegal_transition_is_refused(clock: FakeClock) -> None:
    b = make(clock)
    with pytest.raises(RuntimeError, match="closed -> half-open"):
        b._transition(HALF_OPEN)
    assert b.state is CLOSED


def test_snapshot(clock: FakeClock) -> None:
    b = make(clock)
    fail(b, 2)
    b.record_success()
    b.record_failure()
    assert b.snapshot() == {
        "state": "closed",
        "trips": 0,
        "consecutive_failures": 1,
        "window_calls": 4,
        "window_failures": 3,
        "probes_in_flight": 0,
        "retry_after": 0.0,
    }
    fail(b, 4)
    clock.advance(0.25)
    snap = b.snapshot()
    assert snap["state"] == "open" and snap["trips"] == 1
    assert snap["retry_after"] == 0.75
    clock.advance(0.75)
    b.allow()
    assert b.snapshot()["state"] == "half-open"
    assert b.snapshot()["probes_in_flight"] == 1


def test_default_clock_is_monotonic() -> None:
    b = CircuitBreaker("real")
    assert b.allow() and b.state is CLOSED


# ---- a model check ------------------------------------------------------------------------

Event = st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 3000)),
    st.tuples(st.sampled_from(["allow", "success", "failure", "release"]), st.just(0)),
)


@given(st.lists(Event, max_size=200))
def test_invariants_under_random_events(events: list[tuple[str, int]]) -> None:
    clock = FakeClock(0.0)
    settings = BreakerSettings(
        consecutive_failures=3, min_calls_in_window=4, half_open_probes=2, max_open_seconds=8.0
    )
    b = CircuitBreaker("x", settings, clock)
    trips = 0
    for action, ms in events:
        before = b.state
        if action == "advance":
            clock.advance(ms / 1000)
        elif action == "allow":
            predicted = b.would_allow()
            assert b.allow() == predicted
        elif action == "success":
            b.record_success()
        elif action == "failure":
            b.record_failure()
        else:
            b.release()
        if b.state is OPEN and before is not OPEN:
            trips += 1
        assert b.trips == trips
        assert 0 <= b.probes_in_flight <= settings.half_open_probes
        assert 0.0 <= b.retry_after() <= settings.max_open_seconds
        if b.state is CLOSED:
            assert b.retry_after() == 0.0 and b.probes_in_flight == 0
            assert b.consecutive_failures < settings.consecutive_failures
