"""The Redis limiter against real Redis: the Lua script is the pure ``gcra_us``, decisions are
atomic across OS processes, and a frozen (SIGSTOP) or absent Redis fails fast and recovers.

Shared-Redis tests use a unique key prefix each and delete their keys; anything that stops,
flushes or freezes Redis runs on a private ``redis-server`` started by the test."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.backends.redis.limiter import GCRA_LUA, RedisLimiter, RedisUnavailable
from proxy.resilience.ratelimit import Rate, gcra_us
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("DBPROXY_TEST_REDIS", "redis://127.0.0.1:6379/0")
BUDGET = 0.1  # asserted bound per decision when Redis is frozen (the limiter's timeout: 50 ms)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix no other test uses; every key under it is deleted afterwards."""
    p = f"dbproxy:test:rl:{uuid.uuid4().hex}:"
    yield p
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=p + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def limiter(prefix: str) -> AsyncIterator[RedisLimiter]:
    lim = RedisLimiter(REDIS_URL, timeout=1.0, key_prefix=prefix)
    await lim.start()
    yield lim
    await lim.close()


# ---- (a) the Lua script and the pure function agree ---------------------------------------


async def test_script_equals_gcra_us_decision_for_decision(
    limiter: RedisLimiter, prefix: str
) -> None:
    """Same forced clock, same TAT: identical Decisions and identical stored TAT, step after
    step, over a scripted random walk of clock advances, rates and costs (including costs
    above the burst, fractional costs and zero-cost peeks).

    All times are whole seconds (costs in halves on 2 s intervals), so a TAT ahead of the
    forced clock is at least 1 s ahead and its real-time TTL cannot lapse mid-test."""
    rng = random.Random(20240605)
    rates = [Rate(20 / 60, 20), Rate(1, 5), Rate(0.5, 3), Rate(0.001, 100), Rate(1 / 7, 9)]
    probe = aioredis.Redis.from_url(REDIS_URL)
    try:
        for r_index, rate in enumerate(rates):
            key = f"walk{r_index}"
            now_us = 1_000_000 * rng.randrange(0, 10**6)
            tat: float | None = None
            for _step in range(120):
                now_us += 1_000_000 * rng.choice([0, 0, 0, 1, 2, 3, 5, 30])
                cost: float = rng.choice([0, 1, 1, 1, 2, 3, rate.burst, rate.burst + 1])
                if rate.interval_us == 2_000_000 and rng.random() < 0.3:
                    cost = rng.choice([0.5, 1.5, 2.5])
                expected, new_tat = gcra_us(tat, now_us, rate, cost)
                got = await limiter._decide(key, rate, cost, now_us)
                assert got == expected, (rate, now_us, tat, cost)
                if new_tat is not None:
                    tat = new_tat
                stored = await probe.get(prefix + key)
                if tat is not None and tat > now_us:
                    assert stored is not None and int(stored) == tat
                else:  # a full bucket: Redis may have deleted the key (cost 0) where the
                    assert stored is None or int(stored) == tat  # pure step keeps TAT=now
    finally:
        await probe.aclose()


async def test_script_on_server_time_matches_the_20_per_minute_boundaries(
    limiter: RedisLimiter, prefix: str
) -> None:
    """On Redis TIME: the structural outcome of gcra (verdicts and remaining exact; times
    within the few milliseconds the calls themselves take)."""
    rate = Rate(20 / 60, 20)
    for n in range(1, 21):
        d = await limiter.check("svc:read", rate)
        assert d.allowed and d.remaining == 20 - n and d.limit == 20
        assert 3.0 * n - 0.5 < d.reset_after <= 3.0 * n
    for _ in range(21, 26):
        d = await limiter.check("svc:read", rate)
        assert not d.allowed and d.remaining == 0
        assert 2.5 < d.retry_after <= 3.0
        assert d.headers()["Retry-After"] == "3"
        assert 59.5 < d.reset_after <= 60.0
    probe = aioredis.Redis.from_url(REDIS_URL)
    try:
        ttl_ms = await probe.pttl(prefix + "svc:read")
        assert 59_000 < ttl_ms <= 60_000  # expires when the bucket is full again, no later
    finally:
        await probe.aclose()
    assert limiter.failures == 0


async def test_cost_above_burst_is_denied_by_the_script_too(limiter: RedisLimiter) -> None:
    d = await limiter.check("big", Rate(1, 10), cost=11)
    assert not d.allowed and d.retry_after == 10.0 and d.remaining == 10
    assert (await limiter.check("big", Rate(1, 10), cost=10)).allowed


# ---- (b) atomicity across processes ---------------------------------------------------------

_HAMMER = textwrap.dedent(
    """
    import asyncio, sys, time
    from proxy.backends.redis.limiter import RedisLimiter
    from proxy.resilience.ratelimit import Rate

    url, prefix, go, attempts = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])

    async def main() -> None:
        lim = RedisLimiter(url, timeout=5.0, key_prefix=prefix)
        await lim.start()
        rate = Rate(0.001, 100)
        await asyncio.sleep(max(0.0, go - time.time()))
        sem = asyncio.Semaphore(16)

        async def one() -> bool:
            async with sem:
                return (await lim.check("shared", rate)).allowed

        results = await asyncio.gather(*(one() for _ in range(attempts)))
        await lim.close()
        print(sum(results), lim.failures)

    asyncio.run(main())
    """
)


def test_four_processes_share_one_bucket_of_100_exactly(prefix: str) -> None:
    go = time.time() + 2.0  # every process is up and connected before the race starts
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, REDIS_URL, prefix, str(go), "150"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    admitted = failures = 0
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        a, f = (int(x) for x in out.split())
        admitted += a
        failures += f
    assert failures == 0
    assert admitted == 100  # 600 attempts, burst 100, refill one token per 1000 s


# ---- (c) a private redis-server to freeze, flush and stop -----------------------------------


async def _timed_failure(lim: RedisLimiter, key: str, rate: Rate) -> float:
    t0 = time.perf_counter()
    with pytest.raises(RedisUnavailable):
        await lim.check(key, rate)
    return time.perf_counter() - t0


async def test_frozen_redis_fails_fast_every_time_then_recovers(
    private_redis: PrivateRedis,
) -> None:
    lim = RedisLimiter(private_redis.url, timeout=0.05, key_prefix="frz:")
    await lim.start()
    rate = Rate(0.001, 1000)
    try:
        assert (await lim.check("k", rate)).allowed  # warm: a pooled, connected socket
        private_redis.freeze()
        try:
            sequential = [await _timed_failure(lim, "k", rate) for _ in range(8)]
            t0 = time.perf_counter()
            burst = await asyncio.gather(
                *(lim.check("k", rate) for _ in range(20)), return_exceptions=True
            )
            burst_wall = time.perf_counter() - t0
        finally:
            private_redis.thaw()
        print(
            "frozen Redis, timeout=0.05: sequential decisions (ms): "
            + ", ".join(f"{s * 1000:.1f}" for s in sequential)
            + f"; 20 concurrent: {burst_wall * 1000:.1f} ms wall"
        )
        assert all(s < BUDGET for s in sequential), sequential
        assert all(isinstance(r, RedisUnavailable) for r in burst)
        assert burst_wall < BUDGET
        assert lim.failures == 28

        # Thawed: the same limiter answers again, with coherent replies (no reply left owed
        # on a pooled connection to be read as the answer to a later command).
        first = await lim.check("k", rate)
        assert first.allowed
        # Commands already written to a frozen Redis's sockets run when it resumes: a
        # timed-out check may still have spent its token (over-counting, never under).
        assert 1000 - 2 - 28 <= first.remaining <= 1000 - 2
        print(f"tokens spent by the 28 timed-out checks once thawed: {998 - first.remaining}")
        for n in range(1, 6):
            d = await lim.check("k", rate)
            assert d.allowed and d.remaining == first.remaining - n
        assert lim.failures == 28
    finally:
        await lim.close()


async def test_frozen_during_connect_also_fails_fast(private_redis: PrivateRedis) -> None:
    """Frozen before the first connection: the kernel still completes the TCP handshake,
    so the stall is on the first reply; it is bounded all the same."""
    lim = RedisLimiter(private_redis.url, timeout=0.05, key_prefix="frz:")
    private_redis.freeze()
    try:
        t0 = time.perf_counter()
        await lim.start()  # does not raise: the sidecar must come up without Redis
        assert time.perf_counter() - t0 < BUDGET
        times = [await _timed_failure(lim, "k", Rate(1, 1)) for _ in range(3)]
        assert all(t < BUDGET for t in times), times
        assert lim.failures == 3  # decisions only; the failed registration at start is not one
    finally:
        private_redis.thaw()
    assert (await lim.check("k2", Rate(1, 1))).allowed
    await lim.close()


async def test_unreachable_redis_fails_fast() -> None:
    lim = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.05)
    await lim.start()
    try:
        times = [await _timed_failure(lim, "k", Rate(1, 1)) for _ in range(5)]
        assert all(t < BUDGET for t in times), times
        assert lim.failures == 5
    finally:
        await lim.close()


async def test_error_message_does_not_leak_the_url() -> None:
    secret = "s3cr3t-pa55"
    lim = RedisLimiter(f"redis://:{secret}@127.0.0.1:{free_port()}/0", timeout=0.05)
    await lim.start()
    try:
        with pytest.raises(RedisUnavailable) as info:
            await lim.check("k", Rate(1, 1))
        assert secret not in str(info.value)
    finally:
        await lim.close()


async def test_script_is_reloaded_after_noscript(private_redis: PrivateRedis) -> None:
    lim = RedisLimiter(private_redis.url, timeout=1.0, key_prefix="ns:")
    await lim.start()
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        sha = await admin.script_load(GCRA_LUA)  # the same sha the limiter registered
        assert (await lim.check("k", Rate(1, 5))).remaining == 4
        await admin.script_flush()
        assert await admin.script_exists(sha) == [False]
        assert (await lim.check("k", Rate(1, 5))).remaining == 3  # NOSCRIPT -> EVAL
        assert await admin.script_exists(sha) == [True]
        assert lim.failures == 0
    finally:
        await admin.aclose()
        await lim.close()


async def test_check_before_start_is_a_bug() -> None:
    lim = RedisLimiter(REDIS_URL)
    with pytest.raises(RuntimeError):
        await lim.check("k", Rate(1, 1))
