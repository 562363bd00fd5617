"""What both Redis users share: how a redis-py client is built, and Lua scripts run by SHA."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry  # not redis.retry: redis-py >= 8.2 warns of a sync one
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from proxy.backends.redis.resp import Pipe, ReplyError

__all__ = ["CLEANUP_SLACK", "Script", "io_deadline", "make_client"]

CLEANUP_SLACK: Final = 0.003  # seconds of a budget kept for timer rounding and clean-up

# No CLIENT SETINFO round trip when (re)connecting: redis-py >= 7 spells it driver_info,
# older releases lib_name/lib_version (deprecated, with a warning, since).
_NO_CLIENT_SETINFO: Final[dict[str, Any]] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(aioredis.Redis.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


def io_deadline(timeout: float) -> float:
    """The part of a ``timeout`` budget the I/O may use: ``timeout - min(3 ms, timeout / 10)``."""
    return timeout - min(CLEANUP_SLACK, timeout / 10)


def make_client(url: str, timeout: float, max_connections: int) -> aioredis.Redis:
    """A redis-py client whose socket and connect timeouts are ``timeout``: nothing retried,
    no health-check PING, no CLIENT SETINFO. The URL may hold a password: never log it."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
        health_check_interval=0,
        **_NO_CLIENT_SETINFO,
    )


class Script:
    """A Lua script and its SHA1, run with EVALSHA and, on NOSCRIPT, EVAL."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    async def load(self, client: aioredis.Redis) -> None:
        """Register the script (SCRIPT LOAD), so that the first EVALSHA finds it."""
        await client.script_load(self.text)

    async def run(
        self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[bytes | int | str]
    ) -> Any:
        """EVALSHA the script; on NOSCRIPT (Redis restarted, failed over or flushed) EVAL
        it, which runs it and caches it again, in one round trip."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.text, len(keys), *keys, *args)

    async def call(self, pipe: Pipe, keys: Sequence[str], args: Sequence[bytes | int | str]) -> Any:
        """``run`` on the pipe: the reply, or a command's error reply as a ``ReplyError``
        value (a broken pipe raises ``PipeBroken``)."""
        reply = await pipe.call(b"EVALSHA", self.sha, len(keys), *keys, *args)
        if type(reply) is ReplyError and str(reply).startswith("NOSCRIPT"):
            # Redis restarted or its scripts were flushed: EVAL also caches it again
            reply = await pipe.call(b"EVAL", self.text, len(keys), *keys, *args)
        return reply
