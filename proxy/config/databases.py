"""Parsing the databases of the config file: entries, secrets (``${VAR}``, ``${file:}``), URLs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from proxy.config.model import (
    DATABASE_TYPES,
    MONGO_READ_PREFERENCES,
    READ_PREFERENCES,
    REPLICA_ROLES,
    TIME_PARTITIONS,
    URL_DATABASE_NAME,
    DatabaseConfig,
    PoolSettings,
    ReplicaConfig,
)
from proxy.config.redact import SCHEME_RE
from proxy.config.secrets import SecretTemplate
from proxy.config.values import MAX_PORT, build, numbers_section, read_int, read_str
from proxy.problems import Problems, check_keys, integer, mapping, type_name

_SCHEMES: Final[Mapping[str, tuple[str, ...]]] = {
    "postgresql": ("postgresql", "postgres"),
    "mongodb": ("mongodb", "mongodb+srv"),
    "redis": ("redis", "rediss"),
    "sqlite": ("sqlite",),
}
_TYPE_BY_SCHEME: Final = {s: t for t, schemes in _SCHEMES.items() for s in schemes}
# The types this build has a backend for: an unknown URL scheme (--database,
# $DBPROXY_DATABASE_URL) is answered with exactly their schemes (the others fail later,
# with "has no backend in this build").
URL_DATABASE_TYPES: Final = ("postgresql", "sqlite")
_URL_TYPE_BY_SCHEME: Final = {s: t for s, t in _TYPE_BY_SCHEME.items() if t in URL_DATABASE_TYPES}
_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_REFERENCE_RE: Final = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_pool(value: object, path: str, problems: Problems) -> PoolSettings:
    values = numbers_section(value, PoolSettings, path, problems, {"min_connections": 0})
    low, high = values["min_connections"], values["max_connections"]
    if low is not None and high is not None and high < low:
        problems.add(f"{path}.max_connections", f"must be >= min_connections ({low})")
    pool: PoolSettings = build(PoolSettings, values)
    return pool


def _parse_replica(value: object, path: str, problems: Problems) -> ReplicaConfig | None:
    raw = mapping(value, path, problems)
    if raw is None:
        return None
    check_keys(raw, ("host", "port", "role"), path, problems)
    host = read_str(raw, "host", path, None, problems)
    port = read_int(raw, "port", path, None, problems, high=MAX_PORT)
    if "port" not in raw:
        problems.add(f"{path}.port", "is required")
    role = read_str(raw, "role", path, "replica", problems, choices=REPLICA_ROLES)
    if host is None or port is None or role is None:
        return None
    return ReplicaConfig(host=host, port=port, role=role)


def _parse_replicas(value: object, path: str, problems: Problems) -> tuple[ReplicaConfig, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.add(path, f"must be a list, got {type_name(value)}")
        return ()
    replicas: list[ReplicaConfig] = []
    for index, item in enumerate(value):
        replica = _parse_replica(item, f"{path}[{index}]", problems)
        if replica is None:
            continue
        if any((r.host, r.port) == (replica.host, replica.port) for r in replicas):
            problems.add(
                f"{path}[{index}]",
                f"duplicate replica {problems.show(replica.host)} port {replica.port}",
            )
        replicas.append(replica)
    return tuple(replicas)


def _write_concern(raw: Mapping[Any, object], path: str, problems: Problems) -> str | int | None:
    value = raw.get("write_concern")
    if value is None or (isinstance(value, str) and value):
        return value
    where = f"{path}.write_concern"
    if isinstance(value, int) and not isinstance(value, bool):
        return integer(value, where, problems, low=0)
    problems.add(
        where,
        "must be a non-empty string (e.g. 'majority'), an integer >= 0 or null, "
        f"got {type_name(value)}",
    )
    return None


class Secrets:
    """Resolves ``${VAR}`` (from the environment) and ``${file:/path}`` (file contents,
    stripped; a relative path is taken from the config file's directory)."""

    __slots__ = ("base_dir", "environ")

    def __init__(self, environ: Mapping[str, str], base_dir: Path | None) -> None:
        self.environ = environ
        self.base_dir = base_dir

    def resolve(self, template: str, where: str, problems: Problems) -> str | None:
        """``template`` with references replaced; None (and problems) if any failed."""
        failed = False

        def replace(match: re.Match[str]) -> str:
            nonlocal failed
            value = self._reference(match.group(1), where, problems)
            failed = failed or value is None
            return value or ""

        resolved = _REFERENCE_RE.sub(replace, template)
        return None if failed else resolved

    def template(self, template: str) -> SecretTemplate | None:
        """``template`` as pieces to render again when a secret file changes (``${VAR}``
        resolved now, ``${file:}`` kept as an absolute path); None without a file reference.
        Call after ``resolve`` succeeded."""
        parts: list[tuple[bool, str]] = []
        position = 0
        for match in _REFERENCE_RE.finditer(template):
            parts.append((False, template[position : match.start()]))
            ref = match.group(1)
            if ref.startswith("file:"):
                parts.append((True, str(self._path(ref.removeprefix("file:").strip()).absolute())))
            else:
                parts.append((False, self.environ.get(ref, "")))
            position = match.end()
        parts.append((False, template[position:]))
        if not any(is_file for is_file, _ in parts):
            return None
        return SecretTemplate(tuple(p for p in parts if p[0] or p[1]))

    def _path(self, name: str) -> Path:
        path = Path(name)
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        return path

    def _reference(self, ref: str, where: str, problems: Problems) -> str | None:
        if ref.startswith("file:"):
            return self._file(ref.removeprefix("file:").strip(), where, problems)
        if not _ENV_NAME_RE.fullmatch(ref):
            problems.add(where, "invalid ${...} reference (expected ${NAME} or ${file:/path})")
            return None
        value = self.environ.get(ref)
        if value is None:
            problems.add(where, f"environment variable {ref} is not set")
        return value

    def _file(self, name: str, where: str, problems: Problems) -> str | None:
        if not name:
            problems.add(where, "empty ${file:} reference")
            return None
        path = self._path(name)
        try:
            return path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            problems.add(where, f"secret file {problems.show(str(path))} is not valid UTF-8")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            problems.add(where, f"cannot read secret file {problems.show(str(path))}: {reason}")
        return None


def _expected_schemes(db_type: str) -> str:
    return " or ".join(f"{scheme}://" for scheme in _SCHEMES[db_type])


def _connection_string(
    raw: Mapping[Any, object],
    path: str,
    db_type: str | None,
    secrets: Secrets,
    problems: Problems,
) -> str | None:
    where = f"{path}.connection_string"
    if "connection_string" not in raw:
        problems.add(where, "is required")
        return None
    template = raw["connection_string"]
    if not isinstance(template, str) or not template:
        problems.add(where, f"must be a non-empty string, got {type_name(template)}")
        return None
    dsn = secrets.resolve(template, where, problems)
    if dsn is None or db_type is None:
        return dsn
    match = SCHEME_RE.match(dsn)
    if match is None or match.group(1).lower() not in _SCHEMES[db_type]:
        # Only a scheme written literally in the file is echoed, never resolved text.
        literal = SCHEME_RE.match(template)
        got = f" (got {literal.group(1)}://)" if literal else ""
        problems.add(where, f"must start with {_expected_schemes(db_type)} for type {db_type}{got}")
        return None
    return dsn


# --------------------------------------------------------------------------- databases

_DATABASE_KEYS: Final = (
    "name",
    "type",
    "connection_string",
    "pool_settings",
    "read_preference",
    "write_concern",
    "replicas",
    "alembic_directory",
    "time_partitions",
)


def _database_name(raw: Mapping[Any, object], path: str, problems: Problems) -> str | None:
    name = read_str(raw, "name", path, None, problems)
    if name is not None and not _NAME_RE.fullmatch(name):
        problems.add(
            f"{path}.name",
            "must be a letter followed by at most 62 letters, digits, '_' or '-' "
            f"(got {problems.show(name)})",
        )
        return None
    return name


def _parse_database(
    value: object, path: str, secrets: Secrets, problems: Problems
) -> tuple[str | None, DatabaseConfig | None]:
    """(the entry's name if valid, the entry if entirely valid)."""
    raw = mapping(value, path, problems)
    if raw is None:
        return None, None
    check_keys(raw, _DATABASE_KEYS, path, problems)
    name = _database_name(raw, path, problems)
    db_type = read_str(raw, "type", path, None, problems, choices=DATABASE_TYPES)
    dsn = _connection_string(raw, path, db_type, secrets, problems)
    pool = parse_pool(raw.get("pool_settings"), f"{path}.pool_settings", problems)
    read_preference = read_str(
        raw,
        "read_preference",
        path,
        "primary",
        problems,
        choices=MONGO_READ_PREFERENCES if db_type == "mongodb" else READ_PREFERENCES,
    )
    write_concern = _write_concern(raw, path, problems)
    replicas = _parse_replicas(raw.get("replicas"), f"{path}.replicas", problems)
    alembic_directory = (
        read_str(raw, "alembic_directory", path, None, problems)
        if "alembic_directory" in raw
        else None
    )
    time_partitions = read_str(
        raw, "time_partitions", path, "pg_partman", problems, choices=TIME_PARTITIONS
    )
    if dsn is not None and db_type == "postgresql":
        check_pg_tls(dsn, f"{path}.connection_string", problems)
    if name is None or db_type is None or dsn is None or read_preference is None:
        return name, None
    template = raw["connection_string"]
    return name, DatabaseConfig(
        secret=secrets.template(template) if isinstance(template, str) else None,
        name=name,
        type=db_type,
        connection_string=dsn,
        pool_settings=pool,
        read_preference=read_preference,
        write_concern=write_concern,
        replicas=replicas,
        alembic_directory=alembic_directory,
        time_partitions=time_partitions or "pg_partman",
    )


def parse_databases(
    value: object, secrets: Secrets, problems: Problems
) -> tuple[list[DatabaseConfig], list[str]]:
    """(valid databases, names of all entries with a valid name, in file order)."""
    if value is None:
        return [], []
    if not isinstance(value, list):
        problems.add("databases", f"must be a list, got {type_name(value)}")
        return [], []
    databases: list[DatabaseConfig] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(value):
        path = f"databases[{index}]"
        name, database = _parse_database(item, path, secrets, problems)
        if name is not None and name in first_index:
            problems.add(
                f"{path}.name",
                f"duplicate database name {name!r} (also databases[{first_index[name]}])",
            )
        elif name is not None:
            first_index[name] = index
        if database is not None:
            databases.append(database)
    return databases, list(first_index)


def parse_default(raw: Mapping[Any, object], names: list[str], problems: Problems) -> str | None:
    value = raw.get("default_database")
    if value is None:
        return names[0] if names else None
    if not isinstance(value, str):
        problems.add("default_database", f"must be a string, got {type_name(value)}")
        return None
    if value not in names:
        known = ", ".join(repr(n) for n in names) or "none"
        problems.add(
            "default_database", f"no database named {problems.show(value)} (configured: {known})"
        )
        return None
    return value


_SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SSL_FILES: Final = ("sslrootcert", "sslcert", "sslkey")


def check_pg_tls(dsn: str, where: str, problems: Problems) -> None:
    """A ``postgresql://`` URL's TLS parameters: a known ``sslmode``, readable certificate
    and key files (a typo is a startup error, not a 503 on every request)."""
    query = parse_qs(urlsplit(dsn).query)
    modes = query.get("sslmode", [])
    if modes and modes[-1] not in _SSLMODES:
        problems.add(where, f"sslmode must be one of {', '.join(_SSLMODES)}")
    for key in _SSL_FILES:
        for name in query.get(key, [])[-1:]:
            if not os.access(name, os.R_OK):
                problems.add(where, f"{key} file {problems.show(name)} cannot be read")
    if "sslkey" in query and "sslcert" not in query:
        problems.add(where, "sslkey needs sslcert (the client certificate)")


def url_database(
    url: str,
    source: str,
    problems: Problems,
    secrets: Secrets | None = None,
    name: str = URL_DATABASE_NAME,
) -> DatabaseConfig | None:
    """The database named "default" described by a bare URL (``--database`` or env); with
    ``secrets``, its ``${VAR}``/``${file:}`` references are resolved (and the files watched)."""
    template = url
    if secrets is not None:
        resolved = secrets.resolve(url, source, problems)
        if resolved is None:
            return None
        url = resolved
    match = SCHEME_RE.match(url)
    db_type = _TYPE_BY_SCHEME.get(match.group(1).lower()) if match else None
    if db_type is None:
        expected = ", ".join(f"{s}://" for s in _URL_TYPE_BY_SCHEME)
        problems.add(source, f"unsupported or missing URL scheme (expected one of {expected})")
        return None
    if db_type == "postgresql":
        check_pg_tls(url, source, problems)
    secret = secrets.template(template) if secrets is not None else None
    return DatabaseConfig(name=name, type=db_type, connection_string=url, secret=secret)


def with_url_database(
    databases: list[DatabaseConfig], url: DatabaseConfig
) -> tuple[DatabaseConfig, ...]:
    """``databases`` with ``url`` replacing the one of the same name, or appended."""
    names = [db.name for db in databases]
    if url.name in names:
        databases = list(databases)
        databases[names.index(url.name)] = url
        return tuple(databases)
    return (*databases, url)
