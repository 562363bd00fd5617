"""Minimal baseline server: the least work an HTTP-to-PostgreSQL hop can do, to compare against.

aiohttp on uvloop plus one asyncpg pool, no policy, no stats, no cache:

- ``GET  /api/db/{collection}/{id}`` runs one ``SELECT doc FROM dbproxy."<c>" WHERE _id = $1``
  and returns the jsonb text as the body (asyncpg hands jsonb over as ``str``).
- ``POST /api/db/{collection}`` takes one JSON object, adds ``_id`` (if absent) and
  ``_version: 1``, runs one INSERT into the sidecar's table layout and answers 201.
- ``POST /api/db/{collection}/query`` takes ``{"filter": {...}, "limit": n}`` and runs one
  ``SELECT doc FROM dbproxy."<c>" WHERE doc @> $1 LIMIT $2`` (the filter object used as a
  containment document, served by the GIN index), answering ``{"items": [...], "next": null}``.
- ``POST /api/db/{collection}/query`` with a ``sort`` takes exactly the list_indexed shape,
  ``{"filter": {"grp": g, "n": {"$gte": k}}, "sort": "n", "limit": n}``, and runs
  ``SELECT doc FROM ... WHERE doc->'grp' = $1 AND doc->'n' >= $2 ORDER BY doc->'n' LIMIT $3``
  over the expression index ``((doc->'grp'), (doc->'n'))`` the harness creates.
- ``PUT  /api/db/{collection}/{id}`` takes ``{"$inc": {"<field>": <number>}}`` (one top-level
  field) and runs one ``UPDATE ... SET doc = jsonb_set(doc, '{field}', field + number)``,
  bumping ``_version`` like the sidecar, and returns the new document.
- ``POST /api/db/{collection}/aggregate`` takes exactly one of the two pipelines of the
  aggregation scenarios (``workload.AGG_GROUP_PIPELINE``, ``workload.AGG_TOP_PIPELINE``) and
  runs the same aggregation written by hand in SQL (``workload.AGG_GROUP_SQL``: ``WHERE doc
  @> '{"ok": true}' GROUP BY doc -> 'cat'``; ``workload.AGG_TOP_SQL``: ``ORDER BY doc ->
  'price' DESC, _id LIMIT 1000``), answering ``{"items": [...]}``.
- ``POST /api/db/search`` takes ``{"q": "w1 w2", "collections": [c], ...}`` (two plain
  words, the search scenario's requests) and runs ``search.SQL``: ``_search @@
  plainto_tsquery(w1) && to_tsquery(w2:*) ORDER BY ts_rank_cd ... LIMIT 20`` over the
  sidecar's stored vector and GIN index, with ``ts_headline`` of title and body.
- ``GET  /api/db/health`` answers 200 once the pool is up.

Tables are not created here: the harness makes sure they exist before load starts.

    python -m benchmarks.baseline --port 8801 --database postgresql://postgres@127.0.0.1/db
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import signal
import sys

import asyncpg
import orjson
import uvloop
from aiohttp import web

from benchmarks import search, workload
from benchmarks.workload import new_id

COLLECTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
JSON = "application/json"

POOL = web.AppKey("pool", asyncpg.Pool)
SQL_CACHE = web.AppKey("sql_cache", dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Statements:
    select: str
    insert: str
    query: str
    listing: str
    inc: str
    agg_group: str
    agg_top: str


def _error(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, body=body, content_type=JSON)


def _sql(app: web.Application, collection: str) -> Statements | None:
    """The statements of a collection, built once per collection name."""
    cache = app[SQL_CACHE]
    hit = cache.get(collection)
    if hit is not None:
        return hit
    if not COLLECTION_RE.match(collection):
        return None
    table = f'dbproxy."{collection}"'
    stmts = Statements(
        select=f"SELECT doc FROM {table} WHERE _id = $1",
        insert=f"INSERT INTO {table} (_id, doc, _version) VALUES ($1, $2::jsonb, 1)",
        query=f"SELECT doc FROM {table} WHERE doc @> $1::jsonb LIMIT $2",
        listing=(
            f"SELECT doc FROM {table} WHERE doc -> 'grp' = $1::jsonb AND doc -> 'n' >= $2::jsonb "
            "ORDER BY doc -> 'n' LIMIT $3"
        ),
        inc=(
            f"UPDATE {table} AS t SET doc = jsonb_set(t.doc, ARRAY[$2::text], "
            "to_jsonb(COALESCE((t.doc ->> $2::text)::numeric, 0) + $3::numeric)) "
            "|| jsonb_build_object('_version', t._version + 1), "
            "_version = t._version + 1, updated_at = now() WHERE t._id = $1 RETURNING t.doc"
        ),
        agg_group=workload.AGG_GROUP_SQL.format(c=collection),
        agg_top=workload.AGG_TOP_SQL.format(c=collection),
    )
    cache[collection] = stmts
    return stmts


async def get_one(request: web.Request) -> web.Response:
    sql = _sql(request.app, request.match_info["collection"])
    if sql is None:
        return _error(400, "invalid_collection", "bad collection name")
    text = await request.app[POOL].fetchval(sql.select, request.match_info["id"])
    if text is None:
        return _error(404, "not_found", "document not found")
    return web.Response(text=text, content_type=JSON)


async def create_one(request: web.Request) -> web.Response:
    sql = _sql(request.app, request.match_info["collection"])
    if sql is None:
        return _error(400, "invalid_collection", "bad collection name")
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid_json", "body is not JSON")
    if not isinstance(doc, dict):
        return _error(400, "invalid_body", "baseline accepts one JSON object only")
    doc_id = doc.get("_id")
    if not isinstance(doc_id, str):
        doc_id = new_id()
        doc["_id"] = doc_id
    doc["_version"] = 1
    body = orjson.dumps(doc)
    try:
        await request.app[POOL].execute(sql.insert, doc_id, body.decode())
    except asyncpg.UniqueViolationError:
        return _error(409, "conflict", "document already exists")
    return web.Response(status=201, body=body, content_type=JSON)


async def query(request: web.Request) -> web.Response:
    sql = _sql(request.app, request.match_info["collection"])
    if sql is None:
        return _error(400, "invalid_collection", "bad collection name")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid_json", "body is not JSON")
    flt = body.get("filter", {}) if isinstance(body, dict) else None
    limit = body.get("limit", 100) if isinstance(body, dict) else None
    if not isinstance(flt, dict) or not isinstance(limit, int) or not 0 < limit <= 1000:
        return _error(400, "invalid_query", "baseline takes {filter: object, limit: 1..1000}")
    if "sort" in body:
        return await _listing(request, sql, body, flt, limit)
    rows = await request.app[POOL].fetch(sql.query, orjson.dumps(flt).decode(), limit)
    items = ",".join(r[0] for r in rows)
    return web.Response(text=f'{{"items":[{items}],"next":null}}', content_type=JSON)


async def _listing(
    request: web.Request, sql: Statements, body: dict, flt: dict, limit: int
) -> web.Response:
    """The list_indexed shape only: {"grp": g, "n": {"$gte": k}}, sort n."""
    n = flt.get("n")
    if (
        body["sort"] != "n"
        or set(flt) != {"grp", "n"}
        or not isinstance(n, dict)
        or set(n) != {"$gte"}
    ):
        return _error(400, "invalid_query", 'baseline sorts only {"grp": g, "n": {"$gte": k}}')
    grp, k = orjson.dumps(flt["grp"]).decode(), orjson.dumps(n["$gte"]).decode()
    rows = await request.app[POOL].fetch(sql.listing, grp, k, limit)
    items = ",".join(r[0] for r in rows)
    return web.Response(text=f'{{"items":[{items}],"next":null}}', content_type=JSON)


async def aggregate(request: web.Request) -> web.Response:
    """The two pipelines of the aggregation scenarios only, each as hand-written SQL."""
    sql = _sql(request.app, request.match_info["collection"])
    if sql is None:
        return _error(400, "invalid_collection", "bad collection name")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid_json", "body is not JSON")
    pipeline = body.get("pipeline") if isinstance(body, dict) else None
    if pipeline == workload.AGG_GROUP_PIPELINE:
        statement = sql.agg_group
    elif pipeline == workload.AGG_TOP_PIPELINE:
        statement = sql.agg_top
    else:
        return _error(400, "invalid_pipeline", "baseline runs the benchmark's pipelines only")
    rows = await request.app[POOL].fetch(statement)
    items = ",".join(r[0] for r in rows)
    return web.Response(text=f'{{"items":[{items}]}}', content_type=JSON)


async def text_search(request: web.Request) -> web.Response:
    """The search scenario's requests only, as hand-written SQL (search.SQL)."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid_json", "body is not JSON")
    if not isinstance(body, dict):
        return _error(400, "invalid_search", "body is not an object")
    names = body.get("collections")
    args = search.baseline_args(body.get("q"))
    if not isinstance(names, list) or len(names) != 1 or args is None:
        return _error(400, "invalid_search", "baseline searches two words in one collection")
    collection = names[0]
    if not isinstance(collection, str) or not COLLECTION_RE.match(collection):
        return _error(400, "invalid_collection", "bad collection name")
    cache = request.app[SQL_CACHE]
    key = ("search", collection)
    sql = cache.get(key)
    if sql is None:
        sql = cache[key] = search.SQL.format(c=collection, limit=search.LIMIT)
    rows = await request.app[POOL].fetch(sql, *args, search.HEADLINE, collection)
    items = ",".join(r[0] for r in rows)
    return web.Response(text=f'{{"items":[{items}],"next":null}}', content_type=JSON)


async def update_one(request: web.Request) -> web.Response:
    sql = _sql(request.app, request.match_info["collection"])
    if sql is None:
        return _error(400, "invalid_collection", "bad collection name")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid_json", "body is not JSON")
    inc = body.get("$inc") if isinstance(body, dict) and len(body) == 1 else None
    if not isinstance(inc, dict) or len(inc) != 1:
        return _error(400, "invalid_update", 'baseline takes {"$inc": {"<field>": n}} only')
    ((field, amount),) = inc.items()
    if field.startswith("_") or isinstance(amount, bool) or not isinstance(amount, int | float):
        return _error(400, "invalid_update", "$inc needs a plain field and a number")
    text = await request.app[POOL].fetchval(sql.inc, request.match_info["id"], field, amount)
    if text is None:
        return _error(404, "not_found", "document not found")
    return web.Response(text=text, content_type=JSON)


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=JSON)


def build_app(database: str, pool_size: int) -> web.Application:
    app = web.Application()
    app[SQL_CACHE] = {}

    async def pool_ctx(app: web.Application):
        pool = await asyncpg.create_pool(
            database, min_size=pool_size, max_size=pool_size, command_timeout=30
        )
        app[POOL] = pool
        yield
        await asyncio.wait_for(pool.close(), timeout=10)

    app.cleanup_ctx.append(pool_ctx)
    app.router.add_get("/api/db/health", health)
    app.router.add_get("/api/db/{collection}/{id}", get_one)
    app.router.add_post("/api/db/search", text_search)  # before /api/db/{collection}
    app.router.add_post("/api/db/{collection}", create_one)
    app.router.add_post("/api/db/{collection}/query", query)
    app.router.add_post("/api/db/{collection}/aggregate", aggregate)
    app.router.add_put("/api/db/{collection}/{id}", update_one)
    return app


async def serve(host: str, port: int, database: str, pool_size: int) -> None:
    runner = web.AppRunner(build_app(database, pool_size), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"baseline listening on http://{host}:{port} pool={pool_size}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8801)
    p.add_argument(
        "--database",
        default=os.environ.get("DBPROXY_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    p.add_argument("--pool-size", type=int, default=10, help="asyncpg pool min=max size")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        p.error("baseline binds loopback only")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port, args.database, args.pool_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
