"""The near cache: a bounded in-process LRU of encoded documents with version tombstones."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final

from proxy.cache.protocol import Clock, Hit

__all__ = ["ENTRY_OVERHEAD", "NearCache"]

ENTRY_OVERHEAD: Final = 128
"""Bytes charged per near entry on top of ``len(value) + len(key)`` (dict node, tuple,
object headers), so that ``max_bytes`` tracks memory and not only payload."""


class NearCache:
    """LRU of ``key -> (value, version, expires_at)`` bounded by entries and by bytes, with
    version tombstones so that a fill older than an invalidation is refused.

    ``get`` and ``put`` are O(1) (``OrderedDict``); expired entries are dropped when met.
    ``drop(key, version)`` leaves a tombstone for ``tombstone_ttl`` seconds; at most
    ``max_tombstones`` are kept, and evicting one early raises a floor: any fill whose
    ``since`` is not after that tombstone's creation is refused, so bounding the map never
    weakens the protocol. ``put(..., since=t)`` is refused when ``t`` is ``tombstone_ttl``
    or more in the past (the fill window). Not thread-safe (one event loop).
    """

    __slots__ = (
        "_bytes",
        "_clock",
        "_data",
        "_floor",
        "_tombs",
        "evictions",
        "expirations",
        "hits",
        "max_bytes",
        "max_entries",
        "max_tombstones",
        "misses",
        "refused",
        "tombstone_ttl",
    )

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        clock: Clock = time.monotonic,
        *,
        tombstone_ttl: float = 5.0,
        max_tombstones: int = 10_000,
    ) -> None:
        problems = [
            f"{name} must be > 0, got {value!r}"
            for name, value in (
                ("max_entries", max_entries),
                ("max_bytes", max_bytes),
                ("tombstone_ttl", tombstone_ttl),
                ("max_tombstones", max_tombstones),
            )
            if not value > 0
        ]
        if problems:
            raise ValueError("; ".join(problems))
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.tombstone_ttl = tombstone_ttl
        self.max_tombstones = max_tombstones
        self._clock = clock
        # key -> (value, version, expires_at, charged size); order = recency (last = most
        # recent). A plain tuple of bytes and numbers, which the cycle collector stops
        # tracking the first time it meets one: ten thousand entries would otherwise be
        # traversed by every full collection (a ~17 ms pause was measured while filling).
        self._data: OrderedDict[str, tuple[bytes, int, float, int]] = OrderedDict()
        # key -> (version, created_at); order = creation (first = oldest)
        self._tombs: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._floor = float("-inf")  # fills with since <= floor are refused
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0  # entries pushed out by the entry or byte bound
        self.expirations = 0  # entries found past their TTL
        self.refused = 0  # puts refused: stale version, tombstone, old ticket, too large

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def entries(self) -> int:
        return len(self._data)

    @property
    def tombstones(self) -> int:
        return len(self._tombs)

    @staticmethod
    def entry_size(key: str, value: bytes) -> int:
        return len(value) + len(key) + ENTRY_OVERHEAD

    def get(self, key: str) -> Hit | None:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        value, version, expires_at, size = entry
        if expires_at <= self._clock():
            del self._data[key]
            self._bytes -= size
            self.expirations += 1
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return Hit(value, version)

    def put(
        self, key: str, value: bytes, version: int, ttl: float, *, since: float | None = None
    ) -> bool:
        """Store ``value`` at ``version`` for ``ttl`` seconds unless it could be stale.

        ``since`` is this cache's clock reading taken before the data was read from its
        source (``None``: the caller vouches that it is current, e.g. just written). Returns
        True when the cache now holds ``version`` for ``key``.
        """
        now = self._clock()
        if since is not None and (since <= self._floor or now - since >= self.tombstone_ttl):
            self.refused += 1
            return False
        tomb = self._tombs.get(key)
        if tomb is not None:
            if tomb[1] + self.tombstone_ttl <= now:
                del self._tombs[key]
            elif tomb[0] > version:
                self.refused += 1
                return False
        old = self._data.get(key)
        if old is not None and old[2] > now:
            if old[1] > version:
                self.refused += 1
                return False
            if old[1] == version:
                self._data.move_to_end(key)
                return True
        size = self.entry_size(key, value)
        if size > self.max_bytes or not ttl > 0:
            self.refused += 1
            return False
        if old is not None:
            self._bytes -= old[3]
        self._data[key] = (value, version, now + ttl, size)
        self._data.move_to_end(key)
        self._bytes += size
        self._evict()
        return True

    def drop(self, key: str, version: int | None = None) -> None:
        """Forget ``key``; with ``version`` (the written one) also refuse older fills for
        ``tombstone_ttl`` seconds. An entry is dropped whatever its version (cheap, and
        safe even if a delete-and-recreate reused version numbers)."""
        entry = self._data.pop(key, None)
        if entry is not None:
            self._bytes -= entry[3]
        if version is None:
            return
        now = self._clock()
        old = self._tombs.pop(key, None)
        if old is not None and old[0] > version and old[1] + self.tombstone_ttl > now:
            version = old[0]
        self._tombs[key] = (version, now)
        self._sweep_tombstones(now)

    def clear(self) -> None:
        """Forget everything, and refuse every fill whose ticket predates this call."""
        self._data.clear()
        self._tombs.clear()
        self._bytes = 0
        self._floor = self._clock()

    def _evict(self) -> None:
        data = self._data
        while len(data) > self.max_entries or self._bytes > self.max_bytes:
            size = data.popitem(last=False)[1][3]
            self._bytes -= size
            self.evictions += 1

    def _sweep_tombstones(self, now: float) -> None:
        tombs = self._tombs
        horizon = now - self.tombstone_ttl
        while tombs:
            key, (_, created) = next(iter(tombs.items()))
            if created <= horizon:
                del tombs[key]
            elif len(tombs) > self.max_tombstones:
                del tombs[key]
                self._floor = max(self._floor, created)
            else:
                break

    # Last in the class body, so that ``bytes`` in the annotations above is the builtin.
    @property
    def bytes(self) -> int:
        """Charged bytes held now (``len(value) + len(key) + ENTRY_OVERHEAD`` per entry)."""
        return self._bytes
