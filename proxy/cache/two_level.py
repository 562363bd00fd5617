"""Both cache levels for the pipeline: the near cache in front of a remote cache, kept coherent."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from proxy.cache.near import NearCache
from proxy.cache.protocol import CacheUnavailable, Hit, RemoteCache, RemoteHit, Ticket

__all__ = ["Miss", "TwoLevelCache"]


class Miss(NamedTuple):
    """A ``TwoLevelCache`` miss; pass it back to ``put`` after reading the database.

    ``since`` is the near cache's clock before the lookup; ``ticket`` is None when Redis was
    bypassed (then the fill is skipped, as the near cache cannot be trusted either)."""

    since: float
    ticket: Ticket | None


def _forget_nothing(keys: Sequence[str] | None) -> None:
    return None


class TwoLevelCache:
    """Near cache in front of Redis, for the pipeline. Never raises for Redis trouble.

    ``get`` answers from the near cache, else from Redis (filling near), else with a
    ``Miss`` to pass to ``put`` once the database has answered. ``invalidate`` drops the
    near entry at once, then deletes and broadcasts through Redis. Whenever Redis is not
    live both levels are bypassed (``bypasses``), since the near cache can no longer hear
    invalidations; it is cleared when Redis is live again. Without ``remote`` the near
    cache works alone: coherent only within this one process.
    """

    __slots__ = (
        "_clock",
        "bypasses",
        "forget",
        "invalidations",
        "misses",
        "near",
        "near_hits",
        "refused",
        "remote",
        "remote_hits",
        "ttl_default",
        "unleased",
    )

    def __init__(
        self,
        near: NearCache,
        remote: RemoteCache | None,
        ttl_default: float,
        forget: Callable[[Sequence[str] | None], None] = _forget_nothing,
    ) -> None:
        if not ttl_default > 0:
            raise ValueError(f"ttl_default must be > 0, got {ttl_default!r}")
        self.near = near
        self.remote = remote
        self._clock = near.clock  # the remote's lease is on the same clock (time.monotonic)
        self.ttl_default = ttl_default
        self.near_hits = 0
        self.remote_hits = 0
        self.misses = 0
        self.bypasses = 0  # operations that skipped Redis (and near) because of Redis
        self.refused = 0  # fills refused by Redis (stale version, tombstone, old ticket)
        self.invalidations = 0
        self.unleased = 0  # near lookups skipped: live, but the lease had run out
        # told about every key invalidated here or elsewhere (None: every key), before the
        # invalidation is confirmed: the owner's in-flight fills must not be joined after
        self.forget = forget
        if remote is not None:
            remote.listen(self.on_invalidate, self.on_resync)

    @property
    def usable(self) -> bool:
        """False while Redis is not live: both levels are bypassed then."""
        remote = self.remote
        return remote is None or remote.live

    def leased(self) -> bool:
        """True when the near cache may answer: no Redis, or Redis live and this process
        has heard every invalidation Redis ran up to ``lease`` seconds ago (not live: the
        lease is void). A fill in flight may be joined only then."""
        remote = self.remote
        if remote is None or remote.lease_until > self._clock():
            return True
        if remote.live:
            self.unleased += 1
        return False

    def near_hit(self, key: str) -> Hit | None:
        """The near entry for ``key`` when the near cache may answer (``leased``): no
        await, no Redis."""
        remote = self.remote
        if remote is not None and remote.lease_until <= self._clock():
            if remote.live:
                self.unleased += 1
            return None
        hit = self.near.get(key)
        if hit is not None:
            self.near_hits += 1
        return hit

    async def start(self, wait: float | None = None) -> None:
        if self.remote is not None:
            await self.remote.start(wait)

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.close()

    @property
    def evictions(self) -> int:
        return self.near.evictions

    async def get(self, key: str) -> Hit | Miss:
        near = self.near
        since = near.clock()
        remote = self.remote
        if remote is None:
            hit = near.get(key)
            if hit is not None:
                self.near_hits += 1
                return hit
            self.misses += 1
            return Miss(since, None)
        if not remote.live:
            self.bypasses += 1
            return Miss(since, None)
        if self.leased():
            hit = near.get(key)
            if hit is not None:
                self.near_hits += 1
                return hit
        try:
            got = await remote.get(key)
        except CacheUnavailable:
            self.bypasses += 1
            return Miss(since, None)
        if isinstance(got, RemoteHit):
            self.remote_hits += 1
            near.put(key, got.value, got.version, got.ttl_ms / 1000, since=since)
            return Hit(got.value, got.version)
        self.misses += 1
        return Miss(since, got)

    async def put(
        self, key: str, value: bytes, version: int, miss: Miss, ttl: float | None = None
    ) -> bool:
        """Fill after a miss with what the database returned; True when cached."""
        ttl = self.ttl_default if ttl is None else ttl
        remote = self.remote
        if remote is None:
            return self.near.put(key, value, version, ttl, since=miss.since)
        if miss.ticket is None:  # Redis was bypassed at the lookup (already counted)
            return False
        try:
            stored = await remote.put(key, value, version, ttl, miss.ticket)
        except CacheUnavailable:
            self.bypasses += 1
            return False
        if not stored:
            self.refused += 1
            return False
        return self.near.put(key, value, version, ttl, since=miss.since)

    async def invalidate(self, key: str, version: int) -> None:
        """After a write of ``key`` committed at ``version``: drop it here and everywhere."""
        await self.invalidate_many(((key, version),))

    async def invalidate_many(self, entries: Sequence[tuple[str, int]]) -> None:
        """``invalidate`` for several keys (a transaction, a bulk write): one round trip."""
        for key, version in entries:
            self.near.drop(key, version)
        self.forget([key for key, _ in entries])
        self.invalidations += len(entries)
        if self.remote is None or not entries:
            return
        try:
            await self.remote.invalidate(entries)
        except CacheUnavailable:  # kept by RedisCache and replayed when Redis answers
            self.bypasses += 1

    def on_invalidate(self, entries: list[tuple[str, int]]) -> None:
        """Subscriber callback: another sidecar (or this one) wrote these keys."""
        drop = self.near.drop
        for key, version in entries:
            drop(key, version)
        self.forget([key for key, _ in entries])

    def on_resync(self) -> None:
        """Subscriber callback: invalidations may have been missed; forget everything."""
        self.near.clear()
        self.forget(None)

    def stats(self) -> dict[str, int]:
        near = self.near
        out = {
            "near_hits": self.near_hits,
            "remote_hits": self.remote_hits,
            "misses": self.misses,
            "bypasses": self.bypasses,
            "refused": self.refused + near.refused,
            "invalidations": self.invalidations,
            "evictions": near.evictions,
            "expirations": near.expirations,
            "entries": near.entries,
            "bytes": near.bytes,
        }
        remote = self.remote
        if remote is not None:
            out.update(
                remote_failures=remote.failures,
                remote_skipped=remote.skipped,
                remote_resyncs=remote.resyncs,
                remote_pending=remote.pending,
                remote_live=int(remote.live),
                remote_ack_timeouts=remote.ack_timeouts,
                remote_unconfirmed=remote.unconfirmed,
                remote_flushes=remote.flushes,
                unleased=self.unleased,
            )
        return out
