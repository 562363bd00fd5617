"""Minimal baseline server: the least work an HTTP-to-PostgreSQL hop can do, to compare against.

aiohttp on uvloop plus one asyncpg pool, no policy, no stats, no cache:

- ``GET  /api/db/{collection}/{id}`` runs one ``SELECT doc FROM dbproxy."<c>" WHERE _id = $1``
  and returns the jsonb text as the body (asyncpg hands jsonb over as ``str``).
- ``POST /api/db/{collection}`` takes one JSON object, adds ``_id`` (if absent) and
  ``_version: 1``, runs one INSERT into the sidecar's table layout and answers 201.
- ``GET  /api/db/health`` answers 200 once the pool is up.

Tables are not created here: the harness makes sure they exist before load starts.

    python -m benchmarks.baseline --port 8801 --database postgresql://postgres@127.0.0.1/db
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import sys
import time

import asyncpg
import orjson
import uvloop
from aiohttp import web

COLLECTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
JSON = "application/json"

POOL = web.AppKey("pool", asyncpg.Pool)
SQL_CACHE = web.AppKey("sql_cache", dict)

_ID_PREFIX = os.urandom(3).hex()
_ID_COUNTER = itertools.count()


def new_id() -> str:
    """Time-ordered, process-unique id (hex nanoseconds + process prefix + counter)."""
    return f"{time.time_ns():x}{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFF:06x}"


def _error(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, body=body, content_type=JSON)


def _sql(app: web.Application, collection: str) -> tuple[str, str] | None:
    """(select, insert) statements for a collection, built once per collection name."""
    cache = app[SQL_CACHE]
    hit = cache.get(collection)
    if hit is not None:
        return hit
    if not COLLECTION_RE.match(collection):
        return None
    table = f'dbproxy."{collection}"'
    pair = (
        f"SELECT doc FROM {table} WHERE _id = $1",
        f"INSERT INTO {table} (_id, doc, _version) VALUES ($1, $2::jsonb, 1)",
    )
    cache[collection] = pair
    return pair


async def get_one(request: web.Request) -> web.Response:
    sql = _sql(request.app, request.match_info["collection"])
    if sql is None:
        return _error(400, "invalid_collection", "bad collection name")
    text = await request.app[POOL].fetchval(sql[0], request.match_info["id"])
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
        await request.app[POOL].execute(sql[1], doc_id, body.decode())
    except asyncpg.UniqueViolationError:
        return _error(409, "conflict", "document already exists")
    return web.Response(status=201, body=body, content_type=JSON)


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=JSON)


def build_app(database: str, pool_size: int) -> web.Application:
    app = web.Application()
    app[SQL_CACHE] = {}

    async def pool_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        pool = await asyncpg.create_pool(
            database, min_size=pool_size, max_size=pool_size, command_timeout=30
        )
        app[POOL] = pool
        yield
        await asyncio.wait_for(pool.close(), timeout=10)

    app.cleanup_ctx.append(pool_ctx)
    app.router.add_get("/api/db/health", health)
    app.router.add_get("/api/db/{collection}/{id}", get_one)
    app.router.add_post("/api/db/{collection}", create_one)
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
