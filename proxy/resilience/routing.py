"""Endpoint choice per operation: primary vs replicas by kind, preference, breaker, lag and LSN."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Final

from proxy.resilience.breaker import CircuitBreaker

__all__ = [
    "ANALYTICS_KINDS",
    "KINDS",
    "PREFERENCES",
    "READ_KINDS",
    "WRITE_KINDS",
    "EndpointState",
    "Role",
    "Router",
    "format_lsn",
    "parse_lsn",
]

WRITE_KINDS: Final = frozenset({"write", "transaction"})  # always the primary
READ_KINDS: Final = frozenset({"read", "aggregate", "search", "count"})
KINDS: Final = WRITE_KINDS | READ_KINDS
ANALYTICS_KINDS: Final = frozenset({"aggregate", "search", "count"})
PREFERENCES: Final = ("primary", "secondary", "nearest")
EWMA_ALPHA: Final = 0.2

_LSN_RE: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_LSN_MAX: Final = (1 << 64) - 1


class Role(enum.Enum):
    PRIMARY = "primary"
    REPLICA = "replica"  # takes every read kind
    ANALYTICS = "analytics"  # takes only the router's ``analytics_only_for`` kinds


@dataclass(eq=False)
class EndpointState:
    """What the router knows of one endpoint; the backend keeps the numbers current.

    ``outstanding``: requests sent and not yet answered. ``latency_ewma_ms``: recent
    latency (``Router.record_latency``). ``lag_bytes``/``lag_seconds``/``replayed_lsn``:
    the last replication measurement (None: not measured yet). ``healthy``: the last health
    check passed. Compared by identity, so it can key dicts.
    """

    name: str
    role: Role
    breaker: CircuitBreaker
    outstanding: int = 0
    latency_ewma_ms: float | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    replayed_lsn: int | None = None
    healthy: bool = True
    last_error: str | None = None  # redacted text, for GET /api/db/connections


class Router:
    """Chooses the endpoint for one operation (PgCat-style: skip banned replicas, never ban
    the primary, and when no replica is usable send reads to the primary).

    ``choose`` has no effect on breakers: the caller claims the chosen endpoint with
    ``endpoint.breaker.allow()`` right before sending (no ``await`` in between). A replica
    it returns always admits; the primary is returned even when its breaker is open, and the
    caller then fails fast with ``retry_after()``.

    A replica is *eligible* for a read of ``kind`` when its breaker would admit, it is
    healthy, its measured lag is within ``max_lag_seconds`` (and ``max_lag_bytes`` when set),
    it has replayed ``min_lsn`` when one is given, and, for role ANALYTICS, ``kind`` is in
    ``analytics_only_for``. A replica whose lag was never measured is not eligible unless
    ``unmeasured_lag_ok``.

    ``secondary`` takes the eligible replica with the fewest outstanding requests;
    ``nearest`` the endpoint (primary or eligible replica) with the lowest latency EWMA, an
    unmeasured one counting as slowest, then the fewest outstanding. Remaining ties are
    broken deterministically: the primary first (``nearest``), then the replica after the
    one last chosen (round robin in configuration order), so sequential traffic spreads.
    """

    def __init__(
        self,
        primary: EndpointState,
        replicas: list[EndpointState],
        *,
        max_lag_seconds: float,
        max_lag_bytes: int | None,
        analytics_only_for: frozenset[str] = ANALYTICS_KINDS,
        unmeasured_lag_ok: bool = False,
    ) -> None:
        problems = _problems(primary, replicas, max_lag_seconds, max_lag_bytes, analytics_only_for)
        if problems:
            raise ValueError("invalid router: " + "; ".join(problems))
        self.primary = primary
        self.replicas: tuple[EndpointState, ...] = tuple(replicas)
        self.max_lag_seconds = max_lag_seconds
        self.max_lag_bytes = max_lag_bytes
        self.analytics_only_for = analytics_only_for
        self.unmeasured_lag_ok = unmeasured_lag_ok
        self._next = 0  # index of the replica that wins the next tie

    @property
    def endpoints(self) -> tuple[EndpointState, ...]:
        return (self.primary, *self.replicas)

    def choose(self, kind: str, preference: str, min_lsn: int | None = None) -> EndpointState:
        """The endpoint for an operation of ``kind`` under read ``preference``; never None."""
        if kind not in KINDS:
            raise ValueError(f"unknown operation kind {kind!r}")
        if preference not in PREFERENCES:
            raise ValueError(f"unknown read preference {preference!r}")
        if kind in WRITE_KINDS or preference == "primary" or not self.replicas:
            return self.primary
        candidates = self._indexed_eligible(kind, min_lsn)
        if preference == "secondary":
            if not candidates:
                return self.primary
            index, chosen = min(candidates, key=self._secondary_key)
        else:
            index, chosen = min([(-1, self.primary), *candidates], key=self._nearest_key)
            if index < 0:
                return self.primary
        self._next = (index + 1) % len(self.replicas)
        return chosen

    def eligible_replicas(self, kind: str, min_lsn: int | None = None) -> list[EndpointState]:
        """The replicas that may serve a read of ``kind`` now, in configuration order.

        With ``min_lsn=None`` it also tells whether waiting for replay could help a
        token-carrying read that ``choose`` sent to the primary."""
        return [r for _, r in self._indexed_eligible(kind, min_lsn)]

    def is_eligible(self, replica: EndpointState, kind: str, min_lsn: int | None = None) -> bool:
        return replica.role is not Role.PRIMARY and self._eligible(replica, kind, min_lsn)

    def record_latency(self, endpoint: EndpointState, ms: float) -> None:
        """Fold one observed latency into the endpoint's EWMA (alpha 0.2)."""
        if not (math.isfinite(ms) and ms >= 0):
            raise ValueError(f"latency must be a finite number >= 0, got {ms!r}")
        old = endpoint.latency_ewma_ms
        endpoint.latency_ewma_ms = ms if old is None else EWMA_ALPHA * ms + (1 - EWMA_ALPHA) * old

    # ------------------------------------------------------------------ internals

    def _eligible(self, replica: EndpointState, kind: str, min_lsn: int | None) -> bool:
        if replica.role is Role.ANALYTICS and kind not in self.analytics_only_for:
            return False
        if not replica.healthy or not self._lag_ok(replica):
            return False
        if min_lsn is not None and (replica.replayed_lsn is None or replica.replayed_lsn < min_lsn):
            return False
        return replica.breaker.would_allow()

    def _lag_ok(self, replica: EndpointState) -> bool:
        if replica.lag_seconds is None:
            seconds_ok = self.unmeasured_lag_ok
        else:
            seconds_ok = replica.lag_seconds <= self.max_lag_seconds
        if self.max_lag_bytes is None or not seconds_ok:
            return seconds_ok
        if replica.lag_bytes is None:
            return self.unmeasured_lag_ok
        return replica.lag_bytes <= self.max_lag_bytes

    def _indexed_eligible(self, kind: str, min_lsn: int | None) -> list[tuple[int, EndpointState]]:
        """(configuration index, replica) of the eligible replicas."""
        return [(i, r) for i, r in enumerate(self.replicas) if self._eligible(r, kind, min_lsn)]

    def _tie_rank(self, index: int) -> int:
        """0 for the replica after the one last chosen, then onwards, wrapping (-1: primary)."""
        return -1 if index < 0 else (index - self._next) % len(self.replicas)

    def _secondary_key(self, pair: tuple[int, EndpointState]) -> tuple[int, int]:
        index, replica = pair
        return (replica.outstanding, self._tie_rank(index))

    def _nearest_key(self, pair: tuple[int, EndpointState]) -> tuple[float, int, int]:
        index, endpoint = pair
        latency = endpoint.latency_ewma_ms
        return (
            math.inf if latency is None else latency,
            endpoint.outstanding,
            self._tie_rank(index),
        )


def _problems(
    primary: EndpointState,
    replicas: list[EndpointState],
    max_lag_seconds: float,
    max_lag_bytes: int | None,
    analytics_only_for: frozenset[str],
) -> list[str]:
    problems: list[str] = []
    if primary.role is not Role.PRIMARY:
        problems.append(f"primary {primary.name!r} has role {primary.role.value}")
    for replica in replicas:
        if replica.role is Role.PRIMARY:
            problems.append(f"replica {replica.name!r} has role primary")
    names = [primary.name, *(r.name for r in replicas)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"duplicate endpoint names: {', '.join(duplicates)}")
    if len({id(e) for e in (primary, *replicas)}) != len(names):
        problems.append("the same EndpointState object appears twice")
    if not max_lag_seconds >= 0:  # also refuses NaN; inf means no bound
        problems.append("max_lag_seconds must be >= 0")
    if max_lag_bytes is not None and max_lag_bytes < 0:
        problems.append("max_lag_bytes must be >= 0 or None")
    unknown = sorted(analytics_only_for - READ_KINDS)
    if unknown:
        problems.append(f"analytics_only_for holds non-read kinds: {', '.join(unknown)}")
    return problems


def parse_lsn(text: str) -> int:
    """PostgreSQL ``pg_lsn`` text (``"16/B374D848"``: high and low 32 bits in hex) -> int."""
    match = _LSN_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a PostgreSQL LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """int -> PostgreSQL ``pg_lsn`` text, as the server prints it (``"16/B374D848"``)."""
    if not 0 <= lsn <= _LSN_MAX:
        raise ValueError(f"LSN out of range: {lsn!r}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
