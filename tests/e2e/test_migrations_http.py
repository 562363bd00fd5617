"""Migrations through the real ``dbproxy serve`` and ``dbproxy migrate`` processes: the
HTTP API (201/200/202/409/403, polling a background run, status) and the command's exit
codes, on PostgreSQL and the embedded store."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.policy import hash_token
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


async def call(s: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with s.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


def server_args(kind: str, pg_dsn: str, tmp_path: Path) -> list[str]:
    if kind == "postgresql":
        return ["--database", pg_dsn]
    return ["--data-dir", str(tmp_path / "store")]


def name() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
async def test_migrations_api(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    server = launch(*server_args(kind, pg_dsn, tmp_path))
    url = f"{server.url}/api/db"
    coll = name()
    first = {
        "id": f"{coll}-1",
        "version": 1,
        "script": {
            "operations": [
                {
                    "op": "create_collection",
                    "collection": coll,
                    "schema": {"fields": [{"name": "email", "type": "string"}]},
                },
                {
                    "op": "create_index",
                    "collection": coll,
                    "index": {"name": "by_email", "fields": ["email"], "unique": True},
                },
            ]
        },
    }
    async with aiohttp.ClientSession() as s:
        st, body = await call(s, "POST", f"{url}/migrations?dry_run=true", json=first)
        assert st == 200 and body["dry_run"] is True and len(body["steps"]) == 2
        st, body = await call(s, "POST", f"{url}/migrations", json=first)
        assert st == 201 and body["status"] == "completed", body
        st, body = await call(s, "POST", f"{url}/migrations", json=first)
        assert st == 200 and body["noop"] is True
        changed = {**first, "version": 2}
        st, body = await call(s, "POST", f"{url}/migrations", json=changed)
        assert st == 409 and body["error"]["code"] == "checksum_mismatch"
        st, body = await call(s, "POST", f"{url}/{coll}", json={"email": "a@x"})
        assert st == 201
        st, body = await call(s, "POST", f"{url}/{coll}", json={"email": "a@x"})
        assert st == 409 and body["error"]["code"] == "duplicate_key", body
        assert body["error"]["details"] == {"index": "by_email"}
        bad = {"id": f"{coll}-x", "script": {"operations": [{"op": "nope"}]}}
        st, body = await call(s, "POST", f"{url}/migrations", json=bad)
        assert st == 400 and body["error"]["code"] == "unknown_operation"
        dep = {**first, "id": f"{coll}-3", "dependencies": ["missing"]}
        st, body = await call(s, "POST", f"{url}/migrations", json=dep)
        assert st == 409 and body["error"]["code"] == "dependency_not_met"
        await _background(s, url, coll)
        st, body = await call(s, "GET", f"{url}/migrations")
        assert st == 200 and {f"{coll}-1", f"{coll}-2"} <= {r["id"] for r in body["items"]}
        st, body = await call(s, "GET", f"{url}/migrations/status")
        assert st == 200 and body["counts"]["completed"] >= 2 and body["lock_holder"] is None
        st, body = await call(s, "GET", f"{url}/migrations/nope")
        assert st == 404 and body["error"]["code"] == "migration_not_found"


async def _background(s: aiohttp.ClientSession, url: str, coll: str) -> None:
    """A backfill over 3,000 documents one per batch outlasts the ~2 s foreground: 202,
    then GET .../{id} shows progress until completed."""
    docs = [{"_id": f"d{i:05}", "n": 0, "email": f"{i}@x"} for i in range(3000)]
    for i in range(0, len(docs), 500):
        st, body = await call(s, "POST", f"{url}/{coll}", json=docs[i : i + 500])
        assert st in (200, 201, 207), body
    slow = {
        "id": f"{coll}-2",
        "version": 2,
        "dependencies": [f"{coll}-1"],
        "script": {
            "operations": [
                {
                    "op": "backfill",
                    "collection": coll,
                    "filter": {},
                    "update": {"$inc": {"n": 1}},
                    "batch_size": 1,
                }
            ]
        },
    }
    posted, body = await call(s, "POST", f"{url}/migrations", json=slow)
    assert posted in (201, 202), body
    seen = {body["status"]}
    for _ in range(600):
        st, body = await call(s, "GET", f"{url}/migrations/{coll}-2")
        assert st == 200
        seen.add(body["status"])
        if body["status"] == "completed":
            break
        await asyncio.sleep(0.1)
    assert body["status"] == "completed" and body["progress"]["rows_done"] == 3001
    if posted == 202:
        assert seen & {"pending", "executing"}


async def test_permissions(launch: Callable[..., Server], tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "owner.yaml").write_text(
        "service: owner\n"
        f"identity: {{tokens: ['{hash_token('owner-token')}']}}\n"
        "grants:\n  - collections: [mine]\n    operations: [read, create, migrate]\n"
    )
    (policies / "reader.yaml").write_text(
        "service: reader\n"
        f"identity: {{tokens: ['{hash_token('reader-token')}']}}\n"
        "grants:\n  - collections: [mine]\n    operations: [read]\n"
    )
    server = launch("--data-dir", str(tmp_path / "store"), "--policies", str(policies))
    url = f"{server.url}/api/db"
    owner = {"Authorization": "Bearer owner-token"}
    reader = {"Authorization": "Bearer reader-token"}
    mine = {
        "id": "mine-1",
        "script": {"operations": [{"op": "create_collection", "collection": "mine"}]},
    }
    theirs = {
        "id": "t-1",
        "script": {"operations": [{"op": "create_collection", "collection": "theirs"}]},
    }
    raw_sql = {"id": "s-1", "script": {"operations": [{"op": "sql", "sql": "SELECT 1"}]}}
    async with aiohttp.ClientSession() as s:
        st, body = await call(s, "POST", f"{url}/migrations", json=mine, headers=reader)
        assert st == 403 and body["error"]["code"] == "permission_denied"
        st, body = await call(s, "GET", f"{url}/migrations", headers=reader)
        assert st == 403
        st, body = await call(s, "POST", f"{url}/migrations", json=theirs, headers=owner)
        assert st == 403
        st, body = await call(s, "POST", f"{url}/migrations", json=raw_sql, headers=owner)
        assert st == 403 and body["error"]["details"]["missing"]["operation"] == "migrate_sql"
        st, body = await call(s, "POST", f"{url}/migrations", json=mine, headers=owner)
        assert st == 201, body
        st, body = await call(s, "GET", f"{url}/migrations/mine-1", headers=owner)
        assert st == 200 and body["status"] == "completed"


# ---- dbproxy migrate DIR ----------------------------------------------------------------


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "migrate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_cli(tmp_path: Path, pg_dsn: str, kind: str) -> None:
    coll = name()
    d = tmp_path / "migrations"
    d.mkdir()
    (d / "002_index.yaml").write_text(
        f"id: {coll}-index\nversion: 2\ndependencies: [{coll}-create]\n"
        "script:\n  operations:\n"
        f"    - {{op: create_index, collection: {coll}, index: {{name: by_a, fields: [a]}}}}\n"
    )
    (d / "001_create.json").write_bytes(
        orjson.dumps(
            {
                "id": f"{coll}-create",
                "version": 1,
                "script": {"operations": [{"op": "create_collection", "collection": coll}]},
            }
        )
    )
    target = ["--database", pg_dsn] if kind == "postgresql" else ["--data-dir", str(tmp_path / "s")]
    dry = migrate(str(d), *target, "--dry-run")
    assert dry.returncode == 1 or dry.returncode == 0  # the second depends on the first
    done = migrate(str(d), *target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{coll}-create: completed" in done.stdout and f"{coll}-index: completed" in done.stdout
    again = migrate(str(d), *target)
    assert again.returncode == 0 and "already applied" in again.stdout
    (d / "001_create.json").write_bytes(
        orjson.dumps(
            {
                "id": f"{coll}-create",
                "version": 1,
                "script": {"operations": [{"op": "create_collection", "collection": "other"}]},
            }
        )
    )
    changed = migrate(str(d), *target)
    assert changed.returncode == 1 and "checksum_mismatch" in changed.stdout
    (d / "003_bad.yaml").write_text("id: bad\nscript: {operations: [{op: explode}]}\n")
    bad = migrate(str(d), *target)
    assert bad.returncode == 1 and "unknown operation" in bad.stderr
    (d / "003_bad.yaml").write_text(
        "id: c1\ndependencies: [c2]\nscript: {operations: [{op: drop_collection, collection: x}]}\n"
    )
    (d / "004_bad.yaml").write_text(
        "id: c2\ndependencies: [c1]\nscript: {operations: [{op: drop_collection, collection: x}]}\n"
    )
    cycle = migrate(str(d), *target)
    assert cycle.returncode == 1 and "cycle" in cycle.stderr
