"""``GET /api/db/schema/{c}`` and schema violations under policies, over HTTP: the
``schema`` grant, no hidden field (nor path under one) in the inferred fields, no totals
and only readable rows under row rules, no inference without ``list``, and problems that
tell nothing of stored values the caller may not read."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.backends.sqlite.ddl import DATA_FILE, table_name
from proxy.policy import hash_token
from tests.e2e.conftest import Server
from tests.e2e.test_schemas_http import call, server_args

pytestmark = pytest.mark.e2e

SERVICES = {
    # service: (operations on every collection, extra policy text)
    "owner": ("[read, list, count, create, update, delete, schema, migrate]", ""),
    "noschema": ("[read, list, create]", ""),
    "hider": (
        "[read, list, create, update, schema]",
        "fields:\n  '*':\n    readable: [_id, name, n, tenant_id]\n"
        "    writable: [name, n, tenant_id]\n",
    ),
    "tenant": ("[list, schema]", "rows:\n  '*':\n    tenant_id: {header: X-Tenant-Id}\n"),
    "schemaonly": ("[schema]", ""),
}


def auth(service: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {service}-token", **headers}


def write_policies(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    for service, (ops, extra) in SERVICES.items():
        (d / f"{service}.yaml").write_text(
            f"service: {service}\n"
            f"identity: {{tokens: ['{hash_token(service + '-token')}']}}\n"
            f"grants:\n  - collections: ['*']\n    operations: {ops}\n" + extra
        )
    return d


@pytest.fixture(params=["postgresql", "sqlite"])
def server(
    request: pytest.FixtureRequest, launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> Server:
    args = server_args(request.param, pg_dsn, tmp_path)
    return launch(*args, "--policies", str(write_policies(tmp_path)))


def name() -> str:
    return f"p{uuid.uuid4().hex[:10]}"


async def seed(s: aiohttp.ClientSession, url: str, coll: str, docs: list[dict[str, Any]]) -> None:
    st, body = await call(s, "POST", f"{url}/{coll}", json=docs, headers=auth("owner"))
    assert st == 201, body


def inferred_names(info: dict[str, Any]) -> set[str]:
    return {f["name"] for f in info["inferred"]["fields"]}


async def test_schema_grant_and_hidden_fields(server: Server) -> None:
    url = f"{server.url}/api/db"
    coll = name()
    async with aiohttp.ClientSession() as s:
        await seed(
            s,
            url,
            coll,
            [
                {"name": "a", "n": 1, "secret": {"pin": 1234, "deep": {"x": "y"}}},
                {"name": "b", "n": 2, "secret": "plain", "stash": [1]},
            ],
        )
        st, body = await call(s, "GET", f"{url}/schema/{coll}", headers=auth("noschema"))
        assert st == 403 and body["error"]["code"] == "permission_denied", body
        assert body["error"]["details"]["missing"] == {"operation": "schema", "collection": coll}

        st, full = await call(s, "GET", f"{url}/schema/{coll}", headers=auth("owner"))
        assert st == 200 and {"secret", "secret.pin", "secret.deep.x", "stash"} <= inferred_names(
            full
        )
        assert full["estimated_count"] == 2

        st, info = await call(s, "GET", f"{url}/schema/{coll}", headers=auth("hider"))
        assert st == 200, info
        names = inferred_names(info)
        assert names == {"_id", "name", "n"}, names  # _version is dbproxy's, never inferred
        assert not any(n == "secret" or n.startswith("secret.") for n in names)
        assert "secret" not in str(info) and "stash" not in str(info)
        assert info["estimated_count"] == 2  # a field rule hides fields, not rows


async def test_row_rules_and_list_grant(server: Server) -> None:
    url = f"{server.url}/api/db"
    coll = name()
    async with aiohttp.ClientSession() as s:
        await seed(
            s,
            url,
            coll,
            [
                {"tenant_id": "t1", "n": 1},
                {"tenant_id": "t1", "n": 2, "note": "x"},
                {"tenant_id": "t2", "n": 3, "only_t2": True, "deep": {"t2": 1}},
            ],
        )
        headers = auth("tenant", **{"X-Tenant-Id": "t1"})
        st, info = await call(s, "GET", f"{url}/schema/{coll}", headers=headers)
        assert st == 200, info
        assert info["estimated_count"] is None and info["size_bytes"] is None
        assert info["inferred"]["sample_size"] == 2
        names = inferred_names(info)
        assert names == {"_id", "tenant_id", "n", "note"}, names
        fields = {f["name"]: f for f in info["inferred"]["fields"]}
        assert fields["note"]["present"] == 0.5  # of the readable rows only

        headers = auth("tenant", **{"X-Tenant-Id": "t2"})
        st, info = await call(s, "GET", f"{url}/schema/{coll}", headers=headers)
        assert st == 200 and {"only_t2", "deep.t2"} <= inferred_names(info)
        assert "note" not in inferred_names(info) and info["inferred"]["sample_size"] == 1

        st, info = await call(s, "GET", f"{url}/schema/{coll}", headers=auth("schemaonly"))
        assert st == 200, info
        assert info["inferred"]["fields"] == [] and info["inferred"]["sample_size"] == 0
        assert "list" in info["inferred"]["note"]
        assert info["estimated_count"] is None and info["size_bytes"] is None
        assert info["exists"] is True  # what the grant itself shows


SECRET_SCHEMA = {
    "fields": [
        {"name": "name", "type": "string", "constraints": ["max_length:20"]},
        {"name": "n", "type": "integer", "constraints": ["min:0", "max:100"]},
        {"name": "secret", "type": "string", "constraints": ["max_length:10"]},
    ]
}


async def corrupt(kind: str, pg_dsn: str, tmp_path: Path, coll: str) -> None:
    """Store an invalid hidden value behind dbproxy's back, as a sidecar that had not yet
    seen the migration could have written it."""
    long = "a-very-long-hidden-value"
    if kind == "postgresql":
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(
                f'UPDATE "dbproxy"."{coll}" SET doc = jsonb_set(doc, $1, to_jsonb($2::text)) '
                "WHERE _id = $3",
                ["secret"],
                long,
                "d",
            )
        finally:
            await conn.close()
    else:
        with sqlite3.connect(tmp_path / "store" / DATA_FILE) as db:
            db.execute(
                f"UPDATE {table_name(coll)} SET doc = json_set(doc, '$.secret', ?) WHERE _id = ?",
                (long, "d"),
            )


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
async def test_violations_tell_nothing_of_hidden_stored_values(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    server = launch(
        *server_args(kind, pg_dsn, tmp_path), "--policies", str(write_policies(tmp_path))
    )
    url = f"{server.url}/api/db"
    coll = name()
    owner, hider = auth("owner"), auth("hider")
    migration = {
        "id": f"{coll}-1",
        "script": {
            "operations": [{"op": "create_collection", "collection": coll, "schema": SECRET_SCHEMA}]
        },
    }
    async with aiohttp.ClientSession() as s:
        st, body = await call(s, "POST", f"{url}/migrations", json=migration, headers=owner)
        assert st == 201, body
        base = f"{url}/{coll}"
        doc = {"_id": "d", "name": "x", "n": 1, "secret": "short"}
        st, body = await call(s, "POST", base, json=doc, headers=owner)
        assert st == 201, body

        # the caller's own input: told in full (it wrote it)
        st, body = await call(s, "POST", base, json={"name": 5}, headers=hider)
        assert st == 400 and body["error"]["details"]["problems"] == [
            {"path": "name", "rule": "type", "message": "must be of type string (is integer)"}
        ]
        # a hidden field cannot be moved (nor changed) by the caller: refused by the policy
        for update in ({"$rename": {"secret": "name"}}, {"$inc": {"secret": 1}}):
            st, body = await call(s, "PUT", f"{base}/d", json=update, headers=hider)
            assert st == 403 and body["error"]["code"] == "field_not_writable", body

        await corrupt(kind, pg_dsn, tmp_path, coll)
        # a change of readable fields of a document whose hidden field is invalid: refused,
        # the hidden problem told by its path only (no rule, no limit, no type)
        st, body = await call(s, "PUT", f"{base}/d", json={"$set": {"n": 500}}, headers=hider)
        assert st == 400 and body["error"]["code"] == "schema_violation", body
        problems = body["error"]["details"]["problems"]
        assert problems == [
            {"path": "n", "rule": "max", "message": "must be at most 100"},
            {"path": "secret", "rule": "hidden", "message": problems[1]["message"]},
        ], problems
        assert "10" not in problems[1]["message"] and "character" not in str(body)
        st, body = await call(s, "PATCH", f"{base}/d", json={"name": "y"}, headers=hider)
        assert st == 400 and [p["rule"] for p in body["error"]["details"]["problems"]] == ["hidden"]
        assert "a-very-long" not in str(body)
        # the owner, who may read everything, is told everything
        st, body = await call(s, "PUT", f"{base}/d", json={"$set": {"n": 2}}, headers=owner)
        assert st == 400 and body["error"]["details"]["problems"] == [
            {"path": "secret", "rule": "max_length", "message": "must have at most 10 characters"}
        ]
        st, now = await call(s, "GET", f"{base}/d", headers=owner)
        assert st == 200 and now["n"] == 1 and now["name"] == "x" and now["_version"] == 1
