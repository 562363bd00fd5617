"""The operation pipeline: validate an operation, pick its backend, run it. Knows no HTTP."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson

from proxy.backends.base import Backend, Documents, Transaction, check_collection
from proxy.batch import parse_batch, parse_isolation, run_operations
from proxy.config import Config
from proxy.errors import BadRequest, LimitExceeded, NotFound, ProxyError
from proxy.ops import (
    Change,
    FindSpec,
    ItemResult,
    MergePatch,
    Modify,
    Page,
    Replace,
    StoredReply,
    WriteResult,
    build_find_spec,
    check_id,
)
from proxy.query.parse import is_update_document, parse_filter, parse_update
from proxy.query.project import project
from proxy.transactions import TransactionRegistry

T = TypeVar("T")

log = logging.getLogger(__name__)

SYSTEM_FIELDS = ("_id", "_version")


class Core:
    """Runs document operations against the configured backends."""

    def __init__(self, config: Config, backends: Mapping[str, Backend], default: str) -> None:
        self.config = config
        self.limits = config.limits
        self.backends = dict(backends)
        self.default = default
        lim = config.limits
        self.transactions = TransactionRegistry(
            idle_timeout=lim.transaction_idle_timeout_seconds,
            max_lifetime=lim.transaction_max_lifetime_seconds,
            max_open=lim.max_open_transactions,
        )

    def backend(self, database: str | None = None) -> Backend:
        name = database or self.default
        try:
            return self.backends[name]
        except KeyError:
            raise NotFound(f"no database named {name!r:.80}", code="unknown_database") from None

    # -- writes ----------------------------------------------------------------------

    async def create(
        self, collection: str, body: Any, target: Documents | None = None
    ) -> WriteResult | list[ItemResult]:
        check_collection(collection)
        docs = target or self.backend()
        if isinstance(body, list):
            if not body:
                raise BadRequest("a bulk create needs at least one document", code="empty_batch")
            if len(body) > self.limits.max_batch_items:
                raise LimitExceeded(
                    f"at most {self.limits.max_batch_items} documents per request",
                    code="batch_too_large",
                )
            return await self._create_many(collection, body, docs)
        return await docs.insert_one(collection, self._new_document(body))

    async def _create_many(
        self, collection: str, body: list[Any], docs_target: Documents
    ) -> list[ItemResult]:
        docs: list[dict[str, Any]] = []
        slots: list[ItemResult | None] = []
        for item in body:
            try:
                docs.append(self._new_document(item))
                slots.append(None)
            except ProxyError as err:
                item_id = item.get("_id") if isinstance(item, dict) else None
                slots.append(
                    ItemResult(
                        err.status,
                        item_id if isinstance(item_id, str) else None,
                        error=err.to_dict(),
                    )
                )
        results = iter(await docs_target.insert_many(collection, docs) if docs else [])
        return [slot if slot is not None else next(results) for slot in slots]

    def _new_document(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequest("a document must be a JSON object", code="invalid_document")
        if "_id" in body:
            check_id(body["_id"])
        _check_keys(body)
        return {k: v for k, v in body.items() if k != "_version"}

    async def replace_or_update(
        self,
        collection: str,
        doc_id: str,
        body: Any,
        *,
        upsert: bool = False,
        if_match: int | None = None,
        target: Documents | None = None,
    ) -> WriteResult:
        check_collection(collection)
        check_id(doc_id)
        change: Change
        if is_update_document(body):
            change = Modify(parse_update(body, self.limits))
        else:
            change = Replace(self._replacement(body, doc_id))
        return await (target or self.backend()).change(
            collection, doc_id, change, upsert=upsert, if_match=if_match
        )

    def _replacement(self, body: Any, doc_id: str) -> dict[str, Any]:
        doc = self._new_document(body)
        if doc.pop("_id", doc_id) != doc_id:
            raise BadRequest("the body's _id differs from the URL's", code="id_mismatch")
        return doc

    async def merge_patch(
        self,
        collection: str,
        doc_id: str,
        body: Any,
        *,
        if_match: int | None = None,
        target: Documents | None = None,
    ) -> WriteResult:
        check_collection(collection)
        check_id(doc_id)
        if not isinstance(body, dict):
            raise BadRequest("a merge patch must be a JSON object", code="invalid_patch")
        for key in SYSTEM_FIELDS:
            if key in body and not (key == "_id" and body[key] == doc_id):
                raise BadRequest(f"a merge patch cannot change {key}", code="immutable_field")
        patch = {k: v for k, v in body.items() if k not in SYSTEM_FIELDS}
        _check_keys(patch)
        return await (target or self.backend()).change(
            collection, doc_id, MergePatch(patch), if_match=if_match
        )

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        target: Documents | None = None,
    ) -> int:
        check_collection(collection)
        check_id(doc_id)
        return await (target or self.backend()).delete(collection, doc_id, if_match=if_match)

    # -- reads -----------------------------------------------------------------------

    async def get(
        self, collection: str, doc_id: str, fields: Any = None, target: Documents | None = None
    ) -> WriteResult:
        check_collection(collection)
        check_id(doc_id)
        found = await (target or self.backend()).get(collection, doc_id)
        if found is None:
            raise NotFound("no document with this _id", details={"_id": doc_id})
        if fields:
            spec = build_find_spec({"fields": fields}, self.limits, from_url=True)
            assert spec.fields is not None
            body = orjson.dumps(project(orjson.loads(found.body), spec.fields))
            return WriteResult(body, found.version)
        return found

    def find_spec(self, raw: Mapping[str, Any], *, from_url: bool) -> FindSpec:
        return build_find_spec(raw, self.limits, from_url=from_url)

    async def find(self, collection: str, spec: FindSpec, target: Documents | None = None) -> Page:
        check_collection(collection)
        page = await (target or self.backend()).find(collection, spec)
        if spec.fields is None:
            return page
        fields = spec.fields
        return Page([orjson.dumps(project(orjson.loads(b), fields)) for b in page.items], page.next)

    async def count(self, collection: str, raw_filter: Any, target: Documents | None = None) -> int:
        check_collection(collection)
        flt = parse_filter(raw_filter, self.limits)
        return await (target or self.backend()).count(collection, flt)

    # -- transactions ------------------------------------------------------------------

    async def begin(self, owner: str, isolation: Any = None) -> str:
        entry = await self.transactions.begin(self.backend(), parse_isolation(isolation), owner)
        return entry.id

    async def run_batch(self, body: Any) -> list[Any]:
        """All or nothing: every operation's result, or the first failure (rolled back)."""
        req = parse_batch(body, self.limits.max_transaction_operations)
        return await self.transact(
            req.isolation, lambda tx: run_operations(self, req.operations, tx)
        )

    async def transact(self, isolation: str, work: Callable[[Transaction], Awaitable[T]]) -> T:
        tx = await self.backend().begin(isolation)
        try:
            result = await work(tx)
            await tx.commit()
        except BaseException:
            await tx.rollback()  # no-op once committed; shielded from cancellation
            raise
        return result

    async def idempotent(
        self,
        key: str,
        fingerprint: str,
        produce: Callable[[Documents], Awaitable[StoredReply]],
        isolation: str = "read_committed",
    ) -> tuple[StoredReply, bool]:
        """Run ``produce`` once per key: the reply is stored in the same transaction as the
        write, and a retry with the same key and request gets it back (replayed=True)."""
        if not key or len(key) > 255 or not key.isprintable():
            raise BadRequest(
                "Idempotency-Key must be 1-255 printable characters", code="invalid_idempotency_key"
            )
        ttl = self.limits.idempotency_ttl_seconds

        async def work(tx: Transaction) -> tuple[StoredReply, bool]:
            prior = await tx.idem_claim(key, fingerprint, ttl)
            if prior is not None:
                return prior, True
            reply = await produce(tx)
            await tx.idem_save(key, reply)
            return reply, False

        return await self.transact(isolation, work)

    async def maintain(self) -> None:
        for backend in self.backends.values():
            try:
                await backend.maintain()
            except ProxyError as err:
                log.warning("housekeeping of %s failed: %s", backend.name, err.code)

    # -- health ----------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict[str, Any]]:
        databases = {name: await b.health() for name, b in self.backends.items()}
        ready = all(d.get("status") == "up" for d in databases.values())
        return ready, {"status": "ready" if ready else "unavailable", "databases": databases}


def _check_keys(doc: dict[str, Any]) -> None:
    """Top-level field names may not be empty or start with '$' (they would read as operators)."""
    for key in doc:
        if not key or key.startswith("$") or "\x00" in key:
            raise BadRequest(
                f"field name {key!r:.60} is not allowed (empty, NUL, or starting with '$')",
                code="invalid_field_name",
            )
