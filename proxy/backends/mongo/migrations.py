"""Migrations on MongoDB: ``_migrations`` records, a leased lock document, and a migration's
transactions (data in a server transaction; index and collection changes undone on failure)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import orjson
from pymongo.errors import CollectionInvalid, DuplicateKeyError, OperationFailure, PyMongoError

from proxy.backends.migrations import Batch, physical_index_name
from proxy.backends.mongo.errors import translate
from proxy.backends.mongo.sharding import refuse_or_shard
from proxy.backends.mongo.validator import collmod
from proxy.errors import BadRequest, Conflict, DuplicateKey, ProxyError, SchemaViolation
from proxy.query import mongo as mq
from proxy.query.ast import Filter, Update
from proxy.schema.model import IndexSpec, SearchDeclaration, parse_schema
from proxy.schema.partitioning import Partitioning

log = logging.getLogger(__name__)

MIGRATIONS: Final = "_migrations"
SCHEMAS: Final = "_schemas"
LOCK: Final = "_migration_lock"
LEASE_SECONDS: Final = 5.0  # a dead runner's lock is free again after it
LEASE: Final = LEASE_SECONDS
_DDL_MS: Final = 60_000
_INDEX_OPTIONS: Final = ("key", "name", "unique", "partialFilterExpression")
Undo = Callable[[], Awaitable[Any]]


def index_command(collection: str, index: IndexSpec) -> dict[str, Any]:
    """The createIndexes entry of a declared index (partial filter compiled from its AST)."""
    from proxy.config import Limits
    from proxy.query.parse import parse_filter

    spec: dict[str, Any] = {
        "key": {".".join(k.path): -1 if k.descending else 1 for k in index.keys},
        "name": physical_index_name(collection, index.name),
    }
    if index.unique:
        spec["unique"] = True
    if index.partial_filter is not None:
        flt = parse_filter(index.partial_filter, Limits())
        spec["partialFilterExpression"] = mq.compile_filter(flt)
    return spec


class MongoMigrations:
    """The migration side of one MongoDB backend (``host``: the MongoBackend)."""

    dialect = "mongodb"

    def __init__(self, host: Any) -> None:
        self.host = host

    @property
    def dsn(self) -> str:
        return str(self.host.config.connection_string)

    @property
    def db(self) -> Any:
        return self.host.db

    async def prepare(self) -> None:
        names = set(await self.db.list_collection_names())
        for name in (MIGRATIONS, SCHEMAS, LOCK):
            if name not in names:
                with contextlib.suppress(OperationFailure, CollectionInvalid):  # made meanwhile
                    await self.db.create_collection(name)

    async def lock_holder(self) -> str | None:
        doc = await self.db[LOCK].find_one({"_id": "lock", "expires_at": {"$gt": time.time()}})
        return None if doc is None else str(doc.get("runner") or "unknown")

    async def record(self, mig_id: str) -> dict[str, Any] | None:
        doc = await self.db[MIGRATIONS].find_one({"_id": mig_id})
        return None if doc is None else orjson.loads(doc["record"])

    async def create(self, record: dict[str, Any]) -> None:
        with contextlib.suppress(DuplicateKeyError):
            await self.db[MIGRATIONS].insert_one({"_id": record["id"], **_fields(record)})

    async def records(self) -> list[dict[str, Any]]:
        cur = self.db[MIGRATIONS].find({}).sort("_id", 1)
        return [orjson.loads(d["record"]) for d in await cur.to_list()]

    def index_sql(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> str:
        cmd = {"createIndexes": collection, "indexes": [index_command(collection, index)]}
        return orjson.dumps(cmd).decode()

    @asynccontextmanager
    async def session(self, runner: str, *, lock: bool = True) -> AsyncIterator[MongoSession]:
        token = f"{runner}/{uuid.uuid4().hex}" if lock else None
        beat = None
        # the heartbeat and the fence inside each migration transaction both write the lock
        # document: taken in turn, a renewal never lands inside a transaction's snapshot
        # (which the server would answer with a write conflict on the fence)
        lease = asyncio.Lock()
        if token is not None:
            await self._acquire(token, runner)
            beat = asyncio.create_task(self._heartbeat(token, lease))
        try:
            yield MongoSession(self, token, lease)
        finally:
            if beat is not None:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError, PyMongoError):
                    await beat
                with contextlib.suppress(PyMongoError):
                    await asyncio.shield(self.db[LOCK].delete_one({"_id": "lock", "holder": token}))

    async def _acquire(self, token: str, runner: str) -> None:
        while True:
            now = time.time()
            try:
                await self.db[LOCK].find_one_and_update(
                    {"_id": "lock", "expires_at": {"$lt": now}},
                    {
                        "$set": {
                            "holder": token,
                            "runner": runner,
                            "expires_at": now + LEASE_SECONDS,
                        }
                    },
                    upsert=True,
                )
                return
            except DuplicateKeyError:
                await asyncio.sleep(0.1)  # held by a live runner

    async def _heartbeat(self, token: str, lease: asyncio.Lock) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 4)
            async with lease:
                with contextlib.suppress(PyMongoError):
                    await self.db[LOCK].update_one(
                        {"_id": "lock", "holder": token},
                        {"$set": {"expires_at": time.time() + LEASE_SECONDS}},
                    )


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": record.get("version", 0),
        "status": record["status"],
        "checksum": record["checksum"],
        "record": orjson.dumps(record).decode(),
        "updated_at": time.time(),
    }


class MongoSession:
    def __init__(
        self, store: MongoMigrations, token: str | None, lease: asyncio.Lock | None = None
    ) -> None:
        self.store = store
        self.token = token
        self.lease = lease or asyncio.Lock()

    async def save(self, record: dict[str, Any]) -> None:
        await self.store.db[MIGRATIONS].update_one(
            {"_id": record["id"]}, {"$set": _fields(record)}, upsert=True
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MongoTx]:
        """A server transaction for the data; DDL runs at once, undone if it fails."""
        client = self.store.host.client
        async with self.lease, client.start_session() as s:
            await s.start_transaction()
            tx = MongoTx(self, s)
            try:
                yield tx
                if self.token is not None:  # fencing: still ours, in this transaction
                    done = await self.store.db[LOCK].update_one(
                        {"_id": "lock", "holder": self.token},
                        {"$set": {"expires_at": time.time() + LEASE_SECONDS}},
                        session=s,
                    )
                    if done.matched_count != 1:
                        raise Conflict("the migration lock was lost", code="lock_lost")
                await s.commit_transaction()
            except BaseException as exc:
                if s.in_transaction:
                    with contextlib.suppress(PyMongoError):
                        await asyncio.shield(s.abort_transaction())
                await asyncio.shield(tx.undo_all())
                if isinstance(exc, PyMongoError):
                    raise translate(exc) from None
                raise
        for later in tx.after:
            with contextlib.suppress(PyMongoError):
                await later()

    async def count(self, collection: str, flt: Filter | None) -> int:
        match = mq.compile_filter(flt) if flt is not None else {}
        return int(await self.store.db[collection].count_documents(match))

    async def build_index_online(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> bool:
        return False


class MongoTx:
    def __init__(self, session: MongoSession, s: Any) -> None:
        self.session = session
        self.s = s
        self.db = session.store.db
        self.host = session.store.host
        self.undo: list[Undo] = []
        self.after: list[Undo] = []

    async def undo_all(self) -> None:
        for step in reversed(self.undo):
            try:
                await step()
            except PyMongoError as exc:
                log.error("migration undo step failed: %s", type(exc).__name__)
        self.undo.clear()

    async def stored_schema(self, collection: str) -> tuple[int, dict[str, Any]] | None:
        doc = await self.db[SCHEMAS].find_one({"_id": collection}, session=self.s)
        return None if doc is None else (int(doc["version"]), orjson.loads(doc["schema"]))

    async def write_schema(self, collection: str, schema: dict[str, Any] | None) -> None:
        await self._validator(collection, schema)
        if schema is None:
            await self.db[SCHEMAS].delete_one({"_id": collection}, session=self.s)
            return
        await self.db[SCHEMAS].update_one(
            {"_id": collection},
            {
                "$set": {"schema": orjson.dumps(schema).decode(), "updated_at": time.time()},
                "$inc": {"version": 1},
            },
            upsert=True,
            session=self.s,
        )

    async def _validator(self, collection: str, schema: dict[str, Any] | None) -> None:
        """The server's ``$jsonSchema`` validator follows the declared schema (undone, to
        the options it had, when the transaction fails)."""
        found = await self.db.list_collections(filter={"name": collection})
        info = await found.to_list()
        if not info:
            return
        parsed = None if schema is None else parse_schema(schema, collection, "schema")
        before = info[0].get("options") or {}
        previous = {"collMod": collection, "validator": before.get("validator") or {}}
        for key in ("validationLevel", "validationAction"):
            if key in before:
                previous[key] = before[key]
        try:
            await self.db.command(collmod(collection, parsed))
        except PyMongoError as exc:
            raise translate(exc) from None
        self.undo.append(lambda: self.db.command(previous))

    async def table_exists(self, collection: str) -> bool:
        return collection in await self.db.list_collection_names(filter={"name": collection})

    async def needs_online(self, collection: str) -> bool:
        return False  # createIndexes runs at once, undone if the transaction fails

    async def create_collection(self, collection: str) -> None:
        if await self.table_exists(collection):
            return
        try:
            await self.db.create_collection(collection)
        except PyMongoError as exc:
            raise translate(exc) from None
        self.undo.append(lambda: self.db.drop_collection(collection))

    async def create_partitioned(self, collection: str, spec: Partitioning) -> None:
        await self.create_collection(collection)
        await refuse_or_shard(self.host, collection, spec)

    async def partitioning(self, collection: str) -> Partitioning | None:
        return None

    async def begin_partitioning(self, collection: str, spec: Partitioning) -> int:
        await refuse_or_shard(self.host, collection, spec)
        return 0

    async def copy_partition_batch(
        self, collection: str, spec: Partitioning, after: str, size: int
    ) -> tuple[int, str | None]:
        return 0, None

    async def finish_partitioning(
        self,
        collection: str,
        spec: Partitioning,
        indexes: tuple[IndexSpec, ...],
        kinds: dict[tuple[str, ...], str],
    ) -> None:
        return None

    async def abandon_partitioning(self, collection: str) -> None:
        return None

    async def drop_collection(self, collection: str) -> None:
        """Renamed aside at once (renamed back on failure), dropped after the commit."""
        if not await self.table_exists(collection):
            return
        trash = f"_trash_{collection}_{uuid.uuid4().hex[:8]}"
        name = self.db.name
        admin = self.host.client.admin
        await admin.command({"renameCollection": f"{name}.{collection}", "to": f"{name}.{trash}"})
        self.undo.append(
            lambda: admin.command(
                {"renameCollection": f"{name}.{trash}", "to": f"{name}.{collection}"}
            )
        )
        self.after.append(lambda: self.db.drop_collection(trash))

    async def _indexes(self, collection: str) -> dict[str, dict[str, Any]]:
        if not await self.table_exists(collection):
            return {}
        cur = await self.db[collection].list_indexes()
        return {ix["name"]: dict(ix) for ix in await cur.to_list()}

    async def create_index(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> None:
        await self.create_collection(collection)
        spec = index_command(collection, index)
        if spec["name"] in await self._indexes(collection):
            return  # built by an earlier, interrupted run of this step
        try:
            await self.db.command(
                {"createIndexes": collection, "indexes": [spec], "maxTimeMS": _DDL_MS}
            )
        except DuplicateKeyError:
            raise DuplicateKey(
                f"the unique index {index.name!r} refuses duplicate values",
                details={"index": index.name},
            ) from None
        except OperationFailure as exc:
            if index.partial_filter is not None and exc.code in (2, 67):
                raise BadRequest(
                    f"index {index.name!r}: MongoDB refuses this partial_filter as a "
                    "partialFilterExpression",
                    code="unsupported",
                    details={"index": index.name, "feature": "partial_filter"},
                ) from None
            raise translate(exc) from None
        physical = spec["name"]
        self.undo.append(lambda: self.db[collection].drop_index(physical))

    async def drop_index(self, collection: str, name: str) -> None:
        physical = physical_index_name(collection, name)
        found = (await self._indexes(collection)).get(physical)
        if found is None:
            return
        await self.db[collection].drop_index(physical)
        spec = {
            k: v
            for k, v in found.items()
            if k in ("key", "name", "unique", "partialFilterExpression")
        }
        self.undo.append(lambda: self.db.command({"createIndexes": collection, "indexes": [spec]}))

    async def set_search(self, collection: str, declared: SearchDeclaration | None) -> None:
        raise BadRequest(
            "full-text search is not declared on the MongoDB backend",
            code="unsupported_by_backend",
            details={"feature": "set_search"},
        )

    async def sql(self, text: str) -> None:
        raise BadRequest("the sql operation needs PostgreSQL", code="unsupported")

    async def scan(
        self, collection: str, after: str, size: int
    ) -> list[tuple[str, dict[str, Any]]]:
        cur = self.db[collection].find({"_id": {"$gt": after}}, session=self.s)
        rows = await cur.sort("_id", 1).limit(size).to_list()
        return [(r["_id"], r) for r in rows]

    async def apply_batch(
        self, collection: str, flt: Filter, update: Update, after: str, size: int, audit: str
    ) -> Batch:
        coll = self.db[collection]
        match = mq.both({"_id": {"$gt": after}}, mq.compile_filter(flt))
        try:
            cur = coll.find(match, {"_id": 1}, session=self.s).sort("_id", 1).limit(size)
            ids = [r["_id"] for r in await cur.to_list()]
            if not ids:
                return Batch([], [])
            await coll.update_many({"_id": {"$in": ids}}, mq.compile_update(update), session=self.s)
            cur = coll.find({"_id": {"$in": ids}}, session=self.s).sort("_id", 1)
            docs = list(await cur.to_list())
            if self.host.audit:
                await self.host.audit_record(
                    self.s, "dbproxy-migrate", "backfill", collection, ids, audit
                )
        except ProxyError:
            raise
        except PyMongoError as exc:
            err = translate(exc, updating=True)
            if isinstance(err, SchemaViolation):  # SecantusDB: bypass_document_validation
                raise Conflict(  # is not honoured (MongoDB's docs: it is)
                    f"stored document(s) of {collection!r} would not satisfy the schema",
                    code="existing_documents_invalid",
                    details={"collection": collection, "documents": [{"_id": i} for i in ids]},
                ) from None
            raise err from None
        return Batch(ids, docs)

    async def save(self, record: dict[str, Any]) -> None:
        await self.db[MIGRATIONS].update_one(
            {"_id": record["id"]}, {"$set": _fields(record)}, upsert=True, session=self.s
        )
