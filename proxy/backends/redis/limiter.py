"""Global rate limiting in Redis: one atomic GCRA Lua script per decision, shared by all sidecars.
Timeouts and failure handling: docs/redis.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Final, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.backends.redis.client import Script, io_deadline, make_client
from proxy.resilience.ratelimit import Decision, Rate

__all__ = ["GCRA_LUA", "RedisLimiter", "RedisUnavailable"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS[1] the bucket; ARGV: interval_us, burst, increment_us, [now_us, tests only].
# Mirrors proxy.ratelimit.gcra_us line for line (Lua numbers are IEEE doubles too). The
# TAT is stored in whole microseconds and expires when the bucket would be full again, at
# which point "no key" and "the stored TAT" mean the same thing.
GCRA_LUA: Final = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local increment = tonumber(ARGV[3])
local now
if ARGV[4] ~= nil and ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tolerance = interval * burst
local base = now
local stored = redis.call('GET', KEYS[1])
if stored then
  local tat = tonumber(stored)
  if tat ~= nil and tat > now then base = tat end
end
local function left(t)
  local n = math.floor((tolerance - (t - now)) / interval)
  if n < 0 then return 0 end
  return n
end
if increment > tolerance then
  return {0, left(base), tolerance, base - now}
end
local new_tat = base + increment
local allow_at = new_tat - tolerance
if now < allow_at then
  return {0, left(base), allow_at - now, base - now}
end
if new_tat > now then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
             'PX', math.ceil((new_tat - now) / 1000))
else
  redis.call('DEL', KEYS[1])
end
return {1, left(new_tat), 0, new_tat - now}
"""

_GCRA: Final = Script(GCRA_LUA)


class RedisUnavailable(Exception):
    """Redis could not give a rate-limit decision in time (down, frozen, refused, erroring).

    The message never contains the URL; the driver error is chained as ``__cause__``.
    """


class RedisLimiter:
    """GCRA buckets in Redis under ``key_prefix + key``, decided atomically by one script.

    ``timeout`` bounds every decision, connection set-up included: the I/O is cut at
    ``timeout - min(3 ms, timeout / 10)``, leaving the rest for the event loop's timer
    rounding (about 0.5 ms) and the clean-up, so the call itself returns within ``timeout``
    on an event loop that is not overloaded. ``failures`` counts the decisions that raised
    ``RedisUnavailable`` since start.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.05,
        key_prefix: str = "dbproxy:rl:",
        max_connections: int = 64,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        self._url = url  # may hold a password: never logged, never put in a message
        self.timeout = timeout
        self._io_deadline = io_deadline(timeout)
        self.key_prefix = key_prefix
        self._max_connections = max_connections
        self._client: aioredis.Redis | None = None
        self.failures = 0

    async def start(self) -> None:
        """Build the connection pool and register the script. Does not fail when Redis is
        down: the sidecar must start anyway, and ``check`` then reports each failure."""
        if self._client is not None:
            return
        self._client = make_client(self._url, self.timeout, self._max_connections)
        try:
            await asyncio.wait_for(_GCRA.load(self._client), self._io_deadline)
        except (RedisError, OSError, TimeoutError) as exc:  # not a decision: not counted
            log.warning(
                "rate-limit Redis unavailable at start (%s); each decision will try again",
                type(exc).__name__,
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), max(self.timeout, 1.0))

    async def check(self, key: str, rate: Rate, cost: float = 1.0) -> Decision:
        """Decide on ``cost`` tokens against the shared bucket ``key`` (consumed if allowed).

        Raises ``RedisUnavailable`` (and counts it) when no decision came within ``timeout``.
        """
        return await self._decide(key, rate, cost, None)

    async def _decide(self, key: str, rate: Rate, cost: float, now_us: int | None) -> Decision:
        """``check`` with an optional forced ``now_us`` (tests compare it with ``gcra_us``)."""
        client = self._client
        if client is None:
            raise RuntimeError("RedisLimiter.check() before start()")
        increment = rate.increment_us(cost)  # a bad cost is the caller's bug: ValueError
        args = (rate.interval_us, rate.burst, increment, "" if now_us is None else now_us)
        allowed, remaining, retry_us, reset_us = await self._bounded(
            self._run_script(client, self.key_prefix + key, args)
        )
        return Decision.from_us(allowed == 1, rate.burst, remaining, retry_us, reset_us)

    async def _bounded(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` for at most ``timeout``; every failure becomes ``RedisUnavailable``.

        On timeout the command is cancelled; redis-py then closes that connection (a read
        or write interrupted by cancellation disconnects), so no reply is left owed on a
        pooled connection and the next call starts on a fresh one instead of queueing.
        """
        try:
            return await asyncio.wait_for(aw, self._io_deadline)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failures += 1
            raise RedisUnavailable(f"rate-limit Redis unavailable ({type(exc).__name__})") from exc

    @staticmethod
    async def _run_script(
        client: aioredis.Redis, key: str, args: tuple[int, int, int, int | str]
    ) -> tuple[int, int, int, int]:
        """Run the script (EVALSHA, on NOSCRIPT EVAL) and check its reply's shape."""
        reply = await _GCRA.run(client, (key,), args)
        if not (isinstance(reply, list) and len(reply) == 4 and all(type(x) is int for x in reply)):
            raise RedisError("the rate-limit script answered something else than 4 integers")
        return reply[0], reply[1], reply[2], reply[3]
