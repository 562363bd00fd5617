"""The document endpoints (create, get, replace, patch, delete, find, count): request
decoding, responses, and ``execute`` (transaction, idempotency key, or plain)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy import context
from proxy.backends.base import Documents
from proxy.config import Limits
from proxy.errors import (
    BadRequest,
    DuplicateId,
    PayloadTooLarge,
    PreconditionFailed,
    UnsupportedMediaType,
)
from proxy.http import monitor
from proxy.http.keys import CONFIG, CORE, RAW_BODY, caller_of
from proxy.http.middleware import JSON, json_response, partition_key
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller
from proxy.query.parse import is_update_document
from proxy.query.spec import (
    MAX_VERSION,
    FindSpec,
    ItemResult,
    StoredReply,
    WriteResult,
    parse_json_text,
)

# ---- request decoding -------------------------------------------------------------------


async def read_json(request: web.Request, limits: Limits | None = None) -> Any:
    if limits is None:
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


def replayed_response(reply: StoredReply, replayed: bool) -> web.Response:
    """The stored answer of an idempotency key, marked when it is a replay."""
    response = web.Response(body=reply.body, status=reply.status, headers=reply.headers)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


# ---- handlers ----------------------------------------------------------------------


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
    core: Core | None = None,
) -> web.Response:
    """Run ``op`` inside the caller's transaction (X-Transaction-Id), or once per
    Idempotency-Key (writes; ``grants`` and ``charge`` judge a replay, see
    ``Core.idempotent``), or plainly."""
    if core is None:
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
    return replayed_response(reply, replayed)


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


async def read_document(
    core: Core,
    caller: Caller,
    collection: str,
    doc_id: str,
    fields: str | None,
    target: Documents | None = None,
) -> web.Response:
    """GET by id: the one handler of the router (``get_one``) and of the fast path
    (``fast_path.Shortcuts``, which awaits this coroutine directly: no extra frame)."""
    return document_response(await core.get(collection, doc_id, fields, target, caller))


async def get_one(request: web.Request) -> web.Response:
    core = request.app[CORE]
    m = request.match_info
    collection, doc_id, fields = m["collection"], m["id"], request.query.get("fields")
    caller = caller_of(request)
    given = request.query.get("partition_key")
    if given is not None:  # reads one partition (the header sets it too: middleware)
        ctx = context.current.get()
        context.current.set(dataclasses.replace(ctx, partition_key=partition_key(given)))
    if "X-Transaction-Id" not in request.headers:  # the hot path: no closure dispatch
        return await read_document(core, caller, collection, doc_id, fields)

    def op(target: Documents | None) -> Awaitable[web.Response]:
        return read_document(core, caller, collection, doc_id, fields, target)

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
    return await _find(core, request, request.match_info["collection"], spec, source)


async def _find(
    core: Core, request: web.Request, collection: str, spec: FindSpec, source: Any
) -> web.Response:
    request[monitor.PATTERN_SOURCE] = source

    async def op(target: Documents | None) -> web.Response:
        page = await core.find(collection, spec, target, caller_of(request))
        request[monitor.DOCUMENTS] = len(page.items)
        return page_response(page.items, page.next)

    return await execute(request, op, write=False, core=core)


async def find_query(core: Core, request: web.Request, collection: str) -> web.Response:
    """``POST /api/db/{collection}/query``: the one handler of the router
    (``query_documents``) and of the fast path (``fast_path.Shortcuts``)."""
    body = await read_json(request, core.limits)
    if not isinstance(body, dict):
        raise BadRequest("the query body must be a JSON object", code="invalid_query")
    return await _find(core, request, collection, core.find_spec(body, from_url=False), body)


async def query_documents(request: web.Request) -> web.Response:
    return await find_query(request.app[CORE], request, request.match_info["collection"])


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
