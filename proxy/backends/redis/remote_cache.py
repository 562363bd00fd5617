"""The read cache's shared level in Redis: entries, invalidations broadcast and confirmed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from proxy.backends.redis.cache_link import AckWait, RemoteState
from proxy.backends.redis.cache_scripts import FLUSH, GET, PUT
from proxy.backends.redis.cache_subscriber import CacheSubscriber
from proxy.backends.redis.client import Script, make_client
from proxy.cache.protocol import (
    CacheUnavailable,
    InvalidateCallback,
    RemoteHit,
    ResyncCallback,
    Ticket,
)

__all__ = ["RedisCache"]


class RedisCache(CacheSubscriber):
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

    # -- lifecycle --------------------------------------------------------------------------

    def listen(self, on_invalidate: InvalidateCallback, on_resync: ResyncCallback) -> None:
        """Register the owner: ``on_invalidate([(key, version), ...])`` for every message
        (this process's own included), ``on_resync()`` whenever everything must be
        forgotten (after a reconnection, or a flush of everything). Both are called from
        the subscriber task and must not block; an exception in one makes the subscriber
        reconnect and resync."""
        self._on_invalidate = on_invalidate
        self._on_resync = on_resync

    async def start(self, wait: float | None = None) -> None:
        """Build the pools and start the subscriber. Does not fail when Redis is down (the
        sidecar must start anyway). ``wait``: seconds to wait for the first resync
        (default ``probe_timeout``); returns earlier once live."""
        if self._client is not None:
            return
        self._client = make_client(self._url, self.probe_timeout, max_connections=2)
        self._sub_client = make_client(self._url, self.probe_timeout, max_connections=2)
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
        reply = await self._op(GET, (*self._keys, self.prefix + key), (), optional=True)
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
        reply = await self._op(PUT, (*self._keys, self.prefix + key), args, optional=True)
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
        waits: list[AckWait] = []
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
        self, script: Script, keys: Sequence[str], args: Sequence[bytes | int | str]
    ) -> Any:
        return await self._op(script, keys, args, live_only=False)

    async def flush(self) -> None:
        """Invalidate every entry of every sidecar sharing this prefix (one round trip)."""
        if not self.live:
            self._pending_flush = True
            self.skipped += 1
            raise CacheUnavailable("cache Redis is not live")
        try:
            await self._op(FLUSH, self._keys, ())
        except CacheUnavailable:
            self._pending_flush = True
            raise
