"""What the two cache levels exchange: the value types, the error, and the remote cache Protocol."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

__all__ = [
    "CacheUnavailable",
    "Clock",
    "Hit",
    "InvalidateCallback",
    "RemoteCache",
    "RemoteHit",
    "ResyncCallback",
    "Ticket",
]

Clock = Callable[[], float]
"""Seconds on a monotonic scale (``time.monotonic`` in production, a fake in tests)."""

InvalidateCallback = Callable[[list[tuple[str, int]]], None]
ResyncCallback = Callable[[], None]


class CacheUnavailable(Exception):
    """Redis could not serve a cache operation in time (down, frozen, erroring, resyncing).

    The message never contains the URL; a driver error is chained as ``__cause__``.
    """


class Hit(NamedTuple):
    """A cached document: its encoded bytes and its ``_version``."""

    value: bytes
    version: int


class RemoteHit(NamedTuple):
    """A Redis hit, with the milliseconds the entry has left (the near copy lives no longer)."""

    value: bytes
    version: int
    ttl_ms: int


class Ticket(NamedTuple):
    """A Redis fill ticket: Redis ``TIME`` in ms and the flush generation, at the miss."""

    at_ms: int
    gen: int


class RemoteCache(Protocol):
    """The shared level behind the near cache (``proxy.backends.redis.RedisCache``).

    Every operation raises ``CacheUnavailable`` on trouble; ``lease_until`` is on the near
    cache's clock. The counters are read for ``TwoLevelCache.stats``.
    """

    lease_until: float
    failures: int
    skipped: int
    resyncs: int
    ack_timeouts: int
    unconfirmed: int
    flushes: int

    @property
    def live(self) -> bool: ...

    @property
    def pending(self) -> int: ...

    def listen(self, on_invalidate: InvalidateCallback, on_resync: ResyncCallback) -> None: ...

    async def start(self, wait: float | None = None) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: str) -> RemoteHit | Ticket: ...

    async def put(
        self, key: str, value: bytes, version: int, ttl: float, ticket: Ticket | None = None
    ) -> bool: ...

    async def invalidate(self, entries: Sequence[tuple[str, int]]) -> None: ...
