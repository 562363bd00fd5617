"""A private PostgreSQL killed with ``kill -9`` and frozen with SIGSTOP while a real ``dbproxy
serve`` streams acknowledged writes (creates with an Idempotency-Key, retried with the same key
until acknowledged) and reads: no acknowledged write lost, none duplicated, every request
answered within its deadline, and every failure a clear, retryable answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.conftest import Server, start_server
from tests.pgcluster import PgCluster, binaries_missing, private_cluster

pytestmark = pytest.mark.e2e

STATEMENT_TIMEOUT = 1.0  # limits.statement_timeout_seconds of the sidecar under test
POOL_TIMEOUT = 0.5  # pool_settings.timeout_seconds
# A request's deadline: one pool wait and one statement, plus slack for a loaded 2-core machine.
DEADLINE = STATEMENT_TIMEOUT + POOL_TIMEOUT + 2.0
CLIENT_TIMEOUT = 60.0  # the client waits this long before it calls a request hung
WRITERS = 6
READERS = 2
KILLS = 3
FREEZE_SECONDS = DEADLINE + 1.0  # longer than any answer may take


@dataclass
class Run:
    """What one scenario saw from the client's side."""

    acknowledged: set[str] = field(default_factory=set)  # client ids answered 201 (or replayed)
    attempted: set[str] = field(default_factory=set)
    requests: int = 0
    slowest: float = 0.0
    slow: list[tuple[str, int, float]] = field(default_factory=list)  # over the deadline
    hung: list[str] = field(default_factory=list)  # no answer within CLIENT_TIMEOUT
    unclear: list[tuple[str, int, str]] = field(default_factory=list)  # misleading answers
    statuses: dict[tuple[int, str], int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)  # client id -> rows in the table

    def record(self, what: str, status: int, code: str, took: float) -> None:
        self.requests += 1
        self.statuses[(status, code)] = self.statuses.get((status, code), 0) + 1
        self.slowest = max(self.slowest, took)
        if took > DEADLINE:
            self.slow.append((what, status, round(took, 2)))
        # a fault is not an internal error, and a client that opened no transaction must not
        # hear that its transaction aborted
        if status == 500 or code in ("internal_error", "transaction_aborted"):
            self.unclear.append((what, status, code))

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {len(self.acknowledged)} writes acknowledged, "
            f"slowest answer {self.slowest:.2f} s (deadline {DEADLINE} s), "
            f"statuses {sorted(self.statuses.items())}"
        )


async def call(
    session: aiohttp.ClientSession, run: Run, what: str, method: str, url: str, **kw: Any
) -> tuple[int, Any]:
    started = time.monotonic()
    try:
        async with session.request(method, url, **kw) as resp:
            body = await resp.json(content_type=None)
            status = resp.status
    except TimeoutError:
        run.hung.append(what)
        run.record(what, 0, "hung", time.monotonic() - started)
        return 0, None
    code = body["error"]["code"] if status >= 400 and isinstance(body, dict) else ""
    run.record(what, status, code, time.monotonic() - started)
    return status, body


async def writer(session: aiohttp.ClientSession, url: str, run: Run, stop: asyncio.Event) -> None:
    """Create documents one after another; each is retried with its Idempotency-Key until it is
    acknowledged (also after ``stop``: a write in doubt must be resolved)."""
    while not stop.is_set():
        cid = uuid.uuid4().hex
        run.attempted.add(cid)
        headers = {"Idempotency-Key": f"create-{cid}"}
        give_up = time.monotonic() + 90
        while time.monotonic() < give_up:
            status, _ = await call(
                session, run, "create", "POST", url, json={"cid": cid}, headers=headers
            )
            if status in (200, 201):
                run.acknowledged.add(cid)
                break
            await asyncio.sleep(0.05)


async def reader(session: aiohttp.ClientSession, url: str, run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await call(session, run, "list", "GET", url, params={"limit": "5"})
        await asyncio.sleep(0.02)


async def stream_through(server: Server, collection: str, fault: Any) -> Run:
    """Writers and readers run while ``fault()`` (a coroutine) runs; then they finish."""
    run = Run()
    url = f"{server.url}/api/db/{collection}"
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = [asyncio.create_task(writer(session, url, run, stop)) for _ in range(WRITERS)]
        tasks += [asyncio.create_task(reader(session, url, run, stop)) for _ in range(READERS)]
        try:
            await asyncio.sleep(0.7)
            await fault()
            await asyncio.sleep(1.0)  # and some more writes on the healed database
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return run


async def rows_per_client_id(dsn: str, collection: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT doc->>'cid' AS cid, count(*) AS n FROM dbproxy.{collection} GROUP BY 1"
        )
    finally:
        await conn.close()
    return {r["cid"]: r["n"] for r in rows}


def sidecar(cluster: PgCluster, tmp: Path) -> Server:
    config = tmp / "dbproxy.yaml"
    config.write_text(
        f"limits: {{statement_timeout_seconds: {STATEMENT_TIMEOUT}}}\n"
        "databases:\n"
        "  - name: main\n"
        "    type: postgresql\n"
        f"    connection_string: {cluster.dsn()}\n"
        f"    pool_settings: {{min_connections: 2, max_connections: 10, "
        f"timeout_seconds: {POOL_TIMEOUT}}}\n"
    )
    return start_server(["--config", str(config)], tmp, {"DBPROXY_LOG_LEVEL": "WARNING"})


def kills(cluster: PgCluster) -> Any:
    async def fault() -> None:
        for _ in range(KILLS):
            await asyncio.to_thread(cluster.kill)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(cluster.start)
            await asyncio.sleep(1.0)

    return fault


def freeze(cluster: PgCluster) -> Any:
    async def fault() -> None:
        await asyncio.to_thread(cluster.freeze)
        try:
            await asyncio.sleep(FREEZE_SECONDS)
        finally:
            await asyncio.to_thread(cluster.thaw)

    return fault


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """One private cluster and one sidecar: writes stream through 3 kills, then a freeze."""
    missing = binaries_missing()
    if missing is not None:
        pytest.skip(missing)
    tmp = tmp_path_factory.mktemp("pg-faults")
    with private_cluster() as cluster:
        server = sidecar(cluster, tmp)
        try:
            result = {}
            for name, fault in (("killed", kills), ("frozen", freeze)):
                try:
                    run = asyncio.run(stream_through(server, name, fault(cluster)))
                finally:
                    cluster.thaw()
                run.stored = asyncio.run(rows_per_client_id(cluster.dsn(), name))
                result[name] = run
        finally:
            server.stop()
        yield result


@pytest.fixture
def killed(runs: dict[str, Run]) -> Run:
    return runs["killed"]


@pytest.fixture
def frozen(runs: dict[str, Run]) -> Run:
    return runs["frozen"]


def lost_and_duplicated(run: Run) -> tuple[list[str], list[str]]:
    lost = sorted(c for c in run.acknowledged if run.stored.get(c, 0) == 0)
    duplicated = sorted(c for c, n in run.stored.items() if n > 1)
    return lost, duplicated


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_no_acknowledged_write_is_lost_or_duplicated(
    fault: str, request: pytest.FixtureRequest
) -> None:
    run: Run = request.getfixturevalue(fault)
    lost, duplicated = lost_and_duplicated(run)
    assert len(run.acknowledged) > 50, run.summary()
    assert (lost, duplicated) == ([], []), run.summary()
    # nothing was stored that no client tried to write
    assert set(run.stored) <= run.attempted
    assert not run.hung, run.summary()


def test_every_request_is_answered_within_its_deadline_across_kills(killed: Run) -> None:
    assert (killed.hung, killed.slow) == ([], []), killed.summary()


def test_every_request_is_answered_within_its_deadline_while_frozen(frozen: Run) -> None:
    assert (frozen.hung, frozen.slow[:10]) == ([], []), frozen.summary()


def test_a_crash_answers_only_clear_retryable_errors(killed: Run) -> None:
    assert killed.unclear == [], killed.summary()


def test_a_freeze_answers_that_the_database_is_not_answering(frozen: Run) -> None:
    assert frozen.unclear == [], frozen.summary()
    codes = {code for (status, code) in frozen.statuses if status >= 500}
    assert codes and "statement_timeout" not in codes, frozen.summary()


def test_writes_flow_again_after_each_fault(killed: Run, frozen: Run) -> None:
    # the last writes of each scenario (after the fault healed) were acknowledged
    for run in (killed, frozen):
        assert run.acknowledged, run.summary()
        assert len(run.acknowledged) >= len(run.attempted) - WRITERS, run.summary()
