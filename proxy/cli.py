"""Command line: ``dbproxy serve|policy|collector|migrate|injector`` parsed, then handed to
``proxy.wiring``."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import replace
from typing import Final

from proxy.config import (
    DATABASE_URL_ENV,
    Config,
    ServerConfig,
    load_config,
    load_database_url,
)
from proxy.errors import ConfigError
from proxy.http.collector import CollectorSettings
from proxy.http.server import AddressInUse
from proxy.inject import InjectorSettings
from proxy.policy import check_directory
from proxy.wiring import (
    ServeOptions,
    bind_or_say_why,
    listener_tls,
    make_core,
    make_gate,
    migrate_directory,
    run_collector,
    run_injector,
    serve,
    serve_workers,
    tls_context,
)

COLLECTOR_TOKEN_ENV = "DBPROXY_COLLECTOR_TOKEN"  # noqa: S105 (a variable name, no secret)


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


def _collector_settings(args: argparse.Namespace) -> CollectorSettings:
    url = args.database or os.environ.get(DATABASE_URL_ENV) or ""
    if not url:
        raise ConfigError(["--database must be a postgresql:// URL (or set DBPROXY_DATABASE_URL)"])
    source = "--database" if args.database else DATABASE_URL_ENV
    database = load_database_url(url, source, name="collector")
    token = args.token if args.token is not None else os.environ.get(COLLECTOR_TOKEN_ENV)
    return CollectorSettings(
        database_url=database.connection_string,
        database_secret=database.secret,
        token=token or None,
        host=args.host,
        port=args.port,
        secrets_interval=args.secrets_interval,
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


def _parser(
    cls: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    p = cls(prog="dbproxy", description="Database access sidecar")
    sub = p.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    pc = sub.add_parser("policy", help="policy tools")
    pc_sub = pc.add_subparsers(dest="policy_command", required=True)
    chk = pc_sub.add_parser("check", help="validate a policy directory")
    chk.add_argument("directory")
    _add_collector(sub)
    _add_migrate(sub)
    _add_injector(sub)
    return p


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    s.add_argument("--tls-cert", default=None, help="PEM certificate (chain): serve HTTPS")
    s.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    s.add_argument(
        "--tls-client-ca",
        default=None,
        help="PEM CA: clients must present a certificate it signed (mutual TLS)",
    )
    s.add_argument(
        "--secrets-interval",
        type=_positive_float,
        default=2.0,
        help="seconds between looks at the ${file:} secrets of connection strings; a "
        "change reconnects with the new credentials (also on SIGHUP) (default 2)",
    )
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
    s.add_argument(
        "--no-fast-lane",
        dest="fast_lane",
        action="store_false",
        help="parse every request with aiohttp, the shortcuts' too (to measure the fast lane)",
    )
    _add_log_level(s)


def _add_collector(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("collector", help="run the central stats collector")
    c.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    c.add_argument("--port", type=int, default=8710, help="listen port (default 8710)")
    c.add_argument("--database", default=None, help="PostgreSQL URL where rollups persist")
    c.add_argument("--token", default=None, help=f"push token (or env {COLLECTOR_TOKEN_ENV})")
    c.add_argument("--tls-cert", default=None, help="PEM certificate (chain): serve HTTPS")
    c.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    c.add_argument(
        "--secrets-interval",
        type=_positive_float,
        default=2.0,
        help="seconds between looks at the ${file:} secrets of --database; a change "
        "reconnects with the new credentials (also on SIGHUP) (default 2)",
    )
    _add_server_flags(c)
    _add_log_level(c)


def _add_migrate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("migrate", help="apply a directory of migration files")
    m.add_argument("directory", help="migration files (*.yaml, *.yml, *.json)")
    m.add_argument("--config", default=None, help="YAML configuration file")
    m.add_argument("--database", default=None, help="database URL (or env DBPROXY_DATABASE_URL)")
    m.add_argument("--data-dir", default=None, help="embedded store directory")
    m.add_argument("--dry-run", action="store_true", help="print the plans, change nothing")
    _add_log_level(m)


def _add_injector(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser("injector", help="run the Kubernetes sidecar-injection webhook (HTTPS)")
    i.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")  # noqa: S104
    i.add_argument("--port", type=int, default=8443, help="listen port (default 8443)")
    i.add_argument("--tls-cert", required=True, help="PEM certificate (chain) file")
    i.add_argument("--tls-key", required=True, help="PEM private key file")
    i.add_argument("--sidecar-image", required=True, help="the image the sidecar runs")
    i.add_argument(
        "--sidecar-pull-policy",
        choices=("Always", "IfNotPresent", "Never"),
        default="IfNotPresent",
        help="the sidecar's imagePullPolicy (default IfNotPresent)",
    )
    i.add_argument("--collector", default=None, help="the collector URL the sidecars push to")
    i.add_argument("--sidecar-port", type=int, default=8700, help="sidecar port (default 8700)")
    i.add_argument("--sidecar-cpu", default="100m", help="CPU request (default 100m)")
    i.add_argument("--sidecar-memory", default="128Mi", help="memory request+limit (128Mi)")
    i.add_argument("--sidecar-log-level", type=_log_level, default="INFO", help="sidecar's")
    i.add_argument(
        "--no-native-sidecar",
        dest="native",
        action="store_false",
        help="inject a regular container instead of an init container with restartPolicy "
        "Always (clusters before Kubernetes 1.29; pods may opt back in by annotation)",
    )
    i.add_argument(
        "--cert-reload-interval", type=_positive_float, default=30.0, help=argparse.SUPPRESS
    )
    _add_log_level(i)


class _ArgsRejected(Exception):
    pass


class _CheckingParser(argparse.ArgumentParser):
    """The real parser, raising where argparse would print and exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise _ArgsRejected(message)

    def print_help(self, file: typing.Any = None) -> None:
        pass  # ``-h`` among a sidecar's arguments is rejected (by exit), never printed

    def exit(self, status: int = 0, message: str | None = None) -> typing.NoReturn:
        raise _ArgsRejected(message or "the arguments would make dbproxy exit")


def serve_args_problem(argv: Sequence[str]) -> str | None:
    """Why ``dbproxy ARGV`` would not parse (None when it does): what the injector checks
    every sidecar command line with."""
    try:
        _parser(_CheckingParser).parse_args(list(argv))
    except _ArgsRejected as err:
        return str(err)[:300]
    return None


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
        return _main_serve(args, list(argv if argv is not None else sys.argv[1:]))
    if args.command == "policy":
        ok, report = check_directory(args.directory)
        print(report, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if args.command == "collector":
        return _main_collector(args)
    if args.command == "migrate":
        return _main_migrate(args)
    if args.command == "injector":
        return _main_injector(args)
    return 0


def _main_injector(args: argparse.Namespace) -> int:
    """``dbproxy injector``: the admission webhook, HTTPS only."""
    settings = InjectorSettings(
        image=args.sidecar_image,
        collector_url=args.collector,
        pull_policy=args.sidecar_pull_policy,
        port=args.sidecar_port,
        cpu=args.sidecar_cpu,
        memory=args.sidecar_memory,
        log_level=args.sidecar_log_level.lower(),
        native=args.native,
        check_args=serve_args_problem,
    )
    try:
        context = tls_context(args.tls_cert, args.tls_key)
    except ConfigError as err:
        print(f"dbproxy: {err}", file=sys.stderr)
        return 2
    sockets = bind_or_say_why(args.host, args.port)
    if sockets is None:
        return 1
    import uvloop

    try:
        uvloop.run(
            run_injector(
                settings,
                context,
                ServerConfig(host=args.host, port=args.port),
                sockets,
                cert_files=(args.tls_cert, args.tls_key),
                reload_interval=args.cert_reload_interval,
            )
        )
    except OSError as err:
        print(f"dbproxy: cannot start: {err}", file=sys.stderr)
        return 1
    return 0


def _main_migrate(args: argparse.Namespace) -> int:
    """``dbproxy migrate DIR``: exit 0 when every migration completed (or was done
    already), 1 otherwise (the error printed)."""
    import asyncio

    try:
        config = load_config(args.config, database_url=args.database, data_dir=args.data_dir)
        return asyncio.run(migrate_directory(config, args.directory, dry_run=args.dry_run))
    except ConfigError as err:
        print(f"dbproxy: {err}", file=sys.stderr)
        return 1


def _serve_settings(args: argparse.Namespace) -> tuple[Config, ServeOptions]:
    """The configuration and options of ``serve``, validated (backends and policies)
    before anything is bound."""
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
        fast_lane=args.fast_lane,
        listen_fds=args.listen_fds,
        collector_token=os.environ.get(COLLECTOR_TOKEN_ENV),
        secrets_interval=args.secrets_interval,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    )
    make_core(config, announce=False)
    make_gate(config, opts)
    listener_tls(opts)  # a certificate that cannot be loaded stops the start here
    return config, opts


def _main_serve(args: argparse.Namespace, argv: list[str]) -> int:
    """``dbproxy serve``: one process, or ``--workers N`` sharing the port."""
    try:
        config, opts = _serve_settings(args)
    except ConfigError as err:
        print(f"dbproxy: {err}", file=sys.stderr)
        return 2
    if opts.workers < 1:
        print("dbproxy: --workers must be at least 1", file=sys.stderr)
        return 2
    if opts.workers > 1:
        try:
            return serve_workers(config, opts, argv)
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
    return 0


def _main_collector(args: argparse.Namespace) -> int:
    """``dbproxy collector``: listens like ``serve`` (exclusive bind, guarded connections)."""
    try:
        settings = _collector_settings(args)
    except ConfigError as err:
        print(f"dbproxy: {err}", file=sys.stderr)
        return 2
    server = _server_flags(ServerConfig(host=settings.host, port=settings.port), args)
    tls = None
    if (args.tls_cert is None) != (args.tls_key is None):
        print("dbproxy: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_cert is not None:
        try:
            tls = tls_context(args.tls_cert, args.tls_key)
        except ConfigError as err:
            print(f"dbproxy: {err}", file=sys.stderr)
            return 2
    sockets = bind_or_say_why(settings.host, settings.port)
    if sockets is None:
        return 1
    import uvloop

    try:
        uvloop.run(run_collector(settings, server_settings=server, sockets=sockets, tls=tls))
    except OSError as err:
        print(f"dbproxy: cannot start: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
