"""Fault and abuse, the server itself (issue 13, items 8 and 15): slow and idle clients, the
connection cap, a busy port, bad flags, a missing database, and what a new user hits."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.e2e.conftest import Server, free_port

pytestmark = pytest.mark.e2e


def coll() -> str:
    return "srv_" + uuid.uuid4().hex[:8]


def host_port(server: Server) -> tuple[str, int]:
    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, Any, Any]:
    async with session.request(method, url, **kw) as resp:
        body = await resp.read()
        return resp.status, json.loads(body) if body else None, resp.headers.copy()


async def timed_get(url: str) -> tuple[int, float]:
    """A GET on a fresh connection: (status, seconds)."""
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as r:
        await r.read()
        return r.status, time.monotonic() - started


def split_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body) of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    return status, headers, json.loads(body[:length]) if length else None


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        top = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"needs {wanted} file descriptors")


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionError:
        pass
    return data


# ---- item 8: slow clients -------------------------------------------------------------


SLOW = 2000


async def test_slowloris_connections_are_closed_and_health_still_answers(
    launch: Callable[..., Server],
) -> None:
    raise_fd_limit(SLOW + 500)
    server = launch("--header-timeout", "3")
    host, port = host_port(server)
    done = asyncio.Event()

    async def slowloris() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        writer.write(b"GET /api/db/health HTTP/1.1\r\nHost: x\r\n")

        async def drip() -> None:
            try:
                while not done.is_set():
                    await asyncio.sleep(1.0)
                    writer.write(b"X-Slow: 1\r\n")
            except (ConnectionError, RuntimeError):
                pass

        dripper = asyncio.create_task(drip())
        try:
            data = await asyncio.wait_for(read_until_closed(reader), 40)
            return time.monotonic() - started, data
        finally:
            dripper.cancel()
            writer.close()

    tasks = [asyncio.create_task(slowloris()) for _ in range(SLOW)]
    await asyncio.sleep(1.5)  # every slow connection is open and dripping
    try:
        status, seconds = await timed_get(f"{server.url}/api/db/health")
        assert status == 200 and seconds < 3, (status, seconds)
        async with aiohttp.ClientSession() as s:
            st, doc, _ = await call(s, "POST", f"{server.url}/api/db/{coll()}", json={"a": 1})
            assert st == 201 and doc["a"] == 1
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        done.set()
    closed = [r for r in results if not isinstance(r, BaseException)]
    assert len(closed) == SLOW, [r for r in results if isinstance(r, BaseException)][:3]
    slowest = max(seconds for seconds, _ in closed)
    assert slowest < 3 + 15, slowest  # the header timeout, plus generous slack for a busy box
    answered = [split_response(data) for _, data in closed if data]
    assert len(answered) > SLOW // 2  # most see why (the rest may be reset mid-write)
    for status, _, body in answered:
        assert status == 408 and body["error"]["code"] == "header_timeout", body


async def test_slow_body_gets_408_envelope(launch: Callable[..., Server]) -> None:
    server = launch("--body-timeout", "2")
    host, port = host_port(server)
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(
        f"POST /api/db/{coll()} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n{".encode()
    )
    data = await asyncio.wait_for(read_until_closed(reader), 30)
    writer.close()
    status, _, body = split_response(data)
    assert status == 408 and body["error"]["code"] == "body_timeout", body
    assert body["error"]["request_id"] and body["error"]["message"]
    assert time.monotonic() - started < 2 + 10
    async with aiohttp.ClientSession() as s:  # and the sidecar serves on
        st, _, _ = await call(s, "GET", f"{server.url}/api/db/health")
        assert st == 200


async def test_idle_keepalive_connection_is_closed(launch: Callable[..., Server]) -> None:
    server = launch("--idle-timeout", "2")
    host, port = host_port(server)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /api/db/health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    await asyncio.wait_for(read_until_closed(reader), 30)
    idle = time.monotonic() - started
    writer.close()
    assert idle < 2 + 10, idle
    # a silent new connection is idle too
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    assert await asyncio.wait_for(read_until_closed(reader), 30) == b""
    writer.close()
    assert time.monotonic() - started < 2 + 10


async def test_connections_beyond_the_cap_get_503_and_health_still_answers(
    launch: Callable[..., Server],
) -> None:
    cap = 40
    server = launch("--max-connections", str(cap))
    host, port = host_port(server)
    held = []
    for _ in range(cap):  # keep-alive connections the sidecar has accepted and served
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /api/db/health HTTP/1.1\r\nHost: x\r\n\r\n")
        held.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        assert length is not None
        await reader.readexactly(int(length.group(1)))
    url = f"{server.url}/api/db/{coll()}/nope"
    timeout = aiohttp.ClientTimeout(total=20)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as s:
            st, body, headers = await call(s, "GET", url)
            assert st == 503 and body["error"]["code"] == "too_many_connections", body
            assert int(headers["Retry-After"]) >= 1 and body["error"]["request_id"]
        status, seconds = await timed_get(f"{server.url}/api/db/health")
        assert status == 200 and seconds < 5
    finally:
        for writer in held:
            writer.close()
            await writer.wait_closed()
    deadline = time.monotonic() + 15
    while True:  # once they are gone, requests are served again
        async with aiohttp.ClientSession(timeout=timeout) as s:
            st, _, _ = await call(s, "GET", url)
        if st == 404 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert st == 404


async def test_past_the_cap_and_its_reserve_503_at_the_door_but_health_answers(
    launch: Callable[..., Server],
) -> None:
    cap, reserve = 16, 64  # the reserve: max(64, cap // 8)
    server = launch("--max-connections", str(cap))
    host, port = host_port(server)
    held = []
    try:
        for i in range(cap + reserve):  # all of them begin a request and stall
            reader, writer = await asyncio.open_connection(host, port)
            held.append(writer)
            writer.write(b"GET /api/db/health HTTP/1.1\r\n")
            if i == cap - 1:
                await asyncio.sleep(0.3)  # the first ones are in, the next overflow
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection(host, port)
        held.append(writer)
        writer.write(f"GET /api/db/{coll()}/x HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await asyncio.wait_for(read_until_closed(reader), 10)
        status, headers, body = split_response(data)
        assert status == 503 and body["error"]["code"] == "too_many_connections", body
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        status, seconds = await timed_get(f"{server.url}/api/db/health")  # still answered
        assert status == 200 and seconds < 5
    finally:
        for writer in held:
            writer.close()
            await writer.wait_closed()


# ---- item 15: a second serve on a busy port --------------------------------------------


def run_cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_second_serve_on_a_busy_port_fails(
    launch: Callable[..., Server], tmp_path: Path, workers: int
) -> None:
    first = launch("--workers", str(workers))
    _, port = host_port(first)
    other = tmp_path / "other"
    other.mkdir()
    try:
        second = run_cli("serve", "--port", str(port), cwd=other, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("a second dbproxy serve started on a busy port")
    assert second.returncode == 1, second.stderr
    assert "address already in use" in second.stderr.lower(), second.stderr
    assert "Traceback" not in second.stderr
    assert first.proc.poll() is None


async def test_workers_still_share_their_port(launch: Callable[..., Server]) -> None:
    server = launch("--workers", "2")
    base = f"{server.url}/api/db/{coll()}"
    for i in range(20):
        async with aiohttp.ClientSession() as fresh:
            st, _, _ = await call(fresh, "POST", base, json={"i": i})
            assert st == 201
    children = subprocess.run(
        ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 2
    assert server.stop() == 0


# ---- item 15: flags and URLs --------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "collector"])
def test_invalid_log_level_is_a_clear_error(tmp_path: Path, command: str) -> None:
    done = run_cli(command, "--port", str(free_port()), "--log-level", "loud", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "--log-level" in done.stderr and "'loud'" in done.stderr, done.stderr
    assert "debug" in done.stderr.lower() and "warning" in done.stderr.lower()


def test_log_level_is_case_insensitive(launch: Callable[..., Server]) -> None:
    server = launch("--log-level", "debug")
    assert server.proc.poll() is None


def test_unsupported_url_scheme_lists_the_working_ones(tmp_path: Path) -> None:
    done = run_cli("serve", "--database", "mysql://u@127.0.0.1/db", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "postgresql://, postgres://, sqlite://)" in done.stderr, done.stderr
    for scheme in ("mongodb", "redis", "mysql://u"):
        assert scheme not in done.stderr, done.stderr


async def test_missing_database_says_so(launch: Callable[..., Server], pg_dsn: str) -> None:
    name = f"nosuch_{uuid.uuid4().hex[:8]}"
    server = launch("--database", pg_dsn.rpartition("/")[0] + "/" + name)
    async with aiohttp.ClientSession() as s:
        st, health, _ = await call(s, "GET", f"{server.url}/api/db/health")
        assert st == 503
        db = health["databases"]["default"]
        assert db["status"] == "down" and db["error"] == "database_unavailable", db
        assert db["message"] == f"database {name} does not exist", db
        st, body, headers = await call(s, "GET", f"{server.url}/api/db/{coll()}/x")
        assert st == 503 and body["error"]["code"] == "database_unavailable", body
        assert f"database {name} does not exist" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
    await asyncio.sleep(4)  # several reconnect attempts
    log = server.output()
    assert "sqlstate=3D000" not in log and "internal_error" not in log, log
    assert sum(f"database {name} does not exist" in line for line in log.splitlines()) == 1, log


# ---- item 15: GET sort as an object, and the transaction header -------------------------


@pytest.mark.parametrize("backend", ["postgresql", "embedded"])
async def test_get_sort_accepts_the_object_form(
    launch: Callable[..., Server], pg_dsn: str, backend: str
) -> None:
    server = launch("--database", pg_dsn) if backend == "postgresql" else launch()
    base = f"{server.url}/api/db/{coll()}"
    async with aiohttp.ClientSession() as s:
        for age in (30, 10, 20):
            st, _, _ = await call(s, "POST", base, json={"age": age, "name": f"n{age}"})
            assert st == 201
        for sort, expected in (
            ('{"age":-1}', [30, 20, 10]),
            ('{"age":1}', [10, 20, 30]),
            ('[["age",-1]]', [30, 20, 10]),
            ("-age", [30, 20, 10]),
        ):
            st, page, _ = await call(s, "GET", base, params={"sort": sort})
            assert st == 200, page
            assert [d["age"] for d in page["items"]] == expected, sort
        st, body, _ = await call(s, "GET", base, params={"sort": '{"age":'})
        assert st == 400 and body["error"]["code"] == "invalid_json", body


async def test_commit_and_rollback_take_the_transaction_header(
    launch: Callable[..., Server], pg_dsn: str
) -> None:
    server = launch("--database", pg_dsn)
    tx_url = f"{server.url}/api/db/transaction"
    base = f"{server.url}/api/db/{coll()}"
    async with aiohttp.ClientSession() as s:
        for action, expected in (("commit", "committed"), ("rollback", "rolled-back")):
            st, begun, _ = await call(s, "POST", tx_url, json={"action": "begin"})
            assert st == 201
            hdr = {"X-Transaction-Id": begun["transaction_id"]}
            st, _, _ = await call(s, "POST", base, json={"_id": action}, headers=hdr)
            assert st == 201
            st, body, _ = await call(s, "POST", tx_url, json={"action": action}, headers=hdr)
            assert st == 200, body
            assert body == {"transaction_id": begun["transaction_id"], "status": expected}
        st, _, _ = await call(s, "GET", f"{base}/commit")
        assert st == 200
        st, _, _ = await call(s, "GET", f"{base}/rollback")
        assert st == 404
        st, begun, _ = await call(s, "POST", tx_url, json={"action": "begin"})
        hdr = {"X-Transaction-Id": begun["transaction_id"]}
        st, body, _ = await call(
            s, "POST", tx_url, json={"action": "commit", "transaction_id": "other"}, headers=hdr
        )
        assert st == 400 and body["error"]["code"] == "transaction_id_mismatch", body
        st, body, _ = await call(  # same id twice is fine
            s,
            "POST",
            tx_url,
            json={"action": "rollback", "transaction_id": begun["transaction_id"]},
            headers=hdr,
        )
        assert st == 200 and body["status"] == "rolled-back", body
