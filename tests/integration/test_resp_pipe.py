"""The cache's pipelined Redis connection (``proxy/backends/resp.py``) against real
Redis servers: the machine's, and private ones a test may freeze, kill or protect with a
password."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.backends.redis.resp import Pipe, PipeBroken, ReplyError, open_pipe
from tests.conftest import REDIS_URL
from tests.redis_server import PrivateRedis, run_private_redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def key() -> str:
    return f"test:resp:{uuid.uuid4().hex}"


@pytest.fixture
async def pipe(key: str) -> AsyncIterator[Pipe]:
    """A pipe to the machine's Redis; closed, and the test's keys deleted, after."""
    opened = await open_pipe(REDIS_URL, deadline=2.0, connect_timeout=2.0)
    try:
        yield opened
    finally:
        opened.close()
        await _cleanup(f"{key}*")


@pytest.fixture
def protected_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    yield from run_private_redis(tmp_path, "--requirepass", "s3cr3t")


async def _cleanup(pattern: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=pattern)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_concurrent_commands_get_their_own_replies_in_order(pipe: Pipe, key: str) -> None:
    # one loop turn: 300 commands of three kinds, interleaved, written together
    futures = []
    for i in range(100):
        futures.append(pipe.call("SET", f"{key}:{i}", f"v{i}".encode()))
        futures.append(pipe.call("INCRBY", f"{key}:n", i))
        futures.append(pipe.call("GET", f"{key}:{i}"))
    assert pipe.in_flight == 300
    replies = await asyncio.gather(*futures)
    for i in range(100):
        assert replies[3 * i] == b"OK"
        assert replies[3 * i + 1] == sum(range(i + 1))
        assert replies[3 * i + 2] == f"v{i}".encode()
    assert pipe.in_flight == 0
    assert await pipe.call("GET", f"{key}:missing") is None
    assert await pipe.call("RPUSH", f"{key}:list", b"a", "b", 3) == 3
    assert await pipe.call("LRANGE", f"{key}:list", 0, -1) == [b"a", b"b", b"3"]


async def test_an_error_reply_is_its_callers_alone(pipe: Pipe, key: str) -> None:
    before = pipe.call("SET", key, b"text")
    wrong = pipe.call("INCR", key)  # not an integer: an error reply
    unknown = pipe.call("EVALSHA", "0" * 40, 0)  # NOSCRIPT
    after = pipe.call("GET", key)
    assert await before == b"OK"
    err = await wrong
    assert isinstance(err, ReplyError) and "not an integer" in str(err)
    noscript = await unknown
    assert isinstance(noscript, ReplyError) and str(noscript).startswith("NOSCRIPT")
    assert await after == b"text"
    assert not pipe.broken


async def test_a_caller_that_gives_up_does_not_shift_the_replies(pipe: Pipe, key: str) -> None:
    await pipe.call("SET", key, b"mine")
    abandoned = pipe.call("ECHO", "nobody waits for this")
    nxt = pipe.call("GET", key)
    abandoned.cancel()
    assert await nxt == b"mine"
    assert await pipe.call("PING") == b"PONG"


async def test_a_frozen_redis_breaks_the_pipe_within_its_deadline(
    private_redis: PrivateRedis,
) -> None:
    pipe = await open_pipe(private_redis.url, deadline=0.05, connect_timeout=1.0)
    assert await pipe.call("PING") == b"PONG"
    private_redis.freeze()
    try:
        started = time.monotonic()
        first = pipe.call("PING")
        await asyncio.sleep(0.01)
        second = pipe.call("PING")  # queued behind the first: fails with it
        with pytest.raises(PipeBroken, match=r"within 0\.05s"):
            await first
        took = time.monotonic() - started
        with pytest.raises(PipeBroken):
            await second
        assert 0.04 <= took < 0.5, took
        assert pipe.broken
        with pytest.raises(PipeBroken):  # broken for good: refused at once
            pipe.call("PING")
    finally:
        private_redis.thaw()
        pipe.close()


async def test_a_killed_connection_fails_every_waiting_command(
    private_redis: PrivateRedis,
) -> None:
    pipe = await open_pipe(private_redis.url, deadline=5.0, connect_timeout=1.0)
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        assert await pipe.call("CLIENT", "SETNAME", "victim") == b"OK"
        waiting = pipe.call("BLPOP", "never-pushed", 0)  # blocks until the kill
        await asyncio.sleep(0.05)
        assert await admin.client_kill_filter(_type=None, skipme=True) >= 1
        with pytest.raises(PipeBroken, match="lost"):
            await asyncio.wait_for(waiting, 2.0)
        assert pipe.broken
    finally:
        await admin.aclose()
        pipe.close()


async def test_password_and_database_from_the_url(protected_redis: PrivateRedis, key: str) -> None:
    port = protected_redis.url.rsplit(":", 1)[1].split("/")[0]
    pipe = await open_pipe(f"redis://:s3cr3t@127.0.0.1:{port}/3", 1.0, 1.0)
    try:
        assert await pipe.call("SET", key, b"in-db-3") == b"OK"
    finally:
        pipe.close()
    check = aioredis.Redis.from_url(f"redis://:s3cr3t@127.0.0.1:{port}/3")
    other = aioredis.Redis.from_url(f"redis://:s3cr3t@127.0.0.1:{port}/0")
    try:
        assert await check.get(key) == b"in-db-3"
        assert await other.get(key) is None
    finally:
        await check.aclose()
        await other.aclose()


async def test_a_wrong_password_is_refused_without_echoing_it(
    protected_redis: PrivateRedis,
) -> None:
    port = protected_redis.url.rsplit(":", 1)[1].split("/")[0]
    with pytest.raises(PipeBroken, match="refused the handshake") as caught:
        await open_pipe(f"redis://:hunter2@127.0.0.1:{port}/0", 1.0, 1.0)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(PipeBroken):  # no password at all: the first command is refused
        pipe = await open_pipe(f"redis://127.0.0.1:{port}/0", 1.0, 1.0)
        try:
            reply = await pipe.call("GET", "x")
            assert isinstance(reply, ReplyError) and "NOAUTH" in str(reply)
            raise PipeBroken("as expected")
        finally:
            pipe.close()


async def test_nothing_listening_fails_fast_without_the_url() -> None:
    url = f"redis://:pw-in-url@127.0.0.1:{_free_port()}/0"
    started = time.monotonic()
    with pytest.raises(PipeBroken, match="cannot connect") as caught:
        await open_pipe(url, 1.0, 1.0)
    assert time.monotonic() - started < 1.0
    assert "pw-in-url" not in str(caught.value)


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="deadline"):
        Pipe(0)
    with pytest.raises(ValueError, match="redis://"):
        await open_pipe("unix:///tmp/redis.sock", 1.0, 1.0)
