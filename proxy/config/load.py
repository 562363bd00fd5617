"""Loading the configuration: the YAML file, flags and environment, every problem at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from proxy.config.databases import (
    Secrets,
    parse_databases,
    parse_default,
    url_database,
    with_url_database,
)
from proxy.config.model import Config, DatabaseConfig
from proxy.config.sections import (
    parse_cache,
    parse_collector_push,
    parse_limits,
    parse_locations,
    parse_server,
)
from proxy.config.values import config_problems
from proxy.errors import ConfigError
from proxy.problems import Problems, check_keys, read_yaml

DATABASE_URL_ENV: Final = "DBPROXY_DATABASE_URL"
_TOP_KEYS: Final = (
    "server",
    "limits",
    "cache",
    "data_dir",
    "collector_url",
    "collector_push",
    "default_database",
    "databases",
)


def _parse_all_databases(
    raw: Mapping[Any, object],
    secrets: Secrets,
    database_url: str | None,
    problems: Problems,
) -> tuple[tuple[DatabaseConfig, ...], str | None]:
    """(databases, default database name): the file's, then the URL database on top."""
    databases, names = parse_databases(raw.get("databases"), secrets, problems)
    default = parse_default(raw, names, problems)
    url: str | None = database_url
    source = "database_url"
    if url is None:  # an empty environment variable counts as unset
        url, source = secrets.environ.get(DATABASE_URL_ENV) or None, DATABASE_URL_ENV
    if url == "":
        problems.add(source, "must not be empty")
    elif url is not None and (database := url_database(url, source, problems, secrets)):
        return with_url_database(databases, database), database.name
    return tuple(databases), default


def load_config(
    path: str | None = None,
    *,
    database_url: str | None = None,
    host: str | None = None,
    port: int | None = None,
    data_dir: str | None = None,
    collector_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read, resolve and validate the configuration; raise one ConfigError listing every
    problem. Keyword arguments (CLI flags) override the file; ``database_url`` (else
    ``$DBPROXY_DATABASE_URL``) adds or replaces a database named "default" and makes it the
    default. ``environ`` (default ``os.environ``) feeds ``${VAR}`` references."""
    problems = config_problems()
    raw: Mapping[Any, object] = {}
    if path is not None:
        raw = read_yaml(path, problems, where=path, noun="config file") or {}
    check_keys(raw, _TOP_KEYS, "", problems)
    secrets = Secrets(
        os.environ if environ is None else environ,
        Path(path).parent if path is not None else None,
    )
    server = parse_server(raw.get("server"), problems, host, port)
    limits = parse_limits(raw.get("limits"), problems)
    cache = parse_cache(raw.get("cache"), problems)
    databases, default = _parse_all_databases(raw, secrets, database_url, problems)
    data_dir_value, collector = parse_locations(raw, data_dir, collector_url, problems)
    push = parse_collector_push(raw.get("collector_push"), problems)
    if problems.items:
        raise ConfigError(problems.items)
    return Config(
        server=server,
        databases=databases,
        limits=limits,
        default_database=default,
        data_dir=data_dir_value,
        collector_url=collector,
        collector_push=push,
        cache=cache,
    )


def load_database_url(
    url: str, source: str, *, name: str, environ: Mapping[str, str] | None = None
) -> DatabaseConfig:
    """One PostgreSQL database given by a URL alone (``dbproxy collector --database``):
    ``${VAR}`` and ``${file:}`` resolved (relative files from the working directory, the
    files watched for rotation), TLS parameters checked; ConfigError naming every problem."""
    problems = config_problems()
    secrets = Secrets(os.environ if environ is None else environ, None)
    database = url_database(url, source, problems, secrets, name=name)
    if database is not None and database.type != "postgresql":
        problems.add(source, "must be a postgresql:// URL")
    if problems.items or database is None:
        raise ConfigError(problems.items)
    return database
