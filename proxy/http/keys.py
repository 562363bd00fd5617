"""Typed keys for state on the aiohttp application and on each request."""

from __future__ import annotations

from aiohttp import web

from proxy.config import Config
from proxy.pipeline.core import Core
from proxy.pipeline.gate import OPEN, Caller

CORE: web.AppKey[Core] = web.AppKey("core", Core)
CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
RAW_BODY: web.RequestKey[bytes] = web.RequestKey("raw_body", bytes)
CALLER: web.RequestKey[Caller] = web.RequestKey("caller", Caller)
# each data route and its operation in the stats model (find|insert|update|delete|...)
OPERATIONS: web.AppKey[dict[web.AbstractRoute, str]] = web.AppKey("operations", dict)


def caller_of(request: web.Request) -> Caller:
    caller: Caller = request.get(CALLER, OPEN)
    return caller
