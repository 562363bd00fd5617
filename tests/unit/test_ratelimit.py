"""Rate limiting with an injected clock: exact GCRA boundaries, headers, LRU bound, concurrency
cap, and properties (window bound; equality with an exact rational token bucket)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.resilience.ratelimit import (
    ConcurrencyLimiter,
    Decision,
    LocalLimiter,
    Rate,
    gcra,
    gcra_us,
)

PER_MINUTE_20 = Rate(20 / 60, 20)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> LocalLimiter:
    return LocalLimiter(clock)


# ---- 20 per minute, burst 20: the boundaries ---------------------------------------------


def test_calls_1_to_20_pass_then_21_to_25_get_exact_retry_after(limiter: LocalLimiter) -> None:
    for n in range(1, 21):
        d = limiter.check("svc:read", PER_MINUTE_20)
        assert d.allowed, n
        assert d.remaining == 20 - n
        assert d.limit == 20
        assert d.retry_after == 0
        assert d.reset_after == 3.0 * n
    for n in range(21, 26):  # same instant: nothing refilled, denials consume nothing
        d = limiter.check("svc:read", PER_MINUTE_20)
        assert not d.allowed, n
        assert d.retry_after == 3.0
        assert d.remaining == 0
        assert d.reset_after == 60.0


def test_retry_after_counts_down_as_time_passes(clock: FakeClock, limiter: LocalLimiter) -> None:
    for _ in range(20):
        assert limiter.check("k", PER_MINUTE_20).allowed
    expected = {0.0: 3.0, 1.0: 2.0, 2.5: 0.5, 2.999999: 0.000001}
    start = clock.now
    for offset, retry in expected.items():
        clock.now = start + offset
        d = limiter.check("k", PER_MINUTE_20)
        assert not d.allowed
        assert d.retry_after == pytest.approx(retry, abs=1e-9)
    clock.now = start + 3.0  # exactly one interval later: exactly one token back
    d = limiter.check("k", PER_MINUTE_20)
    assert d.allowed
    assert d.remaining == 0
    assert d.reset_after == 60.0
    assert not limiter.check("k", PER_MINUTE_20).allowed


def test_full_refill_after_the_window(clock: FakeClock, limiter: LocalLimiter) -> None:
    for _ in range(20):
        limiter.check("k", PER_MINUTE_20)
    clock.advance(59.0)  # 19 tokens back, not 20
    for _ in range(19):
        assert limiter.check("k", PER_MINUTE_20).allowed
    assert not limiter.check("k", PER_MINUTE_20).allowed
    clock.advance(3600.0)  # long idle: the bucket is capped at burst, not 1200 tokens
    d = limiter.check("k", PER_MINUTE_20)
    assert d.allowed and d.remaining == 19
    for _ in range(19):
        assert limiter.check("k", PER_MINUTE_20).allowed
    assert not limiter.check("k", PER_MINUTE_20).allowed


def test_keys_are_independent(limiter: LocalLimiter) -> None:
    for _ in range(20):
        limiter.check("billing:read", PER_MINUTE_20)
    assert not limiter.check("billing:read", PER_MINUTE_20).allowed
    assert limiter.check("billing:write", PER_MINUTE_20).allowed
    assert limiter.check("users:read", PER_MINUTE_20).allowed


# ---- costs ---------------------------------------------------------------------------------


def test_cost_above_one(clock: FakeClock, limiter: LocalLimiter) -> None:
    d = limiter.check("k", PER_MINUTE_20, cost=5)
    assert d.allowed and d.remaining == 15 and d.reset_after == 15.0
    d = limiter.check("k", PER_MINUTE_20, cost=16)  # one token short
    assert not d.allowed
    assert d.retry_after == 3.0
    assert d.remaining == 15
    d = limiter.check("k", PER_MINUTE_20, cost=15)  # exactly what is left
    assert d.allowed and d.remaining == 0 and d.reset_after == 60.0
    clock.advance(30.0)
    d = limiter.check("k", PER_MINUTE_20, cost=11)
    assert not d.allowed and d.retry_after == 3.0 and d.remaining == 10
    assert limiter.check("k", PER_MINUTE_20, cost=10).allowed


def test_fractional_and_zero_cost(limiter: LocalLimiter) -> None:
    d = limiter.check("k", PER_MINUTE_20, cost=0.5)
    assert d.allowed and d.reset_after == 1.5 and d.remaining == 19
    d = limiter.check("k", PER_MINUTE_20, cost=0)  # a peek: consumes nothing
    assert d.allowed and d.reset_after == 1.5 and d.remaining == 19
    assert limiter.check("k", PER_MINUTE_20, cost=19.5).allowed
    assert not limiter.check("k", PER_MINUTE_20, cost=0.5).allowed
    assert limiter.check("k", PER_MINUTE_20, cost=0).allowed


def test_cost_above_burst_is_always_denied(clock: FakeClock, limiter: LocalLimiter) -> None:
    for _ in range(3):
        d = limiter.check("k", PER_MINUTE_20, cost=21)
        assert not d.allowed
        assert d.retry_after == 60.0  # the full window: finite, honest upper bound
        assert d.remaining == 20  # nothing was consumed
        assert d.headers()["Retry-After"] == "60"
        clock.advance(1000.0)
    assert limiter.check("k", PER_MINUTE_20, cost=20).allowed  # the whole burst still fits


@pytest.mark.parametrize("cost", [-1, math.nan, math.inf])
def test_bad_cost_is_refused(limiter: LocalLimiter, cost: float) -> None:
    with pytest.raises(ValueError, match="cost"):
        limiter.check("k", PER_MINUTE_20, cost=cost)


# ---- Rate, Decision, the pure step -------------------------------------------------------


@pytest.mark.parametrize(
    ("per_second", "burst"),
    [(0, 1), (-1, 1), (math.inf, 1), (math.nan, 1), (2e6, 1), (1, 0), (1, 1.5), (1, True)],
)
def test_invalid_rates(per_second: float, burst: int) -> None:
    with pytest.raises(ValueError):
        Rate(per_second, burst)


def test_interval_rounds_up_so_the_rate_is_never_exceeded() -> None:
    assert PER_MINUTE_20.interval_us == 3_000_000
    assert Rate(10, 1).interval_us == 100_000
    assert Rate(3, 1).interval_us == 333_334
    assert Rate(0.001, 100).interval_us == 1_000_000_000
    assert Rate(1e6, 5).interval_us == 1
    assert Rate(3, 3) == Rate(3, 3)


def test_headers_allowed_and_denied(limiter: LocalLimiter) -> None:
    first = limiter.check("k", PER_MINUTE_20)
    assert first.headers() == {
        "RateLimit-Limit": "20",
        "RateLimit-Remaining": "19",
        "RateLimit-Reset": "3",
    }
    for _ in range(19):
        last = limiter.check("k", PER_MINUTE_20)
    assert last.headers() == {
        "RateLimit-Limit": "20",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "60",
    }
    denied = limiter.check("k", PER_MINUTE_20)
    assert denied.headers() == {
        "RateLimit-Limit": "20",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "60",
        "Retry-After": "3",
    }


def test_headers_round_up_and_retry_after_is_at_least_one() -> None:
    d = Decision(False, 10, 0, retry_after=0.2, reset_after=9.01)
    assert d.headers()["Retry-After"] == "1"
    assert d.headers()["RateLimit-Reset"] == "10"
    assert Decision(False, 10, 0, 2.000001, 2.000001).headers()["Retry-After"] == "3"


def test_gcra_is_pure_and_leaves_tat_unchanged_on_denial() -> None:
    rate = Rate(1, 2)
    d1, tat = gcra(None, 10.0, rate, 1)
    assert d1.allowed and tat == 11.0
    d2, tat = gcra(tat, 10.0, rate, 1)
    assert d2.allowed and tat == 12.0
    d3, unchanged = gcra(tat, 10.0, rate, 1)
    assert not d3.allowed and unchanged is None and d3.retry_after == 1.0
    assert gcra(12.0, 10.0, rate, 1) == (d3, None)  # same input, same output
    d4, stale = gcra(5.0, 10.0, rate, 2)  # a TAT in the past is a full bucket
    assert d4.allowed and stale == 12.0 and d4.remaining == 0


def test_gcra_us_matches_gcra_in_seconds() -> None:
    d_s, tat_s = gcra(3.5, 2.25, PER_MINUTE_20, 2)
    d_us, tat_us = gcra_us(3_500_000, 2_250_000, PER_MINUTE_20, 2)
    assert d_s == d_us
    assert tat_s is not None and tat_us is not None
    assert tat_s * 1_000_000 == tat_us


# ---- LRU bound -----------------------------------------------------------------------------


def test_lru_keeps_at_most_max_keys_and_evicts_least_recently_used(clock: FakeClock) -> None:
    lim = LocalLimiter(clock, max_keys=3)
    one = Rate(1, 1)
    for key in ("a", "b", "c"):
        assert lim.check(key, one).allowed
    assert not lim.check("a", one).allowed  # touches "a": now "b" is the oldest
    assert lim.check("d", one).allowed
    assert len(lim) == 3
    assert "b" not in lim and "a" in lim and "c" in lim and "d" in lim
    assert lim.check("b", one).allowed  # evicted: behaves like a full bucket
    assert "c" not in lim  # and "c" made room for it
    assert not lim.check("a", one).allowed  # "a" kept its state all along


def test_lru_stays_bounded_under_many_keys(clock: FakeClock) -> None:
    lim = LocalLimiter(clock, max_keys=100)
    for i in range(10_000):
        lim.check(f"k{i}", PER_MINUTE_20)
    assert len(lim) == 100
    assert "k9999" in lim and "k9899" not in lim


def test_denied_new_key_is_not_stored(clock: FakeClock) -> None:
    lim = LocalLimiter(clock, max_keys=2)
    assert not lim.check("huge", Rate(1, 1), cost=2).allowed
    assert len(lim) == 0


def test_max_keys_must_be_positive(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        LocalLimiter(clock, max_keys=0)


# ---- concurrency cap -----------------------------------------------------------------------


def test_concurrency_limiter() -> None:
    cap = ConcurrencyLimiter(2)
    assert cap.in_flight == 0
    assert cap.try_acquire() and cap.try_acquire()
    assert cap.in_flight == 2
    assert not cap.try_acquire()  # full: refused at once, nothing taken
    assert cap.in_flight == 2
    cap.release()
    assert cap.in_flight == 1
    assert cap.try_acquire()
    cap.release()
    cap.release()
    assert cap.in_flight == 0
    with pytest.raises(RuntimeError):
        cap.release()
    assert cap.in_flight == 0
    with pytest.raises(ValueError):
        ConcurrencyLimiter(0)


# ---- properties ----------------------------------------------------------------------------

rates = st.builds(
    Rate,
    st.sampled_from([20 / 60, 0.5, 1.0, 3.0, 7.0, 10.0, 100.0, 0.001]),
    st.integers(1, 25),
)
steps = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(0, 5, allow_nan=False)),  # clock advance, seconds
        st.one_of(st.integers(0, 30), st.floats(0, 30, allow_nan=False)),  # cost
    ),
    min_size=1,
    max_size=80,
)


@given(rates, steps)
def test_admitted_units_in_any_window_never_exceed_burst_plus_rate_times_window(
    rate: Rate, script: list[tuple[float, float]]
) -> None:
    clock = FakeClock(0.0)
    lim = LocalLimiter(clock)
    admitted: list[tuple[float, float]] = []
    for advance, cost in script:
        clock.advance(advance)
        if lim.check("k", rate, cost).allowed:
            admitted.append((clock.now, cost))
    for i, (t_start, _) in enumerate(admitted):
        units = 0.0
        for t_end, cost in admitted[i:]:
            units += cost
            window = t_end - t_start
            # 2 us of slack: the limiter reads the clock to the microsecond
            assert units <= rate.burst + rate.per_second * (window + 2e-6) + 1e-9


@given(rates, st.lists(st.tuples(st.integers(0, 4_000_000), st.integers(0, 30)), max_size=80))
def test_gcra_is_exactly_a_token_bucket(rate: Rate, script: list[tuple[int, int]]) -> None:
    """Differential test against an exact rational token bucket refilled at 1/interval_us
    tokens per microsecond: same verdicts, same remaining, same retry_after."""
    now = 0
    tat: float | None = None
    tokens = Fraction(rate.burst)
    per_us = Fraction(1, rate.interval_us)
    for advance_us, cost in script:
        now += advance_us
        tokens = min(Fraction(rate.burst), tokens + per_us * advance_us)
        decision, new_tat = gcra_us(tat, now, rate, cost)
        fits = cost <= tokens
        assert decision.allowed == fits
        if fits:
            tokens -= cost
            tat = new_tat
        else:
            assert new_tat is None
            if cost <= rate.burst:
                assert decision.retry_after == _seconds((cost - tokens) / per_us)
        assert decision.remaining == math.floor(tokens)
        assert decision.reset_after == _seconds((rate.burst - tokens) / per_us)


def _seconds(us: Fraction) -> float:
    assert us.denominator == 1  # whole microseconds: the arithmetic is exact
    return int(us) / 1_000_000


@given(
    rates,
    st.lists(
        st.tuples(
            st.integers(0, 3_000_000),  # microseconds to advance
            st.sampled_from(["a", "b", "c"]),  # bucket
            st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.0, 1e9]),  # cost (1e9: above any burst)
        ),
        max_size=60,
    ),
)
def test_take_is_check_allowed_with_the_same_state(
    rate: Rate, script: list[tuple[int, str, float]]
) -> None:
    """The hot path's ``take`` decides exactly as ``check`` and leaves the same buckets, in
    the same LRU order, on any sequence of calls (two limiters side by side, max 2 keys so
    that eviction is exercised too)."""
    clock = FakeClock(0.0)
    by_check, by_take = LocalLimiter(clock, max_keys=2), LocalLimiter(clock, max_keys=2)
    for advance_us, key, cost in script:
        clock.now += advance_us / 1e6
        assert by_take.take(key, rate, cost) == by_check.check(key, rate, cost).allowed
        assert list(by_take._tats.items()) == list(by_check._tats.items())
