"""The by-id shortcut: ``GET /api/db/{collection}/{id}`` answered without the router."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.http import monitor
from proxy.http.app import BY_ID
from proxy.http.documents import read_document
from proxy.http.keys import CALLER, CORE
from proxy.http.middleware import envelope, identified, observed

# reserved names with GET routes of their own under /api/db/<name>/{...}: the router's
ROUTED = frozenset({"migrations", "schema"})
BY_PATH: web.RequestKey[tuple[str, str]] = web.RequestKey("by_path", tuple)


ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def fast_get(app: web.Application, fallback: ServerHandler, observe: bool) -> ServerHandler:
    """The server's request handler with a shortcut for the hottest request there is,
    ``GET /api/db/{collection}/{id}`` with no query string, no percent-escapes and no
    transaction: it runs what the router would run for it (``envelope``, the identity
    middleware, and the route's own handler ``read_document``) without the router, the
    application's handler machinery and the middleware chain. Anything else goes to
    ``fallback``, the application. See docs/http.md."""
    core = app[CORE]
    observer = app[monitor.OBSERVER] if observe else None
    operation = BY_ID.operation
    assert operation is not None
    taken = [0]  # requests that took the shortcut, for /metrics
    app[monitor.METRICS].sources["fast_path"] = lambda: {"requests": taken[0]}

    def read(request: web.Request) -> Awaitable[web.Response]:
        collection, doc_id = request[BY_PATH]
        return read_document(core, request[CALLER], collection, doc_id, None)

    async def pipeline(request: web.Request) -> web.StreamResponse:
        if observer is None:
            return await identified(request, read, core.gate)
        return await observed(request, read, operation, request[BY_PATH][0], observer, core.gate)

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        # the application's request factory makes web.Request objects
        if request.method == "GET" and not request.query_string and type(request) is web.Request:
            parts = request.raw_path.split("/")
            if (
                len(parts) == 5
                and parts[1] == "api"
                and parts[2] == "db"
                and parts[3]
                and parts[4]
                and parts[4] != "count"
                and parts[3] not in ROUTED  # /api/db/migrations/{id}, /api/db/schema/{c}
                and not parts[0]
                and "%" not in request.raw_path
                and "X-Transaction-Id" not in request.headers
            ):
                request[BY_PATH] = (parts[3], parts[4])
                taken[0] += 1
                return await envelope(request, pipeline)
        return await fallback(request)

    return dispatch
