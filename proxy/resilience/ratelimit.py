"""Rate limiting as pure logic: GCRA token buckets, a bounded local limiter, a concurrency cap."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "Clock",
    "ConcurrencyLimiter",
    "Decision",
    "LocalLimiter",
    "Rate",
    "gcra",
    "gcra_us",
    "to_us",
]

Clock = Callable[[], float]
"""Seconds on a monotonic scale (``time.monotonic`` in production, a fake in tests)."""

US_PER_S: Final = 1_000_000
_MAX_EXACT: Final = 2**53  # doubles hold every integer below this exactly
_MAX_PER_SECOND: Final = 1_000_000.0  # one token per microsecond is the finest grain


def to_us(seconds: float) -> int:
    """Seconds to whole microseconds, rounding half up (the same rounding everywhere)."""
    return math.floor(seconds * US_PER_S + 0.5)


def _ceil_us(x: float) -> int:
    """Round a microsecond amount up, forgiving float noise (3000000.0000000005 -> 3000000)."""
    nearest = round(x)
    if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)):
        return int(nearest)
    return math.ceil(x)


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_second`` tokens flow into a bucket holding at most ``burst`` tokens.

    20 per minute with a burst of 20 is ``Rate(20 / 60, 20)``. The emission interval is
    rounded *up* to a whole microsecond, so the effective rate never exceeds
    ``per_second`` (3 per second becomes one token every 333 334 us).
    """

    per_second: float
    burst: int
    interval_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not (isinstance(self.per_second, int | float) and math.isfinite(self.per_second)):
            problems.append(f"per_second must be a finite number, got {self.per_second!r}")
        elif not 0 < self.per_second <= _MAX_PER_SECOND:
            problems.append(f"per_second must be in (0, 1e6], got {self.per_second!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            problems.append(f"burst must be an integer >= 1, got {self.burst!r}")
        if problems:
            raise ValueError("; ".join(problems))
        interval = max(1, _ceil_us(US_PER_S / self.per_second))
        if interval * self.burst >= _MAX_EXACT:
            raise ValueError("burst / per_second is too long a window (over 285 years)")
        object.__setattr__(self, "interval_us", interval)

    @property
    def window_us(self) -> int:
        """Time for an empty bucket to fill up: ``burst`` emission intervals."""
        return self.interval_us * self.burst

    def fits(self, cost: float) -> bool:
        """Can a request of ``cost`` tokens ever be admitted (does it fit in a full bucket)?
        One that does not is refused by the GCRA step forever, whatever the wait."""
        return self.increment_us(cost) <= self.window_us

    def increment_us(self, cost: float) -> int:
        """How far a request of ``cost`` tokens moves the TAT (rounded up: never undercharge)."""
        if cost == 1:
            return self.interval_us
        if not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        return _ceil_us(self.interval_us * cost)


@dataclass(frozen=True, slots=True)
class Decision:
    """One rate-limit verdict, in the terms of the IETF ``RateLimit`` header fields.

    ``limit`` is the bucket capacity (burst); ``remaining`` the whole tokens left after this
    request; ``reset_after`` the seconds until the bucket is full again; ``retry_after`` the
    seconds until this request's cost would be admitted (0 when allowed). A cost larger
    than the burst can never be admitted: it is denied with ``retry_after`` equal to the
    full window (``burst / per_second``), the longest any admissible request waits.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_after: float

    @classmethod
    def from_us(
        cls, allowed: bool, limit: int, remaining: int, retry_us: float, reset_us: float
    ) -> Decision:
        """Build from the microsecond figures of ``gcra_us`` (or of the Redis script)."""
        return cls(allowed, limit, remaining, retry_us / US_PER_S, reset_us / US_PER_S)

    def headers(self) -> dict[str, str]:
        """``RateLimit-Limit/-Remaining/-Reset`` always, ``Retry-After`` when denied."""
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_after)),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


def gcra_us(
    tat_us: float | None, now_us: float, rate: Rate, cost: float = 1.0
) -> tuple[Decision, float | None]:
    """One GCRA step on whole microseconds: the decision and the new TAT (None = unchanged).

    ``tat_us`` None means "no state stored", which is a full bucket. This is, operation for
    operation, the Lua script of the Redis limiter; keep the two in step.
    """
    interval = rate.interval_us
    tolerance = interval * rate.burst
    increment = rate.increment_us(cost)
    base = tat_us if tat_us is not None and tat_us > now_us else now_us
    if increment > tolerance:
        return Decision.from_us(
            False,
            rate.burst,
            _left(base, now_us, tolerance, interval),
            tolerance,
            base - now_us,
        ), None
    new_tat = base + increment
    allow_at = new_tat - tolerance
    if now_us < allow_at:
        return Decision.from_us(
            False,
            rate.burst,
            _left(base, now_us, tolerance, interval),
            allow_at - now_us,
            base - now_us,
        ), None
    return Decision.from_us(
        True,
        rate.burst,
        _left(new_tat, now_us, tolerance, interval),
        0,
        new_tat - now_us,
    ), new_tat


def _left(tat: float, now: float, tolerance: float, interval: float) -> int:
    """Whole tokens in the bucket when its TAT is ``tat``."""
    return max(0, math.floor((tolerance - (tat - now)) / interval))


def gcra(
    tat: float | None, now: float, rate: Rate, cost: float = 1.0
) -> tuple[Decision, float | None]:
    """One GCRA step on seconds (``now`` and the TAT on the same clock), see ``gcra_us``.

    Times are rounded to the microsecond; the returned TAT is in seconds.
    """
    decision, new_tat = gcra_us(None if tat is None else to_us(tat), to_us(now), rate, cost)
    return decision, None if new_tat is None else new_tat / US_PER_S


class LocalLimiter:
    """In-process GCRA buckets by key, at most ``max_keys`` of them (least recently used
    evicted first; an evicted key starts again as a full bucket). O(1) per ``check``.
    """

    __slots__ = ("_clock", "_max_keys", "_tats")

    def __init__(self, clock: Clock, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self._clock = clock
        self._max_keys = max_keys
        self._tats: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tats)

    def __contains__(self, key: object) -> bool:
        return key in self._tats

    def check(self, key: str, rate: Rate, cost: float = 1.0) -> Decision:
        """Decide on a request of ``cost`` tokens against bucket ``key``; consume if allowed."""
        tats = self._tats
        tat = tats.get(key)
        if tat is not None:
            tats.move_to_end(key)
        decision, new_tat = gcra_us(tat, to_us(self._clock()), rate, cost)
        if new_tat is not None:
            tats[key] = new_tat
            if tat is None and len(tats) > self._max_keys:
                tats.popitem(last=False)
        return decision

    def take(self, key: str, rate: Rate, cost: float = 1.0) -> bool:
        """``check(...).allowed`` without building the ``Decision`` (the hot path: only a
        refusal needs its figures, and a refusal changes no state, so the caller may ask
        ``check`` for them afterwards). Same GCRA step, same stored TAT."""
        tats = self._tats
        tat = tats.get(key)
        if tat is not None:
            tats.move_to_end(key)
        now = to_us(self._clock())
        increment = rate.increment_us(cost)
        tolerance = rate.interval_us * rate.burst
        if increment > tolerance:
            return False
        new_tat = (tat if tat is not None and tat > now else now) + increment
        if now < new_tat - tolerance:
            return False
        tats[key] = new_tat
        if tat is None and len(tats) > self._max_keys:
            tats.popitem(last=False)
        return True


class ConcurrencyLimiter:
    """At most ``max_in_flight`` requests at once; never waits (full means answer 429 now).

    Pair every successful ``try_acquire`` with exactly one ``release`` (in a ``finally``).
    """

    __slots__ = ("_in_flight", "max_in_flight")

    def __init__(self, max_in_flight: int) -> None:
        if isinstance(max_in_flight, bool) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        self.max_in_flight = max_in_flight
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_acquire(self) -> bool:
        """Take a slot if one is free; False (and nothing taken) when all are busy."""
        if self._in_flight >= self.max_in_flight:
            return False
        self._in_flight += 1
        return True

    def release(self) -> None:
        """Give a slot back. Releasing more than was acquired is a bug and raises."""
        if self._in_flight <= 0:
            raise RuntimeError("ConcurrencyLimiter.release() without a matching acquire")
        self._in_flight -= 1
