"""``partition_collection`` on PostgreSQL: an existing collection copied into a new
partitioned table in keyset batches while its writes are refused, then swapped in."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any, Final

import asyncpg

import proxy.backends.postgres.partman as partman
from proxy.backends.postgres.errors import translate
from proxy.backends.postgres.partitions import PartKey, create_partitioned, name_child_indexes
from proxy.errors import BadRequest
from proxy.schema.partitioning import Partitioning, parse_partitioning

FROZEN_TRIGGER: Final = "_dbproxy_frozen"
# raised by the frozen collection's trigger: 503 collection_being_partitioned (errors.py)
FROZEN_FUNCTION: Final = """
CREATE OR REPLACE FUNCTION {schema}.dbproxy_frozen() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  RAISE EXCEPTION 'the collection is being partitioned' USING ERRCODE = 'DP010';
END $f$;
"""


def copy_table(schema_ident: str, collection: str) -> str:
    digest = hashlib.blake2s(collection.encode(), digest_size=8).hexdigest()
    return f'{schema_ident}."_c_{digest}"'


class PgConvert:
    """The migration transaction's side of ``partition_collection`` (mixed into PgTx)."""

    conn: asyncpg.Connection
    ident: str

    _made: dict[str, Partitioning]  # partitioned in this transaction, schema not saved yet

    def table(self, collection: str) -> str:
        raise NotImplementedError

    def partman_parent(self, collection: str) -> str | None:
        """pg_partman's name (``schema.table``) of the collection's table, when time
        partitions may be left to pg_partman (None: the sidecar keeps them)."""
        raise NotImplementedError

    async def stored_schema(self, collection: str) -> tuple[int, dict[str, Any]] | None:
        raise NotImplementedError

    async def create_partitioned(self, collection: str, spec: Partitioning) -> None:
        await self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"dbproxy:{collection}"
        )
        key = PartKey(spec, self.ident)
        now = dt.datetime.now(dt.UTC)
        table, parent = self.table(collection), self.partman_parent(collection)
        # pg_partman premakes at least one interval: a premake of 0 stays with the sidecar
        usable = parent is not None and spec.strategy == "time" and spec.premake > 0
        ps = await partman.ensure(self.conn) if usable else None
        await create_partitioned(self.conn, table, collection, key, now, partitions=ps is None)
        if ps is not None and parent is not None:
            await partman.register(self.conn, ps, parent, key, now)
        self._made[collection] = spec

    async def partitioning(self, collection: str) -> Partitioning | None:
        kind = await self.conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)",
            self.table(collection),
        )
        if kind != "p":
            return None
        if collection in self._made:
            return self._made[collection]
        stored = await self.stored_schema(collection)
        declared = stored[1].get("partitioning") if stored else None
        return parse_partitioning(declared) if declared else None

    async def begin_partitioning(self, collection: str, spec: Partitioning) -> int:
        """Checks every document has the key, refuses writes from now on (a statement
        trigger, committed with this transaction), makes the empty partitioned copy;
        the number of documents to copy."""
        table, key = self.table(collection), PartKey(spec, self.ident)
        kind = await self.conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", table
        )
        if kind != "r":
            raise BadRequest(
                f"collection {collection!r} is {'already partitioned' if kind else 'missing'}",
                code="partitioning_change_unsupported",
                details={"collection": collection},
            )
        missing = await self.conn.fetch(
            f"SELECT _id FROM {table} WHERE {key.of('doc')} IS NULL ORDER BY _id LIMIT 10"
        )
        if missing:
            raise BadRequest(
                f"{len(missing)}{'+' if len(missing) == 10 else ''} document(s) have no "
                "partition key of the declared kind",
                code="partition_key_missing",
                details={"ids": [r[0] for r in missing]},
            )
        await self.abandon_partitioning(collection)
        await self.conn.execute(
            f'CREATE TRIGGER "{FROZEN_TRIGGER}" BEFORE INSERT OR UPDATE OR DELETE ON {table} '
            f"FOR EACH STATEMENT EXECUTE FUNCTION {self.ident}.dbproxy_frozen()"
        )
        target = copy_table(self.ident, collection)
        await create_partitioned(self.conn, target, collection, key, dt.datetime.now(dt.UTC))
        return int(await self.conn.fetchval(f"SELECT count(*) FROM {table}"))

    async def copy_partition_batch(
        self, collection: str, spec: Partitioning, after: str, size: int
    ) -> tuple[int, str | None]:
        """The next ``size`` documents after ``after`` (by _id) copied; (count, last _id)."""
        table, key = self.table(collection), PartKey(spec, self.ident)
        try:
            async with self.conn.transaction():
                row = await self.conn.fetchrow(
                    f"WITH c AS (INSERT INTO {copy_table(self.ident, collection)} "
                    "(_id, _pkey, doc, _version, created_at, updated_at) "
                    f"SELECT _id, {key.of('doc')}, doc, _version, created_at, updated_at "
                    f"FROM {table} WHERE _id > $1 ORDER BY _id LIMIT $2 RETURNING _id) "
                    "SELECT count(*), max(_id) FROM c",
                    after,
                    size,
                )
        except asyncpg.PostgresError as exc:
            raise translate(exc) from None
        assert row is not None
        return int(row[0]), row[1]

    async def _swap(self, collection: str, ddl: list[str]) -> None:
        """The copy takes the collection's name (the old table dropped), with ``ddl`` (the
        declared indexes, for the new table) run on it."""
        table = self.table(collection)
        await self.conn.execute(f"DROP TABLE {table}")
        short = table.rsplit(".", 1)[1].strip('"')
        await self.conn.execute(
            f'ALTER TABLE {copy_table(self.ident, collection)} RENAME TO "{short}"'
        )
        for statement in ddl:
            await self.conn.execute(statement)
        await name_child_indexes(self.conn, self.ident, table)

    async def abandon_partitioning(self, collection: str) -> None:
        """Whatever an unfinished conversion left: the copy, its _ids, the write refusal."""
        await self.conn.execute(f"DROP TABLE IF EXISTS {copy_table(self.ident, collection)}")
        await self.conn.execute(f"DELETE FROM {self.ident}._ids WHERE collection = $1", collection)
        if await self.conn.fetchval("SELECT to_regclass($1) IS NOT NULL", self.table(collection)):
            await self.conn.execute(
                f'DROP TRIGGER IF EXISTS "{FROZEN_TRIGGER}" ON {self.table(collection)}'
            )
