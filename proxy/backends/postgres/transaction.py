"""PostgresTransaction: the document operations on one pinned connection inside an open
transaction, with commit, rollback and the idempotency keys claimed inside it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson

from proxy import context
from proxy.backends.base import TxKind
from proxy.backends.postgres.deadline import GRACE_SECONDS
from proxy.backends.postgres.documents import PgDocuments
from proxy.backends.postgres.errors import translate
from proxy.backends.postgres.pool import CONNECTION_ERRORS, Endpoint, release
from proxy.backends.postgres.sql import insert_audit
from proxy.errors import CommitOutcomeUnknown, Conflict, DatabaseTimeout, ProxyError, Unavailable
from proxy.query.spec import StoredReply, check_fingerprint

ISOLATION_LEVELS = ("read_committed", "repeatable_read", "serializable")
_COMMIT_AUDIT_ROW = "VALUES ($1, 'transaction_commit', '*', '{}', $2)"


class PostgresTransaction(PgDocuments):
    """The document operations on one pinned connection inside an open transaction.

    A statement error aborts the whole transaction (PostgreSQL's rule): the transaction is
    then marked failed and only ``rollback`` remains. ``commit``/``rollback`` always give
    the connection back to the pool, rolled back and clean."""

    failure_aborts = True

    def __init__(
        self,
        backend: PgDocuments,
        pool: asyncpg.Pool,
        conn: asyncpg.Connection,
        tx: Any,
        isolation: str,
        give_share: Callable[[], None] | None = None,
        ep: Endpoint | None = None,
        kind: TxKind = TxKind.INTERACTIVE,
    ) -> None:
        super().__init__(
            backend.name,
            backend.limits,
            backend.schema,
            backend.ids,
            set(backend._known_tables),
            backend.audit,
            backend._partitioned,
        )
        self.wrote = False
        self._backend = backend
        self._pool = pool
        self._conn = conn
        self._tx = tx
        self._ep = ep
        self._kind = kind
        self.isolation = isolation
        self.failed: ProxyError | None = None
        self.closed = False
        self._give_share = give_share

    def backend_pid(self) -> int:
        return int(self._conn.get_server_pid())

    def _check_usable(self) -> None:
        if self.closed:
            raise Conflict("the transaction has already ended", code="transaction_closed")
        if self.failed is not None:
            raise Conflict(
                "an earlier statement failed; the transaction can only be rolled back",
                code="transaction_aborted",
            )

    def _fail(self, exc: BaseException) -> ProxyError:
        err = translate(exc)
        if isinstance(exc, TimeoutError):  # no answer: the connection's state is unknown
            self._conn.terminate()  # the server rolls the transaction back on its own
            err = DatabaseTimeout(
                "the database did not answer within the request's deadline; the "
                "transaction was rolled back"
            )
        elif isinstance(exc, CONNECTION_ERRORS) and self._kind is TxKind.INTERACTIVE:
            err = Conflict(
                "the transaction's database connection was lost; it was rolled back",
                code="transaction_aborted",
            )
        elif isinstance(exc, CONNECTION_ERRORS):  # a batch or one write: retry it whole
            err = Unavailable(
                "the database connection was lost before COMMIT; nothing was written",
                retry_after=1,
            )
        self.failed = err
        return err

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """One statement on the pinned connection, ending by the request's deadline (the
        service's statement timeout is the server's, set at begin)."""
        timeout = self._wait()
        if timeout <= 0:
            raise TimeoutError
        ep = self._ep
        if ep is None:
            rows: list[asyncpg.Record] = await self._conn.fetch(sql, *args, timeout=timeout)
            return rows
        ep.state.outstanding += 1  # seen by the watchdog: a frozen server is found
        try:
            rows = await self._conn.fetch(sql, *args, timeout=timeout)
        finally:
            ep.state.outstanding -= 1
        ep.last_answer = time.monotonic()
        return rows

    async def _learn(self, collection: str) -> None:
        self._check_usable()
        try:
            await self._ensure_table(self._conn, collection)
        except Exception as exc:
            raise self._fail(exc) from None

    async def _write(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        self._check_usable()
        self.wrote = True
        try:
            await self._ensure_table(self._conn, collection)
            return await self._fetch(sql, *args)
        except Exception as exc:
            raise self._fail(exc) from None

    async def _read(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record] | None:
        self._check_usable()
        try:
            if collection not in self._known_tables:
                found = await self._fetch(
                    "SELECT to_regclass($1) IS NOT NULL", self._table(collection)
                )
                if not found[0][0]:
                    return None
                self._known_tables.add(collection)
            return await self._fetch(sql, *args)
        except Exception as exc:
            raise self._fail(exc) from None

    async def idem_claim(self, key: str, fingerprint: str, ttl: float) -> StoredReply | None:
        """Claim an idempotency key in this transaction, or return the reply stored for it.

        A concurrent request with the same key waits on the row lock until the first one
        commits (then its reply is returned here) or rolls back (then this one claims it)."""
        table = f"{self._schema_ident}._idempotency"
        claimed = await self._run(
            f"INSERT INTO {table} AS t (key, fingerprint, expires_at) "
            "VALUES ($1, $2, now() + make_interval(secs => $3)) ON CONFLICT (key) DO UPDATE "
            "SET fingerprint = EXCLUDED.fingerprint, status = NULL, headers = NULL, "
            "body = NULL, expires_at = EXCLUDED.expires_at WHERE t.expires_at < now() "
            "RETURNING 1",
            key,
            fingerprint,
            ttl,
        )
        if claimed:
            return None
        rows = await self._run(
            f"SELECT fingerprint, status, headers::text, body FROM {table} WHERE key = $1", key
        )
        fp, status, headers, body = rows[0]
        check_fingerprint(fp, fingerprint)
        return StoredReply(int(status), bytes(body), orjson.loads(headers))

    async def idem_save(self, key: str, reply: StoredReply) -> None:
        await self._run(
            f"UPDATE {self._schema_ident}._idempotency SET status = $2, "
            "headers = $3::jsonb, body = $4 WHERE key = $1",
            key,
            reply.status,
            orjson.dumps(reply.headers).decode(),
            reply.body,
        )

    async def _run(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self._check_usable()
        try:
            return await self._fetch(sql, *args)
        except Exception as exc:
            raise self._fail(exc) from None

    async def commit(self) -> None:
        """COMMIT; a connection lost while COMMIT was in flight is reported as unknown.

        Shielded: a client that goes away mid-commit cannot leave the connection half-done.
        """
        self._check_usable()
        if self.audit and self.wrote:
            ctx = context.current.get()
            await self._run(
                insert_audit(self._schema_ident, _COMMIT_AUDIT_ROW),
                ctx.service,
                ctx.request_id,
            )
        self.closed = True
        await asyncio.shield(self._commit_and_release())
        self._backend._known_tables.update(self._known_tables)

    async def _commit_and_release(self) -> None:
        try:
            async with asyncio.timeout(max(self._wait(), GRACE_SECONDS)):
                await self._tx.commit()
        except TimeoutError:  # COMMIT was sent and never answered
            self._conn.terminate()
            raise CommitOutcomeUnknown(
                "the database did not answer the COMMIT in time; the transaction may or may "
                "not have been applied"
            ) from None
        except CONNECTION_ERRORS:
            raise CommitOutcomeUnknown(
                "the connection was lost while committing; the transaction may or may not "
                "have been applied"
            ) from None
        except Exception as exc:
            await self._rollback_quietly()
            raise translate(exc) from None
        finally:
            await self._release()

    async def rollback(self) -> None:
        """ROLLBACK and give the connection back; idempotent, shielded from cancellation."""
        if self.closed:
            return
        self.closed = True
        await asyncio.shield(self._rollback_and_release())

    async def _rollback_and_release(self) -> None:
        try:
            await self._rollback_quietly()
        finally:
            await self._release()

    async def _release(self) -> None:
        give, self._give_share = self._give_share, None
        try:
            await release(self._pool, self._conn)  # rolled back or closed: never unclean
        finally:
            if give is not None:
                give()

    async def _rollback_quietly(self) -> None:
        try:
            if not self._conn.is_closed() and self._conn.is_in_transaction():
                async with asyncio.timeout(GRACE_SECONDS):  # else the server rolls back
                    await self._tx.rollback()
        except Exception:  # the connection is gone: the server rolls back on its own
            with contextlib.suppress(Exception):
                self._conn.terminate()
