"""Document operations, each through the one pipeline sequence: decide → validate → limit →
cache → route/backend → present. Knows no HTTP."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Final, TypeVar

from proxy import numbers
from proxy.backends.base import Backend, Documents, check_collection
from proxy.cache.read_through import ReadThrough
from proxy.config import Limits
from proxy.errors import (
    BadRequest,
    Conflict,
    DuplicateId,
    LimitExceeded,
    NotFound,
    PreconditionFailed,
    ProxyError,
)
from proxy.pipeline.gate import OPEN, Caller, Gatekeeper
from proxy.pipeline.schemas import ActiveSchema, SchemaRegistry
from proxy.policy.decide import Decision
from proxy.query.ast import And, Eq, FieldCond, Filter, Path
from proxy.query.parse import is_update_document, parse_fields, parse_filter, parse_update
from proxy.query.project import project
from proxy.query.spec import (
    Change,
    FindSpec,
    ItemResult,
    MergePatch,
    Modify,
    Page,
    Replace,
    WriteResult,
    build_find_spec,
    check_id,
)

T = TypeVar("T")
P = TypeVar("P")

SYSTEM_FIELDS: Final = ("_id", "_version")
# how often a checked change is computed again when the document moved under it
CHECKED_CHANGE_ATTEMPTS: Final = 10


class DocumentOps:
    """create / get / replace_or_update / merge_patch / delete / find / count."""

    gate: Gatekeeper
    limits: Limits
    reads: ReadThrough
    backend: Callable[[], Backend]
    schemas: SchemaRegistry

    async def active_schema(self, collection: str) -> ActiveSchema | None:
        """The collection's schema on the database this core writes to (None: schemaless)."""
        return await self.schemas.of(self.backend(), collection)

    # -- the sequence ------------------------------------------------------------------

    def decide(
        self,
        caller: Caller,
        collection: str,
        operation: str,
        target: Documents | None,
        doc_id: str | None = None,
    ) -> Decision:
        """Step 1: the names (collection, id), then the compiled decision: the grant, and
        the transaction grant too when the operation runs inside one."""
        check_collection(collection)
        if doc_id is not None:
            check_id(doc_id)
        decision = caller.decisions.get(collection, operation)
        decision.authorize(in_transaction=target is not None)
        return decision

    async def limit(self, caller: Caller, operation: str, rows: int = 0, units: int = 1) -> None:
        """Step 3: the service's rate limits (after validation: bad input costs nothing)."""
        if caller.metered:
            await self.gate.admit(caller, operation, rows=rows, cost_units=units)

    async def _through(
        self,
        caller: Caller,
        decision: Decision,
        validate: Callable[[Decision], P],
        work: Callable[[P], Awaitable[T]],
        *,
        rows: int = 0,
        units: int = 1,
    ) -> T:
        """Steps 2-5 for an operation already decided: validate, limit, then the work
        (cache, backend) with what validation prepared."""
        prepared = validate(decision)
        await self.limit(caller, decision.operation, rows, units)
        return await work(prepared)

    def _docs(self, target: Documents | None) -> Documents:
        return target if target is not None else self.backend()

    # -- writes ------------------------------------------------------------------------

    async def create(
        self,
        collection: str,
        body: Any,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult | list[ItemResult]:
        d = self.decide(caller, collection, "create", target)
        docs = self._docs(target)
        active = await self.active_schema(collection)
        if isinstance(body, list):
            if not body:
                raise BadRequest("a bulk create needs at least one document", code="empty_batch")
            if len(body) > self.limits.max_batch_items:
                raise LimitExceeded(
                    f"at most {self.limits.max_batch_items} documents per request",
                    code="batch_too_large",
                )

            async def insert_many(slots: list[dict[str, Any] | ItemResult]) -> list[ItemResult]:
                return await _insert_many(docs, collection, slots)

            def validate_many(d: Decision) -> list[dict[str, Any] | ItemResult]:
                return [_item(d, item, caller, active, self.schemas) for item in body]

            return await self._through(caller, d, validate_many, insert_many, units=len(body))

        async def insert(doc: dict[str, Any]) -> WriteResult:
            return _visible(d, await docs.insert_one(collection, doc))

        def validate(d: Decision) -> dict[str, Any]:
            doc = _new_document(d, body, caller)
            return doc if active is None else active.new_document(doc, self.schemas)

        return await self._through(caller, d, validate, insert)

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
    ) -> WriteResult:
        d = self.decide(caller, collection, "update", target, doc_id)
        if upsert:
            caller.decisions.get(collection, "create").authorize()
        active = await self.active_schema(collection)

        def validate(d: Decision) -> Change:
            if is_update_document(body):
                update = parse_update(body, self.limits)
                d.check_update(update, upsert, caller.headers)
                return Modify(update)
            doc = _new_document(d, body, caller)
            if doc.pop("_id", doc_id) != doc_id:
                raise BadRequest("the body's _id differs from the URL's", code="id_mismatch")
            replace = Replace(doc, d.keep)
            if active is not None and not active.needs_stored(replace, upsert):
                active.enforce({"_id": doc_id, **doc}, None, self.schemas)  # the body is all
            return replace

        async def change(change: Change) -> WriteResult:
            return await self._change(d, caller, target, doc_id, change, upsert, if_match, active)

        return await self._through(caller, d, validate, change)

    async def merge_patch(
        self,
        collection: str,
        doc_id: str,
        body: Any,
        *,
        if_match: int | None = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult:
        d = self.decide(caller, collection, "update", target, doc_id)

        def validate(d: Decision) -> Change:
            if not isinstance(body, dict):
                raise BadRequest("a merge patch must be a JSON object", code="invalid_patch")
            for key in SYSTEM_FIELDS:
                if key in body and not (key == "_id" and body[key] == doc_id):
                    raise BadRequest(f"a merge patch cannot change {key}", code="immutable_field")
            patch = {k: v for k, v in body.items() if k not in SYSTEM_FIELDS}
            _check_keys(patch)
            d.check_patch(patch, caller.headers)
            return MergePatch(patch)

        async def change(change: Change) -> WriteResult:
            active = await self.active_schema(collection)
            return await self._change(d, caller, target, doc_id, change, False, if_match, active)

        return await self._through(caller, d, validate, change)

    async def _change(
        self,
        d: Decision,
        caller: Caller,
        target: Documents | None,
        doc_id: str,
        change: Change,
        upsert: bool,
        if_match: int | None,
        active: ActiveSchema | None,
    ) -> WriteResult:
        rows = d.row_filter(caller.headers)
        docs = self._docs(target)
        checked = active is not None and active.needs_stored(change, upsert)
        if active is not None and checked and target is not None:
            result = await self._checked_change(
                active, docs, d, doc_id, change, upsert, if_match, rows
            )
        elif active is not None and checked:
            # one checked change per document at a time in this process: they would only
            # make each other compute again (other sidecars' are caught by If-Match)
            async with self.schemas.document_lock(d.collection, doc_id):
                result = await self._checked_change(
                    active, docs, d, doc_id, change, upsert, if_match, rows
                )
        else:
            result = await docs.change(
                d.collection, doc_id, change, upsert=upsert, if_match=if_match, row_filter=rows
            )
        await self.reads.written(target, d.collection, doc_id, result.version)
        return _visible(d, result)

    async def _checked_change(
        self,
        active: ActiveSchema,
        docs: Documents,
        d: Decision,
        doc_id: str,
        change: Change,
        upsert: bool,
        if_match: int | None,
        rows: Filter | None = None,
    ) -> WriteResult:
        """A change whose result the schema must see first: the database computes the
        document the change would make (``preview``), the schema checks it, and the same
        change is written with If-Match on the version it was computed from, so what is
        written is what was checked; when the document moved in between, again."""
        collection = d.collection
        inserting = upsert and if_match is None
        for attempt in range(CHECKED_CHANGE_ATTEMPTS):
            seen = await docs.preview(collection, doc_id, change, upsert=inserting, row_filter=rows)
            if seen is None:
                raise NotFound("no document with this _id", details={"_id": doc_id})
            if seen.old is None:  # the upsert creates it: a new document, with defaults
                doc = active.new_document(
                    {k: v for k, v in seen.new.items() if k != "_version"}, self.schemas
                )
                try:
                    return await docs.insert_one(collection, doc)
                except DuplicateId:
                    continue  # created meanwhile: now it is an update
            if if_match is not None and seen.version != if_match:
                raise PreconditionFailed(
                    "the document's version does not match If-Match", code="version_mismatch"
                )
            active.enforce(seen.new, seen.old, self.schemas, d.readable)
            try:
                return await docs.change(
                    collection, doc_id, change, if_match=seen.version, row_filter=rows
                )
            except PreconditionFailed:
                if if_match is not None:
                    raise
            await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))  # spread contenders
        raise Conflict(
            "the document kept changing while its change was checked against the schema",
            code="write_conflict",
            retryable=True,
        )

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> int:
        d = self.decide(caller, collection, "delete", target, doc_id)

        async def delete(rows: Filter | None) -> int:
            version = await self._docs(target).delete(
                collection, doc_id, if_match=if_match, row_filter=rows
            )
            await self.reads.written(target, collection, doc_id, version + 1)
            return version

        return await self._through(caller, d, lambda d: d.row_filter(caller.headers), delete)

    # -- reads -------------------------------------------------------------------------

    async def get(
        self,
        collection: str,
        doc_id: str,
        fields: Any = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult:
        check_collection(collection)
        check_id(doc_id)
        d = caller.decisions.get(collection, "read")
        if d.plain and target is None and not fields:
            # the common case, the same sequence in one lookup: granted, nothing to
            # validate, filter or hide; limit (inlined), then the cache and the database
            if caller.metered:
                await self.gate.admit(caller, "read")
            found = await self.reads.get(collection, doc_id, self.backend(), None)
            if found is None:
                raise NotFound("no document with this _id", details={"_id": doc_id})
            return found
        d.authorize(in_transaction=target is not None)

        def validate(d: Decision) -> tuple[Path, ...] | None:
            paths = parse_fields(fields, self.limits)
            d.check_fields(paths)
            return paths

        async def read(paths: tuple[Path, ...] | None) -> WriteResult:
            return await self._read_by_id(d, caller, doc_id, paths, target)

        return await self._through(caller, d, validate, read)

    async def _read_by_id(
        self,
        d: Decision,
        caller: Caller,
        doc_id: str,
        paths: tuple[Path, ...] | None,
        target: Documents | None,
    ) -> WriteResult:
        rows = d.row_filter(caller.headers)
        if rows is None:
            found = await self.reads.get(d.collection, doc_id, self.backend(), target)
        else:  # row rules are checked by the database, never against a cached copy
            by_id = FieldCond(Path(("_id",)), (Eq(doc_id),))
            spec = FindSpec(filter=And((by_id, rows)), limit=1)
            page = await self._docs(target).find(d.collection, spec)
            found = None
            if page.items:
                version = numbers.loads_stored(page.items[0])["_version"]
                found = WriteResult(page.items[0], int(version))
        result = _found(found, doc_id)
        if not paths and d.readable is None:
            return result  # nothing to hide: send the stored JSON text as it is
        doc = d.visible(numbers.loads_stored(result.body))
        if paths:
            doc = project(doc, paths)
        return WriteResult(numbers.dumps_stored(doc), result.version)

    def find_spec(self, raw: Mapping[str, Any], *, from_url: bool) -> FindSpec:
        return build_find_spec(raw, self.limits, from_url=from_url)

    async def find(
        self,
        collection: str,
        spec: FindSpec,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> Page:
        d = self.decide(caller, collection, "list", target)
        active = await self.active_schema(collection)
        kinds = active.kinds if active is not None else ()

        def validate(d: Decision) -> FindSpec:
            d.check_filter(spec.filter)
            d.check_sort(spec.sort)
            d.check_fields(spec.fields)
            self.gate.check_row_limit(caller, spec.limit)
            rows = d.row_filter(caller.headers)
            guarded = spec if rows is None else replace(spec, filter=And((spec.filter, rows)))
            # the declared scalar paths: compiled on the indexed expressions
            return replace(guarded, kinds=kinds) if kinds else guarded

        async def find(guarded: FindSpec) -> Page:
            return _present_page(d, spec.fields, await self._docs(target).find(collection, guarded))

        return await self._through(caller, d, validate, find, rows=spec.limit)

    async def count(
        self,
        collection: str,
        raw_filter: Any,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> int:
        check_collection(collection)
        flt = parse_filter(raw_filter, self.limits)
        d = self.decide(caller, collection, "count", target)

        def validate(d: Decision) -> Filter:
            d.check_filter(flt)
            rows = d.row_filter(caller.headers)
            return flt if rows is None else And((flt, rows))

        active = await self.active_schema(collection)
        kinds = active.kinds if active is not None else ()

        async def count(guarded: Filter) -> int:
            return await self._docs(target).count(collection, guarded, kinds=kinds)

        return await self._through(caller, d, validate, count)


# ---- validation and presentation -----------------------------------------------------


def _new_document(d: Decision, body: Any, caller: Caller) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("a document must be a JSON object", code="invalid_document")
    if "_id" in body:
        check_id(body["_id"])
    _check_keys(body)
    d.check_document(body, caller.headers)
    return {k: v for k, v in body.items() if k != "_version"}


def _item(
    d: Decision,
    item: Any,
    caller: Caller,
    active: ActiveSchema | None,
    registry: SchemaRegistry,
) -> dict[str, Any] | ItemResult:
    """One document of a bulk create, or its own failure (a forbidden one refuses all)."""
    try:
        doc = _new_document(d, item, caller)
        return doc if active is None else active.new_document(doc, registry)
    except ProxyError as err:
        if err.status == 403:
            raise
        item_id = item.get("_id") if isinstance(item, dict) else None
        return ItemResult(
            err.status, item_id if isinstance(item_id, str) else None, error=err.to_dict()
        )


async def _insert_many(
    docs: Documents, collection: str, slots: list[dict[str, Any] | ItemResult]
) -> list[ItemResult]:
    valid = [s for s in slots if not isinstance(s, ItemResult)]
    results = iter(await docs.insert_many(collection, valid) if valid else [])
    return [s if isinstance(s, ItemResult) else next(results) for s in slots]


def _found(found: WriteResult | None, doc_id: str) -> WriteResult:
    if found is None:
        raise NotFound("no document with this _id", details={"_id": doc_id})
    return found


def _visible(d: Decision, result: WriteResult) -> WriteResult:
    if d.readable is None:
        return result
    doc = d.visible(numbers.loads_stored(result.body))
    return WriteResult(numbers.dumps_stored(doc), result.version, result.created)


def _present_page(d: Decision, fields: tuple[Path, ...] | None, page: Page) -> Page:
    if fields is None and d.readable is None:
        return page
    items = []
    for raw in page.items:
        doc = d.visible(numbers.loads_stored(raw))
        items.append(numbers.dumps_stored(project(doc, fields) if fields else doc))
    return Page(items, page.next)


def _check_keys(doc: dict[str, Any]) -> None:
    """Top-level field names may not be empty or start with '$' (they would read as operators)."""
    for key in doc:
        if not key or key.startswith("$") or "\x00" in key:
            raise BadRequest(
                f"field name {key!r:.60} is not allowed (empty, NUL, or starting with '$')",
                code="invalid_field_name",
            )
