"""The sidecar's aiohttp application: the route table, health, and the lifecycle contexts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

from aiohttp import web

from proxy.cache import TwoLevelCache
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.http import migrations, monitor, openapi
from proxy.http.aggregate import aggregate
from proxy.http.documents import (
    count_documents,
    create,
    delete_one,
    get_one,
    list_documents,
    patch_one,
    put_one,
    query_documents,
)
from proxy.http.keys import CONFIG, CORE, OPERATIONS
from proxy.http.middleware import Handler, envelope, identity, json_response, observed_identity
from proxy.http.schema import describe_schema
from proxy.http.search import search
from proxy.http.transactions import transaction
from proxy.pipeline.core import Core

log = logging.getLogger(__name__)


class Route(NamedTuple):
    """One endpoint, and its operation in the stats model (None: not timed)."""

    method: str
    path: str
    handler: Handler
    operation: str | None


async def health(request: web.Request) -> web.Response:
    core = request.app[CORE]
    ready, detail = await core.health()
    gate = core.gate
    detail["policies"] = {
        "enforcing": gate.enforcing,
        "mode": "token" if gate.token_mode else ("sidecar" if gate.enforcing else "open"),
        "services": sorted(gate.policies.services) if gate.policies else [],
        "reloads": gate.counters["reloads"],
        "reload_error": gate.reload_error,
    }
    return json_response(detail, 200 if ready else 503)


BY_ID = Route("GET", "/api/db/{collection}/{id}", get_one, "get")  # also the fast path's
QUERY = Route("POST", "/api/db/{collection}/query", query_documents, "find")  # and this

# Order matters for speed and meaning: the router tries dynamic resources in this order,
# so the by-id resource comes early (the hot path matches on the second try), after only
# the GET that it would otherwise swallow (".../count"); a POST to ".../query" passes it
# (it has no POST) and finds its own resource.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/db/health", health, None),
    # "migrations" is a reserved collection name; the router's index by path prefix tries
    # these before the document routes whatever their place here
    Route("GET", "/api/db/migrations/status", migrations.status, None),
    Route("GET", "/api/db/migrations/{id}", migrations.get_record, None),
    Route("GET", "/api/db/migrations", migrations.list_records, None),
    Route("POST", "/api/db/migrations", migrations.submit, None),
    Route("POST", "/api/db/transaction", transaction, "transaction"),
    Route("POST", "/api/db/search", search, "search"),
    Route("GET", "/api/db/schema/{collection}", describe_schema, "schema"),
    Route("GET", "/api/db/{collection}/count", count_documents, "count"),
    BY_ID,
    Route("PUT", "/api/db/{collection}/{id}", put_one, "update"),
    Route("PATCH", "/api/db/{collection}/{id}", patch_one, "update"),
    Route("DELETE", "/api/db/{collection}/{id}", delete_one, "delete"),
    QUERY,
    Route("POST", "/api/db/{collection}/aggregate", aggregate, "aggregate"),
    Route("POST", "/api/db/{collection}", create, "insert"),
    Route("GET", "/api/db/{collection}", list_documents, "find"),
)


def build_app(
    config: Config,
    core: Core,
    monitoring: monitor.Monitoring,
    cache: TwoLevelCache | None = None,
    *,
    observe: bool = True,
) -> web.Application:
    """The sidecar's application over built parts (``proxy.wiring`` builds them).
    ``observe=False`` leaves out the per-request timing (stats and Prometheus
    histograms), for measuring what it costs."""
    app = web.Application(
        middlewares=[envelope, observed_identity if observe else identity],
        client_max_size=config.limits.max_body_bytes,
        handler_args={"max_field_size": 16384, "max_line_size": 16384},
    )
    app[CONFIG] = config
    app[CORE] = core
    app.cleanup_ctx.append(_backends_ctx)
    app.cleanup_ctx.append(_housekeeping_ctx)
    app.cleanup_ctx.append(_cache_ctx(cache))
    openapi.install(app.router)  # static paths, tried before /api/db/{collection}
    app[OPERATIONS] = _add_routes(app.router, ROUTES)
    monitor.install(app, monitoring)
    return app


def _add_routes(
    router: web.UrlDispatcher, routes: tuple[Route, ...]
) -> dict[web.AbstractRoute, str]:
    """Register ``routes`` (a GET answers HEAD too); each added route and its operation."""
    operations: dict[web.AbstractRoute, str] = {}
    for route in routes:
        if route.method == "GET":  # add_get registers HEAD too, with the same handler
            added = router.add_get(route.path, route.handler)
        else:
            added = router.add_route(route.method, route.path, route.handler)
        if route.operation is None:
            continue
        methods = {route.method, "HEAD"} if route.method == "GET" else {route.method}
        assert added.resource is not None
        for each in added.resource:
            if each.method in methods:
                operations[each] = route.operation
    return operations


async def _backends_ctx(app: web.Application) -> AsyncIterator[None]:
    core = app[CORE]
    started = []
    try:
        for backend in core.backends.values():
            await backend.start()
            started.append(backend)
        try:
            await core.refresh_schemas()
        except ProxyError as err:  # a database still down: loaded on its first write
            log.debug("schemas not loaded yet: %s", err.code)  # the backend says why
        yield
    finally:
        if core.migrations is not None:
            await core.migrations.close()  # rolled back; resumed when re-submitted
        for backend in started:
            await backend.close()


async def _housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    """The periodic tasks: transaction reaper and backend housekeeping; open transactions
    are rolled back at shutdown."""
    core = app[CORE]
    reaper = asyncio.create_task(core.transactions.run_reaper())
    upkeep = asyncio.create_task(_every(60.0, core.maintain))
    watchers = [asyncio.create_task(core.watch_schemas(b)) for b in core.backends.values()]
    try:
        yield
    finally:
        for task in (reaper, upkeep, *watchers):
            task.cancel()
        await asyncio.gather(reaper, upkeep, *watchers, return_exceptions=True)
        await core.transactions.close_all()


async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:
            log.exception("periodic job failed")


def _cache_ctx(
    cache: TwoLevelCache | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Start and close the read cache (None: no collection opts in)."""

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        if cache is None:
            yield
            return
        await cache.start(wait=1.0)
        try:
            yield
        finally:
            await cache.close()

    return ctx
