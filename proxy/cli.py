"""Command line and process start-up: ``dbproxy serve``, signals, graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from proxy.backends.base import Backend
from proxy.backends.postgres import PostgresBackend
from proxy.config import Config, load_config
from proxy.core import Core
from proxy.errors import ConfigError
from proxy.http.app import build_app

log = logging.getLogger("dbproxy")


def build_backends(config: Config) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    problems = []
    for db in config.databases:
        if db.type == "postgresql":
            backends[db.name] = PostgresBackend(db, config.limits)
        else:
            problems.append(f"databases.{db.name}: type {db.type!r} has no backend in this build")
    if problems:
        raise ConfigError(problems)
    return backends


def make_core(config: Config) -> Core:
    backends = build_backends(config)
    if not backends:
        raise ConfigError(["no database configured: pass --database URL or --config FILE"])
    default = config.default_database or next(iter(backends))
    return Core(config, backends, default)


async def serve(config: Config, shutdown_timeout: float = 10.0) -> None:
    app = build_app(config, make_core(config))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(
        runner, config.server.host, config.server.port, reuse_port=True, backlog=1024
    )
    await site.start()
    log.info(
        "dbproxy listening on http://%s:%d (databases: %s)",
        config.server.host,
        config.server.port,
        ", ".join(f"{d.name}={d.redacted_dsn()}" for d in config.databases),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        await runner.cleanup()  # stops accepting, waits for handlers, closes pools
    log.info("stopped")


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
    s.add_argument("--log-level", default=os.environ.get("DBPROXY_LOG_LEVEL", "INFO"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
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
            make_core(config)  # validate backends before binding the port
        except ConfigError as err:
            print(f"dbproxy: {err}", file=sys.stderr)
            return 2
        import uvloop

        try:
            uvloop.run(serve(config))
        except OSError as err:
            print(f"dbproxy: cannot start: {err}", file=sys.stderr)
            return 1
        except ConfigError as err:
            print(f"dbproxy: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
