"""Where the sidecar and the collector are built: every part made here, collaborators
passed in through constructors; and the processes that serve them."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.backends.base import Backend
from proxy.backends.mongo import MongoBackend
from proxy.backends.postgres import PostgresBackend
from proxy.backends.redis import RedisCache
from proxy.backends.redis.limiter import RedisLimiter
from proxy.backends.sqlite import DATA_FILE, SqliteBackend, check_location, sqlite_path
from proxy.cache import NearCache, TwoLevelCache
from proxy.cache.read_through import Fills
from proxy.collector import CollectorStore
from proxy.config import CacheConfig, Config, DatabaseConfig, ServerConfig, redact_dsn
from proxy.config.rotation import DEFAULT_INTERVAL, CredentialWatcher
from proxy.errors import ConfigError, ProxyError
from proxy.http.app import build_app
from proxy.http.collector import CollectorSettings, build_collector_app, collector_store
from proxy.http.fast_path import Shortcuts
from proxy.http.inject import build_injector_app
from proxy.http.monitor import Monitoring, Observer
from proxy.http.server import AddressInUse, bind, inherited, start, tune_gc
from proxy.inject import InjectorSettings
from proxy.migrate.files import Progress as MigrateProgress
from proxy.migrate.files import load_directory
from proxy.migrate.runner import MigrationRunner, SchemasChanged
from proxy.observe.metrics import Metrics
from proxy.observe.pusher import StatsPusher
from proxy.observe.stats import StatsRecorder
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Gatekeeper
from proxy.pipeline.schemas import SchemaRegistry
from proxy.policy import load_policies
from proxy.tls import client_context, server_context, watch_certificate

log = logging.getLogger("dbproxy")

EMBEDDED_DATABASE = "embedded"


def build_backends(config: Config, *, coalesce: bool = True) -> dict[str, Backend]:
    """The configured databases' backends, every problem reported at once (no I/O)."""
    backends: dict[str, Backend] = {}
    problems = []
    for db in config.databases:
        if db.type == "postgresql":
            partman = db.time_partitions == "pg_partman"
            backends[db.name] = PostgresBackend(
                db, config.limits, coalesce=coalesce, partman=partman
            )
        elif db.type == "mongodb":
            # by-id reads of cached collections fill the cache: from the primary (routing.py)
            cached = frozenset(c for c in config.cache.collections if config.cache.ttl(c))
            backends[db.name] = MongoBackend(
                db, config.limits, coalesce=coalesce, primary_points=cached
            )
        elif db.type == "sqlite":
            try:
                path = sqlite_path(db.connection_string)
            except ValueError as err:
                problems.append(f"databases.{db.name}: {err}")
                continue
            problem = check_location(path)
            if problem is not None:
                problems.append(f"databases.{db.name}: {problem}")
            else:
                backends[db.name] = SqliteBackend(db, config.limits, path=path)
        else:
            problems.append(f"databases.{db.name}: type {db.type!r} has no backend in this build")
    if problems:
        raise ConfigError(problems)
    return backends


def make_core(
    config: Config,
    *,
    announce: bool = True,
    gate: Gatekeeper | None = None,
    coalesce: bool = True,
    cache: TwoLevelCache | None = None,
    fills: Fills | None = None,
) -> Core:
    """The operation pipeline over the configured databases, validated before any I/O;
    with no database configured, over the embedded SQLite store in ``config.data_dir``."""
    backends = build_backends(config, coalesce=coalesce)
    kw: dict[str, Any] = {"gate": gate, "cache": cache, "fills": fills}
    if not config.databases:
        path = os.path.join(config.data_dir, DATA_FILE)
        problem = check_location(path)
        if problem is not None:
            raise ConfigError([f"data_dir: {problem}"])
        embedded = DatabaseConfig(
            name=EMBEDDED_DATABASE,
            type="sqlite",
            connection_string="sqlite://" + os.path.abspath(path),
        )
        backends[EMBEDDED_DATABASE] = SqliteBackend(embedded, config.limits, path=path)
        if announce:
            log.info(
                "no database configured: using the embedded SQLite store at %s "
                "(pass --database URL or --config FILE to use PostgreSQL)",
                os.path.abspath(path),
            )
    default = (
        EMBEDDED_DATABASE
        if not config.databases
        else config.default_database or next(iter(backends))
    )
    registry = SchemaRegistry()

    async def schemas_changed(collection: str) -> None:  # a migration this process ran
        for backend in backends.values():
            await registry.refresh(backend)

    runner = build_migrations(config, backends, default, schemas_changed)
    return Core(config, backends, default, migrations=runner, schemas=registry, **kw)


def build_migrations(
    config: Config,
    backends: dict[str, Backend],
    default: str,
    schemas_changed: SchemasChanged | None = None,
) -> MigrationRunner:
    """The migration runner over every backend that declares ``schemas``;
    ``schemas_changed(collection)`` runs after a migration changed that schema."""
    stores = {n: b.migrations() for n, b in backends.items() if b.capabilities.schemas}
    alembic = {db.name: db.alembic_directory for db in config.databases}
    return MigrationRunner(
        stores, default, schemas_changed=schemas_changed, alembic_directories=alembic
    )


@dataclass(frozen=True)
class ServeOptions:
    """The serve flags that are not part of the database configuration."""

    policies: str | None = None
    service: str | None = None
    redis_url: str | None = None
    redis_timeout: float = 0.05
    workers: int = 1
    watch_interval: float = 2.0
    coalesce: bool = True
    metrics: bool = True
    fast_path: bool = True
    fast_lane: bool = True  # the fast path's requests parsed past aiohttp (http/lane.py)
    listen_fds: tuple[int, ...] = ()  # a --workers child: the sockets its parent bound
    collector_token: str | None = None  # the bearer token stats pushes carry
    secrets_interval: float = DEFAULT_INTERVAL  # seconds between looks at ${file:} secrets
    tls_cert: str | None = None  # the listener's certificate (with tls_key: HTTPS)
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients must present a certificate


def make_gate(
    config: Config, opts: ServeOptions, *, remote: RedisLimiter | None = None
) -> Gatekeeper:
    """Load the policies (every problem at once) and decide the identity mode;
    ``remote``: the shared rate limiter, if any."""
    policies = None
    caps: dict[str, Any] = {
        "max_statement_timeout_seconds": config.limits.statement_timeout_seconds,
        "max_rows": config.limits.max_limit,
        "max_open_transactions": config.limits.max_open_transactions,
    }
    if opts.policies is not None:
        policies = load_policies(opts.policies, **caps)
        if opts.service is not None and policies.get(opts.service) is None:
            raise ConfigError([f"--service {opts.service!r} has no policy in {opts.policies}"])
    token_mode = policies is not None and opts.service is None
    if not token_mode and not _loopback(config.server.host):
        raise ConfigError(
            [
                f"refusing to listen on {config.server.host}: without token mode anyone who "
                "reaches the port is trusted; use --policies DIR without --service, or a "
                "loopback address"
            ]
        )
    return Gatekeeper(
        policies,
        sidecar_service=opts.service,
        remote=remote,
        policy_dir=opts.policies,
        load_caps=caps,
    )


def listener_tls(opts: ServeOptions) -> ssl.SSLContext | None:
    """The listener's TLS context (``--tls-cert``/``--tls-key``, ``--tls-client-ca``), or
    None for plain HTTP; ConfigError naming the file when one cannot be loaded."""
    if opts.tls_cert is None and opts.tls_key is None:
        if opts.tls_client_ca is not None:
            raise ConfigError(["--tls-client-ca needs --tls-cert and --tls-key"])
        return None
    if opts.tls_cert is None or opts.tls_key is None:
        raise ConfigError(["--tls-cert and --tls-key go together"])
    try:
        return server_context(opts.tls_cert, opts.tls_key, opts.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(
            [f"cannot load the listener's TLS certificate, key or client CA: {reason}"]
        ) from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_cache(settings: CacheConfig, fills: Fills) -> TwoLevelCache | None:
    """The read cache, when some collection opts in: near cache, plus Redis if configured."""
    if not any(c.enabled for c in settings.collections.values()):
        return None
    remote = (
        RedisCache(
            settings.redis_url,
            timeout=settings.redis_timeout_seconds,
            ack_timeout=settings.ack_timeout_seconds,
        )
        if settings.redis_url
        else None
    )
    return TwoLevelCache(
        NearCache(settings.near_max_entries, settings.near_max_bytes),
        remote,
        ttl_default=60.0,
        forget=fills.forget,  # in-flight fills of an invalidated key are not joined again
    )


def build_monitoring(config: Config, core: Core, token: str | None) -> Monitoring:
    """Prometheus metrics, the stats recorder, the observer that feeds both, and the
    stats pusher when a collector is configured (``token``: its bearer token)."""
    metrics = Metrics()

    def flush_pending() -> None:  # what the observer holds is folded in before any read
        observer.flush()

    stats = StatsRecorder(
        core.gate.sidecar_service or "dbproxy",
        slow_threshold_ms=core.limits.slow_query_ms,
        flush_pending=flush_pending,
    )
    observer = Observer(metrics, core, stats)
    metrics.sources["connections"] = core.connections
    metrics.sources["gate"] = lambda: dict(core.gate.counters)
    metrics.sources["transactions"] = lambda: {
        **core.transactions.counters,
        "open": len(core.transactions),
    }
    metrics.sources["cache"] = core.cache_counters
    metrics.sources["schemas"] = core.schemas.counters
    pusher = None
    if config.collector_url:
        push = config.collector_push
        pusher = StatsPusher(
            config.collector_url,
            token,
            stats,
            interval=push.interval_seconds,
            max_buffered_batches=push.max_buffered_batches,
            tls=client_context(push.ca_file) if push.ca_file else None,
        )
        metrics.sources["pusher"] = pusher.counters
    return Monitoring(metrics, stats, observer, pusher)


def build_credentials(config: Config, core: Core, interval: float) -> CredentialWatcher:
    """The watcher of the ``${file:}`` secrets of the PostgreSQL connection strings."""
    watched = {}
    for db in config.databases:
        backend = core.backends.get(db.name)
        if isinstance(backend, PostgresBackend):
            watched[db.name] = (db, backend.rotate_credentials)
    return CredentialWatcher(watched, interval)


async def serve(
    config: Config,
    opts: ServeOptions | None = None,
    shutdown_timeout: float = 10.0,
    sockets: Sequence[socket.socket] | None = None,
) -> None:
    """``dbproxy serve``: build the sidecar, serve until SIGTERM/SIGINT (SIGHUP reloads
    the policies), then finish in-flight requests."""
    opts = opts or ServeOptions()
    if sockets is None:
        sockets = bind(config.server.host, config.server.port)
    limiter = RedisLimiter(opts.redis_url, timeout=opts.redis_timeout) if opts.redis_url else None
    gate = make_gate(config, opts, remote=limiter)
    fills = Fills()
    cache = build_cache(config.cache, fills)
    core = make_core(config, gate=gate, coalesce=opts.coalesce, cache=cache, fills=fills)
    if limiter is not None:
        await limiter.start()
    if not gate.enforcing:
        log.warning(
            "NO POLICIES: running OPEN — every caller may do everything "
            "(pass --policies DIR to enforce per-service policies)"
        )
    monitoring = build_monitoring(config, core, opts.collector_token)
    app = build_app(config, core, monitoring, cache, observe=opts.metrics)
    shortcuts = Shortcuts(app, opts.metrics) if opts.fast_path else None
    tls = listener_tls(opts)
    if tls is None and not _loopback(config.server.host):
        log.warning(
            "listening on %s in plain HTTP: tokens and documents cross the network in clear "
            "text; pass --tls-cert/--tls-key unless a proxy in front terminates TLS",
            config.server.host,
        )
    running = await start(
        app,
        config.server,
        sockets,
        shutdown_timeout=shutdown_timeout,
        wrap=None if shortcuts is None else shortcuts.wrap,
        lane=None if shortcuts is None or not opts.fast_lane else shortcuts.lane,
        tls=tls,
    )
    monitoring.metrics.sources["clients"] = running.clients
    credentials = build_credentials(config, core, opts.secrets_interval)
    credentials.start()
    tune_gc()
    log.info(
        "dbproxy listening on %s://%s:%d (databases: %s; policies: %s)",
        "https" if tls is not None else "http",
        config.server.host,
        config.server.port,
        ", ".join(f"{d.name}={d.redacted_dsn()}" for d in config.databases) or "embedded",
        opts.policies or "off",
    )
    tasks = [asyncio.create_task(_watch_policies(gate, opts.watch_interval))]
    if tls is not None and opts.tls_cert and opts.tls_key:  # renewed certificates, unrestarted
        watched = (opts.tls_cert, opts.tls_key, opts.secrets_interval, "listener")
        tasks.append(asyncio.create_task(watch_certificate(tls, *watched)))

    def reload() -> None:  # SIGHUP: the policies and the secret files, now
        gate.reload()
        credentials.poke()

    try:
        await _until_stopped(reload=reload)
        log.info("shutting down: finishing in-flight requests")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await credentials.close()
        await running.stop()  # stop accepting, wait for handlers, close pools
        if limiter is not None:
            await limiter.close()
    log.info("stopped")


async def _until_stopped(reload: Callable[[], object] | None = None) -> None:
    """Wait for SIGTERM or SIGINT; SIGHUP calls ``reload``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()


def bind_or_say_why(host: str, port: int, fds: Sequence[int] = ()) -> list[socket.socket] | None:
    """The listening sockets (inherited from a ``--workers`` parent, else bound
    exclusively); None, with the reason on stderr, when the port cannot be had."""
    try:
        return inherited(list(fds)) if fds else bind(host, port)
    except AddressInUse as err:
        print(f"dbproxy: {err.strerror}", file=sys.stderr)
    except OSError as err:
        print(f"dbproxy: cannot listen on {host}: {err}", file=sys.stderr)
    return None


def _policy_stamp(directory: str) -> tuple[tuple[str, int, int], ...]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
        return tuple(
            (e.name, e.stat().st_mtime_ns, e.stat().st_size)
            for e in entries
            if e.name.endswith((".yaml", ".yml")) and not e.name.startswith(".")
        )
    except OSError:
        return ()


async def _watch_policies(gate: Gatekeeper, interval: float) -> None:
    """Reload when the policy directory changes (ConfigMap updates swap a symlink)."""
    if gate.policy_dir is None:
        return
    stamp = _policy_stamp(gate.policy_dir)
    while True:
        await asyncio.sleep(interval)
        fresh = _policy_stamp(gate.policy_dir)
        if fresh != stamp:
            stamp = fresh
            gate.reload()


def serve_workers(config: Config, opts: ServeOptions, argv: Sequence[str]) -> int:
    """``--workers N``: the parent binds the listening sockets (exclusively, so no other
    process can join the port) and N processes inherit them and accept from them, each
    with its own pools; the parent forwards signals and waits."""
    child_args = _without_workers(argv)
    sockets = bind(config.server.host, config.server.port)
    fds = [sock.fileno() for sock in sockets]
    child_args += ["--listen-fds", ",".join(map(str, fds))]
    procs: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # before the first child exists: a SIGTERM while they start must not orphan them
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        for _ in range(opts.workers):
            argv = [sys.executable, "-m", "proxy.cli", *child_args]
            procs.append(subprocess.Popen(argv, pass_fds=fds))
    finally:
        for sock in sockets:  # the children hold them now
            sock.close()
    codes = [p.wait() for p in procs]
    return max(codes, default=0)


def _without_workers(argv: Sequence[str]) -> list[str]:
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            args.append(arg)
    return args


def collector_credentials(settings: CollectorSettings, store: CollectorStore) -> CredentialWatcher:
    """The watcher of the ``${file:}`` secrets of the collector's database URL."""
    database = DatabaseConfig(
        name="collector",
        type="postgresql",
        connection_string=settings.database_url,
        secret=settings.database_secret,
    )
    watched = {"collector": (database, store.rotate_credentials)}
    return CredentialWatcher(watched, settings.secrets_interval)


async def run_collector(
    settings: CollectorSettings,
    shutdown_timeout: float = 10.0,
    server_settings: ServerConfig | None = None,
    sockets: Sequence[socket.socket] | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """``dbproxy collector``: serve until SIGTERM/SIGINT, then finish in-flight pushes.
    Connections are guarded like ``serve``'s (``server_settings``: the cap and timeouts;
    default those of ``serve``); ``tls``: HTTPS."""
    if server_settings is None:
        server_settings = ServerConfig(host=settings.host, port=settings.port)
    if sockets is None:
        sockets = bind(settings.host, settings.port)
    store = collector_store(settings)
    app = build_collector_app(settings, store)
    running = await start(app, server_settings, sockets, shutdown_timeout=shutdown_timeout, tls=tls)
    credentials = collector_credentials(settings, store)
    credentials.start()
    log.info(
        "dbproxy collector listening on %s://%s:%d (database: %s, push token: %s)",
        "https" if tls is not None else "http",
        settings.host,
        settings.port,
        redact_dsn(settings.database_url),
        "required" if settings.token else "NOT required",
    )
    try:
        await _until_stopped(reload=credentials.poke)  # SIGHUP: the secret files, now
        log.info("collector shutting down")
    finally:
        await credentials.close()
        await running.stop()  # stop accepting, then finish in-flight pushes
    log.info("stopped")


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 at least) with the certificate chain and key loaded;
    ConfigError when they cannot be read or do not match."""
    try:
        return server_context(cert_file, key_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError([f"cannot load --tls-cert/--tls-key: {err}"]) from None


async def run_injector(
    settings: InjectorSettings,
    context: ssl.SSLContext,
    server_settings: ServerConfig,
    sockets: Sequence[socket.socket],
    *,
    cert_files: tuple[str, str] | None = None,
    reload_interval: float = 30.0,
) -> None:
    """``dbproxy injector``: the admission webhook over HTTPS until SIGTERM/SIGINT."""
    app = build_injector_app(settings)
    running = await start(app, server_settings, sockets, tls=context)
    log.info(
        "dbproxy injector listening on https://%s:%d (sidecar image %s)",
        server_settings.host,
        server_settings.port,
        settings.image,
    )
    watcher = (
        asyncio.create_task(watch_certificate(context, *cert_files, reload_interval, "injector"))
        if cert_files
        else None
    )
    try:
        await _until_stopped()
        log.info("injector shutting down")
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await running.stop()
    log.info("stopped")


async def migrate_directory(config: Config, directory: str, *, dry_run: bool = False) -> int:
    """``dbproxy migrate DIR``: apply (or plan) a directory's migrations in dependency order,
    each to the end in the foreground; 0 when every one completed (or was done already)."""
    migrations = load_directory(directory)  # every file checked before anything runs
    core = make_core(config, announce=False)
    runner = core.migrations
    assert runner is not None
    bar = MigrateProgress()
    started = []
    try:
        for backend in core.backends.values():
            await backend.start()
            started.append(backend)
        for m in migrations:
            try:
                outcome = await runner.submit(
                    m, dry_run=dry_run, wait=math.inf, progress=bar.update
                )
            except ProxyError as err:
                bar.line(f"{m.id}: FAILED {err.status} {err.code}: {err.message}")
                return 1
            if dry_run:
                bar.line(f"{m.id}: plan " + orjson.dumps(outcome.body["steps"]).decode())
            else:
                done = "already applied" if outcome.status == 200 else "completed"
                bar.line(f"{m.id}: {done}")
        return 0
    finally:
        for backend in started:
            await backend.close()
