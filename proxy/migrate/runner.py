"""The migration runner shared by the HTTP API and ``dbproxy migrate``: exactly once under
the database's migration lock, recorded in ``_migrations``, resumable, long work in the
background."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from proxy.backends.migrations import MigrationSession, MigrationStore
from proxy.errors import BadRequest, Conflict, NotFound, ProxyError
from proxy.migrate import convert, steps
from proxy.migrate.ops import Migration
from proxy.migrate.plan import DryRun, plan
from proxy.migrate.steps import TxState

log = logging.getLogger(__name__)

SchemasChanged = Callable[[str], Awaitable[None]]
Progress = Callable[[dict[str, Any]], None]
FOREGROUND_SECONDS: Final = 2.0  # past it, POST answers 202 and the work goes on
STATUSES: Final = ("pending", "executing", "completed", "failed", "interrupted")
# operations that run outside the transaction of their neighbours
_LONG: Final = frozenset({"backfill", "alembic_upgrade", "partition_collection"})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a submission came to: ``status`` 201 (ran now), 200 (no-op or dry run),
    202 (running in the background), and the record (or plan)."""

    status: int
    body: dict[str, Any]


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def new_record(m: Migration, database: str) -> dict[str, Any]:
    return {
        "id": m.id,
        "name": m.name,
        "database": database,
        "version": m.version,
        "description": m.description,
        "dependencies": list(m.dependencies),
        "checksum": m.checksum,
        "status": "pending",
        "model": m.model,
        "created_at": now_text(),
        "executed_at": None,
        "finished_at": None,
        "duration_ms": None,
        "error": None,
        "progress": None,
        "step": 0,
        "steps": len(m.operations),
        "runner": None,
    }


class MigrationRunner:
    """Runs migrations on the configured databases (``stores``: each backend's migration
    side). ``schemas_changed(collection)`` is awaited after a migration committed a change
    to that collection's schema."""

    def __init__(
        self,
        stores: Mapping[str, MigrationStore],
        default: str,
        *,
        schemas_changed: SchemasChanged | None = None,
        alembic_directories: Mapping[str, str | None] | None = None,
        foreground_seconds: float = FOREGROUND_SECONDS,
        name: str | None = None,
    ) -> None:
        self.stores = dict(stores)
        self.default = default
        self.schemas_changed = schemas_changed
        self.alembic_directories = dict(alembic_directories or {})
        self.foreground_seconds = foreground_seconds
        self.name = name or runner_name()
        self._prepared: set[str] = set()
        self._running: dict[tuple[str, str], asyncio.Task[dict[str, Any]]] = {}

    def store(self, database: str | None) -> tuple[str, MigrationStore]:
        name = database or self.default
        store = self.stores.get(name)
        if store is None:
            raise NotFound(
                f"no database named {name!r:.80} takes migrations", code="unknown_database"
            )
        return name, store

    async def _ready(self, database: str | None) -> tuple[str, MigrationStore]:
        name, store = self.store(database)
        if name not in self._prepared:
            await store.prepare()
            self._prepared.add(name)
        return name, store

    # -- reading records ---------------------------------------------------------------

    async def get(self, mig_id: str, database: str | None = None) -> dict[str, Any]:
        _, store = await self._ready(database)
        record = await store.record(mig_id)
        if record is None:
            raise NotFound(f"no migration {mig_id[:130]!r}", code="migration_not_found")
        return self._shown(record, await store.lock_holder())

    async def records(self, database: str | None = None) -> list[dict[str, Any]]:
        _, store = await self._ready(database)
        holder = await store.lock_holder()
        return [self._shown(r, holder) for r in await store.records()]

    @staticmethod
    def _shown(record: dict[str, Any], holder: str | None) -> dict[str, Any]:
        """A record as shown: ``executing`` with nobody holding the lock is ``interrupted``."""
        if record.get("status") == "executing" and holder is None:
            return {**record, "status": "interrupted"}
        return record

    async def status(self, database: str | None = None) -> dict[str, Any]:
        name, store = await self._ready(database)
        holder = await store.lock_holder()
        items = [self._shown(r, holder) for r in await store.records()]
        counts = dict.fromkeys(STATUSES, 0)
        for r in items:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        done = [r["version"] for r in items if r["status"] == "completed"]

        def ids(status: str) -> list[str]:
            return [r["id"] for r in items if r["status"] == status]

        return {
            "database": name,
            "current_version": max(done) if done else None,
            "counts": counts,
            "pending": ids("pending"),
            "failed": ids("failed"),
            "executing": ids("executing"),
            "interrupted": ids("interrupted"),
            "lock_holder": holder,
        }

    # -- submitting ----------------------------------------------------------------------

    async def submit(
        self,
        m: Migration,
        *,
        dry_run: bool = False,
        wait: float | None = None,
        progress: Progress | None = None,
    ) -> Outcome:
        """Run ``m`` (or plan it). Waits up to ``wait`` seconds (default: the foreground
        time; None from the CLI via ``foreground=math.inf``) before answering 202."""
        database, store = await self._ready(m.database)
        self._check_backend(m, store, database)
        existing = await store.record(m.id)
        early = self._settled(m, existing)
        if early is not None:
            return early
        await self._check_dependencies(store, m)
        if dry_run:
            return Outcome(200, await self._plan(store, database, m, existing))
        key = (database, m.id)
        task = self._running.get(key)
        if existing is None:
            await store.create(new_record(m, database))  # pending: GET sees it at once
        if task is None:
            task = asyncio.create_task(self._run(store, database, m, progress))
            self._running[key] = task
            task.add_done_callback(lambda _t: self._running.pop(key, None))
        limit = self.foreground_seconds if wait is None else wait
        done, _ = await asyncio.wait({task}, timeout=None if math.isinf(limit) else limit)
        if not done:
            record = await store.record(m.id) or new_record(m, database)
            return Outcome(202, self._shown(record, self.name))
        record = task.result()  # raises the migration's error
        return Outcome(200 if record.get("_noop") else 201, _clean(record))

    def _check_backend(self, m: Migration, store: MigrationStore, database: str) -> None:
        for i, op in enumerate(m.operations):
            if op.kind in ("sql", "alembic_upgrade") and store.dialect != "postgresql":
                raise BadRequest(
                    f"script.operations[{i}]: {op.kind} needs a PostgreSQL database",
                    code="unsupported",
                    details={"at": f"script.operations[{i}]", "feature": op.kind},
                )
            if op.kind == "alembic_upgrade" and not self.alembic_directories.get(database):
                raise BadRequest(
                    f"database {database!r} has no alembic_directory configured",
                    code="alembic_not_configured",
                )

    @staticmethod
    def _settled(m: Migration, existing: dict[str, Any] | None) -> Outcome | None:
        """Completed with the same content: a no-op; other content: 409 (a failed migration
        of which nothing was committed may be replaced)."""
        if existing is None:
            return None
        if existing["checksum"] != m.checksum:
            if existing["status"] == "failed" and existing.get("step", 0) == 0:
                return None
            raise Conflict(
                f"migration {m.id!r} was recorded with other content",
                code="checksum_mismatch",
                details={"id": m.id, "recorded": existing["checksum"], "submitted": m.checksum},
            )
        if existing["status"] == "completed":
            return Outcome(200, {**existing, "noop": True})
        return None

    @staticmethod
    async def _check_dependencies(store: MigrationStore, m: Migration) -> None:
        missing = []
        for dep in m.dependencies:
            record = await store.record(dep)
            if record is None or record["status"] != "completed":
                missing.append(dep)
        if missing:
            raise Conflict(
                f"migration {m.id!r} depends on migrations not completed: {', '.join(missing)}",
                code="dependency_not_met",
                details={"missing": missing},
            )

    async def _plan(
        self, store: MigrationStore, database: str, m: Migration, existing: dict[str, Any] | None
    ) -> dict[str, Any]:
        start = existing.get("step", 0) if existing else 0
        async with store.session(self.name, lock=False) as session:
            try:
                async with session.transaction() as tx:
                    steps_ = await plan(store, session, tx, m, start, self._alembic(database))
                    raise DryRun(steps_)  # rolls the transaction back: nothing changes
            except DryRun as done:
                steps_ = done.steps
        return {
            "id": m.id,
            "dry_run": True,
            "database": database,
            "checksum": m.checksum,
            "status": existing["status"] if existing else "new",
            "steps": steps_,
        }

    def _alembic(self, database: str) -> Callable[..., Any] | None:
        directory = self.alembic_directories.get(database)
        if not directory:
            return None
        store = self.stores[database]

        def call(revision: str, dry_run: bool) -> Any:
            try:  # helper module of the optional extra dbproxy[alembic]
                module = importlib.import_module("proxy.migrate.alembic_op")
            except ImportError:
                raise BadRequest(
                    "Alembic is not installed (pip install 'dbproxy[alembic]')",
                    code="alembic_unavailable",
                ) from None
            return module.alembic_upgrade(store.dsn, directory, revision, dry_run=dry_run)

        return call

    # -- running -------------------------------------------------------------------------

    async def _run(
        self, store: MigrationStore, database: str, m: Migration, progress: Progress | None
    ) -> dict[str, Any]:
        async with store.session(self.name) as session:
            existing = await store.record(m.id)  # again, under the lock
            early = self._settled(m, existing)
            if early is not None:
                return {**early.body, "_noop": True}
            await self._check_dependencies(store, m)
            if existing is None or existing["checksum"] != m.checksum:
                record = new_record(m, database)
            else:
                record = dict(existing)
            record.update(status="executing", executed_at=now_text(), runner=self.name, error=None)
            await session.save(record)
            started = time.monotonic()
            try:
                changed = await self._execute(session, database, m, record, progress)
            except ProxyError as err:
                record.update(status="failed", error=err.to_dict(), finished_at=now_text())
                record["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
                with contextlib.suppress(ProxyError):
                    await session.save(record)
                raise
            except BaseException:
                log.exception("migration %s failed unexpectedly", m.id)
                raise
        await self._announce(changed)
        return record

    async def _announce(self, collections: set[str]) -> None:
        if self.schemas_changed is None:
            return
        for collection in sorted(collections):
            try:
                await self.schemas_changed(collection)
            except Exception:
                log.exception("schemas_changed(%s) failed", collection)

    async def _execute(
        self,
        session: MigrationSession,
        database: str,
        m: Migration,
        record: dict[str, Any],
        progress: Progress | None,
    ) -> set[str]:
        """The operations from the recorded step: consecutive transactional ones in one
        transaction with the record; a backfill, an online index build or an Alembic
        upgrade on its own, resumable. Returns the collections whose schema changed."""
        ops = m.operations
        started = time.monotonic()
        changed: set[str] = set()
        while record["step"] < len(ops):
            i = record["step"]
            op = ops[i]
            if op.kind == "backfill":
                await self._backfill(session, m, record, progress)
            elif op.kind == "partition_collection":
                await convert.partition_collection(session, m, record, progress)
                changed.add(op.collection or "")
            elif op.kind == "alembic_upgrade":
                call = self._alembic(database)
                assert call is not None and op.revision is not None
                result = call(op.revision, False)
                if asyncio.iscoroutine(result):
                    await result
                record["step"] = i + 1
                await session.save(record)
            elif op.kind == "create_index" and await self._online_index(session, m, record):
                changed.add(op.collection or "")
            else:
                changed |= await self._transactional(session, m, record, started)
            if progress is not None:
                progress(record)
        if record["status"] != "completed":
            self._complete(record, started)
            await session.save(record)
        return changed

    @staticmethod
    def _complete(record: dict[str, Any], started: float) -> None:
        record.update(status="completed", finished_at=now_text())
        record["duration_ms"] = round((time.monotonic() - started) * 1000, 1)

    async def _transactional(
        self, session: MigrationSession, m: Migration, record: dict[str, Any], started: float
    ) -> set[str]:
        """From the recorded step, every operation up to the next long one, in ONE
        transaction that also moves the record on (completing it at the end)."""
        ops = m.operations
        state = TxState()
        async with session.transaction() as tx:
            i = record["step"]
            while i < len(ops) and ops[i].kind not in _LONG:
                op = ops[i]
                if op.kind == "create_index" and i > record["step"]:
                    assert op.collection is not None
                    if await tx.needs_online(op.collection):
                        break  # built online, after this transaction
                await self._apply(tx, state, m, i)
                i += 1
            record["step"] = i
            if i == len(ops):
                self._complete(record, started)
            await tx.save(record)
        return state.changed

    async def _apply(self, tx: Any, state: TxState, m: Migration, i: int) -> None:
        op = m.operations[i]
        c = op.collection
        if op.kind == "create_collection":
            assert c is not None
            if op.schema is not None:
                await steps.set_schema(tx, state, c, op.schema)
            else:
                await tx.create_collection(c)
        elif op.kind == "set_schema":
            assert c is not None and op.schema is not None
            await steps.set_schema(tx, state, c, op.schema)
        elif op.kind == "create_index":
            assert c is not None and op.index is not None
            schema = await steps.current_schema(tx, state, c)
            new = steps.with_index(schema, c, op.index)
            if new is not None:
                await tx.create_index(c, op.index, steps.index_kinds(new))
                await steps.save_schema(tx, state, c, new)
        elif op.kind == "drop_index":
            await steps.drop_index(tx, state, op)
        elif op.kind == "set_search":
            assert c is not None
            await steps.set_search(tx, state, c, op.search)
        elif op.kind == "rename_field":
            await steps.rename_field(tx, state, op, m.id)
        elif op.kind == "drop_collection":
            assert c is not None
            await steps.drop_collection(tx, state, c)
        elif op.kind == "sql":
            assert op.sql is not None
            await tx.sql(op.sql)
        else:  # pragma: no cover - every kind is handled above or as a long step
            raise AssertionError(op.kind)

    async def _online_index(
        self, session: MigrationSession, m: Migration, record: dict[str, Any]
    ) -> bool:
        """A create_index on a table with rows, built without blocking writes (PostgreSQL
        CONCURRENTLY), then declared in a short transaction; False: not possible here."""
        op = m.operations[record["step"]]
        assert op.collection is not None and op.index is not None
        state = TxState()
        async with session.transaction() as tx:
            schema = await steps.current_schema(tx, state, op.collection)
        new = steps.with_index(schema, op.collection, op.index)
        if new is None:
            return False  # declared already: the transactional path records the step
        if not await session.build_index_online(op.collection, op.index, steps.index_kinds(new)):
            return False
        async with session.transaction() as tx:
            await steps.save_schema(tx, state, op.collection, new)
            record["step"] += 1
            await tx.save(record)
        return True

    async def _backfill(
        self,
        session: MigrationSession,
        m: Migration,
        record: dict[str, Any],
        progress: Progress | None,
    ) -> None:
        """Keyset batches by _id, each in its own transaction with the record's progress
        (the last _id done), so a resumed run continues exactly after it."""
        i = record["step"]
        op = m.operations[i]
        assert op.collection is not None and op.filter is not None and op.update is not None
        done = record.get("progress") or {}
        if done.get("step") != i:
            total = await session.count(op.collection, op.filter)
            done = {"step": i, "rows_done": 0, "rows_total": total, "after": ""}
            record["progress"] = done
        state = TxState()
        async with session.transaction() as tx:
            validator = steps.enforced_validator(
                await steps.current_schema(tx, state, op.collection)
            )
        while True:
            async with session.transaction() as tx:
                batch = await tx.apply_batch(
                    op.collection, op.filter, op.update, done["after"], op.batch_size, m.id
                )
                steps.check_batch(validator, op.collection, batch.documents)
                if batch.ids:
                    done = {**done, "rows_done": done["rows_done"] + len(batch.ids)}
                    done["after"] = batch.ids[-1]
                    done["rows_total"] = max(done["rows_total"], done["rows_done"])
                else:
                    record["step"] = i + 1
                record["progress"] = done
                await tx.save(record)
            if progress is not None:
                progress(record)
            if not batch.ids:
                return

    async def close(self) -> None:
        """Stop the migrations running in the background (at shutdown): each open
        transaction rolls back and its record shows ``interrupted``, resumed when
        re-submitted."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}
