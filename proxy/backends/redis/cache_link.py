"""The read cache's link to Redis: settings, state machine, the pipe and the scripts run on it."""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from proxy.backends.redis.cache_scripts import CHUNK, INVALIDATE
from proxy.backends.redis.client import Script, io_deadline
from proxy.backends.redis.resp import Pipe, PipeBroken, ReplyError, open_pipe
from proxy.cache.protocol import CacheUnavailable, Clock, InvalidateCallback, ResyncCallback

__all__ = ["AckWait", "CacheLink", "RemoteState", "ScriptRunner"]

log = logging.getLogger("proxy.cache")  # the name it logged under before the move


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


class AckWait:
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


ScriptRunner = Callable[[Script, Sequence[str], Sequence[bytes | int | str]], Awaitable[Any]]


def _ignore_invalidate(entries: list[tuple[str, int]]) -> None:
    return None


def _ignore_resync() -> None:
    return None


def _require_positive(**values: float) -> None:
    """ValueError naming every setting that is not > 0 (in the order given)."""
    problems = [
        f"{name} must be > 0, got {value!r}" for name, value in values.items() if not value > 0
    ]
    if problems:
        raise ValueError("; ".join(problems))


class CacheLink:
    """What every part of ``RedisCache`` shares: its settings, counters and state, the
    pipe every operation runs its script on (``_op``), and the invalidation chunks."""

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
        self._io_deadline = io_deadline(timeout)
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
        self._waiting: dict[int, AckWait] = {}
        self._acks_out: dict[str, list[int]] = {}
        self._ack_sender: asyncio.Task[None] | None = None

    def _init_connections(self) -> None:
        """The clients, the subscriber's tasks and state, and what it must replay."""
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

    def _drop(self, waits: list[AckWait]) -> None:
        for wait in waits:
            wait.future.cancel()
            self._waiting.pop(wait.seq, None)
        waits.clear()

    async def _confirmed(self, waits: list[AckWait], ran: float) -> None:
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

    async def _op(
        self,
        script: Script,
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
            reply = await script.call(pipe, keys, args)
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

        async def run(
            script: Script, keys: Sequence[str], args: Sequence[bytes | int | str]
        ) -> Any:
            return await script.run(client, keys, (*self._fence_args, *args))

        return run

    async def _invalidate_chunks(
        self,
        run: ScriptRunner,
        entries: Sequence[tuple[str, int]],
        waits: list[AckWait] | None = None,
    ) -> None:
        """One script per chunk. With ``waits``, each chunk's message is registered for
        confirmations BEFORE it is published (a confirmation may overtake the reply)."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(entries), CHUNK):
            chunk = entries[start : start + CHUNK]
            self._seq += 1
            seq = self._seq
            payload = orjson.dumps({"o": self.node, "s": seq, "e": chunk})
            keys = [*self._keys, *(self.prefix + key for key, _ in chunk)]
            args: list[bytes | int | str] = [payload, self._tombstone_ms]
            args.extend(version for _, version in chunk)
            wait = None
            if waits is not None:
                wait = AckWait(seq, loop.create_future())
                self._waiting[seq] = wait
                waits.append(wait)
            receivers = await run(INVALIDATE, keys, args)
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
