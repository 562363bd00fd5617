"""The push to the central collector: a periodic task drains the stats recorder into a
bounded buffer and posts the batches, oldest first (see docs/observability.md)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import random
import ssl
from collections import deque
from typing import Any, Final

import aiohttp
import orjson

from proxy.observe.stats import StatsRecorder
from proxy.tls import tls_failure

__all__ = ["BATCHES_PATH", "StatsPusher"]

log = logging.getLogger(__name__)

BATCHES_PATH: Final = "/api/collector/batches"
_REJECTED: Final = frozenset({400, 413, 422})  # the collector will never take this batch
_LARGE_BODY: Final = 1 << 20
_JITTER: Final = 0.1  # +-10% on the interval, so a fleet started together spreads out


class StatsPusher:
    """Every ``interval`` seconds: ``recorder.drain_batch()`` into the buffer, then POST
    the buffered batches to ``{url}/api/collector/batches`` until one fails.

    Counters: ``sent`` (accepted by the collector, duplicates included), ``failures``
    (attempts that did not get an answer or got 401/403/5xx: the batch stays buffered),
    ``rejected`` (400/413/422: the batch is discarded, retrying cannot help), ``dropped``
    (oldest batches discarded because the buffer was full)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        recorder: StatsRecorder,
        *,
        interval: float = 2.0,
        max_buffered_batches: int = 100,
        timeout: float = 1.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if interval <= 0 or timeout <= 0 or max_buffered_batches < 1:
            raise ValueError("interval, timeout and max_buffered_batches must be positive")
        self.endpoint = url.rstrip("/") + BATCHES_PATH
        self.recorder = recorder
        self.interval = interval
        self.timeout = timeout
        self.max_buffered_batches = max_buffered_batches
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._tls = tls  # an https:// collector verified against its own CA
        self._buffer: deque[bytes] = deque()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._last_error = ""
        self._pushing = asyncio.Lock()  # one push at a time: each batch is sent once
        self.sent = 0
        self.failures = 0
        self.rejected = 0
        self.dropped = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def counters(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "failures": self.failures,
            "rejected": self.rejected,
            "dropped": self.dropped,
            "buffered": self.buffered,
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the periodic task (call from the running loop, e.g. in a cleanup_ctx)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dbproxy-stats-pusher")

    async def close(self, *, final_flush: bool = True) -> None:
        """Stop the task; by default make one last attempt to ship what is left (bounded by
        the timeout per batch and stopping at the first failure), then close the session."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            if final_flush:
                with contextlib.suppress(Exception):
                    await self.flush()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None

    async def _run(self) -> None:
        while True:
            spread = 1.0 + random.uniform(-_JITTER, _JITTER)
            await asyncio.sleep(self.interval * spread)
            try:
                await self.flush()
            except Exception:  # never let the task die: the next round tries again
                log.exception("stats push round failed")

    # -- one round -----------------------------------------------------------------------

    async def flush(self) -> None:
        """Drain the recorder into the buffer, then push the buffer."""
        self.collect()
        await self.push()

    def collect(self) -> None:
        """Move the recorder's delta into the buffer (encoded), dropping the oldest batch
        when the buffer is full."""
        batch = self.recorder.drain_batch()
        if batch is None:
            return
        if len(self._buffer) >= self.max_buffered_batches:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(orjson.dumps(batch))

    async def push(self) -> None:
        """POST the buffered batches, oldest first, until one fails."""
        async with self._pushing:
            await self._push()

    async def _push(self) -> None:
        while self._buffer:
            body = self._buffer[0]
            status = await self._post(body)
            if status is not None and 200 <= status < 300:
                self.sent += 1
            elif status in _REJECTED:
                self.rejected += 1
                log.error("collector rejected a stats batch (status %d); discarded", status)
            else:
                self.failures += 1
                self._note_failure(status)
                return
            if self._buffer and self._buffer[0] is body:
                self._buffer.popleft()
            self._note_recovery()

    async def _post(self, body: bytes) -> int | None:
        """The collector's status, or None when it did not answer in time."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=2, ssl=self._tls or True),
            )
        # aiohttp warns about raw bytes over 1 MiB; a BytesIO is streamed the same way
        data: bytes | io.BytesIO = body if len(body) <= _LARGE_BODY else io.BytesIO(body)
        try:
            async with self._session.post(self.endpoint, data=data, headers=self._headers) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._last_error = tls_failure(exc) or type(exc).__name__
            return None

    def _note_failure(self, status: int | None) -> None:
        if not self._failing:  # log transitions only, never once per round
            self._failing = True
            reason = f"status {status}" if status is not None else self._last_error
            log.warning(
                "stats collector %s unreachable (%s); buffering up to %d batches",
                self.endpoint,
                reason,
                self.max_buffered_batches,
            )

    def _note_recovery(self) -> None:
        if self._failing:
            self._failing = False
            log.info("stats collector reachable again (dropped so far: %d)", self.dropped)

    def __repr__(self) -> str:
        fields: dict[str, Any] = {"endpoint": self.endpoint, **self.counters()}
        return f"StatsPusher({', '.join(f'{k}={v!r}' for k, v in fields.items())})"
