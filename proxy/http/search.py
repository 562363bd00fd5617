"""``POST /api/db/search``: the body to the core's search, its answer to the response."""

from __future__ import annotations

from aiohttp import web

from proxy import numbers
from proxy.backends.base import Documents
from proxy.http import monitor
from proxy.http.documents import execute, read_json
from proxy.http.keys import CORE, caller_of
from proxy.http.middleware import JSON


async def search(request: web.Request) -> web.Response:
    core = request.app[CORE]
    body = await read_json(request, core.limits)

    async def op(target: Documents | None) -> web.Response:
        answer = await core.search(body, caller_of(request), target)
        request[monitor.DOCUMENTS] = len(answer["items"])
        return web.Response(body=numbers.dumps_stored(answer), content_type=JSON)

    return await execute(request, op, write=False)
