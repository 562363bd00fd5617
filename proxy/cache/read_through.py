"""The read-through cache of by-id reads: shared fills of concurrent misses, invalidation
after writes (at commit for transactions), background work kept until settled."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

from proxy import context
from proxy.cache import Hit, TwoLevelCache
from proxy.config import CacheConfig
from proxy.query.spec import WriteResult


class PointReads(Protocol):
    """What a fill reads from: a database (or a transaction) by id."""

    async def get(self, collection: str, doc_id: str) -> WriteResult | None: ...


class Fills:
    """Cache misses being filled, by key: concurrent misses of one key share one fill. The
    cache forgets a key's fill (``forget``) as soon as it hears the key invalidated."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[WriteResult | None]] = {}

    def forget(self, keys: Sequence[str] | None) -> None:
        """These keys (None: all) were invalidated; later misses start fresh fills."""
        if keys is None:
            self.pending.clear()
            return
        pending = self.pending
        for key in keys:
            pending.pop(key, None)


class ReadThrough:
    """By-id reads through the two-level cache for the collections that opt in."""

    def __init__(
        self,
        cache: TwoLevelCache | None,
        settings: CacheConfig,
        database: str,
        fills: Fills | None = None,
    ) -> None:
        self.cache = cache
        self.settings = settings
        self.database = database
        self.fills = fills or Fills()
        self._tx_writes: dict[int, list[tuple[str, int]]] = {}
        self._background: set[asyncio.Future[Any]] = set()

    def key(self, collection: str, doc_id: str) -> str:
        return f"d:{self.database}:{collection}:{doc_id}"

    async def get(
        self, collection: str, doc_id: str, db: PointReads, target: PointReads | None
    ) -> WriteResult | None:
        """Transactions and consistency-token reads go to the database; a miss fills the
        cache under the cache's version protocol (a fill older than a write is refused)."""
        cache = self.cache
        ttl = self.settings.ttl(collection) if cache is not None else None
        if (
            cache is None
            or ttl is None
            or target is not None
            or context.current.get().min_lsn is not None
        ):
            return await (target or db).get(collection, doc_id)
        key = self.key(collection, doc_id)
        hit = cache.near_hit(key)  # no await at all for what this process holds
        if hit is not None:
            return WriteResult(hit.value, hit.version)
        if not cache.usable:  # Redis away: no cache, no shared fills (no invalidations)
            cache.bypasses += 1
            return await db.get(collection, doc_id)
        # A fill is forgotten as soon as its key is invalidated, here or by another sidecar,
        # before that write is acknowledged; without a lease this process cannot tell it has
        # heard that invalidation yet, so it does not join (docs/cache-coherence.md).
        pending = self.fills.pending
        fill = pending.get(key)
        if fill is None or not cache.leased():  # the first miss does the work for all
            fill = pending[key] = asyncio.ensure_future(
                self._fill(cache, key, collection, doc_id, ttl, db)
            )
            fill.add_done_callback(lambda done: self._fill_done(key, done))
        return await asyncio.shield(fill)

    def _fill_done(self, key: str, done: asyncio.Future[WriteResult | None]) -> None:
        if self.fills.pending.get(key) is done:
            del self.fills.pending[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter got it already

    async def _fill(
        self,
        cache: TwoLevelCache,
        key: str,
        collection: str,
        doc_id: str,
        ttl: float,
        db: PointReads,
    ) -> WriteResult | None:
        got = await cache.get(key)
        if isinstance(got, Hit):
            return WriteResult(got.value, got.version)
        found = await db.get(collection, doc_id)
        if found is not None:
            # The answer does not wait for the fill: it is conditional (its ticket), so
            # landing late is safe, and Redis runs it before any later lookup.
            self.spawn(cache.put(key, found.body, found.version, got, ttl))
        return found

    async def written(
        self, target: object | None, collection: str, doc_id: str, version: int
    ) -> None:
        """After a write: invalidate its entry now, or at the transaction's commit."""
        cache = self.cache
        if cache is None or self.settings.ttl(collection) is None:
            return
        key = self.key(collection, doc_id)
        if target is None:
            await cache.invalidate(key, version)
        else:
            self._tx_writes.setdefault(id(target), []).append((key, version))

    async def after_commit(self, tx: object) -> None:
        """Invalidate what a transaction wrote (call after COMMIT, even an unknown one)."""
        entries = self._tx_writes.pop(id(tx), None)
        if entries and self.cache is not None:
            await self.cache.invalidate_many(entries)

    def forget_transaction(self, tx: object) -> None:
        self._tx_writes.pop(id(tx), None)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background, kept alive until done (see ``settle``)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait until the background work started so far is over."""
        while self._background:
            await asyncio.wait(set(self._background))

    def counters(self) -> dict[str, Any]:
        if self.cache is None:
            return {}
        st = self.cache.stats()
        return {
            "near:hit": st["near_hits"],
            "redis:hit": st["remote_hits"],
            "any:miss": st["misses"],
            "any:bypass": st["bypasses"],
            "any:refused": st["refused"],
            "near:evict": st["evictions"],
            "any:invalidate": st["invalidations"],
            "redis:ack_timeout": st.get("remote_ack_timeouts", 0),
            "redis:unconfirmed": st.get("remote_unconfirmed", 0),
            "redis:flush": st.get("remote_flushes", 0),
            "near:unleased": st.get("unleased", 0),
        }
