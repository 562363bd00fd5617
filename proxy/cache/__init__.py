"""The document cache: an in-process LRU (near) in front of Redis (remote), kept coherent.

Levels
------
``NearCache`` is a bounded LRU in this process (entries and bytes), ``RedisCache`` holds the
shared copy and carries invalidations between sidecars on one pub/sub channel, and
``TwoLevelCache`` combines them for the pipeline: near first, then Redis, filling near.
Values are opaque ``bytes`` (the encoded whole document) tagged with the document's
``_version``. Redis trouble (down, frozen, slow) never reaches the caller: the operation
gives up within ``timeout`` and the cache is bypassed, counted, until it has resynced.

Coherence protocol
------------------
Versions are per-document and grow with every write. The race to beat is the classic one:
a reader misses, reads version ``v`` from the database, a writer commits ``v+1`` and
invalidates, and only then does the reader put ``v``, which would sit in the cache.

1. *Tickets.* A miss hands out a fill ticket taken BEFORE the database read: the near
   cache's clock reading (``Miss.since``) and Redis's own ``TIME`` plus the flush
   generation, read by the same script that found no entry (``Ticket``). A fill (``put``)
   presents the ticket and is refused when the ticket is older than ``fill_window``
   seconds, measured on the clock that issued it (so no cross-host clock skew enters).
2. *Tombstones.* ``invalidate(key, version)`` (called after the write's COMMIT, with the
   written version) drops the entry and leaves a tombstone ``key -> version`` that lives
   ``fill_window`` (+1 s slack in Redis). Redis does this in ONE script that also PUBLISHes
   the invalidation, so deletion and broadcast are one round trip and atomic; every
   sidecar's subscriber drops the key from its near cache and leaves the same tombstone.
3. *Conditional puts.* A put is refused when a live tombstone carries a newer version,
   when a newer (or, for Redis, the same) version is already stored, or when its ticket is
   too old. A put that replaces a tombstone keeps the tombstone's version and lifetime in
   the entry, so a short value TTL cannot shorten the protection.

Why it holds: a stale fill read the database before the write committed, so its ticket
predates the invalidation. If the fill lands within ``fill_window`` of its ticket, it
lands within ``fill_window`` of the invalidation, while the tombstone is still alive, and
the tombstone refuses it; otherwise the age rule refuses it. Whichever comes first,
invalidation or fill, the result is the same: a fill that lands before the invalidation is
deleted by it. Hence, once Redis has carried out ``invalidate(key, v)`` (the call
returned without ``CacheUnavailable``), it never again serves a version below ``v`` for
that key; and a sidecar that has *received* the invalidation never
serves one from its near cache (the entry was dropped on receipt and the near tombstone
plus the age rule refuse stale near fills, exactly as in Redis).

4. *Acknowledged broadcast and leases.* Every invalidation message carries the writer's
   node id and a sequence number; the script returns how many subscribers PUBLISH reached,
   and each of them confirms once its near cache has dropped the keys. A sidecar serves
   near hits only under a *lease*: a probe token it publishes to itself every
   ``probe_every`` and receives back on its subscription (behind every invalidation Redis
   ran before the probe) extends the lease to send time + ``ack_timeout``. So a write that
   did not collect every confirmation within ``ack_timeout`` of Redis running its script
   can answer: every copy it did not hear from has lost its lease. A write whose script
   Redis did not take (timeout, lost connection) is tried even while the cache is not
   live, and then waits ``ack_timeout`` more before answering (kept for replay).
5. *The fence.* Every script first compares Redis ``TIME`` with a heartbeat key every
   script refreshes; a gap longer than the pipe's deadline (Redis was frozen or restarted)
   voids every entry and ticket (new generation) and broadcasts "forget everything"
   before doing anything else, so invalidations a frozen Redis never ran cannot come back.

Outages: any failed Redis operation, or a subscriber that loses its connection or gets no
PONG, makes ``RedisCache`` not live: both levels are bypassed and the subscriber
reconnects, replays what could not be delivered (bounded; on overflow one flush of
everything) and clears the near cache before it is live again. The argument, and what it
assumes, is in docs/cache-coherence.md.

Assumptions: versions never go backwards for a key (a delete invalidates with the deleted
version + 1); fills come from reads that see every committed write (the primary, or a
replica lagging less than ``fill_window``); Redis is a single node or shard (scripts touch
several keys) whose clock does not step back by more than a second; logical keys never
start with ``@`` (``prefix + "@gen"`` is the generation counter).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import inspect
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple

import orjson
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from proxy.backends.redis.resp import Pipe, PipeBroken, ReplyError, open_pipe

__all__ = [
    "CacheUnavailable",
    "Clock",
    "Hit",
    "Miss",
    "NearCache",
    "RedisCache",
    "RemoteHit",
    "RemoteState",
    "Ticket",
    "TwoLevelCache",
]

log = logging.getLogger(__name__)


Clock = Callable[[], float]
"""Seconds on a monotonic scale (``time.monotonic`` in production, a fake in tests)."""

ENTRY_OVERHEAD: Final = 128
"""Bytes charged per near entry on top of ``len(value) + len(key)`` (dict node, tuple,
object headers), so that ``max_bytes`` tracks memory and not only payload."""

_CLEANUP_SLACK: Final = 0.003  # seconds of a budget kept for timer rounding and clean-up
_FLUSH_ALL: Final = b"*"  # the pub/sub payload meaning "everything is invalid"
_CHUNK: Final = 256  # keys per invalidation script call


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


class Miss(NamedTuple):
    """A ``TwoLevelCache`` miss; pass it back to ``put`` after reading the database.

    ``since`` is the near cache's clock before the lookup; ``ticket`` is None when Redis was
    bypassed (then the fill is skipped, as the near cache cannot be trusted either)."""

    since: float
    ticket: Ticket | None


# ---- level 1: in-process -------------------------------------------------------------------


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


# ---- level 2: Redis ---------------------------------------------------------------------

# Every script starts with the fence. KEYS[1] the generation, KEYS[2] the heartbeat (Redis
# TIME in ms of the last script run); ARGV[1] the channel, ARGV[2] the longest gap in ms.
# A gap longer than that (Redis frozen, or restarted with persisted entries), or no
# heartbeat, voids every entry and ticket (a new generation, above any earlier one) and
# tells every sidecar to forget its near cache, BEFORE this script does its own work. With
# no generation either (a new or emptied Redis) there is nothing to void, but the new
# generation is still above any ticket an earlier instance handed out (see
# docs/cache-coherence.md).
_FENCE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local had = redis.call('GET', KEYS[1])
local gen = tonumber(had or '0')
local hb = tonumber(redis.call('GET', KEYS[2]))
if not hb or now - hb > tonumber(ARGV[2]) then
  gen = math.max(gen + 1, now)
  redis.call('SET', KEYS[1], string.format('%.0f', gen))
  if had then redis.call('PUBLISH', ARGV[1], '*') end
end
if not hb or now > hb then redis.call('SET', KEYS[2], string.format('%.0f', now)) end
"""

# KEYS[3] the entry. A hit: {1, version, value, ms left}; a miss: {0, now_ms, gen} (the
# fill ticket). An entry from an older generation is a miss.
GET_LUA: Final = (
    _FENCE
    + """
local e = redis.call('HMGET', KEYS[3], 'v', 'd', 'x', 'g')
if e[1] and e[2] and tonumber(e[4]) == gen then
  local left = tonumber(e[3]) - now
  if left > 0 then return {1, e[1], e[2], left} end
end
return {0, now, gen}
"""
)

# KEYS[3] the entry; ARGV[3..8]: version, value, ttl_ms, ticket_ms ('' for none), ticket_gen,
# window_ms. Returns 1 stored, 2 this version is already there, 0 refused.
PUT_LUA: Final = (
    _FENCE
    + """
local version = tonumber(ARGV[3])
if ARGV[6] ~= '' then
  if tonumber(ARGV[7]) ~= gen then return 0 end
  if now - tonumber(ARGV[6]) >= tonumber(ARGV[8]) then return 0 end
end
local e = redis.call('HMGET', KEYS[3], 'v', 'x', 'g', 't')
local floor = tonumber(e[4])
if floor and floor > version then return 0 end
if e[1] and tonumber(e[3]) == gen and tonumber(e[2]) > now then
  local have = tonumber(e[1])
  if have > version then return 0 end
  if have == version then return 2 end
end
local ttl = tonumber(ARGV[5])
local keep = ttl
if floor then
  local left = redis.call('PTTL', KEYS[3])
  if left > keep then keep = left end
end
redis.call('HSET', KEYS[3], 'v', ARGV[3], 'd', ARGV[4], 'x', string.format('%.0f', now + ttl),
           'g', string.format('%.0f', gen))
redis.call('PEXPIRE', KEYS[3], keep)
return 1
"""
)

# KEYS[3..] the entries; ARGV[3] payload, ARGV[4] tombstone life in ms, ARGV[4+i] the
# written version of KEYS[2+i]. Deletes, leaves tombstones, publishes: atomic.
INVALIDATE_LUA: Final = (
    _FENCE
    + """
local life = tonumber(ARGV[4])
for i = 3, #KEYS do
  local v = tonumber(ARGV[2 + i])
  local floor = tonumber(redis.call('HGET', KEYS[i], 't'))
  if floor and floor > v then v = floor end
  redis.call('DEL', KEYS[i])
  redis.call('HSET', KEYS[i], 't', string.format('%.0f', v))
  redis.call('PEXPIRE', KEYS[i], life)
end
return redis.call('PUBLISH', ARGV[1], ARGV[3])
"""
)

# Voids every entry and every outstanding ticket.
FLUSH_LUA: Final = (
    _FENCE
    + """
redis.call('INCR', KEYS[1])
return redis.call('PUBLISH', ARGV[1], '*')
"""
)

# ARGV[3] the prober's own channel, ARGV[4] its token: the fence, then the token comes back
# on the subscription, behind every invalidation Redis ran before it (the lease).
PROBE_LUA: Final = (
    _FENCE
    + """
return redis.call('PUBLISH', ARGV[3], ARGV[4])
"""
)

_SCRIPTS: Final = (GET_LUA, PUT_LUA, INVALIDATE_LUA, FLUSH_LUA, PROBE_LUA)


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


# No CLIENT SETINFO round trip when (re)connecting: redis-py >= 7 spells it driver_info,
# older releases lib_name/lib_version (deprecated, with a warning, since).
_NO_CLIENT_SETINFO: Final[dict[str, Any]] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(aioredis.Redis.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


class RemoteState(enum.Enum):
    DOWN = "down"  # no subscription: every operation is refused, the subscriber retries
    RESYNCING = "resyncing"  # subscribed again: replaying lost invalidations, then resync
    LIVE = "live"  # subscribed and resynced: operations go to Redis
    CLOSED = "closed"


_TRANSITIONS: Final[frozenset[tuple[RemoteState, RemoteState]]] = frozenset(
    {
        (RemoteState.DOWN, RemoteState.RESYNCING),
        (RemoteState.RESYNCING, RemoteState.LIVE),
        (RemoteState.RESYNCING, RemoteState.DOWN),
        (RemoteState.LIVE, RemoteState.DOWN),
        (RemoteState.DOWN, RemoteState.CLOSED),
        (RemoteState.RESYNCING, RemoteState.CLOSED),
        (RemoteState.LIVE, RemoteState.CLOSED),
    }
)


class _AckWait:
    """One published invalidation waiting for its confirmations."""

    __slots__ = ("expected", "future", "received", "seq")

    def __init__(self, seq: int, future: asyncio.Future[None]) -> None:
        self.seq = seq
        self.future = future
        self.received = 0
        self.expected: int | None = None  # PUBLISH's receiver count, once the script answered

    def confirm(self) -> None:
        self.received += 1
        self.check()

    def check(self) -> None:
        if self.expected is not None and self.received >= self.expected and not self.future.done():
            self.future.set_result(None)


InvalidateCallback = Callable[[list[tuple[str, int]]], None]
ResyncCallback = Callable[[], None]
ScriptRunner = Callable[[str, Sequence[str], Sequence[bytes | int | str]], Awaitable[Any]]


def _ignore_invalidate(entries: list[tuple[str, int]]) -> None:
    return None


def _ignore_resync() -> None:
    return None


def _forget_nothing(keys: Sequence[str] | None) -> None:
    return None


def _require_positive(**values: float) -> None:
    """ValueError naming every setting that is not > 0 (in the order given)."""
    problems = [
        f"{name} must be > 0, got {value!r}" for name, value in values.items() if not value > 0
    ]
    if problems:
        raise ValueError("; ".join(problems))


class RedisCache:
    """Entries under ``prefix + key`` and invalidations on ``channel``, in one Redis.

    Every operation is bounded by ``timeout`` (connection set-up included, nothing
    retried, a connection whose reply never came is closed) and raises
    ``CacheUnavailable`` on any failure, counted in ``failures``. A failure, or the
    subscriber losing its connection or its PING answer (``health_interval`` of silence,
    then ``probe_timeout``), makes the cache not live: operations are then refused at once
    (``skipped``) until the subscriber has reconnected, replayed the invalidations it could
    not deliver (``pending``) and called ``on_resync``. The subscriber's own work (connect,
    subscribe, replay) is bounded by ``probe_timeout`` and retried with a growing delay
    between ``retry_min`` and ``retry_max`` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.02,
        prefix: str = "dbproxy:c:",
        channel: str = "dbproxy:inv",
        fill_window: float = 5.0,
        probe_timeout: float = 0.5,
        health_interval: float = 1.0,
        retry_min: float = 0.05,
        retry_max: float = 2.0,
        max_in_flight: int = 1024,
        max_pending: int = 10_000,
        ack_timeout: float = 0.05,
        clock: Clock = time.monotonic,
    ) -> None:
        _require_positive(
            timeout=timeout,
            ack_timeout=ack_timeout,
            fill_window=fill_window,
            probe_timeout=probe_timeout,
            health_interval=health_interval,
            retry_min=retry_min,
            retry_max=retry_max,
            max_in_flight=max_in_flight,
            max_pending=max_pending,
        )
        self._url = url  # may hold a password: never logged, never put in a message
        self.timeout = timeout
        self._io_deadline = timeout - min(_CLEANUP_SLACK, timeout / 10)
        self.prefix = prefix
        self.channel = channel
        self.fill_window = fill_window
        self._window_ms = int(fill_window * 1000)
        self._tombstone_ms = self._window_ms + 1000  # slack for ms rounding and clock steps
        self.probe_timeout = probe_timeout
        self.health_interval = health_interval
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self.ack_timeout = ack_timeout
        self._clock = clock
        self._init_lease()
        self._init_acks()
        self._init_connections()
        self._init_counters()

    def _init_lease(self) -> None:
        """The lease: near hits are served only while ``clock() < lease_until``. A probe
        token sent at ``t`` and received back on the subscription (behind every
        invalidation Redis ran before it) extends it to ``t + lease``; a write that
        cannot collect every confirmation waits until such leases have run out."""
        self.lease = self.ack_timeout
        self.lease_until = float("-inf")
        self._epoch = 0  # bumped on every state change: older tokens renew nothing
        self._gap_ms = max(1, int(self._io_deadline * 1000))  # the fence's longest gap
        self.probe_every = min(self.lease / 4, self._gap_ms / 3000)
        self._keys = (self.prefix + "@gen", self.prefix + "@hb")
        self._fence_args = (self.channel, self._gap_ms)

    def _init_acks(self) -> None:
        """This process's name, its confirmation channel, and the invalidations in flight."""
        self.node = secrets.token_hex(8)  # names this process in invalidations and acks
        self._ack_channel = f"{self.channel}:ack:{self.node}"
        self._ack_channel_b = self._ack_channel.encode()
        self._seq = 0
        self._waiting: dict[int, _AckWait] = {}
        self._acks_out: dict[str, list[int]] = {}
        self._ack_sender: asyncio.Task[None] | None = None

    def _init_connections(self) -> None:
        """The clients, the subscriber's tasks and state, and what it must replay."""
        self._shas = {script: _sha(script) for script in _SCRIPTS}
        self._client: aioredis.Redis | None = None  # the subscriber's replays
        self._sub_client: aioredis.Redis | None = None
        self._pipe: Pipe | None = None  # every other command: see proxy/backends/resp.py
        self._opening: asyncio.Future[Pipe] | None = None
        self._state = RemoteState.DOWN
        self._live_event = asyncio.Event()
        self._leased = asyncio.Event()  # set by the first renewal of each live period
        self._supervisor: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pending: dict[str, int] = {}
        self._pending_flush = False
        self._on_invalidate: InvalidateCallback = _ignore_invalidate
        self._on_resync: ResyncCallback = _ignore_resync

    def _init_counters(self) -> None:
        self.failures = 0  # operations that tried Redis and failed or timed out
        self.skipped = 0  # operations refused at once: not live, or every connection busy
        self.resyncs = 0  # times the subscriber (re)connected and called on_resync
        self.disconnects = 0  # times the cache went from live to down
        self.messages = 0  # invalidation messages received (own ones included)
        self.bad_messages = 0  # undecodable messages (each treated as a flush of everything)
        self.ack_timeouts = 0  # invalidations not confirmed by every subscriber in time
        self.ack_failures = 0  # confirmations this process could not send
        self.unconfirmed = 0  # invalidations Redis may not have run (waited out the lease)
        self.flushes = 0  # "forget everything" messages received (fences, flushes, resyncs)

    # -- lifecycle --------------------------------------------------------------------------

    def listen(self, on_invalidate: InvalidateCallback, on_resync: ResyncCallback) -> None:
        """Register the owner: ``on_invalidate([(key, version), ...])`` for every message
        (this process's own included), ``on_resync()`` whenever everything must be
        forgotten (after a reconnection, or a flush of everything). Both are called from
        the subscriber task and must not block; an exception in one makes the subscriber
        reconnect and resync."""
        self._on_invalidate = on_invalidate
        self._on_resync = on_resync

    @property
    def state(self) -> RemoteState:
        return self._state

    @property
    def live(self) -> bool:
        return self._state is RemoteState.LIVE

    @property
    def pending(self) -> int:
        """Invalidations waiting to be replayed (a pending flush counts as one)."""
        return len(self._pending) + self._pending_flush

    async def start(self, wait: float | None = None) -> None:
        """Build the pools and start the subscriber. Does not fail when Redis is down (the
        sidecar must start anyway). ``wait``: seconds to wait for the first resync
        (default ``probe_timeout``); returns earlier once live."""
        if self._client is not None:
            return
        common: dict[str, Any] = {
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            **_NO_CLIENT_SETINFO,
        }
        self._client = aioredis.Redis.from_url(
            self._url,
            socket_timeout=self.probe_timeout,
            socket_connect_timeout=self.probe_timeout,
            max_connections=2,
            **common,
        )
        self._sub_client = aioredis.Redis.from_url(
            self._url,
            socket_timeout=self.probe_timeout,
            socket_connect_timeout=self.probe_timeout,
            max_connections=2,
            **common,
        )
        self._supervisor = asyncio.create_task(self._supervise(), name="cache-subscriber")
        await self.wait_live(self.probe_timeout if wait is None else wait)

    async def wait_live(self, within: float) -> bool:
        """Wait up to ``within`` seconds for the cache to be live, and its first lease (so
        that the near cache answers); tell whether it is live."""
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        if not self.live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._live_event.wait(), within)
        if self.live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._leased.wait(), max(0.0, until - loop.time()))
        return self.live

    async def close(self) -> None:
        if self._state is not RemoteState.CLOSED:
            self._transition(RemoteState.CLOSED)
        sender, self._ack_sender = self._ack_sender, None
        if sender is not None and not sender.done():
            sender.cancel()
            await asyncio.wait({sender}, timeout=1.0)
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            # Python 3.11's wait_for can swallow a cancellation that races with the end of
            # the awaited I/O: insist (the supervisor also stops on its own once CLOSED).
            while not supervisor.done():
                supervisor.cancel()
                await asyncio.wait({supervisor}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                supervisor.result()
        for client in (self._client, self._sub_client):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), max(self.probe_timeout, 1.0))
        self._client = self._sub_client = None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close()

    # -- operations -------------------------------------------------------------------------

    async def get(self, key: str) -> RemoteHit | Ticket:
        """The entry for ``key``, or on a miss the ticket to present to ``put``."""
        reply = await self._op(GET_LUA, (*self._keys, self.prefix + key), (), optional=True)
        try:
            if reply[0] == 1 and type(reply[2]) is bytes:
                return RemoteHit(reply[2], int(reply[1]), int(reply[3]))
            if reply[0] == 0:
                return Ticket(int(reply[1]), int(reply[2]))
            raise ValueError("unexpected reply")
        except (TypeError, ValueError, IndexError) as exc:
            self._fail()
            raise CacheUnavailable("cache Redis answered something unexpected") from exc

    async def put(
        self, key: str, value: bytes, version: int, ttl: float, ticket: Ticket | None = None
    ) -> bool:
        """Store ``value`` at ``version`` for ``ttl`` seconds unless refused by the protocol
        (newer version stored, live tombstone with a newer version, ticket too old or from
        before a flush). True when Redis now holds ``version`` (stored, or already there).
        ``ticket=None`` only for data known current (e.g. the write's own result)."""
        ttl_ms = max(1, int(ttl * 1000))
        args: tuple[bytes | int | str, ...] = (
            version,
            value,
            ttl_ms,
            "" if ticket is None else ticket.at_ms,
            0 if ticket is None else ticket.gen,
            self._window_ms,
        )
        reply = await self._op(PUT_LUA, (*self._keys, self.prefix + key), args, optional=True)
        return reply in (1, 2)

    async def invalidate(self, entries: Sequence[tuple[str, int]]) -> None:
        """Delete ``[(key, written_version), ...]`` in Redis, leave tombstones and publish
        them, in one round trip per 256 keys, then wait for every subscriber's confirmation
        (at most ``ack_timeout``; whoever did not confirm by then has lost its lease). Tried
        even while the cache is not live, and once more on a new connection when the first
        try failed at once; when that fails, the entries are kept for replay, the call
        returns only once every lease that could predate it has run out, and raises
        ``CacheUnavailable``."""
        if not entries:
            return
        if self._closed():
            raise CacheUnavailable("cache Redis is closed")
        waits: list[_AckWait] = []
        try:
            started = self._clock()
            try:
                await self._invalidate_chunks(self._deliver, entries, waits)
            except CacheUnavailable:
                gave_up = self._clock()
                self._drop(waits)
                try:
                    if gave_up - started > self.timeout / 2:  # Redis slow or frozen
                        raise
                    # a connection that broke at once is not yet a lost invalidation
                    await self._invalidate_chunks(self._deliver, entries, waits)
                except CacheUnavailable:
                    self._remember(entries)
                    self.unconfirmed += 1
                    await self._sleep_until(gave_up + self.lease)
                    raise
            await self._confirmed(waits, self._clock())
        finally:
            self._drop(waits)

    async def _deliver(
        self, script: str, keys: Sequence[str], args: Sequence[bytes | int | str]
    ) -> Any:
        return await self._op(script, keys, args, live_only=False)

    def _drop(self, waits: list[_AckWait]) -> None:
        for wait in waits:
            wait.future.cancel()
            self._waiting.pop(wait.seq, None)
        waits.clear()

    async def _confirmed(self, waits: list[_AckWait], ran: float) -> None:
        """Wait until every subscriber PUBLISH reached has confirmed, or until ``ran``
        (a clock reading taken after Redis ran the invalidations) + ``ack_timeout``: by
        then every lease renewed before they ran has expired."""
        pending = [w.future for w in waits if not w.future.done()]
        if not pending:
            return
        until = ran + self.ack_timeout
        _, late = await asyncio.wait(pending, timeout=max(0.0, until - self._clock()))
        if late:
            self.ack_timeouts += 1
            await self._sleep_until(until)

    async def _sleep_until(self, until: float) -> None:
        """Sleep until ``clock() >= until`` (a loop timer may fire a little early)."""
        left = until - self._clock()
        while left > 0:
            await asyncio.sleep(left)
            left = until - self._clock()

    async def flush(self) -> None:
        """Invalidate every entry of every sidecar sharing this prefix (one round trip)."""
        if not self.live:
            self._pending_flush = True
            self.skipped += 1
            raise CacheUnavailable("cache Redis is not live")
        try:
            await self._op(FLUSH_LUA, self._keys, ())
        except CacheUnavailable:
            self._pending_flush = True
            raise

    async def _op(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[bytes | int | str],
        optional: bool = False,
        live_only: bool = True,
    ) -> Any:
        """Run ``script`` on the pipe: within ``timeout`` or ``CacheUnavailable`` (and the
        cache out of service until the subscriber has resynced). An ``optional`` command
        (a lookup or a fill) is refused at once when ``max_in_flight`` commands wait;
        ``live_only=False`` (an invalidation) tries even while the cache is not live."""
        if live_only and not self.live:
            self.skipped += 1
            raise CacheUnavailable("cache Redis is not live")
        args = (*self._fence_args, *args)
        pipe = await self._connected()
        if optional and pipe.in_flight >= self.max_in_flight:
            self.skipped += 1
            raise CacheUnavailable("cache Redis has too many commands in flight")
        try:
            reply = await pipe.call(b"EVALSHA", self._shas[script], len(keys), *keys, *args)
            if type(reply) is ReplyError and str(reply).startswith("NOSCRIPT"):
                # Redis restarted or its scripts were flushed: EVAL also caches it again
                reply = await pipe.call(b"EVAL", script, len(keys), *keys, *args)
        except PipeBroken as exc:
            self._fail()
            raise CacheUnavailable(f"cache Redis unavailable ({exc})") from None
        if type(reply) is ReplyError:
            self._fail()
            raise CacheUnavailable(f"cache Redis refused a script ({str(reply)[:80]})")
        return reply

    async def _connected(self) -> Pipe:
        """The pipe, (re)connected within ``timeout`` when it is broken or not yet open;
        concurrent callers share one try."""
        pipe = self._pipe
        if pipe is not None and not pipe.broken:
            return pipe
        opening = self._opening
        if opening is None:
            opening = self._opening = asyncio.ensure_future(
                open_pipe(self._url, self._io_deadline, self._io_deadline)
            )
            opening.add_done_callback(self._opened)
        try:
            return await asyncio.shield(opening)
        except PipeBroken as exc:
            self._fail()
            raise CacheUnavailable(f"cache Redis unavailable ({exc})") from None

    def _opened(self, opening: asyncio.Future[Pipe]) -> None:
        self._opening = None
        if opening.cancelled() or opening.exception() is not None:
            return
        pipe = opening.result()
        if self._closed():
            pipe.close()
            return
        old, self._pipe = self._pipe, pipe
        if old is not None and old is not pipe:
            old.close()

    def _fail(self) -> None:
        self.failures += 1
        if self._state is RemoteState.LIVE:
            self._go_down("an operation failed")

    def _client_(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisCache used before start() or after close()")
        return self._client

    def _redis_py(self, client: aioredis.Redis) -> ScriptRunner:
        """A script runner on redis-py, for the subscriber's replays (``probe_timeout``)."""

        async def run(script: str, keys: Sequence[str], args: Sequence[bytes | int | str]) -> Any:
            args = (*self._fence_args, *args)
            try:
                return await client.evalsha(self._shas[script], len(keys), *keys, *args)
            except NoScriptError:  # Redis restarted or flushed: EVAL also caches it
                return await client.eval(script, len(keys), *keys, *args)

        return run

    async def _invalidate_chunks(
        self,
        run: ScriptRunner,
        entries: Sequence[tuple[str, int]],
        waits: list[_AckWait] | None = None,
    ) -> None:
        """One script per chunk. With ``waits``, each chunk's message is registered for
        confirmations BEFORE it is published (a confirmation may overtake the reply)."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(entries), _CHUNK):
            chunk = entries[start : start + _CHUNK]
            self._seq += 1
            seq = self._seq
            payload = orjson.dumps({"o": self.node, "s": seq, "e": chunk})
            keys = [*self._keys, *(self.prefix + key for key, _ in chunk)]
            args: list[bytes | int | str] = [payload, self._tombstone_ms]
            args.extend(version for _, version in chunk)
            wait = None
            if waits is not None:
                wait = _AckWait(seq, loop.create_future())
                self._waiting[seq] = wait
                waits.append(wait)
            receivers = await run(INVALIDATE_LUA, keys, args)
            if wait is not None:
                wait.expected = int(receivers)
                wait.check()

    def _remember(self, entries: Sequence[tuple[str, int]]) -> None:
        if self._pending_flush:
            return
        pending = self._pending
        for key, version in entries:
            if pending.get(key, version) <= version:
                pending[key] = version
        if len(pending) > self.max_pending:
            log.warning(
                "cache: more than %d undelivered invalidations; a flush of everything "
                "will be replayed instead",
                self.max_pending,
            )
            pending.clear()
            self._pending_flush = True

    # -- state ----------------------------------------------------------------------------

    def _transition(self, new: RemoteState) -> None:
        if (self._state, new) not in _TRANSITIONS:
            raise RuntimeError(f"cache: illegal transition {self._state.value} -> {new.value}")
        self._state = new
        self._epoch += 1
        self.lease_until = float("-inf")
        self._leased.clear()
        if new is RemoteState.LIVE:
            self._live_event.set()
        else:
            self._live_event.clear()

    def _closed(self) -> bool:  # a method: mypy must not narrow the state across awaits
        return self._state is RemoteState.CLOSED

    def _go_down(self, why: str) -> None:
        if self._state in (RemoteState.LIVE, RemoteState.RESYNCING):
            if self._state is RemoteState.LIVE:
                self.disconnects += 1
                log.warning("cache Redis out of service (%s); bypassing the cache", why)
            self._transition(RemoteState.DOWN)
            listener = self._listener
            if listener is not None:
                listener.cancel()

    # -- subscriber -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Connect, subscribe, replay, resync, listen; on any trouble start again."""
        delay = self.retry_min
        while not self._closed():
            pubsub: Any = None
            listener: asyncio.Task[None] | None = None
            prober: asyncio.Task[None] | None = None
            try:
                pubsub = await self._subscribe()
                if self._closed():
                    break
                self._transition(RemoteState.RESYNCING)
                await self._replay()
                if self._state is not RemoteState.RESYNCING:
                    raise CacheUnavailable("lost during the resync")
                self.resyncs += 1
                self._on_resync()
                self._transition(RemoteState.LIVE)
                log.info("cache Redis live (subscribed to the invalidation channel)")
                delay = self.retry_min
                listener = self._listener = asyncio.create_task(self._listen(pubsub))
                prober = asyncio.create_task(self._probe(), name="cache-prober")
                await asyncio.wait({listener, prober}, return_when=asyncio.FIRST_COMPLETED)
                for done in (listener, prober):
                    if done.done() and not done.cancelled():
                        done.result()  # re-raises what ended it
            except (RedisError, OSError, TimeoutError, CacheUnavailable) as exc:
                log.debug("cache subscriber: %s", type(exc).__name__)
            except Exception:
                log.exception("cache subscriber: unexpected error; reconnecting")
            finally:
                for task in (listener, prober):
                    if task is not None and not task.done():
                        task.cancel()
                        await asyncio.wait({task})
                self._listener = None
                if not self._closed():
                    self._go_down("subscriber disconnected")
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pubsub.aclose(), self.probe_timeout)
            if not self._closed():
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)

    async def _subscribe(self) -> Any:
        client = self._sub_client
        if client is None:
            raise RuntimeError("RedisCache subscriber without a client")
        pubsub: Any = client.pubsub()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.probe_timeout
            await asyncio.wait_for(
                pubsub.subscribe(self.channel, self._ack_channel), self.probe_timeout
            )
            confirmed = 0
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError("no SUBSCRIBE confirmation")
                msg = await asyncio.wait_for(pubsub.get_message(timeout=left), left + 0.05)
                if msg is not None and msg["type"] == "subscribe":
                    confirmed += 1
                    if confirmed == 2:
                        return pubsub
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), self.probe_timeout)
            raise

    async def _replay(self) -> None:
        """Deliver what failed while Redis was away, before anyone trusts the cache again."""
        run = self._redis_py(self._client_())
        if self._pending_flush:
            flush = run(FLUSH_LUA, self._keys, ())
            await asyncio.wait_for(flush, self.probe_timeout)
            self._pending_flush = False
            self._pending.clear()
        while self._pending:
            batch = list(self._pending.items())[:_CHUNK]
            await asyncio.wait_for(self._invalidate_chunks(run, batch), self.probe_timeout)
            for key, version in batch:  # a newer failure for the same key stays pending
                if self._pending.get(key) == version:
                    del self._pending[key]
            if self._pending_flush:  # overflowed while replaying
                await self._replay()
                return

    async def _probe(self) -> None:
        """While live, every ``probe_every``: run the fence and publish a token to our own
        channel; its return on the subscription renews the lease (``_on_probe``)."""
        epoch = self._epoch
        while self._state is RemoteState.LIVE and self._epoch == epoch:
            sent = self._clock()
            token = f"p{epoch} {sent!r}"
            # a failure takes the cache down (this loop ends); a skip is just a skip
            with contextlib.suppress(CacheUnavailable):
                await self._op(PROBE_LUA, self._keys, (self._ack_channel, token), optional=True)
            await asyncio.sleep(max(0.0, sent + self.probe_every - self._clock()))

    def _on_probe(self, data: bytes) -> None:
        try:
            epoch, sent = data[1:].split(b" ", 1)
            until = float(sent) + self.lease
            current = int(epoch) == self._epoch
        except ValueError:
            self.bad_messages += 1
            return
        if current and self._state is RemoteState.LIVE and until > self.lease_until:
            self.lease_until = until
            self._leased.set()

    async def _listen(self, pubsub: Any) -> None:
        """Hand every message to the owner; PING after ``health_interval`` of silence and
        give up when nothing at all came back within ``probe_timeout`` of it."""
        loop = asyncio.get_running_loop()
        last_rx = loop.time()
        ping_at: float | None = None
        # The state is checked on every turn, in case a cancellation by ``_go_down`` was
        # swallowed by wait_for (Python 3.11) when it raced with an arriving message.
        while self._state is RemoteState.LIVE:
            now = loop.time()
            if ping_at is None:
                wait = last_rx + self.health_interval - now
            else:
                wait = ping_at + self.probe_timeout - now
            if wait > 0:
                msg = await asyncio.wait_for(pubsub.get_message(timeout=wait), wait + 0.5)
                while msg is not None:
                    last_rx = loop.time()
                    ping_at = None
                    if msg["type"] == "message":
                        if msg["channel"] == self._ack_channel_b:
                            if msg["data"][:1] == b"p":
                                self._on_probe(msg["data"])
                            else:
                                self._on_acks(msg["data"])
                        else:
                            self._dispatch(msg["data"])
                    # then whatever else has already arrived, without a timer per message:
                    # under a write burst the subscriber must keep up (writers wait for it)
                    msg = await pubsub.get_message(timeout=0.0)
                continue
            if ping_at is not None:
                raise TimeoutError("no PONG from the cache Redis")
            await asyncio.wait_for(pubsub.ping(), self.probe_timeout)
            ping_at = loop.time()

    def _dispatch(self, data: bytes) -> None:
        self.messages += 1
        if data == _FLUSH_ALL:
            self.flushes += 1
            self._on_resync()
            return
        try:
            decoded = orjson.loads(data)
            origin, seq = str(decoded["o"]), int(decoded["s"])
            entries = [(str(k), int(v)) for k, v in decoded["e"]]
        except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, IndexError):
            self.bad_messages += 1
            log.warning("cache: undecodable invalidation message; forgetting everything")
            self._on_resync()
            return
        self._on_invalidate(entries)
        # confirm only now that the near cache has dropped the keys
        if origin == self.node:
            wait = self._waiting.get(seq)
            if wait is not None:
                wait.confirm()
            return
        out = self._acks_out.get(origin)
        if out is None:
            self._acks_out[origin] = [seq]
        else:
            out.append(seq)
        if self._ack_sender is None or self._ack_sender.done():
            self._ack_sender = asyncio.create_task(self._send_acks(), name="cache-acks")

    def _on_acks(self, data: bytes) -> None:
        """Confirmations from other subscribers: a JSON list of our sequence numbers."""
        try:
            seqs = [int(s) for s in orjson.loads(data)]
        except (orjson.JSONDecodeError, TypeError, ValueError):
            self.bad_messages += 1
            return
        waiting = self._waiting
        for seq in seqs:
            wait = waiting.get(seq)
            if wait is not None:
                wait.confirm()

    async def _send_acks(self) -> None:
        """Send the queued confirmations: one PUBLISH per writer, all in one write. Runs a
        loop turn after the first one was queued, so a burst of messages shares it."""
        await asyncio.sleep(0)
        while self._acks_out and not self._closed():
            batch, self._acks_out = self._acks_out, {}
            try:
                pipe = await self._connected()
                channel = self.channel
                await asyncio.gather(
                    *[
                        pipe.call(b"PUBLISH", f"{channel}:ack:{origin}", orjson.dumps(seqs))
                        for origin, seqs in batch.items()
                    ]
                )
            except (CacheUnavailable, PipeBroken) as exc:
                self.ack_failures += len(batch)
                log.debug("cache: confirmations not sent (%s)", exc)


# ---- both levels --------------------------------------------------------------------------


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

    def __init__(self, near: NearCache, remote: RedisCache | None, ttl_default: float) -> None:
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
        self.forget: Callable[[Sequence[str] | None], None] = _forget_nothing
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
