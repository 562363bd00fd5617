"""The fast lane on a real ``dbproxy serve``, over raw sockets: answers in order whatever way
requests arrive (whole, pipelined, split, while one is being answered), mixed with routed
requests on one keep-alive connection, ``Connection: close`` and HTTP/1.0 honoured,
chunked and malformed requests answered by aiohttp, the idle timer still closing an idle
connection, and the lane's count in /metrics (0 with ``--no-fast-lane``)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e


def get(doc_id: str, extra: bytes = b"") -> bytes:
    return b"GET /api/db/items/%s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (doc_id.encode(), extra)


def query(flt: dict[str, object]) -> bytes:
    body = orjson.dumps({"filter": flt, "sort": "n"})
    return (
        b"POST /api/db/items/query HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def create(doc: dict[str, object]) -> bytes:
    body = orjson.dumps(doc)
    return (
        b"POST /api/db/items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class Conn:
    """One raw keep-alive connection and a reader of whole responses."""

    def __init__(self, server: Server) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buf += chunk

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split(" ")[1]), headers, body

    def closed(self, wait: float = 5.0) -> bool:
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


Conns = Callable[[Server], Conn]


@pytest.fixture
def conn() -> Iterator[Conns]:
    opened: list[Conn] = []

    def _open(server: Server) -> Conn:
        opened.append(Conn(server))
        return opened[-1]

    yield _open
    for c in opened:
        c.close()


def metric(server: Server, name: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def seeded(launch: Callable[..., Server], *args: str) -> Server:
    server = launch(*args)
    docs = [{"_id": f"d{i}", "n": i, "even": i % 2 == 0} for i in range(1, 9)]
    req = urllib.request.Request(
        server.url + "/api/db/items",
        data=orjson.dumps(docs),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 201
    return server


def test_requests_whole_pipelined_split_and_mixed_answer_in_order(
    launch: Callable[..., Server], conn: Conns
) -> None:
    server = seeded(launch)
    before = metric(server, "dbproxy_fast_lane_requests_total")
    c = conn(server)
    # whole, one at a time: the lane's
    for i in (1, 2):
        c.send(get(f"d{i}"))
        status, headers, body = c.response()
        assert status == 200 and headers["etag"] == '"1"'
        assert orjson.loads(body) == {"_id": f"d{i}", "n": i, "even": i % 2 == 0, "_version": 1}
    c.send(query({"even": True}))
    status, _, body = c.response()
    assert status == 200 and [d["_id"] for d in orjson.loads(body)["items"]] == [
        "d2",
        "d4",
        "d6",
        "d8",
    ]
    lane_after_whole = metric(server, "dbproxy_fast_lane_requests_total")
    assert lane_after_whole - before == 3
    # a routed request on the same connection, then the lane again
    c.send(create({"_id": "new1", "n": 100}))
    status, _, body = c.response()
    assert status == 201 and orjson.loads(body)["_id"] == "new1"
    c.send(get("new1"))
    assert c.response()[0] == 200
    assert metric(server, "dbproxy_fast_lane_requests_total") - lane_after_whole == 1
    # sent while the one before is being answered: held, then answered, in order
    c.send(get("d3"))
    c.send(get("d4"))
    c.send(get("missing"))
    answers = [c.response() for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 404]
    assert [orjson.loads(a[2]).get("_id") for a in answers[:2]] == ["d3", "d4"]
    assert orjson.loads(answers[2][2])["error"]["code"] == "not_found"
    # pipelined in one send, a routed one in the middle: aiohttp's from here on, in order
    c.send(get("d5") + create({"_id": "new2", "n": 101}) + query({"n": {"$gte": 100}}) + get("d6"))
    answers = [c.response() for _ in range(4)]
    assert [a[0] for a in answers] == [200, 201, 200, 200]
    assert orjson.loads(answers[0][2])["_id"] == "d5"
    assert [d["_id"] for d in orjson.loads(answers[2][2])["items"]] == ["new1", "new2"]
    assert orjson.loads(answers[3][2])["_id"] == "d6"
    # split across sends
    raw = query({"n": 7})
    c.send(raw[:17])
    time.sleep(0.05)
    c.send(raw[17:])
    status, _, body = c.response()
    assert status == 200 and [d["_id"] for d in orjson.loads(body)["items"]] == ["d7"]


def test_close_http10_chunked_and_malformed(launch: Callable[..., Server], conn: Conns) -> None:
    server = seeded(launch)
    c = conn(server)
    c.send(get("d1", b"Connection: close\r\n"))
    status, headers, _ = c.response()
    assert status == 200 and headers.get("connection") == "close"
    assert c.closed()
    c = conn(server)
    c.send(b"GET /api/db/items/d1 HTTP/1.0\r\n\r\n")
    status, _, body = c.response()
    assert status == 200 and orjson.loads(body)["_id"] == "d1"
    c = conn(server)
    body = b'{"filter": {"n": 2}}'
    c.send(
        b"POST /api/db/items/query HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    status, _, out = c.response()
    assert status == 200 and [d["_id"] for d in orjson.loads(out)["items"]] == ["d2"]
    c.send(get("d2"))  # the connection still serves
    assert c.response()[0] == 200
    c = conn(server)
    c.send(b"GET /api/db/items/d1 HTTP/1.1\r\nBad Header\r\n\r\n")
    status, _, out = c.response()
    assert status == 400 and "error" in orjson.loads(out)
    # a bad body on the lane: the envelope's 400, and the connection goes on
    c = conn(server)
    c.send(
        b"POST /api/db/items/query HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\n\r\n{nope"
    )
    status, headers, out = c.response()
    assert status == 400 and json.loads(out)["error"]["request_id"] == headers["x-request-id"]
    c.send(get("d3"))
    assert c.response()[0] == 200


def test_an_idle_lane_connection_is_closed_by_the_idle_timer(
    launch: Callable[..., Server], tmp_path: Path, conn: Conns
) -> None:
    config = tmp_path / "idle.yaml"
    config.write_text("server:\n  idle_timeout_seconds: 1\n")
    server = seeded(launch, "--config", str(config))
    c = conn(server)
    c.send(get("d1"))
    assert c.response()[0] == 200
    started = time.monotonic()
    assert c.closed(wait=5)
    assert time.monotonic() - started < 4


def test_no_fast_lane_answers_the_same_through_aiohttp(
    launch: Callable[..., Server], conn: Conns
) -> None:
    server = seeded(launch, "--no-fast-lane")
    c = conn(server)
    c.send(get("d1") + get("d2"))
    assert [c.response()[0] for _ in range(2)] == [200, 200]
    c.send(get("d3"))
    assert c.response()[0] == 200
    assert metric(server, "dbproxy_fast_lane_requests_total") == 0
    assert metric(server, "dbproxy_fast_path_requests_total") == 3


async def test_sigterm_waits_for_a_lane_request_in_flight(
    launch: Callable[..., Server], pg_dsn: str, conn: Conns
) -> None:
    name = f"lane_{uuid.uuid4().hex[:8]}"
    server = launch("--database", pg_dsn)
    c = conn(server)
    c.send(create({"_id": "seed", "s": "x"}).replace(b"/items", b"/" + name.encode()))
    assert c.response()[0] == 201
    db = await asyncpg.connect(pg_dsn)
    try:  # enough documents that a regex over all of them takes a while
        await db.execute(
            f'INSERT INTO dbproxy."{name}" (_id, doc) SELECT g::text, '
            "jsonb_build_object('_id', g::text, 's', repeat('ab', 200)) "
            "FROM generate_series(1, 150000) g"
        )
    finally:
        await db.close()
    slow = query({"s": {"$regex": "b+c$"}}).replace(b"/items", b"/" + name.encode())
    c.send(slow)
    db = await asyncpg.connect(pg_dsn)
    try:  # the statement is running when SIGTERM arrives
        running = 0
        for _ in range(100):
            running = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            )
            if running:
                break
            await asyncio.sleep(0.01)
        assert running == 1
    finally:
        await db.close()
    lane_count = metric(server, "dbproxy_fast_lane_requests_total")
    code = await asyncio.to_thread(server.stop)
    status, _, body = c.response()
    assert status == 200 and orjson.loads(body)["items"] == []
    assert code == 0, server.output()
    assert lane_count >= 1
