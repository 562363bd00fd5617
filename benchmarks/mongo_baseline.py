"""Minimal MongoDB baseline: aiohttp on uvloop plus one ``pymongo.AsyncMongoClient``, doing
one ``find_one({"_id": id})`` per ``GET /api/db/{collection}/{id}`` (no policy, no stats, no
cache, no coalescing), the document answered as JSON. ``GET /api/db/health`` pings.

    python -m benchmarks.mongo_baseline --port 8802 --mongo-url mongodb://127.0.0.1:27017 \
        --database dbproxy_bench
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import orjson
import uvloop
from aiohttp import web
from pymongo import AsyncMongoClient

CLIENT: web.AppKey[Any] = web.AppKey("client", object)
DB: web.AppKey[Any] = web.AppKey("db", object)


async def get_one(request: web.Request) -> web.Response:
    coll = request.app[DB][request.match_info["collection"]]
    doc = await coll.find_one({"_id": request.match_info["id"]})
    if doc is None:
        return web.Response(status=404, body=b'{"error":{"code":"not_found"}}')
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    await request.app[DB].command("ping")
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def build_app(mongo_url: str, database: str, pool_size: int) -> web.Application:
    app = web.Application()

    async def client_ctx(app: web.Application):
        client: AsyncMongoClient[Any] = AsyncMongoClient(
            mongo_url, maxPoolSize=pool_size, minPoolSize=pool_size
        )
        app[CLIENT] = client
        app[DB] = client[database]
        yield
        await client.close()

    app.cleanup_ctx.append(client_ctx)
    app.router.add_get("/api/db/health", health)
    app.router.add_get("/api/db/{collection}/{id}", get_one)
    return app


async def serve(host: str, port: int, mongo_url: str, database: str, pool_size: int) -> None:
    runner = web.AppRunner(build_app(mongo_url, database, pool_size), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"mongo baseline listening on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mongo_baseline", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8802)
    p.add_argument("--mongo-url", required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--pool-size", type=int, default=10)
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        p.error("the baseline binds loopback only")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port, args.mongo_url, args.database, args.pool_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
