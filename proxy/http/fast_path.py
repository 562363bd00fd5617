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
from proxy.http.lane import ROUTED, Answer, LaneRequest
from proxy.http.middleware import envelope, identified, observed

BY_PATH: web.RequestKey[tuple[str, str]] = web.RequestKey("by_path", tuple)


ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Shortcuts:
    """The shortcuts of an application: ``wrap`` puts them in front of its router, ``lane``
    answers the fast lane's requests (``lane.Lane``) with the same pipelines."""

    def __init__(self, app: web.Application, observe: bool) -> None:
        self._fallback: ServerHandler | None = None
        self._dispatch, self.lane = fast_get(app, self._fall, observe)

    def _fall(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        assert self._fallback is not None
        return self._fallback(request)

    def wrap(self, fallback: ServerHandler) -> ServerHandler:
        self._fallback = fallback
        return self._dispatch


def fast_get(
    app: web.Application, fallback: ServerHandler, observe: bool
) -> tuple[ServerHandler, Answer]:
    """The server's request handler with shortcuts for the hottest requests there are,
    ``GET /api/db/{collection}/{id}`` with no query string and ``POST
    /api/db/{collection}/query`` with none, both with no percent-escapes and no
    transaction: each runs what the router would run for it (``envelope``, the identity
    middleware, and the route's own handler: ``read_document``, ``find_query``) without the
    router, the application's handler machinery and the middleware chain. Anything else
    goes to ``fallback``, the application. Also answers: the same for the fast lane's
    requests (``lane.Lane``). See docs/http.md."""
    core = app[CORE]
    observer = app[monitor.OBSERVER] if observe else None
    get_op, query_op = BY_ID.operation, QUERY.operation
    assert get_op is not None and query_op is not None
    # GET-by-id and query requests that took a shortcut, and how many of those the lane
    taken = [0, 0, 0]
    app[monitor.METRICS].sources["fast_path"] = lambda: {
        "requests": taken[0],
        "queries": taken[1],
        "lane": taken[2],
    }

    def read(request: web.Request) -> Awaitable[web.Response]:
        collection, doc_id = request[BY_PATH]
        return read_document(core, request[CALLER], collection, doc_id, None)

    def query(request: web.Request) -> Awaitable[web.Response]:
        return find_query(core, request, request[BY_PATH][0])

    async def get_pipeline(request: web.Request) -> web.StreamResponse:
        if observer is None:
            return await identified(request, read, core.gate)
        return await observed(request, read, get_op, request[BY_PATH][0], observer, core.gate)

    async def query_pipeline(request: web.Request) -> web.StreamResponse:
        if observer is None:
            return await identified(request, query, core.gate)
        collection = request[BY_PATH][0]
        return await observed(request, query, query_op, collection, observer, core.gate)

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        # the application's request factory makes web.Request objects
        method = request.method
        if (
            (method == "GET" or method == "POST")
            and not request.query_string
            and type(request) is web.Request
        ):
            parts = request.raw_path.split("/")
            if (
                len(parts) == 5
                and parts[1] == "api"
                and parts[2] == "db"
                and parts[3]
                and parts[4]
                and parts[3] not in ROUTED  # /api/db/migrations/{id}, /api/db/schema/{c}
                and not parts[0]
                and "%" not in request.raw_path
                and "X-Transaction-Id" not in request.headers
            ):
                if method == "GET" and parts[4] != "count":
                    request[BY_PATH] = (parts[3], parts[4])
                    taken[0] += 1
                    return await envelope(request, get_pipeline)
                if method == "POST" and parts[4] == "query":
                    request[BY_PATH] = (parts[3], "")
                    taken[1] += 1
                    return await envelope(request, query_pipeline)
        return await fallback(request)

    async def lane(request: LaneRequest) -> web.StreamResponse:
        # the lane took only what dispatch would take (lane.take), so just which of the two
        parts = request.raw_path.split("/")
        as_web = cast(web.Request, request)  # the part of a web.Request the pipelines read
        taken[2] += 1
        if request.method == "GET":
            request[BY_PATH] = (parts[3], parts[4])
            taken[0] += 1
            return await envelope(as_web, get_pipeline)
        request[BY_PATH] = (parts[3], "")
        taken[1] += 1
        return await envelope(as_web, query_pipeline)

    return dispatch, lane
