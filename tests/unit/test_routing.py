"""Tests of proxy/routing.py: every routing rule, ties, LSN gating, lag, analytics, LSN text."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.resilience.breaker import BreakerSettings, BreakerState, CircuitBreaker
from proxy.resilience.routing import (
    ANALYTICS_KINDS,
    KINDS,
    READ_KINDS,
    EndpointState,
    Role,
    Router,
    format_lsn,
    parse_lsn,
)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


CLOCK = FakeClock()
SETTINGS = BreakerSettings(consecutive_failures=1, base_open_seconds=1.0)


def endpoint(
    name: str, role: Role = Role.REPLICA, clock: FakeClock = CLOCK, **kw: Any
) -> EndpointState:
    fields: dict[str, Any] = {"lag_seconds": 0.0, "lag_bytes": 0, "replayed_lsn": 0}
    if role is Role.PRIMARY:
        fields = {}
    fields.update(kw)
    return EndpointState(name, role, CircuitBreaker(name, SETTINGS, clock), **fields)


def router(*replicas: EndpointState, primary: EndpointState | None = None, **kw: Any) -> Router:
    options: dict[str, Any] = {"max_lag_seconds": 5.0, "max_lag_bytes": 1_000_000}
    options.update(kw)
    return Router(primary or endpoint("p", Role.PRIMARY), list(replicas), **options)


def open_breaker(e: EndpointState) -> None:
    e.breaker.record_failure()
    assert e.breaker.state is BreakerState.OPEN


# ---- writes and preference primary --------------------------------------------------------


@pytest.mark.parametrize("kind", ["write", "transaction"])
@pytest.mark.parametrize("preference", ["primary", "secondary", "nearest"])
def test_writes_and_transactions_always_go_to_the_primary(kind: str, preference: str) -> None:
    fast = endpoint("r1", latency_ewma_ms=0.1)
    r = router(fast, primary=endpoint("p", Role.PRIMARY, latency_ewma_ms=50.0, outstanding=99))
    assert r.choose(kind, preference) is r.primary
    assert r.choose(kind, preference, min_lsn=0) is r.primary


@pytest.mark.parametrize("kind", sorted(READ_KINDS))
def test_preference_primary_reads_from_the_primary(kind: str) -> None:
    r = router(endpoint("r1"), endpoint("r2"))
    assert r.choose(kind, "primary") is r.primary


def test_the_primary_is_never_banned() -> None:
    r = router(endpoint("r1"))
    open_breaker(r.primary)
    r.primary.healthy = False
    assert r.choose("write", "secondary") is r.primary
    r.replicas[0].healthy = False
    assert r.choose("read", "secondary") is r.primary
    assert r.choose("read", "nearest") is r.primary


def test_no_replicas_means_primary() -> None:
    r = router()
    for preference in ("primary", "secondary", "nearest"):
        assert r.choose("read", preference) is r.primary


def test_unknown_kind_or_preference_is_a_programming_error() -> None:
    r = router(endpoint("r1"))
    with pytest.raises(ValueError, match="kind"):
        r.choose("delete", "primary")
    with pytest.raises(ValueError, match="preference"):
        r.choose("read", "secondaryPreferred")


# ---- secondary: least outstanding, fallbacks ----------------------------------------------


def test_secondary_takes_the_least_outstanding_replica() -> None:
    r1, r2, r3 = (
        endpoint("r1", outstanding=3),
        endpoint("r2", outstanding=1),
        endpoint("r3", outstanding=2),
    )
    r = router(r1, r2, r3)
    assert r.choose("read", "secondary") is r2
    r2.outstanding = 5
    assert r.choose("read", "secondary") is r3


def test_secondary_ignores_latency_and_the_primary_load() -> None:
    slow = endpoint("r1", latency_ewma_ms=500.0)
    r = router(slow, primary=endpoint("p", Role.PRIMARY, outstanding=0, latency_ewma_ms=0.1))
    slow.outstanding = 40
    assert r.choose("read", "secondary") is slow


def test_secondary_ties_rotate_in_configuration_order() -> None:
    r1, r2, r3 = endpoint("r1"), endpoint("r2"), endpoint("r3")
    r = router(r1, r2, r3)
    picks = [r.choose("read", "secondary").name for _ in range(7)]
    assert picks == ["r1", "r2", "r3", "r1", "r2", "r3", "r1"]


def test_rotation_skips_ineligible_and_busier_replicas() -> None:
    r1, r2, r3 = endpoint("r1"), endpoint("r2"), endpoint("r3")
    r = router(r1, r2, r3)
    assert r.choose("read", "secondary") is r1
    r2.healthy = False
    assert r.choose("read", "secondary") is r3
    assert r.choose("read", "secondary") is r1
    r3.outstanding = 1
    assert r.choose("read", "secondary") is r1


def test_same_state_same_choice() -> None:
    def build() -> Router:
        return router(endpoint("r1", outstanding=2), endpoint("r2", outstanding=1), endpoint("r3"))

    a, b = build(), build()
    for _ in range(5):
        assert a.choose("read", "secondary").name == b.choose("read", "secondary").name
        assert a.choose("count", "nearest").name == b.choose("count", "nearest").name


def test_open_breaker_diverts_reads_to_the_other_replica() -> None:
    r1, r2 = endpoint("r1"), endpoint("r2", outstanding=10)
    r = router(r1, r2)
    open_breaker(r1)
    assert [r.choose("read", "secondary") for _ in range(3)] == [r2, r2, r2]


def test_every_replica_out_sends_reads_to_the_primary() -> None:
    r1, r2 = endpoint("r1"), endpoint("r2")
    r = router(r1, r2)
    open_breaker(r1)
    r2.healthy = False
    assert r.choose("read", "secondary") is r.primary
    assert r.eligible_replicas("read") == []


def test_half_open_replica_is_eligible_only_while_a_probe_slot_is_free() -> None:
    clock = FakeClock()
    r1, r2 = endpoint("r1", clock=clock), endpoint("r2", clock=clock, outstanding=5)
    r = router(r1, r2)
    open_breaker(r1)
    assert r.choose("read", "secondary") is r2
    clock.now = 0.999
    assert r.choose("read", "secondary") is r2
    clock.now = 1.0  # open period over: the replica may take a probe
    chosen = r.choose("read", "secondary")
    assert chosen is r1
    assert r1.breaker.state.value == "open"  # choose() never touches breakers
    assert chosen.breaker.allow()  # the caller claims; now half-open, slot taken
    assert r1.breaker.state.value == "half-open"
    assert r.choose("read", "secondary") is r2
    r1.breaker.record_success()
    assert r.choose("read", "secondary") is r1


def test_unhealthy_replica_is_skipped() -> None:
    r1, r2 = endpoint("r1", healthy=False), endpoint("r2", outstanding=7)
    assert router(r1, r2).choose("read", "secondary") is r2


# ---- lag ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lag_seconds", "eligible"), [(0.0, True), (4.999, True), (5.0, True), (5.001, False)]
)
def test_lag_seconds_bound_is_inclusive(lag_seconds: float, eligible: bool) -> None:
    r1 = endpoint("r1", lag_seconds=lag_seconds)
    r = router(r1)
    assert (r.choose("read", "secondary") is r1) is eligible


@pytest.mark.parametrize(
    ("lag_bytes", "eligible"), [(999_999, True), (1_000_000, True), (1_000_001, False)]
)
def test_lag_bytes_bound_is_inclusive(lag_bytes: int, eligible: bool) -> None:
    r1 = endpoint("r1", lag_bytes=lag_bytes)
    assert (router(r1).choose("read", "secondary") is r1) is eligible


def test_lag_bytes_ignored_when_unbounded() -> None:
    r1 = endpoint("r1", lag_bytes=10**12)
    assert router(r1, max_lag_bytes=None).choose("read", "secondary") is r1
    r2 = endpoint("r2", lag_bytes=None)
    assert router(r2, max_lag_bytes=None).choose("read", "secondary") is r2


def test_lagging_replica_rejoins_when_it_catches_up() -> None:
    r1, r2 = endpoint("r1", lag_seconds=30.0), endpoint("r2", outstanding=3)
    r = router(r1, r2)
    assert r.choose("read", "secondary") is r2
    r1.lag_seconds = 0.2
    assert r.choose("read", "secondary") is r1


def test_unmeasured_lag_is_not_eligible_unless_allowed() -> None:
    r1 = endpoint("r1", lag_seconds=None)
    assert router(r1).choose("read", "secondary").name == "p"
    assert router(r1, unmeasured_lag_ok=True).choose("read", "secondary") is r1
    r2 = endpoint("r2", lag_bytes=None)
    assert router(r2).choose("read", "secondary").name == "p"
    assert router(r2, unmeasured_lag_ok=True).choose("read", "secondary") is r2
    r3 = endpoint("r3", lag_seconds=9.0, lag_bytes=None)
    assert router(r3, unmeasured_lag_ok=True).choose("read", "secondary").name == "p"


# ---- consistency tokens (min_lsn) ---------------------------------------------------------


def test_lsn_gated_read_only_goes_to_a_replica_that_replayed_it() -> None:
    behind = endpoint("behind", replayed_lsn=parse_lsn("0/3000000"))
    ahead = endpoint("ahead", replayed_lsn=parse_lsn("0/3000060"), outstanding=9)
    r = router(behind, ahead)
    token = parse_lsn("0/3000060")
    assert r.choose("read", "secondary", min_lsn=token) is ahead
    assert r.choose("read", "secondary", min_lsn=token - 1) is ahead  # behind is still behind
    assert r.choose("read", "secondary", min_lsn=token + 1) is r.primary
    assert r.choose("read", "nearest", min_lsn=token + 1) is r.primary


def test_lsn_gate_boundary_is_inclusive() -> None:
    r1 = endpoint("r1", replayed_lsn=100)
    r = router(r1)
    assert r.choose("read", "secondary", min_lsn=99) is r1
    assert r.choose("read", "secondary", min_lsn=100) is r1
    assert r.choose("read", "secondary", min_lsn=101) is r.primary


def test_lsn_gate_prefers_least_outstanding_among_caught_up() -> None:
    r1 = endpoint("r1", replayed_lsn=50, outstanding=0)
    r2 = endpoint("r2", replayed_lsn=200, outstanding=4)
    r3 = endpoint("r3", replayed_lsn=300, outstanding=2)
    r = router(r1, r2, r3)
    assert r.choose("read", "secondary", min_lsn=200) is r3
    assert r.choose("read", "secondary") is r1


def test_unknown_replayed_lsn_fails_the_gate() -> None:
    r1 = endpoint("r1", replayed_lsn=None)
    r = router(r1)
    assert r.choose("read", "secondary", min_lsn=0) is r.primary
    assert r.choose("read", "secondary") is r1


def test_eligible_replicas_tells_whether_waiting_could_help() -> None:
    r1 = endpoint("r1", replayed_lsn=10)
    r = router(r1)
    assert r.eligible_replicas("read", min_lsn=11) == []
    assert r.eligible_replicas("read") == [r1]
    assert r.is_eligible(r1, "read") and not r.is_eligible(r1, "read", 11)
    assert not r.is_eligible(r.primary, "read")


# ---- analytics role -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ANALYTICS_KINDS))
def test_analytics_replica_takes_analytics_kinds(kind: str) -> None:
    a = endpoint("a", Role.ANALYTICS)
    assert router(a).choose(kind, "secondary") is a


def test_analytics_replica_never_takes_plain_reads() -> None:
    a, r1 = endpoint("a", Role.ANALYTICS), endpoint("r1", outstanding=50)
    r = router(a, r1)
    assert r.choose("read", "secondary") is r1
    r1.healthy = False
    assert r.choose("read", "secondary") is r.primary
    assert r.choose("read", "nearest") is r.primary


def test_analytics_kinds_are_configurable() -> None:
    a = endpoint("a", Role.ANALYTICS)
    r = router(a, analytics_only_for=frozenset({"aggregate"}))
    assert r.choose("aggregate", "secondary") is a
    assert r.choose("count", "secondary") is r.primary
    r_all = router(a, analytics_only_for=READ_KINDS)
    assert r_all.choose("read", "secondary") is a


def test_plain_replicas_take_analytics_kinds_too() -> None:
    a, r1 = endpoint("a", Role.ANALYTICS, outstanding=2), endpoint("r1")
    assert router(a, r1).choose("aggregate", "secondary") is r1


# ---- nearest ------------------------------------------------------------------------------


def test_nearest_takes_the_lowest_latency_including_the_primary() -> None:
    r1 = endpoint("r1", latency_ewma_ms=3.0)
    r2 = endpoint("r2", latency_ewma_ms=1.5)
    p = endpoint("p", Role.PRIMARY, latency_ewma_ms=2.0)
    r = router(r1, r2, primary=p)
    assert r.choose("read", "nearest") is r2
    r2.latency_ewma_ms = 2.5
    assert r.choose("read", "nearest") is p


def test_nearest_skips_ineligible_replicas_even_if_fast() -> None:
    fast = endpoint("fast", latency_ewma_ms=0.1, lag_seconds=60.0)
    slow = endpoint("slow", latency_ewma_ms=9.0)
    p = endpoint("p", Role.PRIMARY, latency_ewma_ms=10.0)
    assert router(fast, slow, primary=p).choose("read", "nearest") is slow


def test_nearest_unmeasured_counts_as_slowest() -> None:
    r1 = endpoint("r1")
    r2 = endpoint("r2", latency_ewma_ms=100.0)
    assert router(r1, r2).choose("read", "nearest") is r2
    assert router(endpoint("r3")).choose("read", "nearest").name == "p"


def test_nearest_ties_fewest_outstanding_then_primary_then_rotation() -> None:
    p = endpoint("p", Role.PRIMARY, latency_ewma_ms=1.0, outstanding=1)
    r1 = endpoint("r1", latency_ewma_ms=1.0)
    r2 = endpoint("r2", latency_ewma_ms=1.0)
    r = router(r1, r2, primary=p)
    assert [r.choose("read", "nearest").name for _ in range(3)] == ["r1", "r2", "r1"]
    p.outstanding = 0
    assert r.choose("read", "nearest") is p


# ---- latency EWMA -------------------------------------------------------------------------


def test_record_latency_ewma_alpha_point_two() -> None:
    r1 = endpoint("r1")
    r = router(r1)
    r.record_latency(r1, 10.0)
    assert r1.latency_ewma_ms == 10.0
    r.record_latency(r1, 20.0)
    assert r1.latency_ewma_ms == pytest.approx(12.0)
    r.record_latency(r1, 0.0)
    assert r1.latency_ewma_ms == pytest.approx(9.6)
    with pytest.raises(ValueError):
        r.record_latency(r1, -1.0)
    with pytest.raises(ValueError):
        r.record_latency(r1, float("nan"))


# ---- construction -------------------------------------------------------------------------


def test_invalid_router_reports_every_problem() -> None:
    r1 = endpoint("r1")
    with pytest.raises(ValueError) as info:
        Router(
            endpoint("p", Role.REPLICA),
            [r1, r1, endpoint("x", Role.PRIMARY)],
            max_lag_seconds=-1,
            max_lag_bytes=-5,
            analytics_only_for=frozenset({"write"}),
        )
    text = str(info.value)
    for fragment in (
        "primary 'p' has role replica",
        "replica 'x' has role primary",
        "duplicate endpoint names: r1",
        "appears twice",
        "max_lag_seconds",
        "max_lag_bytes",
        "non-read kinds: write",
    ):
        assert fragment in text


def test_endpoints_are_compared_by_identity() -> None:
    a, b = endpoint("same"), endpoint("same")
    assert a != b and len({a, b}) == 2
    assert [e.name for e in router(endpoint("r1")).endpoints] == ["p", "r1"]


# ---- LSN text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/1", 1),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
        ("1/0", 2**32),
    ],
)
def test_lsn_round_trip(text: str, value: int) -> None:
    assert parse_lsn(text) == value
    assert format_lsn(value) == text


def test_parse_lsn_accepts_lowercase_and_padding() -> None:
    assert parse_lsn("16/b374d848") == parse_lsn("16/B374D848")
    assert parse_lsn("00000016/0B374D84") == parse_lsn("16/B374D84")


@pytest.mark.parametrize(
    "bad", ["", "16", "16/", "/1", "1/2/3", "G/0", "123456789/0", "0/-1", "0x1/0"]
)
def test_parse_lsn_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(bad)


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_format_lsn_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        format_lsn(bad)


@given(st.integers(0, 2**64 - 1))
def test_lsn_text_round_trips_and_orders(value: int) -> None:
    text = format_lsn(value)
    assert parse_lsn(text) == value
    assert text == text.upper() and "/" in text


# ---- the property -------------------------------------------------------------------------


def mostly(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually ``strategy``, sometimes None (not measured yet)."""
    return st.one_of(*[strategy] * 5, st.none())


replica_strategy = st.fixed_dictionaries(
    {
        "role": st.sampled_from([Role.REPLICA, Role.REPLICA, Role.ANALYTICS]),
        "outstanding": st.integers(0, 5),
        "latency_ewma_ms": mostly(st.floats(0, 50)),
        "lag_bytes": mostly(st.integers(0, 1200)),
        "lag_seconds": mostly(st.floats(0, 4)),
        "replayed_lsn": mostly(st.integers(0, 1000)),
        "healthy": st.sampled_from([True] * 5 + [False]),
        "breaker": st.sampled_from(["closed"] * 5 + ["open", "open-elapsed", "half-open-full"]),
    }
)


NOW = 10.0


def build_replica(i: int, spec: dict[str, Any], clock: FakeClock) -> EndpointState:
    """A replica whose breaker is, at ``NOW``, in the state ``spec["breaker"]`` names."""
    fields = {k: v for k, v in spec.items() if k not in ("role", "breaker")}
    e = EndpointState(f"r{i}", spec["role"], CircuitBreaker(f"r{i}", SETTINGS, clock), **fields)
    tripped_at = {"open": NOW - 0.5, "open-elapsed": NOW - 1.0, "half-open-full": NOW - 2.0}
    if spec["breaker"] in tripped_at:
        clock.now = tripped_at[spec["breaker"]]
        e.breaker.record_failure()  # open for 1 s
    if spec["breaker"] == "half-open-full":
        clock.now = NOW - 1.0
        assert e.breaker.allow()  # the one probe slot is taken
    return e


def oracle_ok(
    spec: dict[str, Any],
    kind: str,
    min_lsn: int | None,
    max_lag_seconds: float,
    max_lag_bytes: int | None,
) -> bool:
    """Eligibility computed from the generated description alone, not by the router."""
    return (
        (spec["role"] is Role.REPLICA or kind in ANALYTICS_KINDS)
        and spec["healthy"]
        and spec["breaker"] in ("closed", "open-elapsed")
        and spec["lag_seconds"] is not None
        and spec["lag_seconds"] <= max_lag_seconds
        and (
            max_lag_bytes is None
            or (spec["lag_bytes"] is not None and spec["lag_bytes"] <= max_lag_bytes)
        )
        and (
            min_lsn is None
            or (spec["replayed_lsn"] is not None and spec["replayed_lsn"] >= min_lsn)
        )
    )


@given(
    replicas=st.lists(replica_strategy, min_size=1, max_size=5),
    primary_open=st.booleans(),
    kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=10),
    preference=st.sampled_from(["primary", "secondary", "nearest"]),
    min_lsn=st.none() | st.integers(0, 700),
    max_lag_seconds=st.floats(0, 10),
    max_lag_bytes=st.none() | st.integers(0, 2000),
)
def test_router_never_returns_a_banned_lagging_or_stale_replica(
    replicas: list[dict[str, Any]],
    primary_open: bool,
    kinds: list[str],
    preference: str,
    min_lsn: int | None,
    max_lag_seconds: float,
    max_lag_bytes: int | None,
) -> None:
    clock = FakeClock()
    endpoints = [build_replica(i, spec, clock) for i, spec in enumerate(replicas)]
    primary = endpoint("p", Role.PRIMARY, clock=clock)
    if primary_open:
        clock.now = NOW
        primary.breaker.record_failure()
    clock.now = NOW
    r = Router(primary, endpoints, max_lag_seconds=max_lag_seconds, max_lag_bytes=max_lag_bytes)
    for kind in kinds:
        ok = [
            e
            for e, spec in zip(endpoints, replicas, strict=True)
            if oracle_ok(spec, kind, min_lsn, max_lag_seconds, max_lag_bytes)
        ]
        assert r.eligible_replicas(kind, min_lsn) == ok
        chosen = r.choose(kind, preference, min_lsn)
        assert chosen is primary or chosen in ok  # never None, never an ineligible replica
        if kind in ("write", "transaction") or preference == "primary":
            assert chosen is primary
        elif preference == "secondary":
            assert (chosen is primary) == (not ok)  # the primary only when no replica is usable
            if ok:
                assert chosen.outstanding == min(e.outstanding for e in ok)
        if chosen is not primary:
            event(f"{preference}: {chosen.role.value} with breaker {chosen.breaker.state.value}")
            assert chosen.breaker.would_allow()
            assert chosen.breaker.allow()  # what the caller does next must succeed
            chosen.breaker.release()
