"""``POST /api/db/{collection}/aggregate``: the body to the core's aggregate, its documents
(or, with ``explain``, the statement and its plan) to the response."""

from __future__ import annotations

from aiohttp import web

from proxy.backends.base import Documents
from proxy.http import monitor
from proxy.http.documents import execute, read_json
from proxy.http.keys import CORE, caller_of
from proxy.http.middleware import JSON, json_response


async def aggregate(request: web.Request) -> web.Response:
    core = request.app[CORE]
    body = await read_json(request, core.limits)
    collection = request.match_info["collection"]
    if isinstance(body, dict):
        request[monitor.PATTERN_SOURCE] = {"pipeline": body.get("pipeline")}

    async def op(target: Documents | None) -> web.Response:
        result = await core.aggregate(collection, body, target, caller_of(request))
        if result.explain is not None:
            return json_response(result.explain)
        request[monitor.DOCUMENTS] = len(result.items)
        return web.Response(body=b'{"items":[' + b",".join(result.items) + b"]}", content_type=JSON)

    return await execute(request, op, write=False)
