"""Observability over HTTP: what every data operation leaves behind (``Observer``) and the
monitoring endpoints /metrics, /api/db/stats|performance|connections|audit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import context
from proxy.errors import BadRequest
from proxy.http.keys import CORE, caller_of
from proxy.observe.batch import OTHER
from proxy.observe.metrics import Metrics
from proxy.observe.patterns import query_pattern
from proxy.observe.pusher import StatsPusher
from proxy.observe.stats import StatsRecorder
from proxy.pipeline import gate
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller

log = logging.getLogger(__name__)

METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
STATS: web.AppKey[StatsRecorder] = web.AppKey("stats", StatsRecorder)
PUSHER: web.AppKey[StatsPusher] = web.AppKey("pusher", StatsPusher)
# what a handler tells the timing middleware about its operation
PATTERN_SOURCE: web.RequestKey[object] = web.RequestKey("pattern_source", object)
DOCUMENTS: web.RequestKey[int] = web.RequestKey("documents", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# operations whose handlers never set PATTERN_SOURCE or DOCUMENTS
_SIMPLE = frozenset({"get", "update", "delete"})
_PLAIN_PATTERNS: dict[tuple[str, str], str] = {}


def _plain_pattern(operation: str, collection: str) -> str:
    key = (operation, collection)
    pattern = _PLAIN_PATTERNS.get(key)
    if pattern is None:
        if len(_PLAIN_PATTERNS) > 10_000:
            _PLAIN_PATTERNS.clear()
        pattern = _PLAIN_PATTERNS[key] = f"{operation} {collection}"
    return pattern


class Observer:
    """Where every finished data operation is counted: Prometheus histogram, request
    volume per service, and the stats recorder (patterns, windows, collector deltas).

    The hot path only appends one tuple (``add``); the buffer is folded into the three
    in one pass per ``FLUSH_EVERY`` operations, grouping equal keys, so the counters are
    touched once per group instead of once per request. It is also folded before every
    read (``/metrics``, the stats views, the collector's drain) and at least every
    ``FLUSH_SECONDS``, so nothing a reader sees is behind and every operation lands in
    the stats window it finished in (give or take that second). Slow operations skip the
    buffer: they are recorded at once, with their plan looked up."""

    FLUSH_EVERY: Final = 256
    FLUSH_SECONDS: Final = 1.0

    def __init__(self, metrics: Metrics, core: Core, recorder: StatsRecorder) -> None:
        self.metrics = metrics
        self.core = core
        self.recorder = recorder
        self._buffer: list[tuple[str, str, int, str | None, str | None, str, float, int]] = []

    def finish(
        self,
        request: web.Request,
        caller: Caller | None,
        operation: str,
        collection: str,
        seconds: float,
        status: int,
        code: str | None,
    ) -> None:
        """Count one finished data operation (``caller`` None: identification failed).
        Called by the identity middleware (``middleware.observed_identity``) around every data
        route, whatever the outcome."""
        if operation in _SIMPLE:  # by-id routes: no pattern source, one document at most
            pattern = _plain_pattern(operation, collection)
            documents = 1 if status < 300 else 0
        else:
            source = request.get(PATTERN_SOURCE)
            pattern = (
                _plain_pattern(operation, collection)
                if source is None
                else query_pattern(operation, collection, source)
            )
            documents = request.get(DOCUMENTS, 1 if status < 300 else 0)
        service = None if caller is None else caller.service
        recorder = self.recorder
        if seconds * 1000.0 < recorder.slow_threshold_ms:
            buffer = self._buffer
            buffer.append(
                (operation, collection, status, code, service, pattern, seconds, documents)
            )
            if len(buffer) >= self.FLUSH_EVERY:
                self.flush()
            if recorder.plan(pattern) is None:  # a shape's first runs: note its plan once
                self._explain(pattern, first_sight=True)
            return
        self.flush()
        self._fold(operation, collection, status, code, service, pattern, [seconds], documents)
        if recorder.plan(pattern) is None:
            self._explain(pattern)

    def _explain(self, pattern: str, first_sight: bool = False) -> None:
        """The plan of the statement this operation ran (``index_used``), looked up in the
        background and noted for its pattern."""
        statement = context.last_statement.get()
        if statement is not None:
            recorder = self.recorder
            self.core.explain_later(
                statement,
                lambda used, text: recorder.note_plan(pattern, used, text),
                first_sight=first_sight,
            )

    def flush(self) -> None:
        buffer = self._buffer
        if not buffer:
            return
        self._buffer = []
        groups: dict[tuple[str, str, int, str | None, str | None, str], list[Any]] = {}
        for operation, collection, status, code, service, pattern, seconds, docs in buffer:
            key = (operation, collection, status, code, service, pattern)
            group = groups.get(key)
            if group is None:
                groups[key] = [[seconds], docs]
            else:
                group[0].append(seconds)
                group[1] += docs
        for (operation, collection, status, code, service, pattern), (
            seconds_list,
            docs,
        ) in groups.items():
            self._fold(operation, collection, status, code, service, pattern, seconds_list, docs)

    def _fold(
        self,
        operation: str,
        collection: str,
        status: int,
        code: str | None,
        service: str | None,
        pattern: str,
        seconds: list[float],
        documents: int,
    ) -> None:
        self.metrics.observe_many(operation, collection, status, seconds, code)
        if service is not None:
            self.core.count_request(service, operation, len(seconds))
        self.recorder.record_many(
            collection,
            operation,
            pattern,
            [s * 1000.0 for s in seconds],
            documents,
            status < 400,
            code,
        )

    async def run(self) -> None:
        """Fold the buffer at least every ``FLUSH_SECONDS`` (until cancelled)."""
        while True:
            await asyncio.sleep(self.FLUSH_SECONDS)
            self.flush()


OBSERVER: web.AppKey[Observer] = web.AppKey("observer", Observer)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _monitor(request: web.Request) -> Core:
    gate.authorize_service_wide(caller_of(request), "monitor")
    return request.app[CORE]


def _visible(caller: Caller) -> Callable[[str], bool] | None:
    """Which collections a monitoring caller may see in the stats views: those it may
    read, as for the audit log (None: all, when it reads ``"*"`` or nothing enforces).
    ``"<other>"``, where names past the bounds fold, mixes anyone's: shown to "*" only."""
    scope = gate.audit_scope(caller)
    if scope is None:
        return None
    return lambda collection: collection != OTHER and scope.covers(collection)


async def metrics(request: web.Request) -> web.Response:
    request.app[OBSERVER].flush()
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def stats(request: web.Request) -> web.Response:
    core = _monitor(request)
    caller = caller_of(request)
    visible = _visible(caller)
    request.app[OBSERVER].flush()
    databases = {}
    for name, backend in core.backends.items():
        described = backend.capabilities.describe_collections
        tables = await backend.describe_collections() if described else {}
        if visible is not None:
            tables = {table: about for table, about in tables.items() if visible(table)}
        databases[name] = tables
    services = core.volume_by_service()
    if visible is not None:  # a scoped caller sees its own service's volume only
        services = {k: v for k, v in services.items() if k == caller.service}
    return _json(
        {
            "databases": databases,
            "requests": request.app[STATS].totals(visible=visible),
            "services": services,
        }
    )


async def performance(request: web.Request) -> web.Response:
    _monitor(request)
    top = request.query.get("top", "20")
    if not top.isdigit() or not 1 <= int(top) <= 200:
        raise BadRequest("top must be 1-200", code="invalid_parameter")
    visible = _visible(caller_of(request))
    return _json(request.app[STATS].performance(top=int(top), visible=visible))


async def connections(request: web.Request) -> web.Response:
    core = _monitor(request)
    return _json(core.connections())


async def audit(request: web.Request) -> web.Response:
    core = _monitor(request)
    q = request.query
    unknown = set(q) - {"service", "collection", "since", "until", "after", "limit"}
    if unknown:
        raise BadRequest(
            f"unknown parameter(s): {', '.join(sorted(unknown))}", code="unknown_parameter"
        )
    backend = core.backend()
    if not backend.capabilities.audit_log:
        raise BadRequest("this database keeps no audit log", code="unsupported_by_backend")
    limit = _number(q.get("limit", "100"), "limit", int)
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be 1-1000", code="invalid_parameter")
    caller = caller_of(request)
    scope = gate.audit_scope(caller)
    collection = q.get("collection")
    if scope is not None and collection is not None and collection != "*":
        gate.authorize(caller, collection, "read")  # decided by the policy alone
    rows = await backend.audit_log(
        scope=scope,
        service=q.get("service"),
        collection=collection,
        since=_number(q["since"], "since", float) if "since" in q else None,
        until=_number(q["until"], "until", float) if "until" in q else None,
        after_id=_number(q["after"], "after", int) if "after" in q else None,
        limit=limit,
    )
    nxt = str(rows[-1]["id"]) if len(rows) == limit else None
    return _json({"items": rows, "next": nxt})


def _number(raw: str, name: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number", code="invalid_parameter") from None


@dataclass(frozen=True)
class Monitoring:
    """The monitoring side's parts, built by ``proxy.wiring``."""

    metrics: Metrics
    stats: StatsRecorder
    observer: Observer
    pusher: StatsPusher | None = None


def install(app: web.Application, monitoring: Monitoring) -> None:
    """Routes and state of the monitoring side; the observer's flush task and the stats
    pusher run while the application does."""
    app[METRICS] = monitoring.metrics
    app[STATS] = monitoring.stats
    app[OBSERVER] = monitoring.observer
    app.cleanup_ctx.append(_observer_ctx)
    r = app.router
    r.add_get("/metrics", metrics)
    r.add_get("/api/db/stats", stats)
    r.add_get("/api/db/performance", performance)
    r.add_get("/api/db/connections", connections)
    r.add_get("/api/db/audit", audit)
    if monitoring.pusher is not None:
        app[PUSHER] = monitoring.pusher
        app.cleanup_ctx.append(_pusher_ctx)


async def _observer_ctx(app: web.Application) -> AsyncIterator[None]:
    observer = app[OBSERVER]
    task = asyncio.create_task(observer.run(), name="stats-flush")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        observer.flush()


async def _pusher_ctx(app: web.Application) -> AsyncIterator[None]:
    pusher = app[PUSHER]
    await pusher.start()
    try:
        yield
    finally:
        await asyncio.shield(pusher.close())
