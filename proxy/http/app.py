"""The aiohttp application: routes, middlewares (request id, error envelope, body limits)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy import context
from proxy.backends.base import Documents, TxKind
from proxy.backends.redis import RedisCache
from proxy.cache import NearCache, TwoLevelCache
from proxy.config import Config
from proxy.context import RequestContext
from proxy.errors import (
    BadRequest,
    DuplicateId,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    ProxyError,
    UnsupportedMediaType,
)
from proxy.http import monitor
from proxy.http.keys import CALLER, CONFIG, CORE, RAW_BODY, REQUEST_ID, caller_of
from proxy.pipeline.batch import grants_of, parse_batch, run_operations
from proxy.pipeline.documents import Core
from proxy.pipeline.gate import Caller, Gatekeeper
from proxy.query.parse import is_update_document
from proxy.query.spec import (
    MAX_VERSION,
    FindSpec,
    ItemResult,
    StoredReply,
    WriteResult,
    parse_json_text,
)
from proxy.resilience.ratelimit import ConcurrencyLimiter
from proxy.resilience.routing import parse_lsn

log = logging.getLogger(__name__)

JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---- middlewares -----------------------------------------------------------------------


def _error_response(err: ProxyError, request_id: str) -> web.Response:
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
        return _error_response(err, rid)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(_from_http_exception(exc), rid)
    except Exception:
        log.exception("unhandled error request_id=%s", rid)
        return _error_response(InternalError("internal error"), rid)
    response.headers["X-Request-Id"] = rid
    return response


OPEN_PATHS = frozenset({"/api/db/health", "/metrics"})  # liveness and scraping need no token


def _begin(request: web.Request, gate: Gatekeeper) -> tuple[Caller, ConcurrencyLimiter | None]:
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
        )
    )
    context.write_token.set(None)
    context.last_statement.set(None)
    return caller, gate.enter(caller)


async def _end(response: web.StreamResponse) -> web.StreamResponse:
    token = context.write_token.get()
    if token is not None:
        response.headers["X-Consistency-Token"] = token
    # One event-loop turn before the response is written. A handler that never waited
    # (a near-cache hit, a refusal) would otherwise write at once, one request at a time;
    # after the yield the loop first runs every other handler that is ready. Measured on
    # GET-by-id at 64 connections, two sidecar processes side by side under wrk: 20 %
    # less CPU per request on near-cache hits, 4 % on coalesced database reads.
    await asyncio.sleep(0)
    return response


@web.middleware
async def identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identify the caller and hold an in-flight slot around the handler (``_begin``)."""
    if request.path in OPEN_PATHS:
        return await handler(request)
    return await _identified(request, handler, request.app[CORE].gate)


async def _identified(
    request: web.Request, handler: Handler, gate: Gatekeeper
) -> web.StreamResponse:
    _, cap = _begin(request, gate)
    try:
        response = await handler(request)
    finally:
        if cap is not None:
            cap.release()
    return await _end(response)


@web.middleware
async def observed_identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``identity`` plus the timing of every data operation (``monitor.Observer``: counters
    and histogram buckets only, no I/O), whatever the outcome, identification included.
    One middleware, not two: on the hot path every layer costs."""
    operation = monitor.operation_of(request)
    if operation is None:
        return await identity(request, handler)
    collection = request.match_info.get("collection", "-")
    app = request.app
    return await _observed(
        request, handler, operation, collection, app[monitor.OBSERVER], app[CORE].gate
    )


async def _observed(
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
        caller, cap = _begin(request, gate)
        try:
            response = await handler(request)
        finally:
            if cap is not None:
                cap.release()
        status = response.status
        return await _end(response)
    except ProxyError as err:
        code, status = err.code, err.status
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        seconds = time.perf_counter() - started
        observer.finish(request, caller, operation, collection, seconds, status, code)


# ---- the by-id fast path ------------------------------------------------------------------

BY_PATH: web.RequestKey[tuple[str, str]] = web.RequestKey("by_path", tuple)


ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def fast_get(app: web.Application, fallback: ServerHandler, observe: bool) -> ServerHandler:
    """The server's request handler with a shortcut for the hottest request there is,
    ``GET /api/db/{collection}/{id}`` with no query string, no percent-escapes and no
    transaction: it runs exactly what the router would run for it (``envelope``, the
    identity middleware, ``get_one``'s core call and response) without the router, the
    application's handler machinery and the middleware chain, which together cost more
    than the cached read itself. Anything else goes to ``fallback``, the application.
    Such a request has no match info, so nothing on this path may use ``request.app``.
    ``tests/e2e/test_fast_path.py`` holds it to the router's answers."""
    core = app[CORE]
    observer = app[monitor.OBSERVER] if observe else None
    taken = [0]  # requests that took the shortcut, for /metrics
    app[monitor.METRICS].sources["fast_path"] = lambda: {"requests": taken[0]}

    async def read(request: web.Request) -> web.StreamResponse:
        collection, doc_id = request[BY_PATH]
        caller = request[CALLER]
        return document_response(await core.get(collection, doc_id, None, None, caller))

    async def pipeline(request: web.Request) -> web.StreamResponse:
        if observer is None:
            return await _identified(request, read, core.gate)
        return await _observed(request, read, "get", request[BY_PATH][0], observer, core.gate)

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
                and not parts[0]
                and "%" not in request.raw_path
                and "X-Transaction-Id" not in request.headers
            ):
                request[BY_PATH] = (parts[3], parts[4])
                taken[0] += 1
                return await envelope(request, pipeline)
        return await fallback(request)

    return dispatch


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


# ---- request decoding -------------------------------------------------------------------


async def read_json(request: web.Request) -> Any:
    limits = request.app[CONFIG].limits
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise PayloadTooLarge(
            f"request body is larger than {limits.max_body_bytes} bytes",
            details={"max_bytes": limits.max_body_bytes},
        )
    if request.content_type.startswith("multipart/"):
        raise UnsupportedMediaType("send JSON with Content-Type: application/json")
    raw = await request.read()
    if len(raw) > limits.max_body_bytes:
        raise PayloadTooLarge(f"request body is larger than {limits.max_body_bytes} bytes")
    if not raw:
        raise BadRequest("a JSON body is required", code="missing_body")
    request[RAW_BODY] = raw
    return parse_json_text(raw, limits, "request body")


def if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None or raw.strip() == "*":
        return None
    value = raw.strip()
    digits = value[1:-1]
    # a version is a 64-bit integer: anything longer is refused before int() and any I/O
    quoted = value.startswith('"') and value.endswith('"') and len(digits) <= 19
    if quoted and digits.isascii() and digits.isdigit() and int(digits) <= MAX_VERSION:
        return int(digits)
    raise BadRequest('If-Match must be an ETag like "3"', code="invalid_if_match")


def flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no", ""):
        return False
    raise BadRequest(f"{name} must be true or false", code="invalid_parameter")


# ---- responses -----------------------------------------------------------------------


def document_response(result: WriteResult, status: int = 200) -> web.Response:
    return web.Response(
        body=result.body,
        status=status,
        content_type=JSON,
        headers={"ETag": f'"{result.version}"'},
    )


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def page_response(items: list[bytes], nxt: str | None) -> web.Response:
    body = b'{"items":[' + b",".join(items) + b'],"next":' + orjson.dumps(nxt) + b"}"
    return web.Response(body=body, content_type=JSON)


def bulk_response(results: list[ItemResult]) -> web.Response:
    items: list[dict[str, Any]] = []
    for r in results:
        item: dict[str, Any] = {"status": r.status, "_id": r.id}
        if r.version is not None:
            item["_version"] = r.version
        if r.error is not None:
            item["error"] = r.error
        items.append(item)
    created = sum(1 for r in results if r.status == 201)
    status = 201 if created == len(results) else 207
    return json_response(
        {"items": items, "created": created, "failed": len(results) - created}, status
    )


# ---- handlers ----------------------------------------------------------------------


def owner(request: web.Request) -> str:
    """Who is asking: transactions are bound to it."""
    return caller_of(request).service


Operation = Callable[[Documents | None], Awaitable[web.Response]]


Grants = tuple[tuple[str, str], ...]


async def execute(
    request: web.Request,
    op: Operation,
    *,
    write: bool,
    grants: Grants = (),
    charge: tuple[str, int] | None = None,
) -> web.Response:
    """Run ``op`` inside the caller's transaction (X-Transaction-Id), or once per
    Idempotency-Key (writes; ``grants`` and ``charge`` judge a replay, see
    ``Core.idempotent``), or plainly."""
    core = request.app[CORE]
    tx_id = request.headers.get("X-Transaction-Id")
    key = request.headers.get("Idempotency-Key") if write else None
    if tx_id is not None:
        if key is not None:
            raise BadRequest(
                "Idempotency-Key cannot be used inside a transaction; use it on the batch",
                code="idempotency_in_transaction",
            )
        async with core.transactions.use(tx_id, owner(request)) as tx:
            return await op(tx)
    if key is None:
        return await op(None)

    async def produce(tx: Documents) -> StoredReply:
        response = await op(tx)
        assert isinstance(response.body, bytes)
        headers = {h: response.headers[h] for h in REPLAYED_HEADERS if h in response.headers}
        return StoredReply(response.status, response.body, headers)

    reply, replayed = await core.idempotent(
        key,
        fingerprint(request),
        produce,
        caller=caller_of(request),
        grants=grants,
        charge=charge,
    )
    response = web.Response(body=reply.body, status=reply.status, headers=reply.headers)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


REPLAYED_HEADERS = ("ETag", "Content-Type")


def fingerprint(request: web.Request) -> str:
    """``<request>/<policy>``: a hash of who asks and what (service, method, path, the
    conditional headers, the values of the headers the row rules read, the body), and
    the digest of the policy judging it. See ``ops.check_fingerprint``."""
    caller = caller_of(request)
    headers = request.headers
    h = hashlib.sha256()
    parts = [
        caller.service,
        request.method,
        request.path_qs,
        headers.get("If-Match", ""),
        headers.get("If-None-Match", ""),
    ]
    policy = caller.policy
    if policy is not None:
        parts += [f"{name}={headers.get(name, '')}" for name in policy.row_headers]
    for part in parts:
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\x00")
    h.update(request.get(RAW_BODY, b""))
    return f"{h.hexdigest()}/{policy.digest if policy is not None else '-'}"


async def create(request: web.Request) -> web.Response:
    core = request.app[CORE]
    collection = request.match_info["collection"]
    body = await read_json(request)

    caller = caller_of(request)

    async def op(target: Documents | None) -> web.Response:
        result = await core.create(collection, body, target, caller)
        if isinstance(result, list):
            request[monitor.DOCUMENTS] = sum(1 for r in result if r.status == 201)
            return bulk_response(result)
        return document_response(result, 201)

    units = len(body) if isinstance(body, list) else 1
    grants = ((collection, "create"),)
    return await execute(request, op, write=True, grants=grants, charge=("create", units))


async def get_one(request: web.Request) -> web.Response:
    core = request.app[CORE]
    m = request.match_info
    fields = request.query.get("fields")
    caller = caller_of(request)

    async def op(target: Documents | None) -> web.Response:
        return document_response(await core.get(m["collection"], m["id"], fields, target, caller))

    if "X-Transaction-Id" not in request.headers:  # the hot path: no closure dispatch
        return document_response(await core.get(m["collection"], m["id"], fields, None, caller))
    return await execute(request, op, write=False)


async def put_one(request: web.Request) -> web.Response:
    core = request.app[CORE]
    m = request.match_info
    body = await read_json(request)
    upsert, match = flag(request, "upsert"), if_match(request)
    if if_none_match(request):
        return await _create_only(request, body)

    async def op(target: Documents | None) -> web.Response:
        result = await core.replace_or_update(
            m["collection"],
            m["id"],
            body,
            upsert=upsert,
            if_match=match,
            target=target,
            caller=caller_of(request),
        )
        return document_response(result, 201 if result.created else 200)

    grants = ((m["collection"], "update"),) + (((m["collection"], "create"),) if upsert else ())
    return await execute(request, op, write=True, grants=grants, charge=("update", 1))


def if_none_match(request: web.Request) -> bool:
    """``If-None-Match: *``: create only; any other value is not supported."""
    raw = request.headers.get("If-None-Match")
    if raw is None:
        return False
    if raw.strip() != "*":
        raise BadRequest("only If-None-Match: * is supported", code="invalid_if_none_match")
    return True


async def _create_only(request: web.Request, body: Any) -> web.Response:
    """PUT with If-None-Match: * stores the document only if the id is free, else 412."""
    core = request.app[CORE]
    m = request.match_info
    if not isinstance(body, dict) or is_update_document(body):
        raise BadRequest("If-None-Match: * needs a whole document", code="invalid_document")
    if body.get("_id", m["id"]) != m["id"]:
        raise BadRequest("the body's _id differs from the URL's", code="id_mismatch")

    async def op(target: Documents | None) -> web.Response:
        try:
            result = await core.create(
                m["collection"], {**body, "_id": m["id"]}, target, caller_of(request)
            )
        except DuplicateId:
            raise PreconditionFailed(
                "a document with this _id exists (If-None-Match: *)", code="already_exists"
            ) from None
        assert isinstance(result, WriteResult)
        return document_response(result, 201)

    grants = ((m["collection"], "create"),)
    return await execute(request, op, write=True, grants=grants, charge=("create", 1))


async def patch_one(request: web.Request) -> web.Response:
    core = request.app[CORE]
    m = request.match_info
    body = await read_json(request)
    match = if_match(request)

    async def op(target: Documents | None) -> web.Response:
        result = await core.merge_patch(
            m["collection"],
            m["id"],
            body,
            if_match=match,
            target=target,
            caller=caller_of(request),
        )
        return document_response(result)

    grants = ((m["collection"], "update"),)
    return await execute(request, op, write=True, grants=grants, charge=("update", 1))


async def delete_one(request: web.Request) -> web.Response:
    core = request.app[CORE]
    m = request.match_info
    match = if_match(request)

    async def op(target: Documents | None) -> web.Response:
        version = await core.delete(
            m["collection"], m["id"], if_match=match, target=target, caller=caller_of(request)
        )
        return json_response({"deleted": True, "_id": m["id"], "_version": version})

    grants = ((m["collection"], "delete"),)
    return await execute(request, op, write=True, grants=grants, charge=("delete", 1))


async def list_documents(request: web.Request) -> web.Response:
    core = request.app[CORE]
    spec = core.find_spec(request.query, from_url=True)
    raw_filter = request.query.get("filter")  # valid JSON: find_spec parsed it already
    source = {
        "filter": orjson.loads(raw_filter) if raw_filter else None,
        "sort": request.query.get("sort"),
    }
    return await _find(request, spec, source)


async def _find(request: web.Request, spec: FindSpec, source: Any) -> web.Response:
    core = request.app[CORE]
    collection = request.match_info["collection"]
    request[monitor.PATTERN_SOURCE] = source

    async def op(target: Documents | None) -> web.Response:
        page = await core.find(collection, spec, target, caller_of(request))
        request[monitor.DOCUMENTS] = len(page.items)
        return page_response(page.items, page.next)

    return await execute(request, op, write=False)


async def query_documents(request: web.Request) -> web.Response:
    core = request.app[CORE]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("the query body must be a JSON object", code="invalid_query")
    return await _find(request, core.find_spec(body, from_url=False), body)


async def count_documents(request: web.Request) -> web.Response:
    core = request.app[CORE]
    unknown = set(request.query) - {"filter"}
    if unknown:
        raise BadRequest(
            f"unknown parameter(s): {', '.join(sorted(unknown))[:200]}", code="unknown_parameter"
        )
    raw = request.query.get("filter")
    flt = parse_json_text(raw, core.limits, "filter") if raw is not None else None
    collection = request.match_info["collection"]
    request[monitor.PATTERN_SOURCE] = {"filter": flt}

    async def op(target: Documents | None) -> web.Response:
        n = await core.count(collection, flt, target, caller_of(request))
        return json_response({"count": n})

    return await execute(request, op, write=False)


async def transaction(request: web.Request) -> web.Response:
    """Batch (``operations``) or the interactive flow (``action``: begin/commit/rollback)."""
    core = request.app[CORE]
    body = await read_json(request)
    action = body.get("action") if isinstance(body, dict) else None
    if action is not None:
        return await _transaction_action(request, body, action)
    if "X-Transaction-Id" in request.headers:
        raise BadRequest("a batch cannot run inside another transaction", code="nested_transaction")
    key = request.headers.get("Idempotency-Key")
    if key is None:
        results = await core.run_batch(body, caller_of(request))
        return json_response({"committed": True, "results": results})
    req = parse_batch(body, core.limits.max_transaction_operations)

    caller = await core.admit_batch(req.operations, caller_of(request))

    async def produce(tx: Documents) -> StoredReply:
        results = await run_operations(core, req.operations, tx, caller)
        payload = orjson.dumps({"committed": True, "results": results})
        return StoredReply(200, payload, {"Content-Type": JSON})

    reply, replayed = await core.idempotent(  # charged above, replay or not
        key,
        fingerprint(request),
        produce,
        req.isolation,
        TxKind.BATCH,
        caller=caller,
        grants=tuple(grants_of(req.operations)),
    )
    response = web.Response(body=reply.body, status=reply.status, headers=reply.headers)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def _transaction_action(
    request: web.Request, body: dict[str, Any], action: Any
) -> web.Response:
    core = request.app[CORE]
    lim = core.limits
    if action == "begin":
        _only(body, {"action", "isolation"})
        tx_id = await core.begin(caller_of(request), body.get("isolation"))
        return json_response(
            {
                "transaction_id": tx_id,
                "idle_timeout_seconds": lim.transaction_idle_timeout_seconds,
                "max_lifetime_seconds": lim.transaction_max_lifetime_seconds,
            },
            201,
        )
    if action in ("commit", "rollback"):
        _only(body, {"action", "transaction_id"})
        ended = _ended_transaction(request, body)
        if action == "commit":
            await core.transactions.commit(ended, owner(request))
            return json_response({"transaction_id": ended, "status": "committed"})
        await core.transactions.rollback(ended, owner(request))
        return json_response({"transaction_id": ended, "status": "rolled-back"})
    raise BadRequest("action must be begin, commit or rollback", code="invalid_action")


def _ended_transaction(request: web.Request, body: dict[str, Any]) -> str:
    """The transaction a commit/rollback ends: the body's ``transaction_id`` or the
    ``X-Transaction-Id`` header (both may be given when they agree)."""
    named, header = body.get("transaction_id"), request.headers.get("X-Transaction-Id")
    if named is not None and not isinstance(named, str):
        raise BadRequest("transaction_id must be a string", code="invalid_transaction")
    if named is not None and header is not None and named != header:
        raise BadRequest(
            "transaction_id and the X-Transaction-Id header name different transactions",
            code="transaction_id_mismatch",
        )
    ended = named if named is not None else header
    if not ended:
        raise BadRequest(
            "transaction_id (or the X-Transaction-Id header) is required",
            code="invalid_transaction",
        )
    return ended


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    extra = set(body) - allowed
    if extra:
        raise BadRequest(
            f"unknown field(s): {', '.join(sorted(extra))[:200]}", code="unknown_parameter"
        )


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


# ---- application -------------------------------------------------------------------


def build_app(config: Config, core: Core, *, observe: bool = True) -> web.Application:
    """The sidecar's application. ``observe=False`` leaves out the per-request timing
    (stats and Prometheus histograms), for measuring what it costs."""
    app = web.Application(
        middlewares=[envelope, observed_identity if observe else identity],
        client_max_size=config.limits.max_body_bytes,
        handler_args={"max_field_size": 16384, "max_line_size": 16384},
    )
    app[CONFIG] = config
    app[CORE] = core
    app.cleanup_ctx.append(_backends_ctx)
    app.cleanup_ctx.append(_housekeeping_ctx)
    app.cleanup_ctx.append(_cache_ctx)
    r = app.router
    r.add_get("/api/db/health", health)
    r.add_post("/api/db/transaction", transaction)
    # Order matters for speed and meaning: the router tries dynamic resources in this
    # order, so the by-id resource comes early (the hot path matches on the second try),
    # after only the GET that it would otherwise swallow (".../count"); a POST to
    # ".../query" passes it (it has no POST) and finds its own resource.
    r.add_get("/api/db/{collection}/count", count_documents)
    r.add_get("/api/db/{collection}/{id}", get_one)
    r.add_put("/api/db/{collection}/{id}", put_one)
    r.add_patch("/api/db/{collection}/{id}", patch_one)
    r.add_delete("/api/db/{collection}/{id}", delete_one)
    r.add_post("/api/db/{collection}/query", query_documents)
    r.add_post("/api/db/{collection}", create)
    r.add_get("/api/db/{collection}", list_documents)
    monitor.install(app, core, config.collector_url, config.collector_push)
    return app


async def _backends_ctx(app: web.Application) -> AsyncIterator[None]:
    core = app[CORE]
    started = []
    try:
        for backend in core.backends.values():
            await backend.start()
            started.append(backend)
        yield
    finally:
        for backend in started:
            await backend.close()


async def _housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    """The periodic tasks: transaction reaper and backend housekeeping; open transactions
    are rolled back at shutdown."""
    core = app[CORE]
    reaper = asyncio.create_task(core.transactions.run_reaper())
    upkeep = asyncio.create_task(_every(60.0, core.maintain))
    try:
        yield
    finally:
        for task in (reaper, upkeep):
            task.cancel()
        await asyncio.gather(reaper, upkeep, return_exceptions=True)
        await core.transactions.close_all()


async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:
            log.exception("periodic job failed")


async def _cache_ctx(app: web.Application) -> AsyncIterator[None]:
    """The read cache, when some collection opts in: near cache, plus Redis if configured."""
    core = app[CORE]
    settings = app[CONFIG].cache
    if not any(c.enabled for c in settings.collections.values()):
        yield
        return
    remote = (
        RedisCache(
            settings.redis_url,
            timeout=settings.redis_timeout_seconds,
            ack_timeout=settings.ack_timeout_seconds,
        )
        if settings.redis_url
        else None
    )
    cache = TwoLevelCache(
        NearCache(settings.near_max_entries, settings.near_max_bytes), remote, ttl_default=60.0
    )
    cache.forget = core.forget_fills
    await cache.start(wait=1.0)
    core.cache = cache
    try:
        yield
    finally:
        core.cache = None
        await cache.close()
