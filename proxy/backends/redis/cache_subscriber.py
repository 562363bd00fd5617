"""The read cache's subscriber: invalidations and confirmations in, leases renewed, replays out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from redis.exceptions import RedisError

from proxy.backends.redis.cache_link import CacheLink, RemoteState
from proxy.backends.redis.cache_scripts import CHUNK, FLUSH, FLUSH_ALL, GET, INVALIDATE, PROBE, PUT
from proxy.backends.redis.resp import PipeBroken
from proxy.cache.protocol import CacheUnavailable

__all__ = ["CacheSubscriber"]

log = logging.getLogger("proxy.cache")


class CacheSubscriber(CacheLink):
    """The subscriber task of ``RedisCache`` (``_supervise``) and what it runs."""

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
        """Deliver what failed while Redis was away, before anyone trusts the cache again;
        first register the cache's scripts, so that no lookup or fill of a live cache waits
        for a NOSCRIPT round trip (a fresh or restarted Redis knows none of them)."""
        client = self._client_()
        for script in (GET, PUT, INVALIDATE, FLUSH, PROBE):  # one at a time: a pool of two
            await asyncio.wait_for(script.load(client), self.probe_timeout)
        run = self._redis_py(client)
        if self._pending_flush:
            flush = run(FLUSH, self._keys, ())
            await asyncio.wait_for(flush, self.probe_timeout)
            self._pending_flush = False
            self._pending.clear()
        while self._pending:
            batch = list(self._pending.items())[:CHUNK]
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
                await self._op(PROBE, self._keys, (self._ack_channel, token), optional=True)
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
        if data == FLUSH_ALL:
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
