"""The MongoDB backend against a server that goes away and comes back (a private SecantusDB
process this test stops, freezes and restarts on the same data): 503 database_unavailable
within the deadline, the breaker opens and fails fast, health says down, and all of it
recovers when the server is back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.backends.mongo import MongoBackend
from proxy.config import DatabaseConfig, Limits, PoolSettings
from proxy.errors import ProxyError, Unavailable
from proxy.resilience.breaker import BreakerState
from tests import mongo_server

pytestmark = pytest.mark.integration
PORT = 23010  # this helper's private range
URL = f"mongodb://127.0.0.1:{PORT}/outage?directConnection=true"
WAIT = 0.5  # pool_settings.timeout_seconds: server selection and connecting
STATEMENT = 1.0  # limits.statement_timeout_seconds


class Server:
    """``python -m secantus`` on PORT over ``data``; stop, freeze and start it again."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(PORT)),
                *("--storage-path", str(self.data), "--log-level", "ERROR"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        from pymongo import MongoClient

        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "SecantusDB did not start"
            try:
                with MongoClient(URL, serverSelectionTimeoutMS=300) as c:
                    c.admin.command("ping")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a frozen one must hear the TERM
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def freeze(self, frozen: bool) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP if frozen else signal.SIGCONT)
        time.sleep(0.2)  # the signal is delivered asynchronously


@pytest.fixture(autouse=True)
def _finalize_driver_sockets() -> Iterator[None]:
    """The driver's sockets to a stopped server are closed by the garbage collector:
    collect them here, not in whichever test runs next."""
    with mongo_server.driver_sockets_collected():
        yield


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    pytest.importorskip("secantus")
    s = Server(tmp_path / "data")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def make_backend(read_preference: str = "primary") -> MongoBackend:
    cfg = DatabaseConfig(
        name="m",
        type="mongodb",
        connection_string=URL,
        pool_settings=PoolSettings(min_connections=0, max_connections=4, timeout_seconds=WAIT),
        read_preference=read_preference,
    )
    return MongoBackend(cfg, Limits(statement_timeout_seconds=STATEMENT), database="outage")


async def timed_failure(backend: MongoBackend) -> tuple[float, ProxyError]:
    started = time.monotonic()
    with pytest.raises(ProxyError) as caught:
        await backend.get("c", "a")
    return time.monotonic() - started, caught.value


async def test_stopped_then_restarted(server: Server) -> None:
    backend = make_backend()
    await backend.start()
    try:
        await backend.insert_one("c", {"_id": "a", "n": 1})
        assert (await backend.health())["status"] == "up"
        server.stop()
        took = []
        for _ in range(8):
            seconds, err = await timed_failure(backend)
            assert isinstance(err, Unavailable) and err.code == "database_unavailable", err
            assert err.retry_after
            took.append(seconds)
        # each of the first five waits at most for server selection; the open breaker
        # answers the rest at once
        assert max(took[:5]) < WAIT + 1.0, took
        assert max(took[5:]) < 0.05, took
        assert backend.breaker.state is BreakerState.OPEN
        health = await backend.health()
        assert health["status"] == "down" and health["error"] == "database_unavailable"

        server.start()  # the same data, the same port
        deadline = time.monotonic() + 40  # the breaker's backoff is at most 30 s
        while True:
            try:
                found = await backend.get("c", "a")
                break
            except Unavailable:
                assert time.monotonic() < deadline, "did not recover"
                await _sleep(0.2)
        assert found is not None and found.version == 1  # what was written survived
        assert backend.breaker.state is BreakerState.CLOSED
        assert (await backend.health())["status"] == "up"
        created = await backend.insert_one("c", {"_id": "b"})
        assert created.version == 1
    finally:
        await backend.close()


async def test_frozen_server_answers_within_the_deadline(server: Server) -> None:
    """A server that stops answering (SIGSTOP) holds a request no longer than the statement
    timeout plus half a second (the client's socket timeout), then 503/504, not a hang."""
    backend = make_backend()
    await backend.start()
    try:
        await backend.insert_one("c", {"_id": "a"})
        server.freeze(True)
        try:
            seconds, err = await timed_failure(backend)
        finally:
            server.freeze(False)
        assert err.status in (503, 504), err.to_dict()
        assert seconds < STATEMENT + 0.5 + 0.3, seconds
        deadline = time.monotonic() + 40
        while True:  # thawed: answers again
            try:
                assert await backend.get("c", "a") is not None
                break
            except Unavailable:
                assert time.monotonic() < deadline
                await _sleep(0.2)
    finally:
        await backend.close()


async def test_reads_a_secondary_may_serve_have_a_breaker_of_their_own(server: Server) -> None:
    """Under ``secondary`` the reads trip the read breaker; the primary's (writes) stays
    closed until writes fail themselves."""
    backend = make_backend("secondary")
    await backend.start()
    try:
        await backend.insert_one("c", {"_id": "a"})
        server.stop()
        for _ in range(6):
            _, err = await timed_failure(backend)
            assert err.code == "database_unavailable"
        assert backend.read_breaker.state is BreakerState.OPEN
        assert backend.breaker.state is BreakerState.CLOSED
        with pytest.raises(Unavailable):
            await backend.insert_one("c", {"_id": "b"})
        health = await backend.health()
        assert health["status"] == "down"
    finally:
        await backend.close()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
