"""The central stats collector's HTTP service: authenticated batch pushes from sidecars,
fleet views, health, and the collector's own Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.backends.postgres.rollups import PostgresRollups
from proxy.collector import CollectorStore, parse_push_batch
from proxy.config.secrets import SecretTemplate
from proxy.errors import (
    BadRequest,
    InvalidJson,
    PayloadTooLarge,
    ProxyError,
    Unauthorized,
)
from proxy.http.middleware import envelope, json_response
from proxy.observe.batch import SERVICE_RE
from proxy.observe.pusher import BATCHES_PATH

__all__ = [
    "METRICS",
    "SETTINGS",
    "STORE",
    "CollectorMetrics",
    "CollectorSettings",
    "build_collector_app",
    "collector_store",
]

log = logging.getLogger(__name__)

PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4; charset=utf-8"
_MAX_TOP: Final = 100
_MAX_SLOW: Final = 1000


@dataclass(frozen=True, slots=True)
class CollectorSettings:
    """What ``dbproxy collector`` runs with. ``token`` None accepts unauthenticated pushes."""

    database_url: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    # how database_url is rendered again when a ${file:} secret changes (None: no file)
    database_secret: SecretTemplate | None = field(default=None, repr=False, compare=False)
    secrets_interval: float = 2.0  # seconds between looks at the secret files
    host: str = "127.0.0.1"
    port: int = 8710
    max_body_bytes: int = 8 * 1024 * 1024
    maintenance_interval_seconds: float = 60.0
    slow_retention: int = 10_000


class CollectorMetrics:
    """The collector's own metrics, in a registry of its own (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.accepted = Counter(
            "dbproxy_collector_batches_accepted", "Stat batches merged into the rollups", registry=r
        )
        self.duplicates = Counter(
            "dbproxy_collector_batches_duplicate",
            "Stat batches received again (same batch_id) and ignored",
            registry=r,
        )
        self.rejected = Counter(
            "dbproxy_collector_batches_rejected",
            "Stat batches refused, by reason",
            ["reason"],
            registry=r,
        )
        self.patterns = Counter(
            "dbproxy_collector_patterns_merged", "Pattern rollups merged", registry=r
        )
        self.slow = Counter(
            "dbproxy_collector_slow_queries_received", "Slow queries received", registry=r
        )
        self.services = Gauge(
            "dbproxy_collector_services_seen", "Distinct services that pushed", registry=r
        )
        self.instances = Gauge(
            "dbproxy_collector_instances_seen", "Distinct sidecar instances that pushed", registry=r
        )
        self.ingest_seconds = Histogram(
            "dbproxy_collector_ingest_seconds",
            "Time to store one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        for reason in ("unauthorized", "invalid", "too_large", "unavailable"):
            self.rejected.labels(reason)  # every series exists from the start
        self._seen: set[tuple[str, str]] = set()

    def seen(self, pairs: list[tuple[str, str]]) -> None:
        """Note (service, instance) pairs; updates the gauges."""
        self._seen.update(pairs)
        self.services.set(len({service for service, _ in self._seen}))
        self.instances.set(len(self._seen))


STORE: web.AppKey[CollectorStore] = web.AppKey("collector_store", CollectorStore)
SETTINGS: web.AppKey[CollectorSettings] = web.AppKey("collector_settings", CollectorSettings)
METRICS: web.AppKey[CollectorMetrics] = web.AppKey("collector_metrics", CollectorMetrics)


# ---- handlers ------------------------------------------------------------------------


def _authorized(request: web.Request, token: str | None) -> bool:
    if token is None:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"a stats batch may be at most {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"a stats batch may be at most {limit} bytes") from None
    if not raw:
        raise BadRequest("a JSON body is required", code="missing_body")
    return raw


async def push_batch(request: web.Request) -> web.Response:
    """POST /api/collector/batches: 202 when merged (or already merged before), 400 and
    nothing stored when the batch is not valid, 401 without the right token."""
    settings, metrics = request.app[SETTINGS], request.app[METRICS]
    if not _authorized(request, settings.token):
        metrics.rejected.labels("unauthorized").inc()
        raise Unauthorized("a valid push token is required (Authorization: Bearer <token>)")
    try:
        raw = await _read_body(request, settings.max_body_bytes)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidJson("the stats batch is not valid JSON") from None
        batch = parse_push_batch(data)
    except PayloadTooLarge:
        metrics.rejected.labels("too_large").inc()
        raise
    except BadRequest:
        metrics.rejected.labels("invalid").inc()
        raise
    started = time.perf_counter()
    try:
        fresh = await request.app[STORE].ingest(batch)
    except ProxyError:
        metrics.rejected.labels("unavailable").inc()
        raise
    metrics.ingest_seconds.observe(time.perf_counter() - started)
    if fresh:
        metrics.accepted.inc()
        metrics.patterns.inc(len(batch.patterns))
        metrics.slow.inc(len(batch.slow))
        metrics.seen([(batch.service, batch.instance)])
    else:
        metrics.duplicates.inc()
    return json_response(
        {
            "accepted": True,
            "duplicate": not fresh,
            "batch_id": batch.batch_id,
            "patterns": len(batch.patterns),
            "slow": len(batch.slow),
        },
        202,
    )


def _int_param(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from 0 to {high}", code="invalid_parameter")
    return int(raw)


async def performance(request: web.Request) -> web.Response:
    """GET /api/db/performance?scope=fleet[&service=NAME][&top=20][&slow=50]."""
    unknown = set(request.query) - {"scope", "service", "top", "slow"}
    if unknown:
        raise BadRequest(
            f"unknown parameter(s): {', '.join(sorted(unknown))[:200]}", code="unknown_parameter"
        )
    if request.query.get("scope", "fleet") != "fleet":
        raise BadRequest("the collector serves scope=fleet only", code="invalid_parameter")
    service = request.query.get("service")
    if service is not None and not SERVICE_RE.fullmatch(service):
        raise BadRequest("service is not a valid service name", code="invalid_parameter")
    top = _int_param(request, "top", 20, _MAX_TOP)
    slow = _int_param(request, "slow", 50, _MAX_SLOW)
    view = await request.app[STORE].fleet_performance(service, top, slow)
    return json_response(view)


async def health(request: web.Request) -> web.Response:
    db = await request.app[STORE].health()
    ready = db.get("status") == "up"
    body = {"status": "ready" if ready else "unavailable", "databases": {"collector": db}}
    return json_response(body, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    text = generate_latest(request.app[METRICS].registry)
    return web.Response(body=text, headers={"Content-Type": PROMETHEUS_TEXT})


# ---- application ---------------------------------------------------------------------


def collector_store(settings: CollectorSettings) -> CollectorStore:
    """The fleet store of these settings: rollups in PostgreSQL at ``database_url``."""
    return CollectorStore(
        PostgresRollups(settings.database_url), slow_retention=settings.slow_retention
    )


def build_collector_app(
    settings: CollectorSettings, store: CollectorStore | None = None
) -> web.Application:
    """The collector's aiohttp application; the store is opened and closed with it."""
    app = web.Application(
        middlewares=[envelope],
        client_max_size=settings.max_body_bytes,
        handler_args={"max_field_size": 16384, "max_line_size": 16384},
    )
    app[SETTINGS] = settings
    app[STORE] = store or collector_store(settings)
    app[METRICS] = CollectorMetrics()
    app.cleanup_ctx.append(_store_ctx)
    r = app.router
    r.add_post(BATCHES_PATH, push_batch)
    r.add_get("/api/db/performance", performance)
    r.add_get("/api/db/health", health)
    r.add_get("/metrics", metrics)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    await store.start()
    upkeep = asyncio.create_task(_upkeep(app))
    try:
        yield
    finally:
        upkeep.cancel()
        await asyncio.gather(upkeep, return_exceptions=True)
        await store.close()


async def _upkeep(app: web.Application) -> None:
    """Right away and then periodically: refresh the services gauge, prune old rows."""
    store, metrics = app[STORE], app[METRICS]
    interval = app[SETTINGS].maintenance_interval_seconds
    while True:
        with contextlib.suppress(ProxyError):
            await _refresh_seen(store, metrics)
        try:
            await store.maintain()
        except ProxyError as err:
            log.warning("collector maintenance skipped: %s", err.code)
        await asyncio.sleep(interval)


async def _refresh_seen(store: CollectorStore, metrics: CollectorMetrics) -> None:
    pairs: list[tuple[str, str]] = await store.instances()
    metrics.seen(pairs)
