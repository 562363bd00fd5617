"""Helpers of the credential-rotation tests: a private cluster whose role ``app`` logs in with
a SCRAM password (so a changed password is really refused), and waiting for log lines."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import asyncpg

from tests.pgcluster import PgCluster

ROLE = "app"
SCRAM_HBA = [f"host all {ROLE} 127.0.0.1/32 scram-sha-256"]


def admin(cluster: PgCluster, *sql: str) -> list[list[asyncpg.Record]]:
    """Run ``sql`` as the superuser over the cluster's Unix socket; the rows of each."""

    async def run() -> list[list[asyncpg.Record]]:
        conn = await asyncpg.connect(cluster.admin_dsn())
        try:
            return [await conn.fetch(statement) for statement in sql]
        finally:
            await conn.close()

    return asyncio.run(run())


def app_cluster(port: int, password: str, tls: tuple[Path, Path] | None = None) -> PgCluster:
    """A started private cluster where ``app`` (password ``password``, SCRAM over TCP) may
    create tables in database ``postgres``; with ``tls`` (certificate, key), ``app`` is
    let in over TLS only."""
    if tls is None:
        cluster = PgCluster(port=port, hba=SCRAM_HBA)
    else:
        hba = [f"hostssl all {ROLE} 127.0.0.1/32 scram-sha-256"]
        hba += [f"hostnossl all {ROLE} 127.0.0.1/32 reject"]
        cluster = PgCluster(port=port, hba=hba).with_tls(*tls)
    cluster.start()
    try:
        admin(
            cluster,
            f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'",
            f"GRANT CREATE ON DATABASE postgres TO {ROLE}",
            f"GRANT CREATE ON SCHEMA public TO {ROLE}",
        )
    except BaseException:
        cluster.destroy()
        raise
    return cluster


def rotate_password(cluster: PgCluster, new: str) -> datetime:
    """``ALTER ROLE app PASSWORD``; the server's time just after (sessions that started
    before it were opened with the old password)."""
    rows = admin(cluster, f"ALTER ROLE {ROLE} PASSWORD '{new}'", "SELECT clock_timestamp()")
    when: datetime = rows[1][0][0]
    return when


def sessions_since(cluster: PgCluster, before: datetime) -> tuple[int, int]:
    """(sessions of ``app`` started before ``before``, those started after)."""

    async def run() -> tuple[int, int]:
        conn = await asyncpg.connect(cluster.admin_dsn())
        try:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE backend_start < $1), "
                "count(*) FILTER (WHERE backend_start >= $1) "
                "FROM pg_stat_activity WHERE usename = $2",
                before,
                ROLE,
            )
        finally:
            await conn.close()
        assert row is not None
        return int(row[0]), int(row[1])

    return asyncio.run(run())


def wait_for_old_sessions_to_go(
    cluster: PgCluster, before: datetime, timeout: float = 20.0
) -> tuple[int, int]:
    """Wait until no session of ``app`` predates ``before`` (replaced as they came back to
    their pools, nobody ended them) and one opened after it exists (a pool that had simply
    emptied would show no old session either); the last (old, new) counts."""
    deadline = time.monotonic() + timeout
    counts = sessions_since(cluster, before)
    while (counts[0] or not counts[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
        counts = sessions_since(cluster, before)
    return counts


def end_app_sessions(cluster: PgCluster, timeout: float = 20.0) -> int:
    """Terminate every session of ``app``; how many. A pool may be empty for a moment
    between requests, so this tries until it has ended at least one (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = admin(
            cluster,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
        )[0]
        if rows or time.monotonic() >= deadline:
            return len(rows)
        time.sleep(0.05)


def password_works(cluster: PgCluster, password: str) -> bool:
    async def attempt() -> bool:
        dsn = f"postgresql://{ROLE}:{password}@127.0.0.1:{cluster.port}/postgres"
        try:
            conn = await asyncpg.connect(dsn, timeout=5, ssl="prefer")
        except asyncpg.InvalidPasswordError:
            return False
        await conn.close()
        return True

    return asyncio.run(attempt())


def wait_for_log(log: Path, text: str, count: int = 1, timeout: float = 15.0) -> int:
    """Wait until ``text`` appears ``count`` times in ``log``; how many times it did."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = log.read_text(errors="replace").count(text)
        if seen >= count:
            return seen
        time.sleep(0.05)
    return seen


class HttpLoad:
    """``threads`` clients, each on new HTTP connections (so every ``--workers`` process
    gets some): create, read, patch and query documents of ``collection``, or only read
    once ``reads_only`` is set. Every answer that is not the expected status is a failure."""

    def __init__(self, base: str, collection: str, threads: int = 8) -> None:
        self.url = f"{base}/api/db/{collection}"
        self.ok = {"create": 0, "read": 0, "patch": 0, "query": 0}
        self.failed: list[str] = []
        self.reads_only = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]
        for thread in self._threads:
            thread.start()

    def total(self) -> int:
        with self._lock:
            return sum(self.ok.values())

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, tid: int) -> None:
        first = f"t{tid}-0"
        self._call("create", "POST", self.url, {"_id": first, "n": 0}, 201)
        i = 0
        while not self._stop.is_set():
            i += 1
            if self.reads_only.is_set():
                self._call("read", "GET", f"{self.url}/{first}", None, 200)
                self._call("query", "POST", f"{self.url}/query", {"filter": {"n": 0}}, 200)
                continue
            doc = f"t{tid}-{i}"
            if self._call("create", "POST", self.url, {"_id": doc, "n": i}, 201):
                self._call("read", "GET", f"{self.url}/{doc}", None, 200)
                self._call("patch", "PATCH", f"{self.url}/{doc}", {"patched": True}, 200)
            self._call("query", "POST", f"{self.url}/query", {"filter": {"n": i}}, 200)

    def _call(self, kind: str, method: str, url: str, body: object, expect: int) -> bool:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
                status, text = r.status, b""
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read()[:300]
        except OSError as exc:
            status, text = 0, repr(exc).encode()
        with self._lock:
            if status == expect:
                self.ok[kind] += 1
                return True
            self.failed.append(f"{method} {url.rsplit('/api/db/', 1)[1]}: {status} {text!r}")
        return False

    def writes_at_least(self, n: int, timeout: float = 30) -> None:
        """Let the load run until it made ``n`` creates and ``n`` patches (a busy machine
        makes fewer per second; the rotation must have happened under writes)."""
        deadline = time.monotonic() + timeout
        while min(self.ok["create"], self.ok["patch"]) < n and time.monotonic() < deadline:
            time.sleep(0.1)

    def settle(self, seconds: float) -> None:
        """Let the load run ``seconds`` more and until it made progress (15 s at most)."""
        before = self.total()
        time.sleep(seconds)
        deadline = time.monotonic() + 15
        while self.total() <= before + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.total() > before + 10, (before, self.total(), self.failed[:3])


def count(base: str, collection: str, filter_: dict[str, object]) -> int:
    query = urllib.parse.urlencode({"filter": json.dumps(filter_)})
    with urllib.request.urlopen(f"{base}/api/db/{collection}/count?{query}", timeout=10) as r:
        return int(json.loads(r.read())["count"])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the ``--workers`` processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def pg_connections_by_process(port: int) -> dict[int, int]:
    """process id -> established TCP connections it holds to 127.0.0.1:``port`` (ss -tnp)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    held: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        held[int(pid)] = held.get(int(pid), 0) + 1
    return held
