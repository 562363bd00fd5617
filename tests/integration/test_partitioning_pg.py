"""Partitioned collections on real PostgreSQL (issue 21): the ``_pkey`` column on every write
path, the _id registry, the codes, and pruning proven by EXPLAIN."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from proxy import context
from proxy.backends.postgres import PostgresBackend
from proxy.config import Limits
from proxy.errors import BadRequest, DuplicateId, NotFound
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.query.parse import parse_filter, parse_update
from proxy.query.spec import FindSpec, MergePatch, Modify, Replace
from tests.backends import open_backend

pytestmark = pytest.mark.integration
_ids = itertools.count()

STRATEGIES: dict[str, dict[str, Any]] = {
    "hash": {"strategy": "hash", "key": "tenant", "partitions": 4},
    "list": {
        "strategy": "list",
        "key": "tenant",
        "values": {"north": ["a", "b"], "south": ["c", "d"]},
        "default": True,
    },
    "range": {"strategy": "range", "key": "tenant", "bounds": ["b", "d"]},
}


@pytest.fixture
async def backend(pg_dsn: str, tmp_path: Path) -> AsyncIterator[PostgresBackend]:
    async with open_backend("postgresql", pg_dsn, Limits(), str(tmp_path)) as b:
        assert isinstance(b, PostgresBackend)
        yield b


async def migrate(backend: PostgresBackend, *ops: dict[str, Any]) -> Any:
    runner = MigrationRunner({"main": backend.migrations()}, "main")
    raw = {"id": f"p{next(_ids)}", "version": 1, "script": {"operations": list(ops)}}
    out = await runner.submit(parse_migration(raw), wait=30.0)
    await backend.load_schemas()  # what the schema watch does on NOTIFY
    return out


async def partitioned(backend: PostgresBackend, coll: str, part: dict[str, Any]) -> None:
    schema = {"partitioning": part}
    out = await migrate(backend, {"op": "create_collection", "collection": coll, "schema": schema})
    assert out.status == 201, out.body


async def rows(backend: PostgresBackend, coll: str) -> dict[str, tuple[str, str, int]]:
    """_id → (partition, _pkey as text, version), read from the tables themselves."""
    conn = await asyncpg.connect(backend.config.connection_string)
    try:
        table = backend._table(coll)
        got = await conn.fetch(
            f"SELECT _id, tableoid::regclass::text, _pkey::text, _version FROM {table}"
        )
    finally:
        await conn.close()
    return {r[0]: (r[1].rsplit("_", 1)[-1].strip('"'), r[2], r[3]) for r in got}


async def explain(backend: PostgresBackend, sql: str, args: tuple[Any, ...]) -> str:
    conn = await asyncpg.connect(backend.config.connection_string)
    try:
        plan = await conn.fetch("EXPLAIN (COSTS OFF) " + sql, *args)
    finally:
        await conn.close()
    return "\n".join(r[0] for r in plan)


def scanned(plan: str, backend: PostgresBackend, coll: str) -> set[str]:
    """The partitions a plan reads: ours ``<hash>_<name>``, pg_partman's ``<coll>_<name>``."""
    from proxy.backends.postgres.partitions import parent_name

    prefix = parent_name(coll) + "_"
    out = set()
    for word in plan.replace('"', " ").replace(".", " ").split():
        if word.startswith(prefix):
            out.add(word.removeprefix(prefix).split("_")[0])
        elif m := re.match(rf"{coll}_(p\d{{4}}(?:_\d\d){{1,2}}|p\d{{4}}w\d\d|default)", word):
            out.add(m.group(1))  # a partition, or its index (<partition>_pkey)
    return out


def spec(flt: dict[str, Any], **kw: Any) -> FindSpec:
    return FindSpec(filter=parse_filter(flt, Limits()), limit=kw.pop("limit", 100), **kw)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
async def test_every_write_path_fills_the_key_and_moves_rows(
    backend: PostgresBackend, strategy: str
) -> None:
    await partitioned(backend, "acct", STRATEGIES[strategy])
    await backend.insert_one("acct", {"_id": "x1", "tenant": "a", "n": 1})
    bulk = await backend.insert_many(
        "acct", [{"_id": "x2", "tenant": "c", "n": 2}, {"_id": "x3", "n": 3}]
    )
    assert [r.status for r in bulk] == [201, 400]
    assert bulk[1].error is not None and bulk[1].error["code"] == "partition_key_missing"
    with pytest.raises(BadRequest) as err:
        await backend.insert_one("acct", {"_id": "x4", "tenant": [True]})
    assert err.value.code == "partition_key_missing"
    before = await rows(backend, "acct")
    assert before["x1"][1] == ("sa" if strategy == "hash" else "a")
    # replace, patch and update operators moving the key: the row changes partition
    await backend.change("acct", "x1", Replace({"tenant": "d", "n": 10}))
    mid = await rows(backend, "acct")
    assert mid["x1"][1] == ("sd" if strategy == "hash" else "d") and mid["x1"][2] == 2
    if strategy != "hash" or mid["x1"][0] != before["x1"][0]:
        assert mid["x1"][0] != before["x1"][0]
    await backend.change("acct", "x1", MergePatch({"tenant": "b"}))
    await backend.change("acct", "x2", Modify(parse_update({"$set": {"tenant": "a"}}, Limits())))
    after = await rows(backend, "acct")
    assert after["x1"][1:] == (("sb" if strategy == "hash" else "b"), 3)
    assert after["x2"][1] == ("sa" if strategy == "hash" else "a")
    with pytest.raises(BadRequest) as err:
        await backend.change(
            "acct", "x2", Modify(parse_update({"$unset": {"tenant": 1}}, Limits()))
        )
    assert err.value.code == "partition_key_missing"
    # upsert: an update that moves the row, then a create
    await backend.change("acct", "x1", Replace({"tenant": "c"}), upsert=True)
    got = await backend.change("acct", "x9", Replace({"tenant": "d", "n": 9}), upsert=True)
    assert got.created and got.version == 1
    final = await rows(backend, "acct")
    assert final["x1"][1:] == (("sc" if strategy == "hash" else "c"), 4)
    assert set(final) == {"x1", "x2", "x9"}
    # nothing duplicated by the moves: one row per _id, each readable by id
    for doc_id in final:
        doc = await backend.get("acct", doc_id)
        assert doc is not None and orjson.loads(doc.body)["_id"] == doc_id
    assert await backend.delete("acct", "x9") == 1
    with pytest.raises(NotFound):
        await backend.delete("acct", "x9")


async def test_id_unique_across_partitions_unless_per_key(backend: PostgresBackend) -> None:
    await partitioned(backend, "glob", STRATEGIES["list"])
    await backend.insert_one("glob", {"_id": "same", "tenant": "a"})
    with pytest.raises(DuplicateId):
        await backend.insert_one("glob", {"_id": "same", "tenant": "c"})
    out = await backend.insert_many(
        "glob", [{"_id": "same", "tenant": "d"}, {"_id": "new", "tenant": "d"}]
    )
    assert [r.status for r in out] == [409, 201]
    # the registry follows deletes and moves: the _id is free again after a delete
    await backend.change("glob", "same", Replace({"tenant": "c"}))
    assert await backend.delete("glob", "same") == 2
    await backend.insert_one("glob", {"_id": "same", "tenant": "d"})
    assert (await rows(backend, "glob"))["same"][1] == "d"

    per_key = {**STRATEGIES["list"], "unique_id": "per_key"}
    await partitioned(backend, "perkey", per_key)
    await backend.insert_one("perkey", {"_id": "same", "tenant": "a"})
    await backend.insert_one("perkey", {"_id": "same", "tenant": "c"})  # another key: allowed
    with pytest.raises(DuplicateId):
        await backend.insert_one("perkey", {"_id": "same", "tenant": "a"})
    assert sorted(v[1] for v in (await rows_all(backend, "perkey"))) == ["a", "c"]


async def rows_all(backend: PostgresBackend, coll: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(backend.config.connection_string)
    try:
        got = await conn.fetch(f"SELECT _id, _pkey::text FROM {backend._table(coll)}")
    finally:
        await conn.close()
    return [(r[0], r[1]) for r in got]


async def test_out_of_range_list_value_and_transactions(backend: PostgresBackend) -> None:
    part = {"strategy": "list", "key": "region", "values": {"eu": ["eu"], "us": ["us"]}}
    await partitioned(backend, "regions", part)
    with pytest.raises(BadRequest) as err:
        await backend.insert_one("regions", {"region": "apac"})
    assert err.value.code == "partition_key_out_of_range"
    tx = await backend.begin()
    try:
        await tx.insert_one("regions", {"_id": "t1", "region": "eu"})
        await tx.change("regions", "t1", MergePatch({"region": "us"}))
        await tx.commit()
    except BaseException:
        await tx.rollback()
        raise
    assert (await rows(backend, "regions"))["t1"][:2] == ("us", "us")


async def test_pruning_by_explain(backend: PostgresBackend) -> None:
    await partitioned(backend, "ranged", {"strategy": "range", "key": "n", "bounds": [10, 20, 30]})
    await partitioned(backend, "hashed", STRATEGIES["hash"])
    for i in range(40):
        await backend.insert_one("ranged", {"_id": f"r{i}", "n": i})
        await backend.insert_one("hashed", {"_id": f"h{i}", "tenant": f"t{i % 8}"})

    def plan_of(coll: str, flt: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        st = backend.find_statement(coll, spec(flt))
        return st.sql, st.args

    all4 = {"r0", "r1", "r2", "r3"}
    assert scanned(await explain(backend, *plan_of("ranged", {})), backend, "ranged") == all4
    eq = await explain(backend, *plan_of("ranged", {"n": 15}))
    assert scanned(eq, backend, "ranged") == {"r1"}, eq
    inn = await explain(backend, *plan_of("ranged", {"n": {"$in": [1, 25]}}))
    assert scanned(inn, backend, "ranged") == {"r0", "r2"}, inn
    rng = await explain(backend, *plan_of("ranged", {"n": {"$gte": 12, "$lt": 28}}))
    assert scanned(rng, backend, "ranged") == {"r1", "r2"}, rng
    both = await explain(backend, *plan_of("ranged", {"$and": [{"n": {"$gte": 31}}, {"x": 1}]}))
    assert scanned(both, backend, "ranged") == {"r3"}, both
    h = await explain(backend, *plan_of("hashed", {"tenant": "t3"}))
    assert len(scanned(h, backend, "hashed")) == 1, h
    hin = await explain(backend, *plan_of("hashed", {"tenant": {"$in": ["t3", "t5"]}}))
    assert 1 <= len(scanned(hin, backend, "hashed")) <= 2, hin
    # the answers are those of the filter (pruning only narrows where to look)
    page = await backend.find("ranged", spec({"n": {"$gte": 12, "$lt": 28}}, limit=100))
    assert sorted(orjson.loads(d)["n"] for d in page.items) == list(range(12, 28))
    assert await backend.count("hashed", parse_filter({"tenant": "t3"}, Limits())) == 5
    # a GET by id given the key reads one partition, and works without it
    token = context.current.set(dataclasses.replace(context.current.get(), partition_key="15"))
    try:
        doc = await backend.get("ranged", "r15")
        assert doc is not None and orjson.loads(doc.body)["n"] == 15
        assert await backend.get("ranged", "r3") is None  # not in the partition of 15
    finally:
        context.current.reset(token)
    assert await backend.get("ranged", "r3") is not None


async def test_unique_index_must_hold_the_key_and_embedded_store_refuses(
    backend: PostgresBackend, pg_dsn: str, tmp_path: Path
) -> None:
    bad = {
        "partitioning": STRATEGIES["hash"],
        "indexes": [{"name": "by_email", "fields": ["email"], "unique": True}],
    }
    with pytest.raises(BadRequest) as err:
        await migrate(backend, {"op": "create_collection", "collection": "u", "schema": bad})
    assert err.value.code == "unique_index_without_partition_key"
    good = {**bad, "indexes": [{"name": "by_email", "fields": ["tenant", "email"], "unique": True}]}
    await migrate(backend, {"op": "create_collection", "collection": "u", "schema": good})
    await backend.insert_one("u", {"tenant": "a", "email": "e"})
    await backend.insert_one("u", {"tenant": "b", "email": "e"})
    with pytest.raises(Exception) as dup:
        await backend.insert_one("u", {"tenant": "a", "email": "e"})
    assert getattr(dup.value, "code", None) == "duplicate_key"
    async with open_backend("sqlite", pg_dsn, Limits(), str(tmp_path)) as lite:
        runner = MigrationRunner({"main": lite.migrations()}, "main")
        raw = {
            "id": "lite",
            "version": 1,
            "script": {
                "operations": [
                    {
                        "op": "create_collection",
                        "collection": "u",
                        "schema": {"partitioning": STRATEGIES["hash"]},
                    }
                ]
            },
        }
        with pytest.raises(BadRequest) as refused:
            await runner.submit(parse_migration(raw), wait=30.0)
        assert refused.value.code == "unsupported_by_backend"


def iso(when: Any) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def month_name(month: Any, maintainer: str) -> str:
    """A monthly partition's name: pg_partman's ``pYYYY_MM``, the sidecar's ``tYYYYMMDD``."""
    return f"p{month:%Y_%m}" if maintainer == "pg_partman" else f"t{month:%Y%m%d}"


@pytest.fixture(params=["pg_partman", "sidecar"])
async def timed(request: Any, backend: PostgresBackend) -> AsyncIterator[PostgresBackend]:
    """The backend, its time partitions kept by pg_partman or (forced) by the sidecar."""
    backend.partman = request.param == "pg_partman"
    yield backend


async def test_time_partitions_premake_retention_and_pruning(timed: PostgresBackend) -> None:
    import datetime as dt

    from proxy.backends.postgres.partitions import next_period, period_start
    from proxy.backends.postgres.timeparts import UPKEEP_LOCK

    backend = timed
    by = "pg_partman" if backend.partman else "sidecar"
    part = {"strategy": "time", "key": "at", "interval": "month", "premake": 2, "retention": 2}
    await partitioned(backend, "events", part)
    now = dt.datetime.now(dt.UTC)
    this = period_start(now, "month")
    made = {p["name"] for p in (await backend.describe_collection("events", 0))["partitions"]}
    months = [next_period(this, "month", i) for i in range(3)]
    assert made == {"default", *(month_name(m, by) for m in months)}
    assert (await partman_config(backend, "events") is None) == (by == "sidecar")
    for i, m in enumerate(months):
        await backend.insert_one("events", {"_id": f"e{i}", "at": iso(m + dt.timedelta(days=2))})
    await backend.insert_one("events", {"_id": "old", "at": "2001-02-03T04:05:06+02:00"})
    with pytest.raises(BadRequest) as err:
        await backend.insert_one("events", {"_id": "bad", "at": "yesterday"})
    assert err.value.code == "partition_key_missing"
    where = {p: n for p, n in ((v[0], k) for k, v in (await rows(backend, "events")).items())}
    assert where["default"] == "old"

    # a month's range prunes to that month (and the day of margin around it)
    lo, hi = months[1], next_period(months[1], "month")
    st = backend.find_statement("events", spec({"at": {"$gte": iso(lo), "$lt": iso(hi)}}))
    seen = scanned(await explain(backend, st.sql, st.args), backend, "events")
    names = [month_name(m, by) for m in months]
    assert seen == set(names) or (seen <= set(names) and names[1] in seen), seen
    assert "default" not in seen
    st = backend.find_statement("events", spec({"at": iso(months[2] + dt.timedelta(days=2))}))
    seen = scanned(await explain(backend, st.sql, st.args), backend, "events")
    assert seen == {names[2]}
    if by == "pg_partman":  # its upkeep reads the database's clock: test_pg_partman_upkeep
        return

    # two months on: two more made ahead, the first one dropped (a drop: its _id is free)
    later = next_period(this, "month", 2) + dt.timedelta(days=1)
    other = await asyncpg.connect(backend.config.connection_string)
    try:  # another runner holds the fleet-wide lock: nothing is done here
        await other.fetchval(
            "SELECT pg_advisory_lock($1, hashtext($2) & 2147483647)", UPKEEP_LOCK, backend.schema
        )
        assert await backend.partition_upkeep(later) is False
    finally:
        await other.close()
    assert await backend.partition_upkeep(later) is True
    names = {p["name"] for p in (await backend.describe_collection("events", 0))["partitions"]}
    kept = [next_period(this, "month", i) for i in (1, 2, 3, 4)]
    assert names == {"default", *(f"t{m:%Y%m%d}" for m in kept)}
    assert backend.upkeep_counts.created == 2 and backend.upkeep_counts.dropped == 1
    assert await backend.get("events", "e0") is None and await backend.get("events", "e1")
    await backend.insert_one("events", {"_id": "e0", "at": iso(kept[0])})  # registry freed
    assert backend.connections()["partition_upkeep"]["dropped"] == 1


async def test_partition_collection_copies_in_batches_and_refuses_writes_meanwhile(
    backend: PostgresBackend,
) -> None:
    from proxy.errors import Unavailable

    schema = {"indexes": [{"name": "by_code", "fields": ["region", "code"], "unique": True}]}
    await migrate(backend, {"op": "create_collection", "collection": "conv", "schema": schema})
    for i in range(25):
        await backend.insert_one(
            "conv", {"_id": f"c{i:02}", "region": "eu" if i % 2 else "us", "code": i}
        )
    await backend.insert_one("conv", {"_id": "nokey", "code": 99})
    spec = {"strategy": "list", "key": "region", "values": {"eu": ["eu"], "us": ["us"]}}
    op = {
        "op": "partition_collection",
        "collection": "conv",
        "partitioning": spec,
        "batch_size": 10,
    }
    with pytest.raises(BadRequest) as err:  # checked before anything changes
        await migrate(backend, op)
    assert err.value.code == "partition_key_missing" and err.value.details["ids"] == ["nokey"]
    assert await backend.delete("conv", "nokey") == 1  # writes were never refused

    # while the copy runs, writes are refused with 503 and Retry-After; reads go on
    key = (
        parse_migration({"id": "k", "version": 1, "script": {"operations": [op]}})
        .operations[0]
        .partitioning
    )
    assert key is not None
    async with backend.migrations().session("test", lock=False) as s:
        async with s.transaction() as tx:
            assert await tx.begin_partitioning("conv", key) == 25
        with pytest.raises(Unavailable) as refused:
            await backend.insert_one("conv", {"region": "eu", "code": 100})
        assert refused.value.code == "collection_being_partitioned"
        assert refused.value.retry_after == 5
        with pytest.raises(Unavailable):
            await backend.change("conv", "c01", MergePatch({"x": 1}))
        assert await backend.get("conv", "c01") is not None
        async with s.transaction() as tx:
            await tx.abandon_partitioning("conv")
    await backend.change("conv", "c01", MergePatch({"x": 1}))  # writes again

    seen: list[dict[str, Any]] = []
    runner = MigrationRunner({"main": backend.migrations()}, "main")
    raw = {"id": "convert", "version": 1, "script": {"operations": [op]}}
    out = await runner.submit(
        parse_migration(raw), wait=30.0, progress=lambda r: seen.append(dict(r["progress"]))
    )
    assert out.status == 201 and out.body["status"] == "completed", out.body
    assert out.body["progress"]["rows_done"] == 25 and out.body["progress"]["rows_total"] == 25
    assert [p["rows_done"] for p in seen][:3] == [10, 20, 25]
    placed = await rows(backend, "conv")
    assert len(placed) == 25 and all(v[0] == v[1] for v in placed.values())
    assert placed["c01"][2] == 2  # versions kept
    # a sidecar that has not reloaded its schemas: refused once (503), right after it
    stale = PostgresBackend(backend.config, Limits(), schema=backend.schema)
    await stale.start()
    try:
        stale._known_tables.add("conv")
        with pytest.raises(Unavailable) as moved:
            await stale.insert_one("conv", {"_id": "s1", "region": "eu", "code": 200})
        assert moved.value.code == "partitioning_changed"
        await stale.insert_one("conv", {"_id": "s1", "region": "eu", "code": 200})
    finally:
        await stale.close()
    await backend.load_schemas()
    await backend.change("conv", "c01", MergePatch({"region": "us"}))
    assert (await rows(backend, "conv"))["c01"][:2] == ("us", "us")
    with pytest.raises(Exception) as dup:
        await backend.insert_one("conv", {"region": "us", "code": 1})
    assert getattr(dup.value, "code", None) == "duplicate_key"


async def test_index_on_a_partitioned_collection_with_rows(backend: PostgresBackend) -> None:
    await partitioned(backend, "filled", STRATEGIES["hash"])
    for i in range(5):
        await backend.insert_one("filled", {"tenant": f"t{i}", "n": i})
    index = {"name": "by_n", "fields": ["n"]}  # no CONCURRENTLY here: built in the transaction
    out = await migrate(backend, {"op": "create_index", "collection": "filled", "index": index})
    assert out.status == 201 and out.body["status"] == "completed", out.body


async def partman_config(backend: PostgresBackend, coll: str) -> dict[str, Any] | None:
    """The collection's row of pg_partman's part_config (None: not registered)."""
    conn = await asyncpg.connect(backend.config.connection_string)
    try:
        if not await conn.fetchval("SELECT to_regclass('partman.part_config') IS NOT NULL"):
            return None
        row = await conn.fetchrow(
            "SELECT * FROM partman.part_config WHERE parent_table = $1", f"{backend.schema}.{coll}"
        )
    finally:
        await conn.close()
    return None if row is None else dict(row)


async def test_pg_partman_upkeep(backend: PostgresBackend) -> None:
    """With pg_partman, the collection is registered with it and the sidecar's upkeep (under
    the fleet-wide lock) calls run_maintenance: premade partitions made, expired ones dropped
    (a partition drop: the table is gone, the _ids freed), counted in the same metrics."""
    import datetime as dt

    from proxy.backends.postgres.partitions import next_period, period_start
    from proxy.backends.postgres.timeparts import UPKEEP_LOCK

    part = {"strategy": "time", "key": "at", "interval": "month", "premake": 2, "retention": 2}
    await partitioned(backend, "events", part)
    config = await partman_config(backend, "events")
    assert config is not None, "pg_partman is installed here (.ci/run): it must be used"
    assert config["control"] == "_pkey" and config["partition_type"] == "native"
    assert config["partition_interval"] == "1 mon" and config["premake"] == 2
    assert config["retention"] == "1 months" and config["retention_keep_table"] is False
    this = period_start(dt.datetime.now(dt.UTC), "month")
    ahead = [next_period(this, "month", i) for i in range(3)]
    past = [next_period(this, "month", -i) for i in (3, 2, 1)]  # older than the retention: 3, 2
    parent = f"{backend.schema}.events"
    conn = await asyncpg.connect(backend.config.connection_string)
    try:  # as if months had passed: older partitions (made by pg_partman), the last premade gone
        await conn.execute("SET TimeZone = 'UTC'")
        await conn.execute(
            "SELECT partman.create_partition_time($1, $2::timestamptz[])", parent, past
        )
        for i, m in enumerate(past):
            await backend.insert_one("events", {"_id": f"old{i}", "at": iso(m)})
        await conn.execute(f'DROP TABLE "{backend.schema}"."events_p{ahead[2]:%Y_%m}"')
        await conn.fetchval(
            "SELECT pg_advisory_lock($1, hashtext($2) & 2147483647)", UPKEEP_LOCK, backend.schema
        )
        assert await backend.partition_upkeep() is False  # another runner holds the lock
        await conn.execute("SELECT pg_advisory_unlock_all()")
        assert await backend.partition_upkeep() is True
        gone = await conn.fetch(
            "SELECT m FROM unnest($1::text[]) m WHERE to_regclass(m) IS NULL",
            [f'"{backend.schema}"."events_p{m:%Y_%m}"' for m in past],
        )
    finally:
        await conn.close()
    names = {p["name"] for p in (await backend.describe_collection("events", 0))["partitions"]}
    assert names == {"default", *(f"p{m:%Y_%m}" for m in [past[2], *ahead])}
    assert len(gone) == 2  # the tables themselves dropped, not their rows deleted
    assert backend.upkeep_counts.created == 1 and backend.upkeep_counts.dropped == 2
    assert backend.connections()["partition_upkeep"]["dropped"] == 2
    assert await backend.get("events", "old0") is None and await backend.get("events", "old2")
    await backend.insert_one("events", {"_id": "old0", "at": iso(ahead[0])})  # registry freed
    # a second run has nothing to do; dropping the collection forgets its configuration
    assert await backend.partition_upkeep() is True
    assert backend.upkeep_counts.created == 1 and backend.upkeep_counts.dropped == 2
    await migrate(backend, {"op": "drop_collection", "collection": "events"})
    assert await partman_config(backend, "events") is None
