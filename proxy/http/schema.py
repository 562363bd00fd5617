"""``GET /api/db/schema/{collection}``: a collection's schema, indexes and estimates."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import BadRequest
from proxy.http.keys import CORE, caller_of
from proxy.http.middleware import json_response


async def describe_schema(request: web.Request) -> web.Response:
    if request.query:
        unknown = ", ".join(sorted(request.query))[:200]
        raise BadRequest(f"unknown parameter(s): {unknown}", code="unknown_parameter")
    core = request.app[CORE]
    collection = request.match_info["collection"]
    return json_response(await core.describe_schema(collection, caller_of(request)))
