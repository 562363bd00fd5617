"""NearCache (LRU by entries and bytes, TTL, version tombstones, fill window, counters) and
TwoLevelCache without Redis, on an injected clock: no sleeping, exact to the tick."""

from __future__ import annotations

import gc

import pytest

from proxy.cache import ENTRY_OVERHEAD, Hit, Miss, NearCache, TwoLevelCache


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


def near(
    clock: FakeClock,
    *,
    max_entries: int = 100,
    max_bytes: int = 1 << 20,
    tombstone_ttl: float = 5.0,
    max_tombstones: int = 100_000,
) -> NearCache:
    return NearCache(
        max_entries,
        max_bytes,
        clock,
        tombstone_ttl=tombstone_ttl,
        max_tombstones=max_tombstones,
    )


# ---- LRU ------------------------------------------------------------------------------------


def test_lru_by_entries_evicts_the_least_recently_used(clock: FakeClock) -> None:
    c = near(clock, max_entries=3)
    for k in "abc":
        assert c.put(k, k.encode(), 1, 60)
    assert c.get("a") == Hit(b"a", 1)  # a is now the most recent: b is the oldest
    assert c.put("d", b"d", 1, 60)
    assert c.entries == 3 and c.evictions == 1
    assert c.get("b") is None
    assert [c.get(k) for k in "acd"] == [Hit(b"a", 1), Hit(b"c", 1), Hit(b"d", 1)]


def test_lru_by_bytes_with_exact_accounting(clock: FakeClock) -> None:
    one = NearCache.entry_size("k0", b"x" * 100)
    assert one == 100 + 2 + ENTRY_OVERHEAD
    c = near(clock, max_bytes=3 * one)
    for i in range(3):
        assert c.put(f"k{i}", b"x" * 100, 1, 60)
    assert c.bytes == 3 * one and c.evictions == 0
    assert c.put("k3", b"x" * 100, 1, 60)
    assert c.bytes == 3 * one and c.entries == 3 and c.evictions == 1
    assert c.get("k0") is None
    # a bigger value pushes out as many of the oldest as needed
    assert c.put("k4", b"y" * 150, 1, 60)
    assert c.entries == 2 and c.evictions == 3
    assert c.bytes == NearCache.entry_size("k4", b"y" * 150) + one
    # replacing a key (newer version) re-charges it instead of adding
    assert c.put("k4", b"z" * 10, 2, 60)
    assert c.bytes == NearCache.entry_size("k4", b"z" * 10) + one
    # a value larger than the whole cache is refused, nothing evicted for it
    assert not c.put("big", b"x" * (3 * one), 1, 60)
    assert c.entries == 2 and c.refused == 1


def test_drop_and_clear_release_bytes(clock: FakeClock) -> None:
    c = near(clock)
    c.put("a", b"12345", 1, 60)
    c.put("b", b"123", 1, 60)
    c.drop("a")
    assert c.bytes == NearCache.entry_size("b", b"123") and c.entries == 1
    assert c.tombstones == 0  # no version: no tombstone
    c.clear()
    assert c.bytes == 0 and c.entries == 0


# ---- TTL and counters ---------------------------------------------------------------------


def test_ttl_on_the_injected_clock(clock: FakeClock) -> None:
    c = near(clock)
    c.put("a", b"v", 1, 10.0)
    clock.advance(9.999)
    assert c.get("a") == Hit(b"v", 1)
    clock.advance(0.001)
    assert c.get("a") is None  # expired at exactly ttl
    assert c.entries == 0 and c.bytes == 0 and c.expirations == 1
    assert not c.put("z", b"v", 1, 0)  # a non-positive ttl caches nothing


def test_counters(clock: FakeClock) -> None:
    c = near(clock, max_entries=2)
    assert c.get("a") is None
    c.put("a", b"1", 1, 5)
    c.put("b", b"2", 1, 5)
    c.get("a")
    c.get("a")
    c.put("c", b"3", 1, 5)  # evicts b
    c.get("b")
    clock.advance(5)
    c.get("a")  # expired
    assert (c.hits, c.misses, c.evictions, c.expirations) == (2, 3, 1, 1)
    assert c.entries == 1 and c.bytes == NearCache.entry_size("c", b"3")


def test_entries_leave_the_cycle_collectors_sight(clock: FakeClock) -> None:
    """Full collections must not traverse a filled cache: its entries hold only bytes and
    numbers, which the collector stops tracking the first time it meets them."""
    c = near(clock, max_entries=100)
    for i in range(100):
        c.put(f"k{i}", b"v" * i, i, 5)
    gc.collect()
    untracked = sum(not gc.is_tracked(entry) for entry in c._data.values())
    assert untracked == 100
    assert c.get("k7") == Hit(b"v" * 7, 7)


def test_bad_bounds_are_all_reported(clock: FakeClock) -> None:
    with pytest.raises(ValueError) as info:
        NearCache(0, -1, clock, tombstone_ttl=0)
    message = str(info.value)
    assert "max_entries" in message and "max_bytes" in message and "tombstone_ttl" in message


# ---- versions and tombstones ---------------------------------------------------------------


def test_newer_version_is_kept_older_refused_equal_is_a_no_op(clock: FakeClock) -> None:
    c = near(clock)
    assert c.put("a", b"v3", 3, 60)
    assert not c.put("a", b"v2", 2, 60)
    assert c.put("a", b"other", 3, 60)  # same version: already there, unchanged
    assert c.get("a") == Hit(b"v3", 3)
    assert c.put("a", b"v4", 4, 60)
    assert c.get("a") == Hit(b"v4", 4)
    assert c.refused == 1


def test_tombstone_refuses_older_puts_until_it_expires(clock: FakeClock) -> None:
    c = near(clock, tombstone_ttl=5.0)
    c.put("a", b"v4", 4, 60)
    c.drop("a", 5)  # a write committed version 5
    assert c.get("a") is None and c.tombstones == 1
    assert not c.put("a", b"v4", 4, 60)  # the stale fill that lost the race
    assert c.refused == 1
    clock.advance(4.999)
    assert not c.put("a", b"v4", 4, 60)
    clock.advance(0.001)
    assert c.put("a", b"v4", 4, 60)  # tombstone gone (and no ticket given: caller vouches)


def test_tombstone_accepts_the_written_version_and_newer(clock: FakeClock) -> None:
    c = near(clock)
    c.drop("a", 5)
    assert c.put("a", b"v5", 5, 60)
    c.drop("b", 5)
    assert c.put("b", b"v6", 6, 60)


def test_a_later_lower_drop_keeps_the_higher_tombstone(clock: FakeClock) -> None:
    c = near(clock)
    c.drop("a", 7)
    c.drop("a", 5)  # invalidations can arrive out of order
    assert not c.put("a", b"v6", 6, 60)
    assert c.put("a", b"v7", 7, 60)


def test_drop_removes_even_a_newer_entry(clock: FakeClock) -> None:
    c = near(clock)
    c.put("a", b"v9", 9, 60)
    c.drop("a", 5)
    assert c.get("a") is None


def test_fill_window_refuses_a_fill_whose_read_outlived_the_tombstone(clock: FakeClock) -> None:
    """The race the age rule closes: read starts, write lands, tombstone expires, fill."""
    c = near(clock, tombstone_ttl=5.0)
    since = clock()  # the ticket, taken before the database read
    clock.advance(1.0)
    c.drop("a", 5)  # the write's invalidation arrives while the read is slow
    clock.advance(5.0)  # the tombstone is gone now...
    assert not c.put("a", b"v4", 4, 60, since=since)  # ...but the ticket is 6 s old
    assert c.refused == 1


def test_fill_window_boundary(clock: FakeClock) -> None:
    c = near(clock, tombstone_ttl=5.0)
    since = clock()
    clock.advance(4.999)
    assert c.put("a", b"v1", 1, 60, since=since)
    since = clock()
    clock.advance(5.0)
    assert not c.put("b", b"v1", 1, 60, since=since)


def test_bounded_tombstones_raise_a_floor_instead_of_forgetting(clock: FakeClock) -> None:
    c = near(clock, max_tombstones=2, tombstone_ttl=5.0)
    early = clock()
    clock.advance(0.1)
    c.drop("a", 5)
    clock.advance(0.1)
    c.drop("b", 5)
    clock.advance(0.1)
    c.drop("c", 5)  # pushes out a's tombstone before it expired
    assert c.tombstones == 2
    assert not c.put("a", b"v4", 4, 60, since=early)  # read before a's invalidation
    after = clock()
    assert c.put("a", b"v5", 5, 60, since=after)  # read after it: current


def test_expired_tombstones_are_swept(clock: FakeClock) -> None:
    c = near(clock, tombstone_ttl=1.0)
    for i in range(10):
        c.drop(f"k{i}", 1)
    clock.advance(1.0)
    c.drop("last", 1)
    assert c.tombstones == 1


def test_clear_refuses_fills_that_started_before_it(clock: FakeClock) -> None:
    c = near(clock)
    since = clock()
    c.drop("a", 5)
    clock.advance(0.5)
    c.clear()  # e.g. resync: tombstones are gone with everything else
    assert not c.put("a", b"v4", 4, 60, since=since)
    clock.advance(0.001)
    assert c.put("a", b"v5", 5, 60, since=clock())


# ---- TwoLevelCache, near only ---------------------------------------------------------------


async def test_two_level_without_redis_read_fill_invalidate(clock: FakeClock) -> None:
    cache = TwoLevelCache(near(clock), None, ttl_default=30.0)
    got = await cache.get("d:main:users:1")
    assert isinstance(got, Miss)
    assert await cache.put("d:main:users:1", b'{"_version":1}', 1, got)
    assert await cache.get("d:main:users:1") == Hit(b'{"_version":1}', 1)
    stale = await cache.get("d:main:users:2")  # a read starts...
    assert isinstance(stale, Miss)
    await cache.invalidate("d:main:users:2", 8)  # ...a write commits version 8...
    assert not await cache.put("d:main:users:2", b"v7", 7, stale)  # ...the v7 fill loses
    assert isinstance(await cache.get("d:main:users:2"), Miss)
    await cache.invalidate("d:main:users:1", 2)
    assert isinstance(await cache.get("d:main:users:1"), Miss)
    clock.advance(30.0)
    s = cache.stats()
    assert s["near_hits"] == 1 and s["misses"] == 4 and s["invalidations"] == 2
    assert s["refused"] == 1 and s["bypasses"] == 0
    assert "remote_live" not in s


async def test_two_level_ttl_default_and_override(clock: FakeClock) -> None:
    cache = TwoLevelCache(near(clock), None, ttl_default=10.0)
    m = await cache.get("a")
    assert isinstance(m, Miss)
    await cache.put("a", b"x", 1, m)
    m = await cache.get("b")
    assert isinstance(m, Miss)
    await cache.put("b", b"x", 1, m, ttl=2.0)
    clock.advance(2.0)
    assert isinstance(await cache.get("b"), Miss)
    assert isinstance(await cache.get("a"), Hit)
    clock.advance(8.0)
    assert isinstance(await cache.get("a"), Miss)


async def test_two_level_resync_clears_near(clock: FakeClock) -> None:
    cache = TwoLevelCache(near(clock), None, ttl_default=10.0)
    m = await cache.get("a")
    assert isinstance(m, Miss)
    await cache.put("a", b"x", 1, m)
    pending = await cache.get("b")
    assert isinstance(pending, Miss)
    clock.advance(0.01)
    cache.on_invalidate([("a", 2)])
    assert isinstance(await cache.get("a"), Miss)
    cache.on_resync()
    assert not await cache.put("b", b"y", 1, pending)  # its ticket predates the resync


def test_two_level_rejects_a_bad_ttl(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        TwoLevelCache(near(clock), None, ttl_default=0)
