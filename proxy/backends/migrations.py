"""What the migration runner needs of a backend (``Backend.migrations()``), and the physical
names of declared indexes, shared by both dialects and their error translation."""

from __future__ import annotations

import hashlib
import re
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol

from proxy.query.ast import Filter, Update
from proxy.schema.model import IndexSpec, SearchDeclaration
from proxy.schema.partitioning import Partitioning

_PHYSICAL_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9_]{0,39})__([0-9a-f]{12})")


def physical_index_name(collection: str, name: str) -> str:
    """The database's name of a declared index: ``<name>__<12 hex>`` (at most 54 bytes;
    the hash of collection and name keeps it unique in a PostgreSQL schema or an SQLite
    file), from which the declared name reads back (``declared_index_name``)."""
    digest = hashlib.blake2s(f"{collection}\0{name}".encode(), digest_size=6).hexdigest()
    return f"{name}__{digest}"


def declared_index_name(physical: str | None) -> str | None:
    """The declared name inside a physical index name (None: not a declared index)."""
    if not physical:
        return None
    m = _PHYSICAL_RE.fullmatch(physical)
    return m.group(1) if m else None


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch of a backfill: the _ids changed (in order) and the new documents."""

    ids: list[str]
    documents: list[dict[str, Any]]

    @property
    def last(self) -> str | None:
        return self.ids[-1] if self.ids else None


class MigrationTx(Protocol):
    """One database transaction of a migration (committed when its context exits cleanly,
    rolled back on an error)."""

    async def stored_schema(self, collection: str) -> tuple[int, dict[str, Any]] | None: ...

    async def write_schema(self, collection: str, schema: dict[str, Any] | None) -> None:
        """Upsert (bumping ``version``) or, with None, delete the collection's schema, and
        tell the other sidecars (PostgreSQL: NOTIFY in this transaction)."""
        ...

    async def table_exists(self, collection: str) -> bool: ...

    async def needs_online(self, collection: str) -> bool:
        """Whether an index on the collection is built outside a transaction (PostgreSQL:
        the table has rows, so CONCURRENTLY); always False where that cannot be done."""
        ...

    async def create_collection(self, collection: str) -> None: ...

    async def create_partitioned(self, collection: str, spec: Partitioning) -> None:
        """A new collection split by ``spec`` (400 unsupported_by_backend where the
        backend cannot)."""
        ...

    async def partitioning(self, collection: str) -> Partitioning | None:
        """How the collection's table is split now (None: one table, or none yet)."""
        ...

    async def begin_partitioning(self, collection: str, spec: Partitioning) -> int:
        """partition_collection: checks, refuses the collection's writes, makes the copy;
        the documents to copy."""
        ...

    async def copy_partition_batch(
        self, collection: str, spec: Partitioning, after: str, size: int
    ) -> tuple[int, str | None]: ...

    async def finish_partitioning(
        self,
        collection: str,
        spec: Partitioning,
        indexes: tuple[IndexSpec, ...],
        kinds: dict[tuple[str, ...], str],
    ) -> None: ...

    async def abandon_partitioning(self, collection: str) -> None: ...

    async def drop_collection(self, collection: str) -> None: ...

    async def create_index(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> None:
        """Raises DuplicateKey (details.index: the declared name) over duplicates."""
        ...

    async def drop_index(self, collection: str, name: str) -> None: ...

    async def set_search(self, collection: str, declared: SearchDeclaration | None) -> None:
        """Make the collection's full-text index the one ``declared`` describes (None: no
        index), built from the stored documents and kept by every later write in the same
        statement (PostgreSQL: a stored generated ``tsvector`` column with a GIN index; the
        embedded store: an FTS5 table kept by triggers). Creates the table if absent."""
        ...

    async def sql(self, text: str) -> None: ...

    async def scan(
        self, collection: str, after: str, size: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """Up to ``size`` stored documents with _id > ``after``, in _id order."""
        ...

    async def apply_batch(
        self, collection: str, flt: Filter, update: Update, after: str, size: int, audit: str
    ) -> Batch:
        """Apply ``update`` to the next ``size`` documents matching ``flt`` with _id >
        ``after`` (bumping ``_version``, one audit row with ``audit`` as its request id)."""
        ...

    async def save(self, record: dict[str, Any]) -> None:
        """Upsert the migration's record in this transaction."""
        ...


class MigrationSession(Protocol):
    """A runner's session: its own connection, holding the database's migration lock for
    its whole life (freed by the database or the OS if the process dies)."""

    async def save(self, record: dict[str, Any]) -> None:
        """Upsert a record, committed at once."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[MigrationTx]: ...

    async def count(self, collection: str, flt: Filter | None) -> int: ...

    async def build_index_online(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> bool:
        """Build the index without blocking writes where the database can (PostgreSQL:
        CONCURRENTLY, checked valid; an invalid one is dropped and DuplicateKey or a 409
        ``index_invalid`` raised); False when it cannot (then it goes in a transaction)."""
        ...


class MigrationStore(Protocol):
    """A backend's migration side: records, the lock, and sessions."""

    dialect: str  # "postgresql" | "sqlite"

    @property
    def dsn(self) -> str:
        """The connection string as it is now (for an Alembic environment; never shown)."""
        ...

    async def prepare(self) -> None:
        """Create the ``_migrations`` table if missing."""
        ...

    def session(
        self, runner: str, *, lock: bool = True
    ) -> AbstractAsyncContextManager[MigrationSession]: ...

    async def lock_holder(self) -> str | None:
        """Who holds the migration lock (``host:pid``), None when nobody does."""
        ...

    async def record(self, mig_id: str) -> dict[str, Any] | None: ...

    async def create(self, record: dict[str, Any]) -> None:
        """Insert a (pending) record unless one with its id exists."""
        ...

    async def records(self) -> list[dict[str, Any]]: ...

    def index_sql(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> str:
        """The DDL ``create_index`` would run (for a dry run's plan; partial filters
        shown with placeholders)."""
        ...
