"""Collection schemas through the real ``dbproxy serve`` process, declared by
``POST /api/db/migrations``: every write path refused over HTTP with the error envelope,
defaults, unique indexes, ``GET /api/db/schema/{c}``, /metrics, and a second sidecar on the
same database enforcing a migration the first one ran."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
KINDS = ["postgresql", "sqlite"]

FIELDS: list[dict[str, Any]] = [
    {"name": "email", "type": "string", "required": True, "constraints": ["max_length:40"]},
    {"name": "age", "type": "integer", "constraints": ["min:0", "max:150"]},
    {
        "name": "role",
        "type": "string",
        "default_value": "member",
        "constraints": ["enum:member|admin"],
    },
]


async def call(s: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with s.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


def server_args(kind: str, pg_dsn: str, tmp_path: Path) -> list[str]:
    if kind == "postgresql":
        return ["--database", pg_dsn]
    return ["--data-dir", str(tmp_path / "store")]


def name() -> str:
    return f"s{uuid.uuid4().hex[:10]}"


def migration(
    coll: str, fields: list[dict[str, Any]], validation: dict[str, str] | None = None
) -> dict[str, Any]:
    schema: dict[str, Any] = {"fields": fields}
    if validation is not None:
        schema["validation"] = validation
    return {
        "id": f"{coll}-schema",
        "version": 1,
        "script": {
            "operations": [
                {"op": "create_collection", "collection": coll, "schema": schema},
                {
                    "op": "create_index",
                    "collection": coll,
                    "index": {"name": "by_email", "fields": ["email"], "unique": True},
                },
            ]
        },
    }


async def declare(
    s: aiohttp.ClientSession, url: str, body: dict[str, Any], **kw: Any
) -> dict[str, Any]:
    st, record = await call(s, "POST", f"{url}/migrations", json=body, **kw)
    assert st == 201 and record["status"] == "completed", record
    return record


async def refused_within(s: aiohttp.ClientSession, url: str, coll: str, seconds: float) -> float:
    """Seconds until creating an invalid document (``email`` not a string, a fresh value
    each time: the unique index) is refused with schema_violation (polled, bounded)."""
    start = time.monotonic()
    for i in itertools.count(1):  # pragma: no branch - returns or fails
        st, body = await call(s, "POST", f"{url}/{coll}", json={"email": i})
        if st == 400:
            assert body["error"]["code"] == "schema_violation", body
            return time.monotonic() - start
        assert st == 201, body
        assert time.monotonic() - start < seconds, f"still not enforced after {seconds} s"
        await asyncio.sleep(0.05)
    raise AssertionError("unreachable")


def assert_violation(st: int, body: dict[str, Any], *expected: tuple[str, str]) -> None:
    """400 schema_violation in the error envelope, listing exactly ``expected`` (path, rule)."""
    assert st == 400, body
    err = body["error"]
    assert err["code"] == "schema_violation" and err["request_id"], body
    assert "schema" in err["message"]
    problems = err["details"]["problems"]
    assert err["details"]["truncated"] is False
    assert all(set(p) == {"path", "rule", "message"} and p["message"] for p in problems)
    assert sorted((p["path"], p["rule"]) for p in problems) == sorted(expected), problems


@pytest.mark.parametrize("kind", KINDS)
async def test_every_write_path_over_http(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    server = launch(*server_args(kind, pg_dsn, tmp_path))
    url = f"{server.url}/api/db"
    coll = name()
    async with aiohttp.ClientSession() as s:
        await declare(s, url, migration(coll, FIELDS))
        took = await refused_within(s, url, coll, 10.0)
        assert took < 0.5, took  # this process ran it: enforced at once
        base = f"{url}/{coll}"

        # create: every problem listed, nothing written
        st, body = await call(
            s, "POST", base, json={"_id": "bad", "age": -1, "role": "boss", "email": 7}
        )
        assert_violation(st, body, ("age", "min"), ("email", "type"), ("role", "enum"))
        assert (await call(s, "GET", f"{base}/bad"))[0] == 404

        # defaults filled on create
        st, doc = await call(s, "POST", base, json={"_id": "a", "email": "a@x", "age": 30})
        assert st == 201 and doc["role"] == "member", doc
        st, stored = await call(s, "GET", f"{base}/a")
        assert st == 200 and stored["role"] == "member" and stored["_version"] == 1

        # PUT (replace), PATCH, update operators: refused, the stored document unchanged
        st, body = await call(s, "PUT", f"{base}/a", json={"age": 31})
        assert_violation(st, body, ("email", "required"))
        st, body = await call(s, "PATCH", f"{base}/a", json={"age": 200})
        assert_violation(st, body, ("age", "max"))
        st, body = await call(s, "PATCH", f"{base}/a", json={"email": None})
        assert_violation(st, body, ("email", "required"))  # merge patch null removes it
        st, body = await call(s, "PUT", f"{base}/a", json={"$inc": {"age": 500}})
        assert_violation(st, body, ("age", "max"))
        st, body = await call(s, "PUT", f"{base}/a", json={"$unset": {"email": ""}})
        assert_violation(st, body, ("email", "required"))
        st, body = await call(s, "PUT", f"{base}/a", json={"$set": {"role": "root"}})
        assert_violation(st, body, ("role", "enum"))
        st, body = await call(s, "PUT", f"{base}/a", json={"$rename": {"email": "mail"}})
        assert_violation(st, body, ("email", "required"))
        st, now = await call(s, "GET", f"{base}/a")
        assert st == 200 and now == stored

        # a valid update goes through
        st, doc = await call(s, "PUT", f"{base}/a", json={"$inc": {"age": 1}})
        assert st == 200 and doc["age"] == 31 and doc["_version"] == 2

        # upsert: an invalid one creates nothing; a valid one that creates gets defaults
        st, body = await call(s, "PUT", f"{base}/u1?upsert=true", json={"$set": {"age": 3}})
        assert_violation(st, body, ("email", "required"))
        st, body = await call(s, "PUT", f"{base}/u1?upsert=true", json={"age": 3})
        assert_violation(st, body, ("email", "required"))
        assert (await call(s, "GET", f"{base}/u1"))[0] == 404
        st, doc = await call(s, "PUT", f"{base}/u1?upsert=true", json={"$set": {"email": "u@x"}})
        assert st in (200, 201) and doc["role"] == "member", doc
        st, doc = await call(s, "PUT", f"{base}/u2?upsert=true", json={"email": "u2@x"})
        assert st in (200, 201) and doc["role"] == "member", doc

        # a batch with one invalid operation writes nothing
        batch = {
            "operations": [
                {"op": "create", "collection": coll, "document": {"_id": "t1", "email": "t1@x"}},
                {"op": "update", "collection": coll, "id": "a", "update": {"$set": {"age": 40}}},
                {"op": "update", "collection": coll, "id": "a", "update": {"$set": {"age": -4}}},
            ]
        }
        st, body = await call(s, "POST", f"{url}/transaction", json=batch)
        assert st == 400 and body["error"]["code"] == "schema_violation", body
        assert body["error"]["details"]["operation"] == 2
        assert (await call(s, "GET", f"{base}/t1"))[0] == 404
        st, now = await call(s, "GET", f"{base}/a")
        assert now["age"] == 31 and now["_version"] == 2

        # bulk: per item, the valid ones written
        st, body = await call(s, "POST", base, json=[{"_id": "b1", "email": "b1@x"}, {"_id": "b2"}])
        assert st == 207, body
        assert (await call(s, "GET", f"{base}/b1"))[0] == 200
        assert (await call(s, "GET", f"{base}/b2"))[0] == 404

        # the unique index: 409 duplicate_key naming the declared index
        st, body = await call(s, "POST", base, json={"email": "a@x"})
        assert st == 409 and body["error"]["code"] == "duplicate_key", body
        assert body["error"]["details"] == {"index": "by_email"}
        st, body = await call(s, "PUT", f"{base}/b1", json={"$set": {"email": "a@x"}})
        assert st == 409 and body["error"]["details"] == {"index": "by_email"}, body

        await _describe(s, url, coll)


async def _describe(s: aiohttp.ClientSession, url: str, coll: str) -> None:
    st, info = await call(s, "GET", f"{url}/schema/{coll}")
    assert st == 200, info
    assert info["collection"] == coll and info["declared"] is True and info["exists"] is True
    assert [f["name"] for f in info["schema"]["fields"]] == ["email", "age", "role"]
    assert info["version"] >= 1 and "inferred" not in info
    by_name = {ix["name"]: ix for ix in info["indexes"]}
    assert "by_email" in by_name, info
    ix = by_name["by_email"]
    assert ix["fields"] == ["email"] and ix["unique"] is True and ix["declared"] is True
    assert ix["valid"] is True and isinstance(ix["size_bytes"], int) and ix["size_bytes"] > 0
    assert info["estimated_count"] == 4  # a, u1, u2, b1 (exact below 10,000 rows)
    assert isinstance(info["size_bytes"], int) and info["size_bytes"] > 0

    other = name()  # undeclared: the fields are inferred from a sample
    for doc in (
        {"n": 1, "tags": ["x"], "when": "2024-05-01T12:00:00Z"},
        {"n": 2.5, "o": {"k": "v"}},
    ):
        assert (await call(s, "POST", f"{url}/{other}", json=doc))[0] == 201
    st, info = await call(s, "GET", f"{url}/schema/{other}")
    assert st == 200 and info["declared"] is False and info["schema"] is None, info
    fields = {f["name"]: f for f in info["inferred"]["fields"]}
    assert info["inferred"]["sample_size"] == 2
    assert fields["n"]["type"] == ["integer", "number"] and fields["n"]["present"] == 1.0
    assert fields["when"]["type"] == ["datetime"] and fields["o.k"]["type"] == ["string"]
    assert fields["tags"]["type"] == ["array"] and all(f["inferred"] for f in fields.values())
    assert info["estimated_count"] == 2
    st, body = await call(s, "GET", f"{url}/schema/{other}?x=1")
    assert st == 400 and body["error"]["code"] == "unknown_parameter"
    st, body = await call(s, "GET", f"{url}/schema/bad-name")
    assert st == 400


@pytest.mark.parametrize("kind", KINDS)
async def test_warn_and_violation_metrics(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    server = launch(*server_args(kind, pg_dsn, tmp_path))
    url = f"{server.url}/api/db"
    warned, strict = name(), name()
    async with aiohttp.ClientSession() as s:
        await declare(s, url, migration(warned, FIELDS, {"level": "strict", "action": "warn"}))
        await declare(s, url, migration(strict, FIELDS))
        assert await refused_within(s, url, strict, 10.0) < 0.5  # one violation counted
        for i in range(3):  # let through, counted (two problems each: one write)
            st, doc = await call(
                s, "POST", f"{url}/{warned}", json={"_id": f"w{i}", "email": i, "age": -1}
            )
            assert st == 201 and doc["role"] == "member", doc
        st, _ = await call(s, "PUT", f"{url}/{warned}/w0", json={"$set": {"age": 900}})
        assert st == 200
        st, body = await call(s, "POST", f"{url}/{strict}", json={"email": 1})
        assert st == 400 and body["error"]["code"] == "schema_violation"
        async with s.get(f"{server.url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    samples = {
        (smp.name, smp.labels.get("collection")): smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
    }
    assert samples[("dbproxy_schema_warnings_total", warned)] == 4
    assert ("dbproxy_schema_warnings_total", strict) not in samples
    assert samples[("dbproxy_schema_violations_total", strict)] == 2
    assert ("dbproxy_schema_violations_total", warned) not in samples
    assert "# TYPE dbproxy_schema_warnings_total counter" in text


@pytest.mark.parametrize("kind", KINDS)
async def test_second_sidecar_enforces_a_migration_the_first_ran(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    first = launch(*server_args(kind, pg_dsn, tmp_path))
    second = launch(*server_args(kind, pg_dsn, tmp_path))
    coll = name()
    async with aiohttp.ClientSession() as s:
        st, _ = await call(s, "POST", f"{second.url}/api/db/{coll}", json={"email": "pre@x"})
        assert st == 201  # schemaless so far (and valid: the migration checks it)
        await declare(s, f"{first.url}/api/db", migration(coll, FIELDS))
        took = await refused_within(s, f"{second.url}/api/db", coll, 10.0)
        print(f"{kind}: the second sidecar enforced it after {took:.2f} s")
        assert took < 5.0, took  # PostgreSQL: LISTEN/NOTIFY; embedded store: polled every 1 s
        st, info = await call(s, "GET", f"{second.url}/api/db/schema/{coll}")
        assert st == 200 and info["declared"] is True
