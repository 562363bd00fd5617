"""Command line and process start-up: ``dbproxy serve``, signals, graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from aiohttp import web

from proxy.backends.base import Backend
from proxy.backends.postgres import PostgresBackend
from proxy.backends.redis.limiter import RedisLimiter
from proxy.backends.sqlite import DATA_FILE, SqliteBackend, check_location, sqlite_path
from proxy.config import (
    DATABASE_URL_ENV,
    Config,
    DatabaseConfig,
    ServerConfig,
    load_config,
    redact_dsn,
)
from proxy.errors import ConfigError
from proxy.http import monitor
from proxy.http.app import build_app, fast_get
from proxy.http.collector import CollectorSettings, build_collector_app
from proxy.http.server import AddressInUse, bind, inherited, listen, tune_gc
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Gatekeeper
from proxy.policy import check_directory, load_policies

log = logging.getLogger("dbproxy")

COLLECTOR_TOKEN_ENV = "DBPROXY_COLLECTOR_TOKEN"  # noqa: S105 (a variable name, no secret)


EMBEDDED_DATABASE = "embedded"


def build_backends(config: Config) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    problems = []
    for db in config.databases:
        if db.type == "postgresql":
            backends[db.name] = PostgresBackend(db, config.limits)
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


def make_core(config: Config, *, announce: bool = True) -> Core:
    """The operation pipeline over the configured databases, validated before any I/O;
    with no database configured, over the embedded SQLite store in ``config.data_dir``."""
    backends = build_backends(config)
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
        return Core(config, backends, EMBEDDED_DATABASE)
    default = config.default_database or next(iter(backends))
    return Core(config, backends, default)


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
    listen_fds: tuple[int, ...] = ()  # a --workers child: the sockets its parent bound


def make_gate(config: Config, opts: ServeOptions) -> Gatekeeper:
    """Load the policies (every problem at once) and decide the identity mode."""
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
        policies, sidecar_service=opts.service, policy_dir=opts.policies, load_caps=caps
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(
    config: Config,
    opts: ServeOptions | None = None,
    shutdown_timeout: float = 10.0,
    sockets: Sequence[socket.socket] | None = None,
) -> None:
    opts = opts or ServeOptions()
    if sockets is None:
        sockets = bind(config.server.host, config.server.port)
    core = make_core(config)
    core.gate = make_gate(config, opts)
    for backend in core.backends.values():
        if hasattr(backend, "coalesce"):
            backend.coalesce = opts.coalesce
    limiter = None
    if opts.redis_url:
        limiter = RedisLimiter(opts.redis_url, timeout=opts.redis_timeout)
        await limiter.start()
        core.gate.remote = limiter
    if not core.gate.enforcing:
        log.warning(
            "NO POLICIES: running OPEN — every caller may do everything "
            "(pass --policies DIR to enforce per-service policies)"
        )
    app = build_app(config, core, observe=opts.metrics)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    server = runner.server
    assert server is not None
    if opts.fast_path:
        server.request_handler = fast_get(app, server.request_handler, opts.metrics)
    gate, listeners = await listen(server, config.server, sockets)
    app[monitor.METRICS].sources["clients"] = lambda: {
        "open": len(server.connections),
        "refused": gate.refused,
    }
    tune_gc()
    log.info(
        "dbproxy listening on http://%s:%d (databases: %s; policies: %s)",
        config.server.host,
        config.server.port,
        ", ".join(f"{d.name}={d.redacted_dsn()}" for d in config.databases) or "embedded",
        opts.policies or "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, core.gate.reload)
    watcher = asyncio.create_task(_watch_policies(core.gate, opts.watch_interval))
    try:
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        for listener in listeners:  # stop accepting
            listener.close()
        await runner.cleanup()  # waits for handlers, closes pools
        if limiter is not None:
            await limiter.close()
    log.info("stopped")


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
    try:
        procs = [
            subprocess.Popen([sys.executable, "-m", "proxy.cli", *child_args], pass_fds=fds)
            for _ in range(opts.workers)
        ]
    finally:
        for sock in sockets:  # the children hold them now
            sock.close()

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
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


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {value!r})")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {value!r})")
    return number


def _fd_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(fd) for fd in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("must be comma-separated descriptors") from None


async def run_collector(
    settings: CollectorSettings,
    shutdown_timeout: float = 10.0,
    server_settings: ServerConfig | None = None,
    sockets: Sequence[socket.socket] | None = None,
) -> None:
    """``dbproxy collector``: serve until SIGTERM/SIGINT, then finish in-flight pushes.
    Connections are guarded like ``serve``'s (``server_settings``: the cap and timeouts;
    default those of ``serve``)."""
    if server_settings is None:
        server_settings = ServerConfig(host=settings.host, port=settings.port)
    if sockets is None:
        sockets = bind(settings.host, settings.port)
    runner = web.AppRunner(
        build_collector_app(settings), access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    assert runner.server is not None
    _, listeners = await listen(runner.server, server_settings, sockets)
    log.info(
        "dbproxy collector listening on http://%s:%d (database: %s, push token: %s)",
        settings.host,
        settings.port,
        redact_dsn(settings.database_url),
        "required" if settings.token else "NOT required",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("collector shutting down")
    finally:
        for listener in listeners:  # stop accepting
            listener.close()
        await runner.cleanup()
    log.info("stopped")


def _collector_settings(args: argparse.Namespace) -> CollectorSettings:
    database = args.database or os.environ.get(DATABASE_URL_ENV) or ""
    if not database.startswith(("postgresql://", "postgres://")):
        raise ConfigError(["--database must be a postgresql:// URL (or set DBPROXY_DATABASE_URL)"])
    token = args.token if args.token is not None else os.environ.get(COLLECTOR_TOKEN_ENV)
    return CollectorSettings(
        database_url=database, token=token or None, host=args.host, port=args.port
    )


LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")


def _log_level(value: str) -> str:
    """``--log-level``: one of LOG_LEVELS, in any case."""
    if value.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(LOG_LEVELS)} (got {value[:40]!r})"
        )
    return value.upper()


def _add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        type=_log_level,
        default=os.environ.get("DBPROXY_LOG_LEVEL", "INFO"),
        help=f"{', '.join(LOG_LEVELS)} (default info, or env DBPROXY_LOG_LEVEL)",
    )


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    """The connection cap and the slow-client timeouts (``serve`` and ``collector``)."""
    p.add_argument(
        "--max-connections",
        type=_positive_int,
        default=None,
        help="client connections accepted; past it, 503 too_many_connections (health is "
        "still answered) (default 4096)",
    )
    p.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=None,
        help="seconds from a request's first byte to its last header, else 408 (default 10)",
    )
    p.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=None,
        help="seconds from a request's headers to its body's last byte, else 408 (default 30)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=None,
        help="seconds a keep-alive connection may wait for its next request (default 60)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbproxy", description="Database access sidecar")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the sidecar")
    s.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="listen port (default 8700)")
    s.add_argument("--config", default=None, help="YAML configuration file")
    s.add_argument("--database", default=None, help="database URL (or env DBPROXY_DATABASE_URL)")
    s.add_argument("--data-dir", default=None, help="embedded store directory")
    s.add_argument("--collector", default=None, help="central stats collector URL")
    s.add_argument("--policies", default=None, help="policy directory: turns enforcement on")
    s.add_argument("--service", default=None, help="sidecar mode: every request is this service")
    s.add_argument(
        "--redis",
        default=os.environ.get("DBPROXY_REDIS_URL"),
        help="Redis URL for global rate limits (or env DBPROXY_REDIS_URL)",
    )
    s.add_argument(
        "--redis-timeout",
        type=float,
        default=0.05,
        help="seconds a global rate-limit decision may wait for Redis before the policy's "
        "fail mode decides (default 0.05)",
    )
    s.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    _add_server_flags(s)
    s.add_argument("--listen-fds", type=_fd_list, default=(), help=argparse.SUPPRESS)
    s.add_argument(
        "--no-coalesce",
        dest="coalesce",
        action="store_false",
        help="one statement per request (no coalesced reads or batched creates)",
    )
    s.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="no per-request stats or Prometheus histograms (to measure their cost)",
    )
    s.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help="route GET-by-id through the router like every request (to measure the shortcut)",
    )
    _add_log_level(s)
    pc = sub.add_parser("policy", help="policy tools")
    pc_sub = pc.add_subparsers(dest="policy_command", required=True)
    chk = pc_sub.add_parser("check", help="validate a policy directory")
    chk.add_argument("directory")
    c = sub.add_parser("collector", help="run the central stats collector")
    c.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    c.add_argument("--port", type=int, default=8710, help="listen port (default 8710)")
    c.add_argument("--database", default=None, help="PostgreSQL URL where rollups persist")
    c.add_argument("--token", default=None, help=f"push token (or env {COLLECTOR_TOKEN_ENV})")
    _add_server_flags(c)
    _add_log_level(c)
    return p


_SERVER_FLAGS: Final = {
    "max_connections": "max_connections",
    "header_timeout": "header_timeout_seconds",
    "body_timeout": "body_timeout_seconds",
    "idle_timeout": "idle_timeout_seconds",
}


def _server_flags(server: ServerConfig, args: argparse.Namespace) -> ServerConfig:
    """``server`` overridden by the connection flags given."""
    given = {
        field: getattr(args, flag)
        for flag, field in _SERVER_FLAGS.items()
        if getattr(args, flag) is not None
    }
    return replace(server, **given) if given else server


def _with_server_flags(config: Config, args: argparse.Namespace) -> Config:
    """The server settings of the file, overridden by the flags given."""
    server = _server_flags(config.server, args)
    return config if server is config.server else replace(config, server=server)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if args.command == "serve":
        try:
            config = load_config(
                args.config,
                database_url=args.database,
                host=args.host,
                port=args.port,
                data_dir=args.data_dir,
                collector_url=args.collector,
            )
            config = _with_server_flags(config, args)
            opts = ServeOptions(
                args.policies,
                args.service,
                args.redis,
                args.redis_timeout,
                args.workers,
                coalesce=args.coalesce,
                metrics=args.metrics,
                fast_path=args.fast_path,
                listen_fds=args.listen_fds,
            )
            make_core(config, announce=False)  # validate backends and policies before binding
            make_gate(config, opts)
        except ConfigError as err:
            print(f"dbproxy: {err}", file=sys.stderr)
            return 2
        if opts.workers < 1:
            print("dbproxy: --workers must be at least 1", file=sys.stderr)
            return 2
        if opts.workers > 1:
            try:
                args_list = list(argv if argv is not None else sys.argv[1:])
                return serve_workers(config, opts, args_list)
            except AddressInUse as err:
                print(f"dbproxy: {err.strerror}", file=sys.stderr)
                return 1
            except OSError as err:
                print(f"dbproxy: cannot listen on {config.server.host}: {err}", file=sys.stderr)
                return 1
        sockets = bind_or_say_why(config.server.host, config.server.port, opts.listen_fds)
        if sockets is None:
            return 1
        import uvloop

        try:
            uvloop.run(serve(config, opts, sockets=sockets))
        except OSError as err:
            print(f"dbproxy: cannot start: {err}", file=sys.stderr)
            return 1
        except ConfigError as err:
            print(f"dbproxy: {err}", file=sys.stderr)
            return 2
    if args.command == "policy":
        ok, report = check_directory(args.directory)
        print(report, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if args.command == "collector":
        return _main_collector(args)
    return 0


def _main_collector(args: argparse.Namespace) -> int:
    """``dbproxy collector``: listens like ``serve`` (exclusive bind, guarded connections)."""
    try:
        settings = _collector_settings(args)
    except ConfigError as err:
        print(f"dbproxy: {err}", file=sys.stderr)
        return 2
    server = _server_flags(ServerConfig(host=settings.host, port=settings.port), args)
    sockets = bind_or_say_why(settings.host, settings.port)
    if sockets is None:
        return 1
    import uvloop

    try:
        uvloop.run(run_collector(settings, server_settings=server, sockets=sockets))
    except OSError as err:
        print(f"dbproxy: cannot start: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
