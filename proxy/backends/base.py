"""The contract every storage backend implements, and the checks they share."""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from proxy.errors import BadRequest, InvalidCollection, ProxyError, Unavailable
from proxy.policy import RESERVED_COLLECTIONS
from proxy.query.aggregate.ast import Aggregated, AggregateSpec
from proxy.query.ast import Filter
from proxy.query.search import SearchHits, SearchRequest
from proxy.query.spec import (
    AuditScope,
    Change,
    DeclaredKinds,
    FindSpec,
    ItemResult,
    Page,
    Preview,
    StoredReply,
    WriteResult,
)

if TYPE_CHECKING:
    from proxy.backends.migrations import MigrationStore

COLLECTION_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
RESERVED = RESERVED_COLLECTIONS  # endpoint names under /api/db/: never collections


def check_collection(name: str) -> str:
    if name in _VALID:
        return name
    if not COLLECTION_RE.fullmatch(name):
        raise InvalidCollection(
            "collection names must match ^[A-Za-z][A-Za-z0-9_]{0,62}$",
            details={"collection": name[:80]},
        )
    if name in RESERVED:
        raise InvalidCollection(f"{name!r} is a reserved name", code="reserved_collection_name")
    if len(_VALID) < 10_000:
        _VALID.add(name)
    return name


_VALID: set[str] = set()  # names already checked: the check runs once per name


class Documents(Protocol):
    """Document storage. Documents cross this boundary as dicts going in and JSON text
    (bytes) coming out, so a read is sent to the client without being decoded."""

    async def insert_one(self, collection: str, doc: dict[str, Any]) -> WriteResult: ...

    async def insert_many(
        self, collection: str, docs: list[dict[str, Any]]
    ) -> list[ItemResult]: ...

    async def get(self, collection: str, doc_id: str) -> WriteResult | None: ...

    async def change(
        self,
        collection: str,
        doc_id: str,
        change: Change,
        *,
        upsert: bool = False,
        if_match: int | None = None,
        row_filter: Filter | None = None,
    ) -> WriteResult: ...

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        row_filter: Filter | None = None,
    ) -> int: ...

    async def find(self, collection: str, spec: FindSpec) -> Page: ...

    async def count(self, collection: str, flt: Filter, *, kinds: DeclaredKinds = ()) -> int: ...

    async def aggregate(self, collection: str, spec: AggregateSpec) -> Aggregated:
        """The pipeline as one statement over the caller's views (``Capabilities.aggregate``)."""
        ...

    async def search(self, request: SearchRequest) -> SearchHits:
        """Full-text search over the request's targets, ranked as one list
        (``Capabilities.search``; see proxy.query.search for every rule). A target whose
        table does not exist has no hits."""
        ...

    async def collection_names(self) -> list[str]:
        """Every collection that has a table, sorted (``Capabilities.search``)."""
        ...

    async def preview(
        self,
        collection: str,
        doc_id: str,
        change: Change,
        *,
        upsert: bool = False,
        row_filter: Filter | None = None,
    ) -> Preview | None:
        """What ``change`` would make of the document, computed by the database (the same
        expressions ``change`` writes with) and written nowhere; None when there is no such
        document within ``row_filter`` and ``upsert`` is False."""
        ...


class TxKind(enum.Enum):
    """What a transaction is for, which decides what it may hold (see ``TransactionShare``)."""

    INTERACTIVE = "interactive"  # begin/commit over HTTP: may sit idle between requests
    BATCH = "batch"  # one request, many operations
    SINGLE = "single"  # one plain write (an idempotent one): counts as a plain request


def transaction_share(pool_size: int) -> int:
    """How many of a pool's connections batches and interactive transactions may hold at
    once: a quarter (at least one) stays for plain requests; a pool of one keeps none."""
    reserve = max(1, -(-pool_size // 4))
    return max(1, pool_size - reserve)


class TransactionShare:
    """The part of a pool that batches and interactive transactions may hold.

    An interactive ``begin`` beyond it is refused at once (the holders may sit idle for
    their whole idle timeout); a batch waits for a slot up to the pool's acquire timeout.
    Either way the refusal is 503 ``too_many_transactions`` with Retry-After."""

    def __init__(self, pool_size: int) -> None:
        self.pool_size = pool_size
        self.limit = transaction_share(pool_size)
        self.held = 0
        self._slots = asyncio.Semaphore(self.limit)

    async def take(self, kind: TxKind, wait: float) -> bool:
        """Take a slot for ``kind``; False when ``kind`` needs none (nothing to give back)."""
        if kind is TxKind.SINGLE:
            return False
        if not self._slots.locked():
            await self._slots.acquire()  # free: returns without waiting
        elif kind is TxKind.INTERACTIVE:
            raise self._refusal()
        else:
            try:
                await asyncio.wait_for(self._slots.acquire(), wait)
            except TimeoutError:
                raise self._refusal() from None
        self.held += 1
        return True

    def give(self) -> None:
        self.held -= 1
        self._slots.release()

    def _refusal(self) -> Unavailable:
        return Unavailable(
            f"transactions hold every connection they may use ({self.limit} of "
            f"{self.pool_size}; the rest is kept for plain requests); retry shortly",
            code="too_many_transactions",
            retry_after=1,
            details={"limit": self.limit, "pool": self.pool_size},
        )


class Transaction(Documents, Protocol):
    """Document operations inside one open database transaction (one pinned connection)."""

    failed: ProxyError | None
    closed: bool

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...

    async def idem_claim(self, key: str, fingerprint: str, ttl: float) -> StoredReply | None: ...

    async def idem_save(self, key: str, reply: StoredReply) -> None: ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do beyond the document contract: declared by each backend class
    and asked by the pipeline, never probed with ``hasattr``."""

    explain: bool = False  # ``explain``: the plan of a slow statement
    describe_collections: bool = False  # ``describe_collections``: sizes for /api/db/stats
    audit_log: bool = False  # ``audit_log``: the writes' audit trail
    endpoints: bool = False  # ``connections`` lists pools, roles and breakers
    coalesce: bool = False  # concurrent point reads share one statement
    schemas: bool = False  # ``load_schemas``, ``describe_collection``, ``migrations``
    aggregate: bool = False  # ``aggregate``: pipelines compiled to one statement
    search: bool = False  # ``search`` and ``collection_names``: full-text search


class Backend(Documents, Protocol):
    """A configured database: lifecycle, health, transactions, and what it declares it can
    do (``capabilities``; a method whose capability is False must not be called)."""

    name: str
    capabilities: Capabilities

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def health(self) -> dict[str, Any]: ...

    async def begin(
        self, isolation: str = "read_committed", kind: TxKind = TxKind.SINGLE
    ) -> Transaction: ...

    async def maintain(self) -> None: ...

    def connections(self) -> dict[str, Any]: ...

    async def load_schemas(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """Every declared collection schema: collection → (version, its JSON form)."""
        ...

    async def watch_schemas(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Until cancelled: await ``changed`` whenever the declared schemas may have changed
        (PostgreSQL: LISTEN for the NOTIFY every migration sends; the embedded store: a
        local poll), and once at the start."""
        ...

    async def describe_collection(self, collection: str, sample: int) -> dict[str, Any]:
        """One collection as the database has it: ``exists``, ``indexes`` (name, fields,
        unique, valid, size_bytes), ``estimated_count``, ``size_bytes``, and up to
        ``sample`` stored documents (``sample``, decoded) for type inference."""
        ...

    async def describe_collections(self) -> dict[str, Any]: ...

    def migrations(self) -> MigrationStore:
        """The migration side (``proxy.backends.migrations``); when ``schemas``."""
        ...

    async def explain(self, sql: str, args: tuple[Any, ...]) -> tuple[bool, str]: ...

    async def audit_log(
        self,
        *,
        scope: AuditScope | None = None,
        service: str | None = None,
        collection: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]: ...


class Unsupported:
    """What a backend without an optional capability answers (its flag is False, so the
    pipeline never calls these; they exist so every backend meets ``Backend``)."""

    def connections(self) -> dict[str, Any]:
        return {"endpoints": []}

    async def describe_collections(self) -> dict[str, Any]:
        return {}

    async def explain(self, sql: str, args: tuple[Any, ...]) -> tuple[bool, str]:
        raise Unsupported.refusal("explain")

    @staticmethod
    def refusal(what: str) -> ProxyError:
        return BadRequest(f"this database does not support {what}", code="unsupported_by_backend")
