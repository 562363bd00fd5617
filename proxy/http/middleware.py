"""The middlewares every request passes: request id, error envelope, identity and timing."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy import context
from proxy.context import RequestContext
from proxy.errors import (
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
)
from proxy.http import monitor
from proxy.http.keys import CALLER, CORE, OPERATIONS, REQUEST_ID
from proxy.pipeline.gate import Caller, Gatekeeper
from proxy.resilience.ratelimit import ConcurrencyLimiter
from proxy.resilience.routing import parse_lsn

log = logging.getLogger(__name__)

JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def error_response(err: ProxyError, request_id: str) -> web.Response:
    body = err.to_dict()
    body["request_id"] = request_id
    headers = {"X-Request-Id": request_id, **err.headers}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return web.Response(
        body=orjson.dumps({"error": body}), status=err.status, content_type=JSON, headers=headers
    )


def _from_http_exception(exc: web.HTTPException) -> ProxyError:
    if exc.status == 404:
        return NotFound("no such endpoint", code="no_such_endpoint")
    if exc.status == 405:
        return MethodNotAllowed("method not allowed on this endpoint")
    if exc.status == 413:
        return PayloadTooLarge("request body is larger than the configured limit")
    err = BadRequest(exc.reason or "bad request", code="bad_request")
    err.status = exc.status
    return err


_RID_PREFIX = uuid.uuid4().hex[:16]  # this process, at random
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    """A request id unique across processes and restarts (random per-process prefix plus
    a counter; 32 hex digits like a UUID): cheap, since every request needs one. Not a
    secret: nothing is authorized by it."""
    return f"{_RID_PREFIX}{next(_rid_counter):016x}"


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id on every response; every failure in the one error envelope."""
    rid = request.headers.get("X-Request-Id")
    if not rid or len(rid) > 128 or not rid.isprintable():
        rid = new_request_id()
    request[REQUEST_ID] = rid
    try:
        response = await handler(request)
    except ProxyError as err:
        return error_response(err, rid)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc), rid)
    except Exception:
        log.exception("unhandled error request_id=%s", rid)
        return error_response(InternalError("internal error"), rid)
    response.headers["X-Request-Id"] = rid
    return response


# liveness, scraping and the API's description (it names no collection or policy) need no token
OPEN_PATHS = frozenset({"/api/db/health", "/metrics", "/api/db/openapi.json", "/api/db/docs"})


def begin(request: web.Request, gate: Gatekeeper) -> tuple[Caller, ConcurrencyLimiter | None]:
    """Who is asking (sidecar service, bearer token, or open mode), the request context the
    adapters see, and one of the service's in-flight slots (release it when done)."""
    headers = request.headers
    caller = gate.identify(headers)
    request[CALLER] = caller
    context.current.set(
        RequestContext(
            caller.service,
            request[REQUEST_ID],
            gate.statement_timeout(caller),
            read_preference(headers.get("X-Read-Preference")),
            consistency_token(headers.get("X-Consistency-Token")),
            time.monotonic(),
            partition_key(headers.get("X-Partition-Key")),
        )
    )
    context.write_token.set(None)
    context.last_statement.set(None)
    return caller, gate.enter(caller)


async def end(response: web.StreamResponse) -> web.StreamResponse:
    """The consistency token of the request's write, then one loop turn (docs/http.md)."""
    token = context.write_token.get()
    if token is not None:
        response.headers["X-Consistency-Token"] = token
    await asyncio.sleep(0)
    return response


@web.middleware
async def identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identify the caller and hold an in-flight slot around the handler (``begin``)."""
    if request.path in OPEN_PATHS:
        return await handler(request)
    return await identified(request, handler, request.app[CORE].gate)


async def identified(
    request: web.Request, handler: Handler, gate: Gatekeeper
) -> web.StreamResponse:
    _, cap = begin(request, gate)
    try:
        response = await handler(request)
    finally:
        if cap is not None:
            cap.release()
    return await end(response)


@web.middleware
async def observed_identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``identity`` plus the timing of every data operation (``monitor.Observer``: counters
    and histogram buckets only, no I/O), whatever the outcome, identification included.
    One middleware, not two: on the hot path every layer costs."""
    app = request.app
    operation = app[OPERATIONS].get(request.match_info.route)
    if operation is None:
        return await identity(request, handler)
    collection = request.match_info.get("collection", "-")
    return await observed(
        request, handler, operation, collection, app[monitor.OBSERVER], app[CORE].gate
    )


async def observed(
    request: web.Request,
    handler: Handler,
    operation: str,
    collection: str,
    observer: monitor.Observer,
    gate: Gatekeeper,
) -> web.StreamResponse:
    started = time.perf_counter()
    caller: Caller | None = None
    code: str | None = None
    status = 500
    try:
        caller, cap = begin(request, gate)
        try:
            response = await handler(request)
        finally:
            if cap is not None:
                cap.release()
        status = response.status
        return await end(response)
    except ProxyError as err:
        code, status = err.code, err.status
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        seconds = time.perf_counter() - started
        observer.finish(request, caller, operation, collection, seconds, status, code)


READ_PREFERENCES = frozenset({"primary", "secondary", "nearest"})


def read_preference(raw: str | None) -> str | None:
    if raw is None:
        return None
    if raw not in READ_PREFERENCES:
        raise BadRequest(
            "X-Read-Preference must be primary, secondary or nearest", code="invalid_header"
        )
    return raw


def consistency_token(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return parse_lsn(raw.strip())
    except ValueError:
        raise BadRequest(
            "X-Consistency-Token must be the token of an earlier write", code="invalid_header"
        ) from None


MAX_PARTITION_KEY = 1024


def partition_key(raw: str | None) -> str | None:
    """``X-Partition-Key`` (or ``?partition_key=``): the key of the partition a GET by id
    reads (issue 21); at most 1024 characters."""
    if raw is None:
        return None
    if len(raw) > MAX_PARTITION_KEY:
        raise BadRequest(
            f"the partition key may be at most {MAX_PARTITION_KEY} characters",
            code="invalid_header",
        )
    return raw
