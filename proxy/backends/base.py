"""The contract every storage backend implements, and the checks they share."""

from __future__ import annotations

import re
from typing import Any, Protocol

from proxy.errors import InvalidCollection, ProxyError
from proxy.ops import Change, FindSpec, ItemResult, Page, StoredReply, WriteResult
from proxy.policy import RESERVED_COLLECTIONS
from proxy.query.ast import Filter

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
        guard: Filter | None = None,
    ) -> WriteResult: ...

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        guard: Filter | None = None,
    ) -> int: ...

    async def find(self, collection: str, spec: FindSpec) -> Page: ...

    async def count(self, collection: str, flt: Filter) -> int: ...


class Transaction(Documents, Protocol):
    """Document operations inside one open database transaction (one pinned connection)."""

    failed: ProxyError | None
    closed: bool

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...

    async def idem_claim(self, key: str, fingerprint: str, ttl: float) -> StoredReply | None: ...

    async def idem_save(self, key: str, reply: StoredReply) -> None: ...


class Backend(Documents, Protocol):
    """A configured database: lifecycle, health, and transactions."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def health(self) -> dict[str, Any]: ...

    async def begin(self, isolation: str = "read_committed") -> Transaction: ...

    async def maintain(self) -> None: ...
