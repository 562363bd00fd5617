"""Fault and abuse, the collector (issue 13 follow-up): ``dbproxy collector`` has the same
slow-client guard, parser-error envelope and exclusive bind as ``dbproxy serve``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.abuse.test_server import read_until_closed, split_response, timed_get
from tests.conftest import PG_ADMIN_DSN
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.e2e


@dataclass
class Collector:
    url: str
    port: int
    dsn: str
    proc: subprocess.Popen[bytes]
    log: Path


def _command(port: int, dsn: str, *extra: str) -> list[str]:
    cli = [sys.executable, "-m", "proxy.cli", "collector"]
    return [*cli, "--port", str(port), "--database", dsn, *extra]


@pytest.fixture
async def collector(tmp_path: Path) -> AsyncIterator[Collector]:
    name = f"dbproxy_cguard_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    port = free_port()
    log = tmp_path / "collector.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _command(port, dsn, "--header-timeout", "2"),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DBPROXY_COLLECTOR_TOKEN": "guard-token"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    async with s.get(f"{url}/api/db/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
        yield Collector(url, port, dsn, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_collector_closes_a_slowloris_with_408_and_health_answers(
    collector: Collector,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
    started = time.monotonic()
    writer.write(b"GET /api/db/health HTTP/1.1\r\nHost: x\r\n")
    done = asyncio.Event()

    async def drip() -> None:
        try:
            while not done.is_set():
                await asyncio.sleep(0.5)
                writer.write(b"X-Slow: 1\r\n")
        except (ConnectionError, RuntimeError):
            pass

    dripper = asyncio.create_task(drip())
    try:
        await asyncio.sleep(0.5)
        status, _ = await timed_get(f"{collector.url}/api/db/health")
        assert status == 200
        data = await asyncio.wait_for(read_until_closed(reader), 30)
    finally:
        done.set()
        dripper.cancel()
        writer.close()
    assert time.monotonic() - started < 2 + 15
    status, headers, body = split_response(data)
    assert status == 408 and body["error"]["code"] == "header_timeout", body
    assert headers["connection"] == "close"
    status, _ = await timed_get(f"{collector.url}/api/db/health")
    assert status == 200


async def test_collector_answers_a_long_url_in_the_envelope(collector: Collector) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{collector.url}/api/db/performance?x={'a' * 20_000}") as r,
    ):
        status, raw = r.status, await r.read()
        content_type = r.headers.get("Content-Type", "")
    assert status == 414, raw[:200]
    assert content_type.startswith("application/json"), content_type
    error = json.loads(raw)["error"]
    assert error["code"] == "uri_too_long" and error["request_id"], error


def test_second_collector_on_a_busy_port_fails(collector: Collector, tmp_path: Path) -> None:
    try:
        second = subprocess.run(
            _command(collector.port, collector.dsn),
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a second dbproxy collector started on a busy port")
    assert second.returncode == 1, second.stderr
    assert "address already in use" in second.stderr.lower(), second.stderr
    assert f"cannot listen on 127.0.0.1:{collector.port}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert collector.proc.poll() is None
