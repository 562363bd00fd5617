"""The document operations of the MongoDB backend, written once for the backend and its
transactions (a session in a transaction, or none)."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from pymongo import ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from proxy import context, numbers
from proxy.backends.mongo.aggregate import MongoAggregate
from proxy.backends.mongo.errors import duplicate
from proxy.config import Limits
from proxy.errors import (
    Conflict,
    DuplicateId,
    DuplicateKey,
    NotFound,
    NumberOutOfRange,
    PreconditionFailed,
    ProxyError,
    UnsupportedByBackend,
)
from proxy.ids import IdGenerator
from proxy.query import cursor as cursors
from proxy.query import mongo as mq
from proxy.query.ast import Filter
from proxy.query.search import SearchHits, SearchRequest
from proxy.query.spec import (
    Change,
    DeclaredKinds,
    FindSpec,
    ItemResult,
    MergePatch,
    Modify,
    Page,
    Preview,
    Replace,
    WriteResult,
    keep_protected,
)

T = TypeVar("T")
Session = AsyncClientSession | None
Op = Callable[[Session], Awaitable[T]]
Query = Callable[[AsyncCollection[Any], Session], Awaitable[T]]  # a read a replica may serve
AUDIT = "_audit"
IDEMPOTENCY = "_idempotency"
_CHANGE_NAMES = {Replace: "replace", Modify: "update", MergePatch: "patch"}
_CAS_ATTEMPTS = 20  # a replace or patch computed on a version that moved: again
_INT64_MAX = 2**63 - 1


_audit_seq = itertools.count(random.randrange(1000))


def audit_id() -> int:
    """An audit record's id: microseconds since the epoch times 1000 plus a per-process
    sequence, so ids grow with time without a shared counter (which every concurrent
    write would conflict on)."""
    return time.time_ns() // 1000 * 1000 + next(_audit_seq) % 1000


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge key by key, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def body_of(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


def _not_found(doc_id: str) -> NotFound:
    return NotFound("no document with this _id", details={"_id": doc_id})


def _version_mismatch() -> PreconditionFailed:
    return PreconditionFailed(
        "the document's version does not match If-Match", code="version_mismatch"
    )


class MongoDocuments(MongoAggregate):
    """The document operations over two primitives: ``_write`` (an operation that changes
    documents, run with its audit record atomically) and ``_read``."""

    def __init__(self, name: str, limits: Limits, ids: IdGenerator, audit: bool) -> None:
        self.name = name
        self.limits = limits
        self.ids = ids
        self.audit = audit
        self.wrote = False

    in_transaction = False  # a MongoTransaction: an error there ends the transaction

    # -- what the backend and a transaction provide ------------------------------------

    @property
    def db(self) -> AsyncDatabase[Any]:
        raise NotImplementedError

    async def _write(self, op: Op[T], audit: Callable[[T], list[str]] | None = None) -> T:
        raise NotImplementedError

    async def _read(self, op: Op[T]) -> T:
        raise NotImplementedError

    def _coll(self, collection: str) -> AsyncCollection[Any]:
        return self.db[collection]

    async def _query(self, collection: str, kind: str, op: Query[T]) -> T:
        """A read of ``kind`` (``point``, ``read``, ``count``…) that the backend routes by
        read preference (``routing.py``); in a transaction, on the transaction's session."""
        coll = self._coll(collection)
        return await self._read(lambda session: op(coll, session))

    def _max_ms(self) -> int:
        return max(1, int(self.limits.statement_timeout_seconds * 1000))

    # -- audit -------------------------------------------------------------------------

    def _audited(
        self, operation: str, collection: str, op: Op[T], written: Callable[[T], list[str]]
    ) -> Op[T]:
        """``op`` followed, with the same session, by its audit record when it changed
        documents (the caller runs both in one transaction)."""
        if not self.audit:
            return op
        ctx = context.current.get()
        service, request_id = ctx.service, ctx.request_id

        async def run(session: Session) -> T:
            result = await op(session)
            ids = written(result)
            if ids:
                await self.audit_record(session, service, operation, collection, ids, request_id)
                self.wrote = True
            return result

        return run

    async def audit_record(
        self,
        session: Session,
        service: str,
        operation: str,
        collection: str,
        ids: list[str],
        request_id: str,
    ) -> None:
        record = {
            "_id": audit_id(),
            "at": time.time(),
            "service": service,
            "operation": operation,
            "collection": collection,
            "ids": ids,
            "request_id": request_id,
            "outcome": "ok",
        }
        await self.db[AUDIT].insert_one(record, session=session)

    # -- inserts -----------------------------------------------------------------------

    def _prepare(self, doc: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        doc_id = doc.get("_id")
        if doc_id is None:
            doc_id = self.ids.new()
        full = {"_id": doc_id, **doc, "_version": 1}
        body = numbers.dumps_document(full)
        return full, body

    async def insert_one(self, collection: str, doc: dict[str, Any]) -> WriteResult:
        full, body = self._prepare(doc)
        coll = self._coll(collection)

        async def run(session: Session) -> None:
            try:
                await coll.insert_one(full, session=session)
            except DuplicateKeyError as exc:
                err = duplicate(exc.details)
                if isinstance(err, DuplicateId):
                    err = DuplicateId(
                        "a document with this _id already exists", details={"_id": full["_id"]}
                    )
                raise err from None

        await self._write(self._audited("create", collection, run, lambda _: [full["_id"]]))
        return WriteResult(body, 1, created=True)

    async def insert_many(self, collection: str, docs: list[dict[str, Any]]) -> list[ItemResult]:
        prepared: list[dict[str, Any] | ItemResult] = []
        for doc in docs:
            try:
                prepared.append(self._prepare(doc)[0])
            except ProxyError as err:
                prepared.append(ItemResult(err.status, doc.get("_id"), error=err.to_dict()))
        batch = [p for p in prepared if isinstance(p, dict)]
        try:
            done = await self._insert_batch(collection, batch) if batch else []
        except DuplicateKey:
            if self.in_transaction:
                raise
            done = [await self._insert_alone(collection, d) for d in batch]
        results = iter(done)
        out: list[ItemResult] = []
        for p in prepared:
            if isinstance(p, ItemResult):
                out.append(p)
                continue
            failed = next(results)
            if failed is None:
                out.append(ItemResult(201, p["_id"], 1))
            else:
                out.append(ItemResult(failed.status, p["_id"], error=failed.to_dict()))
        return out

    async def _insert_alone(self, collection: str, doc: dict[str, Any]) -> ProxyError | None:
        try:
            await self.insert_one(collection, doc)
        except Conflict as err:
            return err
        return None

    async def _insert_batch(
        self, collection: str, batch: list[dict[str, Any]]
    ) -> list[ProxyError | None]:
        """Insert what it can: a repeated ``_id`` (in the batch, the first one wins, or one
        stored already) refuses its own document only. A taken unique key fails the whole
        batch in a transaction (the caller then inserts one by one)."""
        coll = self._coll(collection)

        async def run(session: Session) -> list[ProxyError | None]:
            done: list[ProxyError | None] = [None] * len(batch)
            seen: set[str] = set()
            for i, d in enumerate(batch):
                if d["_id"] in seen:
                    done[i] = _taken(d["_id"])
                seen.add(d["_id"])
            stored = coll.find({"_id": {"$in": list(seen)}}, {"_id": 1}, session=session)
            taken = {row["_id"] for row in await stored.to_list()}
            for i, d in enumerate(batch):
                if d["_id"] in taken:
                    done[i] = _taken(d["_id"])
            fresh = [d for d, err in zip(batch, done, strict=True) if err is None]
            if not fresh:
                return done
            try:
                await coll.insert_many(fresh, ordered=session is not None, session=session)
            except BulkWriteError as exc:
                if session is not None:
                    raise duplicate(exc.details["writeErrors"][0]) from None
                index = [i for i, err in enumerate(done) if err is None]
                for failure in exc.details.get("writeErrors", []):
                    if failure.get("code") != 11000:
                        raise
                    done[index[failure["index"]]] = duplicate(failure)
            return done

        def written(done: list[ProxyError | None]) -> list[str]:
            return [d["_id"] for d, err in zip(batch, done, strict=True) if err is None]

        return await self._write(self._audited("create", collection, run, written))

    # -- reads -------------------------------------------------------------------------

    async def get(self, collection: str, doc_id: str) -> WriteResult | None:
        async def run(coll: AsyncCollection[Any], session: Session) -> Any:
            return await coll.find_one({"_id": doc_id}, session=session)

        found = await self._query(collection, "point", run)
        return None if found is None else WriteResult(body_of(found), int(found["_version"]))

    async def find(self, collection: str, spec: FindSpec) -> Page:
        stages, order = mq.sort_stages(spec.sort)
        tag = cursors.sort_tag(repr(spec.sort))
        match = mq.compile_filter(spec.filter)
        pipeline: list[dict[str, Any]] = [{"$match": match}] if match else []
        pipeline += stages
        if spec.cursor is not None:
            kinds: list[type] = [int, object] * len(spec.sort) + [str]
            values = cursors.decode(spec.cursor, tag, kinds)
            pipeline.append({"$match": mq.after_filter(order, values)})
        pipeline.append({"$sort": order})
        if spec.skip:
            pipeline.append({"$skip": spec.skip})
        pipeline.append({"$limit": spec.limit + 1})
        context.last_statement.set(("mongodb aggregate", (collection,)))

        async def run(coll: AsyncCollection[Any], session: Session) -> list[dict[str, Any]]:
            cur = await coll.aggregate(pipeline, session=session, maxTimeMS=self._max_ms())
            return list(await cur.to_list())

        rows = await self._query(collection, "read", run)
        more = len(rows) > spec.limit
        rows = rows[: spec.limit]
        nxt = None
        if more:
            nxt = cursors.encode(tag, [rows[-1].get(k) for k in order])
        items = []
        for row in rows:
            for k in list(row):
                if k.startswith("__dbproxy_"):
                    del row[k]
            items.append(body_of(row))
        return Page(items, nxt)

    async def count(self, collection: str, flt: Filter, *, kinds: DeclaredKinds = ()) -> int:
        match = mq.compile_filter(flt)

        async def run(coll: AsyncCollection[Any], session: Session) -> int:
            return int(await coll.count_documents(match, session=session, maxTimeMS=self._max_ms()))

        return await self._query(collection, "count", run)

    # -- changes -----------------------------------------------------------------------

    async def change(
        self,
        collection: str,
        doc_id: str,
        change: Change,
        *,
        upsert: bool = False,
        if_match: int | None = None,
        row_filter: Filter | None = None,
    ) -> WriteResult:
        """Replace, update or patch one document; If-Match and ``row_filter`` are part of
        the write's own filter (a miss is then told apart: 404 or 412)."""
        rows = mq.compile_filter(row_filter) if row_filter is not None else None
        if isinstance(change, Modify):
            op: Op[WriteResult] = self._modify(collection, doc_id, change, upsert, if_match, rows)
        else:
            op = self._swap(collection, doc_id, change, upsert, if_match, rows)
        operation = _CHANGE_NAMES[type(change)]
        return await self._write(self._audited(operation, collection, op, lambda _: [doc_id]))

    def _target(
        self, doc_id: str, version: int | None, rows: dict[str, Any] | None
    ) -> dict[str, Any]:
        flt: dict[str, Any] = {"_id": doc_id}
        if version is not None:
            flt["_version"] = version if 0 < version <= _INT64_MAX else -1
        return mq.both(flt, rows)

    def _modify(
        self,
        collection: str,
        doc_id: str,
        change: Modify,
        upsert: bool,
        if_match: int | None,
        rows: dict[str, Any] | None,
    ) -> Op[WriteResult]:
        coll = self._coll(collection)
        update = mq.compile_update(change.update)
        inserting = upsert and if_match is None

        async def run(session: Session) -> WriteResult:
            after = ReturnDocument.AFTER
            found = await coll.find_one_and_update(
                self._target(doc_id, if_match, rows),
                update,
                return_document=after,
                session=session,
            )
            if found is not None:  # a result past the numbers' range undoes the write
                _check_result(found)
                return WriteResult(body_of(found), int(found["_version"]))
            if inserting:  # a filter no stored document meets: an insert or a duplicate
                try:
                    made = await coll.find_one_and_update(
                        {"_id": doc_id, "_version": {"$exists": False}},
                        update,
                        upsert=True,
                        return_document=after,
                        session=session,
                    )
                except DuplicateKeyError:  # it exists, outside the caller's rows
                    raise _not_found(doc_id) from None
                assert made is not None  # an upsert returns what it made
                _check_result(made)
                return WriteResult(body_of(made), int(made["_version"]), created=True)
            await self._explain_miss(coll, session, doc_id, if_match, rows)
            raise AssertionError("unreachable")

        return run

    def _swap(
        self,
        collection: str,
        doc_id: str,
        change: Replace | MergePatch,
        upsert: bool,
        if_match: int | None,
        rows: dict[str, Any] | None,
    ) -> Op[WriteResult]:
        """A replace or a merge patch: computed from the stored version and written only
        over that version (compare and swap), again when the version moved meanwhile."""
        coll = self._coll(collection)
        inserting = upsert and if_match is None

        async def run(session: Session) -> WriteResult:
            for _ in range(_CAS_ATTEMPTS):
                stored = await coll.find_one(self._target(doc_id, None, rows), session=session)
                if stored is None:
                    if not inserting:
                        await self._explain_miss(coll, session, doc_id, if_match, rows)
                    new = _changed({"_id": doc_id}, change, doc_id)
                    new["_version"] = 1
                    numbers.dumps_document(new)  # what may be stored (NUL, numbers)
                    try:
                        await coll.insert_one(new, session=session)
                    except DuplicateKeyError:
                        if session is not None:  # a transaction cannot go on after it
                            raise _not_found(doc_id) from None
                        if await coll.find_one({"_id": doc_id}) is not None and rows:
                            raise _not_found(doc_id) from None
                        continue
                    return WriteResult(body_of(new), 1, created=True)
                version = int(stored["_version"])
                if if_match is not None and version != if_match:
                    raise _version_mismatch()
                new = _changed(stored, change, doc_id)
                new["_version"] = version + 1
                numbers.dumps_document(new)  # what may be stored (NUL, numbers)
                done = await coll.find_one_and_replace(
                    self._target(doc_id, version, rows),
                    new,
                    session=session,
                    return_document=ReturnDocument.AFTER,
                )
                if done is not None:
                    return WriteResult(body_of(done), version + 1)
                if if_match is not None or session is not None:
                    raise _version_mismatch() if if_match is not None else _conflict()
            raise _conflict()

        return run

    async def _explain_miss(
        self,
        coll: AsyncCollection[Any],
        session: Session,
        doc_id: str,
        if_match: int | None,
        rows: dict[str, Any] | None,
    ) -> None:
        """A write matched nothing: missing (or outside the caller's rows: the same
        answer) is 404, a moved version 412."""
        if if_match is not None:
            seen = await coll.find_one(
                self._target(doc_id, None, rows), {"_version": 1}, session=session
            )
            if seen is not None:
                raise _version_mismatch()
        raise _not_found(doc_id)

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        row_filter: Filter | None = None,
    ) -> int:
        coll = self._coll(collection)
        rows = mq.compile_filter(row_filter) if row_filter is not None else None

        async def run(session: Session) -> int:
            gone = await coll.find_one_and_delete(
                self._target(doc_id, if_match, rows), {"_version": 1}, session=session
            )
            if gone is None:
                await self._explain_miss(coll, session, doc_id, if_match, rows)
                raise AssertionError("unreachable")
            return int(gone["_version"])

        return await self._write(self._audited("delete", collection, run, lambda _: [doc_id]))

    async def preview(
        self,
        collection: str,
        doc_id: str,
        change: Change,
        *,
        upsert: bool = False,
        row_filter: Filter | None = None,
    ) -> Preview | None:
        """What ``change`` would make of the document. A replace or patch is computed here
        as ``change`` computes it; an update by the database, in a transaction that is
        aborted (``_preview_update``)."""
        coll = self._coll(collection)
        rows = mq.compile_filter(row_filter) if row_filter is not None else None

        async def run(session: Session) -> Any:
            return await coll.find_one(self._target(doc_id, None, rows), session=session)

        stored = await self._read(run)
        if stored is None:
            exists = await self._read(lambda s: coll.find_one({"_id": doc_id}, session=s))
            if not upsert or exists is not None:
                return None
        if isinstance(change, Modify):
            new = await self._preview_update(collection, doc_id, change, stored is None)
        else:
            new = _changed(stored or {"_id": doc_id}, change, doc_id)
        if stored is None:
            return Preview(None, new, None)
        return Preview(stored, new, int(stored["_version"]))

    async def search(self, request: SearchRequest) -> SearchHits:
        raise UnsupportedByBackend("this database does not support search")

    async def collection_names(self) -> list[str]:
        names = await self._read(lambda s: self.db.list_collection_names(session=s))
        return sorted(n for n in names if not n.startswith("_"))

    async def _preview_update(
        self, collection: str, doc_id: str, change: Modify, insert: bool
    ) -> dict[str, Any]:
        raise NotImplementedError


def _check_result(doc: dict[str, Any]) -> None:
    """An update's result holds only numbers dbproxy stores (a double past its range made
    by $mul or $inc is refused; the caller's transaction then undoes the write)."""
    try:
        numbers.check_value(doc)
    except NumberOutOfRange:
        raise NumberOutOfRange(
            "the result of an $inc or $mul is beyond the range of a double (finite, at most "
            f"{numbers.DOUBLE_MAX!r} in magnitude)"
        ) from None


def _taken(doc_id: str) -> DuplicateId:
    return DuplicateId("a document with this _id already exists", details={"_id": doc_id})


def _conflict() -> Conflict:
    return Conflict(
        "the document kept changing while it was replaced; retry",
        code="write_conflict",
        retryable=True,
    )


def _changed(stored: dict[str, Any], change: Change, doc_id: str) -> dict[str, Any]:
    """The new document of a replace or a merge patch (``_version`` set by the caller)."""
    if isinstance(change, Replace):
        body = {k: v for k, v in change.doc.items() if k not in ("_id", "_version")}
        if change.keep is not None:
            body = keep_protected(stored, body, change.keep)
        new = {"_id": doc_id, **body}
    else:
        assert isinstance(change, MergePatch)
        patched = merge_patch(stored, change.patch)
        new = {"_id": doc_id, **{k: v for k, v in patched.items() if k != "_id"}}
    new.pop("_version", None)
    return new
