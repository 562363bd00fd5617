"""Cross-sidecar cache coherence under faults (issue 13, item 7): two caching sidecars share
a private Redis that is frozen, killed, slowed, has its subscription stalled, or runs on a
machine under CPU load; after every write's response, no read from either sidecar may
return an older version."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import Server, free_port, start_server
from tests.e2e.test_cache_http import cache_events, cached_config
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.e2e

LANES = 8


# ---- a Redis of the test's own that can be frozen, killed and started again -------------


@dataclass
class Redis:
    port: int
    dir: Path
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(
            [binary, *args, "--save", "", *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    # appendfsync always: a killed Redis comes back with the entries it held (the hard case)
    server = Redis(free_port(), tmp_path, ("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class SubscriptionStaller(FaultProxy):
    """A fault proxy that can stall only the connections that subscribed (the sidecars'
    invalidation subscriptions), while every other connection (the pipes) flows."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.stall_subscriptions = False
        self._subscribed: set[int] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_writer))
        conn = id(writer)

        async def upstream() -> None:
            while data := await reader.read(65536):
                if b"SUBSCRIBE" in data.upper():
                    self._subscribed.add(conn)
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                while self.stall_subscriptions and conn in self._subscribed:
                    await asyncio.sleep(0.005)
                writer.write(data)
                await writer.drain()

        with contextlib.suppress(Exception):
            await asyncio.gather(upstream(), downstream())
        for w in (writer, up_writer):
            w.transport.abort()
            self._conns.discard(w)


# ---- two sidecars and the write-then-read pairs ---------------------------------------


@dataclass
class Pairs:
    """Counts of the lanes' write-then-read pairs."""

    pairs: int = 0
    reads: int = 0
    stale: list[tuple[str, int, int]] = field(default_factory=list)  # (sidecar, wrote, read)
    errors: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def two_sidecars(
    tmp_path: Path, pg_dsn: str, redis_url: str
) -> AsyncIterator[tuple[Server, Server, str]]:
    coll = "coh_" + uuid.uuid4().hex[:6]
    cfg = cached_config(tmp_path, pg_dsn, redis_url, coll)
    a, b = await asyncio.gather(
        *(asyncio.to_thread(start_server, ["--config", str(cfg)], tmp_path) for _ in range(2))
    )
    try:
        yield a, b, coll
    finally:
        a.stop()
        b.stop()


async def run_pairs(
    a: Server, b: Server, coll: str, fault: Callable[[], Awaitable[None]], *, one_way: bool = False
) -> tuple[Pairs, dict[str, float]]:
    """Write-then-read pairs in ``LANES`` lanes (one document each) while ``fault`` runs;
    the pairs stop when it returns. Each write goes to one sidecar, and as soon as its
    response is in, the document is read twice from the other one (whose near cache held
    the previous version) and once from the writer (so that the next write, on the other
    side, has a cached old version to kill on both sidecars). ``one_way``: every write goes
    to ``a`` and ``b`` only reads, so that nothing but its near cache tells ``b`` (a reader
    that only hits its near cache never touches Redis, and so never notices trouble)."""
    out = Pairs()
    done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        docs = [{"_id": f"k{lane}", "n": 0} for lane in range(LANES)]
        async with s.post(f"{a.url}/api/db/{coll}", json=docs) as r:
            assert r.status == 201, await r.text()

        async def read(server: Server, path: str, wrote: int) -> None:
            async with s.get(server.url + path) as r:
                if r.status != 200:
                    out.errors.append(f"GET {r.status} {await r.text()}")
                    return
                got = (await r.json())["n"]
            out.reads += 1
            if got < wrote:
                out.stale.append((server.url, wrote, got))

        async def lane(n: int) -> None:
            path = f"/api/db/{coll}/k{n}"
            for server in (a, b):  # warm both near caches
                await read(server, path, 0)
            i = 0
            while not done.is_set():
                i += 1
                writer, reader = (a, b) if one_way or (i + n) % 2 else (b, a)
                async with s.put(writer.url + path, json={"$set": {"n": i}}) as r:
                    if r.status != 200:
                        out.errors.append(f"PUT {r.status} {await r.text()}")
                        continue
                await read(reader, path, i)
                await read(reader, path, i)
                await read(writer, path, i)
                out.pairs += 1

        lanes = [asyncio.create_task(lane(n)) for n in range(LANES)]
        try:
            await fault()
        finally:
            done.set()
            await asyncio.gather(*lanes)
        events = {
            f"{name}.{k}": v
            for name, server in (("a", a), ("b", b))
            for k, v in (await cache_events(s, server)).items()
        }
    return out, events


def report(name: str, got: Pairs, events: dict[str, float]) -> None:
    print(
        f"\n{name}: {got.pairs} pairs, {got.reads} reads, {len(got.stale)} stale "
        f"(first: {got.stale[:3]}), {len(got.errors)} errors {got.errors[:2]}; {events}"
    )


# ---- the faults ---------------------------------------------------------------------------


async def test_frozen_redis_serves_nothing_stale(tmp_path: Path, pg_dsn: str, redis: Redis) -> None:
    """Redis frozen (SIGSTOP) twice while the pairs run, and thawed: 0 stale, during the
    freeze (the near caches must not outlive it) and after the thaw (the entries that the
    frozen Redis could not delete must not come back)."""
    async with two_sidecars(tmp_path, pg_dsn, redis.url) as (a, b, coll):

        async def fault() -> None:
            await asyncio.sleep(0.5)
            for _ in range(2):
                redis.signal(signal.SIGSTOP)
                await asyncio.sleep(0.9)
                redis.signal(signal.SIGCONT)
                await asyncio.sleep(1.0)

        got, events = await run_pairs(a, b, coll, fault, one_way=True)
    report("frozen", got, events)
    assert got.errors == []
    assert got.pairs > 100
    assert got.stale == []


async def test_killed_redis_serves_nothing_stale(tmp_path: Path, pg_dsn: str, redis: Redis) -> None:
    """Redis killed (SIGKILL) while the pairs run and started again on its port with the
    entries it had persisted: 0 stale, while it is away and once it is back."""
    async with two_sidecars(tmp_path, pg_dsn, redis.url) as (a, b, coll):

        async def fault() -> None:
            await asyncio.sleep(0.5)
            for _ in range(2):
                redis.kill()
                await asyncio.sleep(0.6)
                await asyncio.to_thread(redis.start)
                await asyncio.sleep(1.0)

        got, events = await run_pairs(a, b, coll, fault, one_way=True)
    report("killed", got, events)
    assert got.errors == []
    assert got.pairs > 100
    assert got.stale == []


async def test_slow_redis_serves_nothing_stale(tmp_path: Path, pg_dsn: str, redis: Redis) -> None:
    """Latency between the sidecars and Redis (a fault proxy): below, near and beyond the
    cache's timeouts, then gone again: 0 stale."""
    proxy = FaultProxy("127.0.0.1", redis.port)
    await proxy.start()
    try:
        async with two_sidecars(tmp_path, pg_dsn, f"redis://127.0.0.1:{proxy.port}/0") as (
            a,
            b,
            coll,
        ):

            async def fault() -> None:
                await asyncio.sleep(0.5)
                # around the cache's 50 ms timeout (a round trip is twice the latency,
                # more when the proxy queues), then far beyond it, then none
                for latency in (0.01, 0.02, 0.025, 0.03, 0.08, 0.0, 0.02, 0.0):
                    proxy.latency = latency
                    await asyncio.sleep(0.5)

            got, events = await run_pairs(a, b, coll, fault)
    finally:
        await proxy.stop()
    report("slow", got, events)
    assert got.errors == []
    assert got.pairs > 100
    assert got.stale == []


async def test_stalled_subscription_serves_nothing_stale(
    tmp_path: Path, pg_dsn: str, redis: Redis
) -> None:
    """The sidecars' invalidation subscriptions stall (nothing reaches them) while their
    command connections work: 0 stale."""
    proxy = SubscriptionStaller("127.0.0.1", redis.port)
    await proxy.start()
    try:
        async with two_sidecars(tmp_path, pg_dsn, f"redis://127.0.0.1:{proxy.port}/0") as (
            a,
            b,
            coll,
        ):

            async def fault() -> None:
                await asyncio.sleep(0.5)
                for _ in range(2):
                    proxy.stall_subscriptions = True
                    await asyncio.sleep(0.8)
                    proxy.stall_subscriptions = False
                    await asyncio.sleep(0.6)

            got, events = await run_pairs(a, b, coll, fault)
    finally:
        await proxy.stop()
    report("stalled subscription", got, events)
    assert got.errors == []
    assert got.pairs > 100
    assert got.stale == []


BUSY = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


async def test_cpu_load_serves_nothing_stale(tmp_path: Path, pg_dsn: str, redis: Redis) -> None:
    """The machine under CPU load (busy-loop processes, several per core) while the pairs
    run, so that the sidecars' event loops are starved and handle invalidations late:
    0 stale."""
    async with two_sidecars(tmp_path, pg_dsn, redis.url) as (a, b, coll):
        busy: list[subprocess.Popen[bytes]] = []

        async def fault() -> None:
            await asyncio.sleep(0.3)
            for _ in range(3 * (os.cpu_count() or 2)):
                busy.append(subprocess.Popen([sys.executable, "-c", BUSY]))
            await asyncio.sleep(5.0)

        try:
            got, events = await run_pairs(a, b, coll, fault)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
    report("cpu load", got, events)
    assert got.errors == []
    assert got.pairs > 20  # a starved machine: few, but enough to have raced
    assert got.stale == []
