"""The /api/db/transaction endpoint: a batch of operations, or begin/commit/rollback."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.errors import BadRequest
from proxy.http.documents import fingerprint, owner, read_json, replayed_response
from proxy.http.keys import CORE, caller_of
from proxy.http.middleware import json_response


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
    reply, replayed = await core.run_batch_once(body, key, fingerprint(request), caller_of(request))
    return replayed_response(reply, replayed)


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
