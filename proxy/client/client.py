"""The async client: ``Client`` (HTTP, retries, consistency token), ``Collection`` and
``Transaction``. Imports nothing of the server; aiohttp's client only."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import aiohttp

from proxy.client.errors import DbProxyError, from_response

Doc = dict[str, Any]


class Client:
    """``async with Client("http://127.0.0.1:8700", token=None) as db``. Retryable errors
    (429, 503, 409 marked retryable, lost connections) are retried with exponential
    backoff; a retried write carries an Idempotency-Key (generated when not given), so it
    happens once. The X-Consistency-Token of the last write goes with later reads."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        retries: int = 3,
        backoff: float = 0.1,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.consistency_token: str | None = None
        self._headers = dict(headers or {})
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def collection(self, name: str) -> Collection:
        return Collection(self, name)

    def transaction(self, isolation: str | None = None) -> Transaction:
        return Transaction(self, isolation)

    async def search(self, q: str, **options: Any) -> Doc:
        """``POST /api/db/search``: options are the body's other fields (collections, …)."""
        result: Doc = await self.request("POST", "/api/db/search", body={"q": q, **options})
        return result

    async def health(self) -> Doc:
        result: Doc = await self.request("GET", "/api/db/health", retry=False)
        return result

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        write: bool = False,
        retry: bool = True,
        tx: str | None = None,
    ) -> Any:
        """One call, retried when that is safe; the parsed JSON answer, or DbProxyError."""
        if self._session is None:
            raise RuntimeError("use the client as `async with Client(...) as db`")
        sent = dict(headers or {})
        if tx is not None:
            sent["X-Transaction-Id"] = tx
            retry = False  # a statement inside a transaction is not repeated behind its back
        if write and retry and "Idempotency-Key" not in sent:
            sent["Idempotency-Key"] = uuid.uuid4().hex
        if not write and self.consistency_token is not None:
            sent["X-Consistency-Token"] = self.consistency_token
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            try:
                return await self._once(method, path, body, params, sent)
            except DbProxyError as err:
                if not err.retryable or attempt == attempts - 1:
                    raise
                await asyncio.sleep(self._delay(attempt, err.retry_after))
            except (TimeoutError, aiohttp.ClientConnectionError):
                if attempt == attempts - 1 or (write and "Idempotency-Key" not in sent):
                    raise
                await asyncio.sleep(self._delay(attempt, None))
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = self.backoff * (2**attempt) * (0.5 + random.random())
        return float(max(delay, min(retry_after, 5.0))) if retry_after is not None else delay

    async def _once(
        self,
        method: str,
        path: str,
        body: Any,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str],
    ) -> Any:
        assert self._session is not None
        async with self._session.request(
            method, self.url + path, json=body, params=params, headers=headers
        ) as response:
            token = response.headers.get("X-Consistency-Token")
            if token is not None:
                self.consistency_token = token
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = None
            if response.status >= 400:
                raise from_response(response.status, data, response.headers)
            return data


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _conditions(if_match: int | None, idempotency_key: str | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if if_match is not None:
        headers["If-Match"] = f'"{int(if_match)}"'
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


class Collection:
    """The document operations on one collection (inside a transaction when ``tx``)."""

    def __init__(self, client: Client, name: str, tx: str | None = None) -> None:
        self.client = client
        self.name = name
        self.tx = tx
        self._base = f"/api/db/{_quote(name)}"

    def _path(self, doc_id: str) -> str:
        return f"{self._base}/{_quote(doc_id)}"

    async def _write(
        self, method: str, path: str, body: Any, headers: dict[str, str], **kw: Any
    ) -> Doc:
        result: Doc = await self.client.request(
            method, path, body=body, headers=headers, write=True, tx=self.tx, **kw
        )
        return result

    async def create(self, document: Doc, *, idempotency_key: str | None = None) -> Doc:
        return await self._write("POST", self._base, document, _conditions(None, idempotency_key))

    async def create_many(self, documents: list[Doc], *, idempotency_key: str | None = None) -> Doc:
        """``{"items": [{"status", "_id", ...}], "created", "failed"}`` (each item alone)."""
        body = list(documents)
        return await self._write("POST", self._base, body, _conditions(None, idempotency_key))

    async def get(self, doc_id: str, *, fields: str | list[str] | None = None) -> Doc:
        params = None
        if fields is not None:
            params = {"fields": fields if isinstance(fields, str) else ",".join(fields)}
        result: Doc = await self.client.request(
            "GET", self._path(doc_id), params=params, tx=self.tx
        )
        return result

    async def replace(
        self,
        doc_id: str,
        document: Doc,
        *,
        if_match: int | None = None,
        upsert: bool = False,
        idempotency_key: str | None = None,
    ) -> Doc:
        headers = _conditions(if_match, idempotency_key)
        params = {"upsert": "true"} if upsert else None
        return await self._write("PUT", self._path(doc_id), document, headers, params=params)

    async def update(
        self,
        doc_id: str,
        operators: Doc,
        *,
        if_match: int | None = None,
        upsert: bool = False,
        idempotency_key: str | None = None,
    ) -> Doc:
        """Update operators (``{"$inc": {"n": 1}}``), applied in the database."""
        if not operators or not all(k.startswith("$") for k in operators):
            raise ValueError("update takes update operators only ($set, $inc, ...)")
        return await self.replace(
            doc_id, operators, if_match=if_match, upsert=upsert, idempotency_key=idempotency_key
        )

    async def patch(
        self,
        doc_id: str,
        patch: Doc,
        *,
        if_match: int | None = None,
        idempotency_key: str | None = None,
    ) -> Doc:
        headers = _conditions(if_match, idempotency_key)
        return await self._write("PATCH", self._path(doc_id), patch, headers)

    async def delete(
        self, doc_id: str, *, if_match: int | None = None, idempotency_key: str | None = None
    ) -> Doc:
        headers = _conditions(if_match, idempotency_key)
        return await self._write("DELETE", self._path(doc_id), None, headers)

    async def find(
        self,
        filter: Doc | None = None,
        *,
        sort: str | Doc | None = None,
        limit: int | None = None,
        fields: str | list[str] | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Doc]:
        """Every matching document (at most ``limit``), page after page following ``next``."""
        body: Doc = {}
        if filter is not None:
            body["filter"] = filter
        if sort is not None:
            body["sort"] = sort
        if fields is not None:
            body["fields"] = fields
        left = limit
        while True:
            body["limit"] = page_size if left is None else max(1, min(page_size, left))
            page = await self.client.request("POST", f"{self._base}/query", body=body, tx=self.tx)
            for item in page["items"]:
                if left is not None:
                    if left <= 0:
                        return
                    left -= 1
                yield item
            if not page.get("next") or (left is not None and left <= 0):
                return
            body["next"] = page["next"]

    async def count(self, filter: Doc | None = None) -> int:
        import json

        params = {"filter": json.dumps(filter)} if filter is not None else None
        result = await self.client.request("GET", f"{self._base}/count", params=params, tx=self.tx)
        return int(result["count"])

    async def aggregate(self, pipeline: list[Doc]) -> list[Doc]:
        result = await self.client.request(
            "POST", f"{self._base}/aggregate", body={"pipeline": pipeline}, tx=self.tx
        )
        items: list[Doc] = result["items"]
        return items


class Transaction:
    """``async with db.transaction() as tx``: begun on entry; committed on a clean exit,
    rolled back when the block raises. ``tx.collection(name)`` runs inside it."""

    def __init__(self, client: Client, isolation: str | None = None) -> None:
        self.client = client
        self.isolation = isolation
        self.id: str | None = None

    def collection(self, name: str) -> Collection:
        if self.id is None:
            raise RuntimeError("the transaction has not begun (use `async with`)")
        return Collection(self.client, name, self.id)

    async def __aenter__(self) -> Transaction:
        body: Doc = {"action": "begin"}
        if self.isolation is not None:
            body["isolation"] = self.isolation
        begun = await self.client.request("POST", "/api/db/transaction", body=body)
        self.id = str(begun["transaction_id"])
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        action = "commit" if kind is None else "rollback"
        body = {"action": action, "transaction_id": self.id}
        await self.client.request("POST", "/api/db/transaction", body=body, write=True, retry=False)
