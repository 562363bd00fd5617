"""The batch planner and runner: a list of operations checked before any work, then run in
order on one transaction, resolving ``$ref``s to earlier results (docs/transactions.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from proxy import numbers
from proxy.backends.base import Documents
from proxy.errors import BadRequest, LimitExceeded, ProxyError
from proxy.pipeline.gate import OPEN, Caller
from proxy.query.spec import MAX_VERSION, FindSpec, ItemResult, Page, WriteResult


class BatchTarget(Protocol):
    """The document operations a batch runs (the pipeline's, so each is judged alike)."""

    async def create(
        self, collection: str, body: Any, target: Documents | None = None, caller: Caller = OPEN
    ) -> WriteResult | list[ItemResult]: ...

    async def get(
        self,
        collection: str,
        doc_id: str,
        fields: Any = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult: ...

    async def replace_or_update(
        self,
        collection: str,
        doc_id: str,
        body: Any,
        *,
        upsert: bool = False,
        if_match: int | None = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult: ...

    async def merge_patch(
        self,
        collection: str,
        doc_id: str,
        body: Any,
        *,
        if_match: int | None = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult: ...

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> int: ...

    def find_spec(self, raw: Mapping[str, Any], *, from_url: bool) -> FindSpec: ...

    async def find(
        self,
        collection: str,
        spec: FindSpec,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> Page: ...

    async def count(
        self,
        collection: str,
        raw_filter: Any,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> int: ...


OPS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # op: (required fields, optional fields) besides "op" and "collection"
    "create": (frozenset({"document"}), frozenset()),
    "get": (frozenset({"id"}), frozenset({"fields"})),
    "replace": (frozenset({"id", "document"}), frozenset({"upsert", "if_match"})),
    "update": (frozenset({"id", "update"}), frozenset({"upsert", "if_match"})),
    "patch": (frozenset({"id", "patch"}), frozenset({"if_match"})),
    "delete": (frozenset({"id"}), frozenset({"if_match"})),
    "query": (frozenset(), frozenset({"filter", "sort", "limit", "skip", "fields", "next"})),
    "count": (frozenset(), frozenset({"filter"})),
}
# op -> the operation a policy must grant on its collection (and the gatekeeper charges)
GRANTS = {
    "create": "create",
    "get": "read",
    "replace": "update",
    "update": "update",
    "patch": "update",
    "delete": "delete",
    "query": "list",
    "count": "count",
}
ISOLATION = ("read_committed", "repeatable_read", "serializable")
FIND_FIELDS = ("filter", "sort", "limit", "skip", "fields", "next")


@dataclass(frozen=True, slots=True)
class BatchRequest:
    operations: list[dict[str, Any]]
    isolation: str


def parse_batch(body: Any, max_ops: int) -> BatchRequest:
    """Check the whole batch's shape before any database work."""
    if not isinstance(body, dict):
        raise BadRequest("a transaction body must be a JSON object", code="invalid_transaction")
    unknown = set(body) - {"operations", "isolation", "action"}
    if unknown:
        raise BadRequest(
            f"unknown field(s): {', '.join(sorted(unknown))[:200]}", code="unknown_parameter"
        )
    ops = body.get("operations")
    if not isinstance(ops, list) or not ops:
        raise BadRequest("operations must be a non-empty array", code="invalid_transaction")
    if len(ops) > max_ops:
        raise LimitExceeded(
            f"at most {max_ops} operations per transaction", code="too_many_operations"
        )
    isolation = parse_isolation(body.get("isolation"))
    for i, op in enumerate(ops):
        _check_op(i, op)
    return BatchRequest(ops, isolation)


def grants_of(ops: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every (collection, operation) grant a checked batch needs, transaction included."""
    out: list[tuple[str, str]] = []
    for op in ops:
        collection = op["collection"]
        out += [(collection, GRANTS[op["op"]]), (collection, "transaction")]
        if op.get("upsert") is True:
            out.append((collection, "create"))
    return out


def parse_isolation(raw: Any) -> str:
    if raw is None:
        return "read_committed"
    if raw not in ISOLATION:
        raise BadRequest(
            f"isolation must be one of {', '.join(ISOLATION)}", code="invalid_isolation"
        )
    return str(raw)


def _check_op(i: int, op: Any) -> None:
    def bad(msg: str) -> BadRequest:
        return BadRequest(
            f"operation {i}: {msg}", code="invalid_operation", details={"operation": i}
        )

    if not isinstance(op, dict):
        raise bad("must be an object")
    name = op.get("op")
    if name not in OPS:
        raise bad(f"op must be one of {', '.join(OPS)}")
    if not isinstance(op.get("collection"), str):
        raise bad("collection is required")
    required, optional = OPS[name]
    keys = set(op) - {"op", "collection"}
    missing = required - keys
    if missing:
        raise bad(f"{name} needs {', '.join(sorted(missing))}")
    extra = keys - required - optional
    if extra:
        raise bad(f"{name} does not take {', '.join(sorted(extra))}")


def charges(ops: list[dict[str, Any]], default_limit: int) -> list[tuple[str, int]]:
    """What each operation of a (parsed) batch is charged as: (operation, rows)."""
    out = []
    for op in ops:
        rows = 0
        if op["op"] == "query":
            limit = op.get("limit")
            ok = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
            rows = int(limit) if ok else default_limit  # type: ignore[arg-type]
        out.append((GRANTS[op["op"]], rows))
    return out


class _Results:
    """Results so far, for references from later operations."""

    def __init__(self) -> None:
        self.docs: list[bytes | None] = []
        self._parsed: dict[int, Any] = {}

    def resolve(self, value: Any, at: int) -> Any:
        if isinstance(value, dict):
            if set(value) == {"$ref"}:
                return self._lookup(value["$ref"], at)
            return {k: self.resolve(v, at) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, at) for v in value]
        return value

    def _lookup(self, ref: Any, at: int) -> Any:
        index, path = (ref, "_id") if isinstance(ref, int) else (None, None)
        if isinstance(ref, list) and len(ref) == 2 and isinstance(ref[1], str):
            index, path = ref
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < at:
            raise BadRequest(
                f"operation {at}: $ref must name an earlier operation", code="invalid_reference"
            )
        raw = self.docs[index]
        if raw is None:
            raise BadRequest(
                f"operation {at}: operation {index} returned no document", code="invalid_reference"
            )
        doc = self._parsed.setdefault(index, numbers.loads_stored(raw))
        assert path is not None
        for seg in path.split("."):
            if not isinstance(doc, dict) or seg not in doc:
                raise BadRequest(
                    f"operation {at}: operation {index}'s document has no {path!r}",
                    code="invalid_reference",
                )
            doc = doc[seg]
        return doc


async def run_operations(
    core: BatchTarget, ops: list[dict[str, Any]], tx: Documents, caller: Caller = OPEN
) -> list[Any]:
    """Run the operations in order on ``tx``; the first failure raises, naming its index."""
    results = _Results()
    out: list[Any] = []
    for i, raw in enumerate(ops):
        op = {k: results.resolve(v, i) if k != "op" else v for k, v in raw.items()}
        try:
            reply, doc = await _RUNNERS[op["op"]](core, op, tx, caller)
        except ProxyError as err:
            err.details = {**err.details, "operation": i, "op": op["op"]}
            err.message = f"operation {i} ({op['op']}): {err.message}"
            raise
        results.docs.append(doc)
        out.append(reply)
    return out


def _doc_reply(result: WriteResult, status: int = 200) -> tuple[dict[str, Any], bytes]:
    return {"status": status, "document": orjson.Fragment(result.body)}, result.body


Runner = Callable[
    [BatchTarget, dict[str, Any], Documents, Caller],
    Awaitable[tuple[dict[str, Any], bytes | None]],
]


async def _create(
    core: BatchTarget, op: dict[str, Any], tx: Documents, caller: Caller
) -> tuple[dict[str, Any], bytes]:
    if not isinstance(op["document"], dict):
        raise BadRequest("document must be an object", code="invalid_document")
    result = await core.create(op["collection"], op["document"], target=tx, caller=caller)
    assert not isinstance(result, list | ItemResult)
    return _doc_reply(result, 201)


async def _get(
    core: BatchTarget, op: dict[str, Any], tx: Documents, caller: Caller
) -> tuple[dict[str, Any], bytes]:
    result = await core.get(op["collection"], op["id"], op.get("fields"), tx, caller)
    return _doc_reply(result)


async def _replace(
    core: BatchTarget, op: dict[str, Any], tx: Documents, caller: Caller
) -> tuple[dict[str, Any], bytes]:
    body = op.get("document", op.get("update"))
    if op["op"] == "update" and not (
        isinstance(body, dict) and all(k.startswith("$") for k in body)
    ):
        raise BadRequest("update takes update operators ($set, $inc, ...)", code="invalid_update")
    if op["op"] == "replace" and isinstance(body, dict) and any(k.startswith("$") for k in body):
        raise BadRequest("replace takes a whole document; use op update", code="invalid_document")
    result = await core.replace_or_update(
        op["collection"],
        op["id"],
        body,
        upsert=op.get("upsert") is True,
        if_match=_if_match(op),
        target=tx,
        caller=caller,
    )
    return _doc_reply(result, 201 if result.created else 200)


async def _patch(
    core: BatchTarget, op: dict[str, Any], tx: Documents, caller: Caller
) -> tuple[dict[str, Any], bytes]:
    result = await core.merge_patch(
        op["collection"], op["id"], op["patch"], if_match=_if_match(op), target=tx, caller=caller
    )
    return _doc_reply(result)


async def _delete(
    core: BatchTarget, op: dict[str, Any], tx: Documents, caller: Caller
) -> tuple[dict[str, Any], None]:
    version = await core.delete(
        op["collection"], op["id"], if_match=_if_match(op), target=tx, caller=caller
    )
    return {"status": 200, "deleted": True, "_id": op["id"], "_version": version}, None


async def _query(
    core: BatchTarget, op: dict[str, Any], tx: Documents, caller: Caller
) -> tuple[dict[str, Any], None]:
    spec = core.find_spec({k: op[k] for k in FIND_FIELDS if k in op}, from_url=False)
    page = await core.find(op["collection"], spec, tx, caller)
    items = [orjson.Fragment(b) for b in page.items]
    return {"status": 200, "items": items, "next": page.next}, None


async def _count(
    core: BatchTarget, op: dict[str, Any], tx: Documents, caller: Caller
) -> tuple[dict[str, Any], None]:
    n = await core.count(op["collection"], op.get("filter"), tx, caller)
    return {"status": 200, "count": n}, None


def _if_match(op: dict[str, Any]) -> int | None:
    value = op.get("if_match")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VERSION:
        raise BadRequest("if_match must be a version number", code="invalid_if_match")
    return value


_RUNNERS: dict[str, Runner] = {
    "create": _create,
    "get": _get,
    "replace": _replace,
    "update": _replace,
    "patch": _patch,
    "delete": _delete,
    "query": _query,
    "count": _count,
}
