"""Coalesced point reads on MongoDB: concurrent reads by id of one collection share one
``find({"_id": {"$in": [...]}})``, each caller getting its own document (docs/mongodb.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection

from proxy.backends.coalesce import Coalescer, FetchMany
from proxy.backends.mongo.documents import body_of
from proxy.query.spec import WriteResult

Session = AsyncClientSession | None
Read = Callable[[Callable[[Session], Awaitable[Any]]], Awaitable[Any]]
MAX_COLLECTIONS = 10_000  # coalescers kept before they are all forgotten (names are bounded)


class PointReads:
    """One ``Coalescer`` per collection over ``read`` (the backend's breaker-guarded read)."""

    def __init__(self, read: Read, collection: Callable[[str], AsyncCollection[Any]]) -> None:
        self._read = read
        self._collection = collection
        self._coalescers: dict[str, Coalescer[str, WriteResult]] = {}

    async def get(self, collection: str, doc_id: str) -> WriteResult | None:
        co = self._coalescers.get(collection)
        if co is None:
            if len(self._coalescers) >= MAX_COLLECTIONS:
                self._coalescers.clear()
            co = self._coalescers[collection] = Coalescer(self._fetcher(collection))
        return await co.get(doc_id)

    def _fetcher(self, collection: str) -> FetchMany[str, WriteResult]:
        async def fetch_many(ids: list[str]) -> dict[str, WriteResult]:
            coll = self._collection(collection)

            async def run(session: Session) -> list[dict[str, Any]]:
                cursor = coll.find({"_id": {"$in": ids}}, session=session)
                return await cursor.to_list(None)

            docs = await self._read(run)
            return {d["_id"]: WriteResult(body_of(d), int(d["_version"])) for d in docs}

        return fetch_many
