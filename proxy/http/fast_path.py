"""The shortcuts: ``GET /api/db/{collection}/{id}`` and ``POST /api/db/{collection}/query``
answered without the router."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from proxy.http import monitor
from proxy.http.app import BY_ID, QUERY
from proxy.http.documents import find_query, read_document
from proxy.http.keys import CALLER, CORE
from proxy.http.lane import ROUTED, LaneRequest
from proxy.http.middleware import envelope, identified, observed

BY_PATH: web.RequestKey[tuple[str, str]] = web.RequestKey("by_path", tuple)


ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Shortcuts:
    """The server's request handler with shortcuts for the hottest requests there are,
    ``GET /api/db/{collection}/{id}`` with no query string and ``POST
    /api/db/{collection}/query`` with none, both with no percent-escapes and no
    transaction: each runs what the router would run for it (``envelope``, the identity
    middleware, and the route's own handler: ``read_document``, ``find_query``) without the
    router, the application's handler machinery and the middleware chain. ``wrap`` puts
    them in front of the application's handler (anything else goes to it); ``lane``
    answers the fast lane's requests (``lane.Lane``) the same way. See docs/http.md."""

    def __init__(self, app: web.Application, observe: bool) -> None:
        self._fallback: ServerHandler | None = None
        self._core = app[CORE]
        self._observer = app[monitor.OBSERVER] if observe else None
        get_op, query_op = BY_ID.operation, QUERY.operation
        assert get_op is not None and query_op is not None
        self._get_op, self._query_op = get_op, query_op
        # GET-by-id and query requests that took a shortcut, and how many of those the lane
        self._taken = [0, 0, 0]
        app[monitor.METRICS].sources["fast_path"] = self._counts

    def _counts(self) -> dict[str, int]:
        taken = self._taken
        return {"requests": taken[0], "queries": taken[1], "lane": taken[2]}

    def wrap(self, fallback: ServerHandler) -> ServerHandler:
        self._fallback = fallback
        return self._dispatch

    def _read(self, request: web.Request) -> Awaitable[web.Response]:
        collection, doc_id = request[BY_PATH]
        return read_document(self._core, request[CALLER], collection, doc_id, None)

    def _query(self, request: web.Request) -> Awaitable[web.Response]:
        return find_query(self._core, request, request[BY_PATH][0])

    async def _get_pipeline(self, request: web.Request) -> web.StreamResponse:
        gate, observer = self._core.gate, self._observer
        if observer is None:
            return await identified(request, self._read, gate)
        collection = request[BY_PATH][0]
        return await observed(request, self._read, self._get_op, collection, observer, gate)

    async def _query_pipeline(self, request: web.Request) -> web.StreamResponse:
        gate, observer = self._core.gate, self._observer
        if observer is None:
            return await identified(request, self._query, gate)
        collection = request[BY_PATH][0]
        return await observed(request, self._query, self._query_op, collection, observer, gate)

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        # the application's request factory makes web.Request objects
        method = request.method
        if (method == "GET" or method == "POST") and type(request) is web.Request:
            parts = request.raw_path.split("/")
            if _shortcut_path(parts, request) and not request.query_string:
                if method == "GET" and parts[4] != "count":
                    request[BY_PATH] = (parts[3], parts[4])
                    self._taken[0] += 1
                    return await envelope(request, self._get_pipeline)
                if method == "POST" and parts[4] == "query":
                    request[BY_PATH] = (parts[3], "")
                    self._taken[1] += 1
                    return await envelope(request, self._query_pipeline)
        assert self._fallback is not None
        return await self._fallback(request)

    async def lane(self, request: LaneRequest) -> web.StreamResponse:
        # the lane took only what _dispatch would take (lane.take), so just which of the two
        parts = request.raw_path.split("/")
        as_web = cast(web.Request, request)  # the part of a web.Request the pipelines read
        taken = self._taken
        taken[2] += 1
        if request.method == "GET":
            request[BY_PATH] = (parts[3], parts[4])
            taken[0] += 1
            return await envelope(as_web, self._get_pipeline)
        request[BY_PATH] = (parts[3], "")
        taken[1] += 1
        return await envelope(as_web, self._query_pipeline)


def _shortcut_path(parts: list[str], request: web.Request) -> bool:
    """``/api/db/{collection}/{rest}`` (``parts``: the raw path split at ``/``) without
    percent-escapes, not a route of its own, and outside a transaction."""
    return (
        len(parts) == 5
        and parts[1] == "api"
        and parts[2] == "db"
        and bool(parts[3])
        and bool(parts[4])
        and parts[3] not in ROUTED  # /api/db/migrations/{id}, /api/db/schema/{c}
        and not parts[0]
        and "%" not in request.raw_path
        and "X-Transaction-Id" not in request.headers
    )
