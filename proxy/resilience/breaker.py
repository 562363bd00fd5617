"""Circuit breaker per endpoint: closed / open / half-open, backoff that grows (pure logic)."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["BreakerSettings", "BreakerState", "CircuitBreaker", "Clock"]

Clock = Callable[[], float]
"""Seconds on a monotonic scale (``time.monotonic`` in production, a fake in tests)."""


class BreakerState(enum.Enum):
    CLOSED = "closed"  # traffic flows; failures are counted
    OPEN = "open"  # traffic refused until the open period has elapsed
    HALF_OPEN = "half-open"  # a few probe requests decide: success closes, failure re-opens


# Every legal transition; ``CircuitBreaker._transition`` refuses anything else.
_TRANSITIONS: Final[frozenset[tuple[BreakerState, BreakerState]]] = frozenset(
    {
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    }
)

_MAX_DOUBLINGS: Final = 62  # base * 2**62 exceeds any sensible cap; avoids float overflow


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a breaker opens and for how long.

    It opens after ``consecutive_failures`` failures in a row, or when, over the sliding
    window of ``window_seconds``, at least ``min_calls_in_window`` calls were recorded and
    the share of failures among them is >= ``failure_ratio``. The n-th trip in a row (no
    successful probe in between) keeps it open ``base_open_seconds * 2**(n-1)`` seconds,
    capped at ``max_open_seconds``. Half-open, it admits ``half_open_probes`` requests at
    once. The window is made of ``window_buckets`` equal time buckets (1 s each by default):
    a call is forgotten between ``window_seconds - window_seconds/window_buckets`` and
    ``window_seconds`` after it was recorded.
    """

    consecutive_failures: int = 5
    failure_ratio: float = 0.5
    window_seconds: float = 10.0
    min_calls_in_window: int = 20
    base_open_seconds: float = 1.0
    max_open_seconds: float = 30.0
    half_open_probes: int = 1
    window_buckets: int = 10

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid breaker settings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with these values (empty when valid)."""
        problems: list[str] = []
        if self.consecutive_failures < 1:
            problems.append("consecutive_failures must be >= 1")
        if not 0.0 < self.failure_ratio <= 1.0:
            problems.append("failure_ratio must be in (0, 1]")
        if not (math.isfinite(self.window_seconds) and self.window_seconds > 0):
            problems.append("window_seconds must be a positive number")
        if self.min_calls_in_window < 1:
            problems.append("min_calls_in_window must be >= 1")
        if not (math.isfinite(self.base_open_seconds) and self.base_open_seconds > 0):
            problems.append("base_open_seconds must be a positive number")
        if not (math.isfinite(self.max_open_seconds) and self.max_open_seconds > 0):
            problems.append("max_open_seconds must be a positive number")
        elif self.max_open_seconds < self.base_open_seconds:
            problems.append("max_open_seconds must be >= base_open_seconds")
        if self.half_open_probes < 1:
            problems.append("half_open_probes must be >= 1")
        if self.window_buckets < 1:
            problems.append("window_buckets must be >= 1")
        return problems

    def open_seconds(self, trips_in_a_row: int) -> float:
        """How long the ``trips_in_a_row``-th consecutive trip keeps the breaker open."""
        doublings = min(max(trips_in_a_row - 1, 0), _MAX_DOUBLINGS)
        return min(self.base_open_seconds * 2.0**doublings, self.max_open_seconds)


class _Window:
    """Calls and failures over the last ``buckets`` time buckets; fixed memory."""

    __slots__ = ("_calls", "_epochs", "_failures", "_width")

    def __init__(self, seconds: float, buckets: int) -> None:
        self._width = seconds / buckets
        self._epochs = [-1] * buckets  # which bucket number each slot currently holds
        self._calls = [0] * buckets
        self._failures = [0] * buckets

    def _epoch(self, now: float) -> int:
        return math.floor(now / self._width)

    def add(self, now: float, failed: bool) -> None:
        epoch = self._epoch(now)
        slot = epoch % len(self._epochs)
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._calls[slot] = 0
            self._failures[slot] = 0
        self._calls[slot] += 1
        if failed:
            self._failures[slot] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(calls, failures) in the buckets that still belong to the window at ``now``."""
        oldest = self._epoch(now) - len(self._epochs) + 1
        calls = failures = 0
        for slot, epoch in enumerate(self._epochs):
            if epoch >= oldest:
                calls += self._calls[slot]
                failures += self._failures[slot]
        return calls, failures

    def clear(self) -> None:
        for slot in range(len(self._epochs)):
            self._epochs[slot] = -1
            self._calls[slot] = 0
            self._failures[slot] = 0


class CircuitBreaker:
    """One endpoint's breaker. Not thread-safe; meant for one asyncio event loop.

    Contract for callers: ask ``allow()`` before sending; when it said True, report exactly
    one of ``record_success()`` (the server answered, even with a client error such as a
    constraint violation), ``record_failure()`` (the endpoint is unavailable: connection
    refused/reset/lost, connect or statement timeout, PostgreSQL admin-shutdown /
    cannot-connect-now / too-many-connections) or ``release()`` (no verdict: the request was
    cancelled). Classifying errors is the adapter's job, never this module's. A half-open
    probe that reports nothing within ``max_open_seconds`` is presumed lost, so a leaked
    probe cannot keep the breaker half-open forever. Outcomes are not tied to the admission
    that produced them: a late answer to a request admitted while closed, arriving while
    half-open, counts as the probe's verdict (the endpoint did answer, or did fail, just now).

    Time-based changes happen lazily: an open breaker whose period has elapsed stays
    ``OPEN`` (with ``retry_after() == 0``) until the next ``allow()`` moves it to half-open.
    """

    def __init__(
        self,
        name: str,
        settings: BreakerSettings | None = None,
        clock: Clock | None = None,
        *,
        on_transition: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings if settings is not None else BreakerSettings()
        self._clock: Clock = clock if clock is not None else time.monotonic
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._window = _Window(self.settings.window_seconds, self.settings.window_buckets)
        self._consecutive_failures = 0
        self._trips = 0
        self._trips_in_a_row = 0  # trips since the breaker last closed: drives the backoff
        self._open_until = 0.0
        self._probes_in_flight = 0
        self._probes_lost_at = 0.0  # when in-flight probes are presumed lost

    # ------------------------------------------------------------------ reading

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def trips(self) -> int:
        """How many times the breaker went to OPEN (from CLOSED or HALF_OPEN)."""
        return self._trips

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def probes_in_flight(self) -> int:
        return self._probes_in_flight

    def would_allow(self) -> bool:
        """What ``allow()`` would answer now, without admitting anything or changing state."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            return now >= self._open_until
        return self._probe_slot_free(now)

    def retry_after(self) -> float:
        """Seconds until the breaker may admit a request again (0.0: it would admit now).

        Half-open with every probe slot taken, the answer depends on the pending probe; the
        hint is then the time until the probes are presumed lost, at most
        ``base_open_seconds``."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            return 0.0
        if self._state is BreakerState.OPEN:
            return max(0.0, self._open_until - now)
        if self._probe_slot_free(now):
            return 0.0
        return min(self.settings.base_open_seconds, max(0.0, self._probes_lost_at - now))

    def window_counts(self) -> tuple[int, int]:
        """(calls, failures) currently in the sliding window."""
        return self._window.counts(self._clock())

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view for ``GET /api/db/connections``."""
        calls, failures = self.window_counts()
        return {
            "state": self._state.value,
            "trips": self._trips,
            "consecutive_failures": self._consecutive_failures,
            "window_calls": calls,
            "window_failures": failures,
            "probes_in_flight": self._probes_in_flight,
            "retry_after": round(self.retry_after(), 3),
        }

    # ------------------------------------------------------------------ admitting

    def allow(self) -> bool:
        """May a request go to this endpoint now? True in half-open claims a probe slot."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now < self._open_until:
                return False
            self._transition(BreakerState.HALF_OPEN)
        if not self._probe_slot_free(now):
            return False
        if self._probes_in_flight >= self.settings.half_open_probes:
            self._probes_in_flight = 0  # the earlier probes are presumed lost
        self._probes_in_flight += 1
        self._probes_lost_at = now + self.settings.max_open_seconds
        return True

    def _probe_slot_free(self, now: float) -> bool:
        return self._probes_in_flight < self.settings.half_open_probes or (
            now >= self._probes_lost_at
        )

    # ------------------------------------------------------------------ outcomes

    def record_success(self) -> None:
        """The endpoint answered. Closes a half-open breaker; ignored while open (a late
        answer to a request admitted before the trip says nothing about now)."""
        if self._state is BreakerState.CLOSED:
            self._consecutive_failures = 0
            self._window.add(self._clock(), failed=False)
        elif self._state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """The endpoint was unavailable (connection/timeout/server-unavailable errors only)."""
        if self._state is BreakerState.CLOSED:
            now = self._clock()
            self._consecutive_failures += 1
            self._window.add(now, failed=True)
            if self._should_trip(now):
                self._transition(BreakerState.OPEN)
        elif self._state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.OPEN)

    def trip(self) -> None:
        """The endpoint is known not to answer (a liveness probe timed out): open now,
        without waiting for requests to fail one by one. Ignored while already open."""
        if self._state is not BreakerState.OPEN:
            self._transition(BreakerState.OPEN)

    def release(self) -> None:
        """An admitted request ended without a verdict (e.g. cancelled): free its probe slot."""
        if self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1

    def _should_trip(self, now: float) -> bool:
        settings = self.settings
        if self._consecutive_failures >= settings.consecutive_failures:
            return True
        calls, failures = self._window.counts(now)
        return calls >= settings.min_calls_in_window and failures / calls >= settings.failure_ratio

    # ------------------------------------------------------------------ the one place

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        if (old, new) not in _TRANSITIONS:
            raise RuntimeError(
                f"breaker {self.name!r}: illegal transition {old.value} -> {new.value}"
            )
        now = self._clock()
        self._probes_in_flight = 0
        self._probes_lost_at = 0.0
        if new is BreakerState.OPEN:
            self._trips += 1
            self._trips_in_a_row += 1
            self._open_until = now + self.settings.open_seconds(self._trips_in_a_row)
            self._consecutive_failures = 0
            self._window.clear()
        elif new is BreakerState.CLOSED:
            self._trips_in_a_row = 0
            self._consecutive_failures = 0
            self._window.clear()
        self._state = new
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)
