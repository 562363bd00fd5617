"""Aggregation on MongoDB: the validated pipeline compiled to the server's own pipeline
(proxy.query.aggregate.mongo), run as one ``aggregate`` command, its documents as JSON text."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from proxy import context
from proxy.backends.mongo.errors import translate
from proxy.errors import InternalError, InvalidQuery, ProxyError
from proxy.query.aggregate.ast import Aggregated, AggregateSpec
from proxy.query.aggregate.mongo import compile_pipeline
from proxy.query.aggregate.mongo_expr import FAILED

log = logging.getLogger(__name__)

T = TypeVar("T")
Session = AsyncClientSession | None
# the server refused the compiled pipeline itself (a stage or an operator it does not
# know, a bad specification): dbproxy's fault or the server's, never the caller's values
_REFUSED_PIPELINE = {40324, 31325, 168, 15983, 16410, 16411, 40323, 40352, 17276}
# what the values are not to blame for: time, size, the server's state
_NOT_VALUES = {50, 262, 10334, 17419, 17420, 10, 91, 189, 11600, 11602, 13435, 13436, 112}
_SERVER_INTERNAL = 1  # MongoDB's InternalError
_EXPLAINED = ("stages", "queryPlanner", "explainVersion")


class MongoAggregate:
    """``aggregate``, mixed into the document operations (the backend and a transaction:
    ``_read`` runs one read, with the transaction's session when there is one)."""

    @property
    def db(self) -> AsyncDatabase[Any]:
        raise NotImplementedError

    async def _read(self, op: Callable[[Session], Awaitable[T]]) -> T:
        raise NotImplementedError

    def _coll(self, collection: str) -> AsyncCollection[Any]:
        raise NotImplementedError

    def _max_ms(self) -> int:
        raise NotImplementedError

    async def aggregate(self, collection: str, spec: AggregateSpec) -> Aggregated:
        views = {v.collection: v for v in spec.views}
        stages = compile_pipeline(spec.pipeline, spec.base, views, spec.cap)
        if spec.explain:
            return await self._explain_pipeline(collection, stages)
        coll = self._coll(collection)
        context.last_statement.set(("mongodb aggregate", (collection,)))

        async def run(session: Session) -> list[dict[str, Any]]:
            try:
                cur = await coll.aggregate(
                    stages, session=session, maxTimeMS=self._max_ms(), allowDiskUse=True
                )
                return list(await cur.to_list())
            except OperationFailure as exc:
                raise _failed(exc) from None

        rows = await self._read(run)
        items = [orjson.dumps(row) for row in rows]
        for item in items:
            if len(item) > spec.max_bytes:
                raise InvalidQuery(
                    f"an output document is over {spec.max_bytes} bytes",
                    code="result_too_large",
                )
        return Aggregated(items)

    async def _explain_pipeline(self, collection: str, stages: list[dict[str, Any]]) -> Aggregated:
        """The server's plan of the compiled pipeline (its queryPlanner verbosity)."""
        command = {
            "explain": {"aggregate": collection, "pipeline": stages, "cursor": {}},
            "verbosity": "queryPlanner",
        }

        async def run(session: Session) -> dict[str, Any]:
            try:
                return dict(await self.db.command(command, session=session))
            except OperationFailure as exc:
                raise _failed(exc) from None

        answer = await self._read(run)
        plan = {k: answer[k] for k in _EXPLAINED if k in answer}
        return Aggregated([], {"pipeline": _plain(stages), "plan": _plain(plan)})


def _failed(exc: OperationFailure) -> ProxyError:
    """A refused run: the values met an operator that cannot take them (expression_failed,
    naming the operator when dbproxy's own check failed), else as any other error."""
    code = exc.code or 0
    if code in _NOT_VALUES:
        return translate(exc)
    if code == _SERVER_INTERNAL:  # the server's own failure, not the values' nor ours
        log.error("MongoDB failed internally running a pipeline: %s", exc)
        return InternalError(
            "the database failed internally running the pipeline",
            details={"server_code": code},
        )
    if code in _REFUSED_PIPELINE:
        log.error("MongoDB refused a compiled pipeline (code %s)", code)
        return InternalError("the database refused the compiled pipeline")
    message = str((exc.details or {}).get("errmsg", ""))
    found = FAILED.search(message)
    what = found.group(1) if found else f"an operator (server code {code})"
    # the server evaluates constant parts ahead of any document ("folding"): such a
    # failure happens over no input too
    details = {"when": "optimising"} if message.startswith("Failed to optimize") else None
    return InvalidQuery(
        f"an expression failed on a value it cannot take: {what}",
        code="expression_failed",
        details=details,
    )


def _plain(value: Any) -> Any:
    """A server answer as JSON values (BSON-only values as their text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
