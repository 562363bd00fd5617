"""Tests of proxy/config.py: loading, validation (all problems at once), secrets, redaction."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from proxy.config import (
    DATABASE_URL_ENV,
    Config,
    DatabaseConfig,
    Limits,
    PoolSettings,
    ReplicaConfig,
    ServerConfig,
    load_config,
    redact_dsn,
)
from proxy.errors import ConfigError

SECRET = "s3cr3t-Pa55word"


def write(tmp_path: Path, text: str, name: str = "dbproxy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def problems_of(path: str | None = None, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)  # type: ignore[arg-type]
    assert SECRET not in str(info.value)
    for problem in info.value.problems:
        assert SECRET not in problem
    return info.value.problems


FULL = """
server: {host: 0.0.0.0, port: 9000}
limits:
  max_body_bytes: 2048
  statement_timeout_seconds: 2
  default_limit: 50
data_dir: /var/lib/dbproxy
collector_url: http://collector:8710
default_database: analytics
databases:
  - name: main
    type: postgresql
    connection_string: postgresql://app:${PGPASSWORD}@db:5432/app
    pool_settings: {min_connections: 1, max_connections: 20, timeout_seconds: 2.5}
    read_preference: nearest
    write_concern: majority
    replicas:
      - {host: db-replica-1, port: 5432}
      - {host: db-analytics, port: 5433, role: analytics}
  - name: analytics
    type: mongodb
    connection_string: mongodb+srv://u:${file:mongo.secret}@cluster0.example.net/db
    write_concern: 2
  - name: cache
    type: redis
    connection_string: rediss://cache:6380/0
  - name: local-store
    type: sqlite
    connection_string: sqlite:///tmp/local.db
"""


# --------------------------------------------------------------------------- valid files


def test_full_file_round_trips_to_dataclasses(tmp_path: Path) -> None:
    (tmp_path / "mongo.secret").write_text(f"  {SECRET}\n", encoding="utf-8")
    config = load_config(write(tmp_path, FULL), environ={"PGPASSWORD": SECRET})

    assert config == Config(
        server=ServerConfig(host="0.0.0.0", port=9000),
        databases=(
            DatabaseConfig(
                name="main",
                type="postgresql",
                connection_string=f"postgresql://app:{SECRET}@db:5432/app",
                pool_settings=PoolSettings(
                    min_connections=1, max_connections=20, timeout_seconds=2.5
                ),
                read_preference="nearest",
                write_concern="majority",
                replicas=(
                    ReplicaConfig(host="db-replica-1", port=5432, role="replica"),
                    ReplicaConfig(host="db-analytics", port=5433, role="analytics"),
                ),
            ),
            DatabaseConfig(
                name="analytics",
                type="mongodb",
                connection_string=f"mongodb+srv://u:{SECRET}@cluster0.example.net/db",
                write_concern=2,
            ),
            DatabaseConfig(name="cache", type="redis", connection_string="rediss://cache:6380/0"),
            DatabaseConfig(
                name="local-store", type="sqlite", connection_string="sqlite:///tmp/local.db"
            ),
        ),
        limits=Limits(max_body_bytes=2048, statement_timeout_seconds=2.0, default_limit=50),
        default_database="analytics",
        data_dir="/var/lib/dbproxy",
        collector_url="http://collector:8710",
    )
    assert isinstance(config.limits.statement_timeout_seconds, float)
    assert config.database().name == "analytics"
    assert config.database("main").pool_settings.max_connections == 20


def test_dataclasses_are_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data_dir = "elsewhere"  # type: ignore[misc]


def test_no_file_no_url_means_no_databases() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert config.databases == ()
    assert config.default_database is None
    assert config.server == ServerConfig(host="127.0.0.1", port=8700)
    assert config.data_dir == ".dbproxy"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), environ={}) == Config()


def test_default_database_is_the_first(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        databases:
          - {name: b, type: sqlite, connection_string: "sqlite:///b.db"}
          - {name: a, type: postgresql, connection_string: "postgres://h/a"}
        """,
    )
    config = load_config(path, environ={})
    assert config.default_database == "b"
    assert config.database().name == "b"


def test_database_lookup_errors() -> None:
    with pytest.raises(ConfigError, match="no database is configured"):
        Config().database()
    config = Config(
        databases=(DatabaseConfig("main", "sqlite", "sqlite:///x.db"),), default_database="main"
    )
    with pytest.raises(ConfigError, match="no database named 'other'"):
        config.database("other")


# --------------------------------------------------------------------------- problems


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        sever: {host: x}
        server: {port: 70000, hots: a}
        limits: {max_body_bytes: 0, max_json_depth: true, statement_timeout_seconds: "5",
                 max_limit: 10, default_limit: 20, max_in_itmes: 3}
        default_database: nowhere
        collector_url: ftp://collector
        databases:
          - name: main
            type: postgresql
            connection_string: postgresql://app:s3cr3t-Pa55word@db/app
          - name: second
            type: postgresql
            connection_string: postgresql://app:s3cr3t-Pa55word@db/app
            pool_settings: {min_connections: 2, max_connections: 1}
            read_preference: closest
            replicas: [{host: r1, port: 0, role: leader}, {port: 5432}]
          - name: main
            type: oracle
            connection_string: oracle://x
          - name: 9lives
            type: mongodb
            connection_string: postgresql://app:s3cr3t-Pa55word@db/app
            conection_string: typo
            write_concern: -1
          - just a string
          - {name: nodsn, type: redis}
        """,
    )
    problems = problems_of(path, environ={})
    expected = [
        "sever: unknown key (did you mean 'server'?)",
        "server.hots: unknown key (did you mean 'host'?)",
        "server.port: must be between 1 and 65535 (got 70000)",
        "limits.max_in_itmes: unknown key (did you mean 'max_in_items'?)",
        "limits.max_body_bytes: must be >= 1 (got 0)",
        "limits.max_json_depth: must be an integer, got boolean",
        "limits.statement_timeout_seconds: must be a number, got string",
        "limits.default_limit: must be <= max_limit (10)",
        "databases[1].pool_settings.max_connections: must be >= min_connections (2)",
        "databases[1].read_preference: must be one of primary, secondary, nearest (got 'closest')",
        "databases[1].replicas[0].port: must be between 1 and 65535 (got 0)",
        "databases[1].replicas[0].role: must be one of replica, analytics (got 'leader')",
        "databases[1].replicas[1].host: is required",
        "databases[2].type: must be one of postgresql, mongodb, redis, sqlite (got 'oracle')",
        "databases[2].name: duplicate database name 'main' (also databases[0])",
        "databases[3].conection_string: unknown key (did you mean 'connection_string'?)",
        "databases[3].connection_string: must start with mongodb:// or mongodb+srv:// "
        "for type mongodb (got postgresql://)",
        "databases[3].write_concern: must be >= 0 (got -1)",
        "databases[3].name: must be a letter followed by at most 62 letters, digits, "
        "'_' or '-' (got '9lives')",
        "databases[4]: must be a mapping, got string",
        "databases[5].connection_string: is required",
        "default_database: no database named 'nowhere' (configured: 'main', 'second', 'nodsn')",
        "collector_url: must start with http:// or https://",
    ]
    for problem in expected:
        assert problem in problems
    assert len(problems) == len(expected), problems


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: true}\n")
    assert problems_of(path, environ={}) == ["server.port: must be an integer, got boolean"]


def test_wrong_section_types(tmp_path: Path) -> None:
    path = write(tmp_path, "server: [1]\nlimits: 3\ndatabases: {name: x}\n")
    assert problems_of(path, environ={}) == [
        "server: must be a mapping, got list",
        "limits: must be a mapping, got integer",
        "databases: must be a list, got mapping",
    ]


@pytest.mark.parametrize(
    ("db_type", "dsn"),
    [
        ("postgresql", "postgresql://h/db"),
        ("postgresql", "postgres://h/db"),
        ("postgresql", "POSTGRESQL://h/db"),
        ("mongodb", "mongodb://h/db"),
        ("mongodb", "mongodb+srv://h/db"),
        ("redis", "redis://h/0"),
        ("redis", "rediss://h/0"),
        ("sqlite", "sqlite:///tmp/x.db"),
    ],
)
def test_accepted_schemes(tmp_path: Path, db_type: str, dsn: str) -> None:
    path = write(
        tmp_path, f"databases: [{{name: d, type: {db_type}, connection_string: '{dsn}'}}]\n"
    )
    assert load_config(path, environ={}).database().connection_string == dsn


def test_scheme_hidden_when_it_came_from_a_secret(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "databases: [{name: d, type: redis, connection_string: '${URL}'}]\n",
    )
    problems = problems_of(path, environ={"URL": f"postgresql://u:{SECRET}@h/db"})
    assert problems == [
        "databases[0].connection_string: must start with redis:// or rediss:// for type redis"
    ]


def test_database_name_pattern(tmp_path: Path) -> None:
    long_name = "a" * 64
    path = write(
        tmp_path,
        f"""
        databases:
          - {{name: ok_Name-1, type: sqlite, connection_string: "sqlite:///a"}}
          - {{name: "bad name", type: sqlite, connection_string: "sqlite:///b"}}
          - {{name: {long_name}, type: sqlite, connection_string: "sqlite:///c"}}
          - {{name: "-x", type: sqlite, connection_string: "sqlite:///d"}}
          - {{name: 12, type: sqlite, connection_string: "sqlite:///e"}}
        """,
    )
    problems = problems_of(path, environ={})
    assert [p.split(":")[0] for p in problems] == [
        "databases[1].name",
        "databases[2].name",
        "databases[3].name",
        "databases[4].name",
    ]
    assert problems[3] == "databases[4].name: must be a non-empty string, got integer"


def test_yaml_syntax_error_is_a_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'databases:\n  - name: x\n    connection_string: "postgresql://u:{SECRET}@h\n  bad: [\n',
    )
    problems = problems_of(path, environ={})
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: invalid YAML at line ")


def test_missing_file_and_non_mapping_top_level(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert problems_of(missing, environ={}) == [f"{missing}: config file not found"]
    path = write(tmp_path, "- a\n- b\n")
    assert problems_of(path, environ={}) == [f"{path}: top level must be a mapping, got list"]


def test_missing_file_and_bad_flags_reported_together(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    problems = problems_of(missing, port=0, database_url="mysql://h/db", environ={})
    assert problems == [
        f"{missing}: config file not found",
        "port: must be between 1 and 65535 (got 0)",
        "database_url: unsupported or missing URL scheme (expected one of postgresql://, "
        "postgres://, sqlite://)",
    ]


# --------------------------------------------------------------------------- secrets


def test_env_and_file_secrets_resolved(tmp_path: Path) -> None:
    secret_file = tmp_path / "secrets" / "pg"
    secret_file.parent.mkdir()
    secret_file.write_text(f"\n{SECRET}\n\n", encoding="utf-8")
    path = write(
        tmp_path,
        f"""
        databases:
          - name: env
            type: postgresql
            connection_string: postgresql://${{PGUSER}}:${{PGPASSWORD}}@db/app
          - name: absolute
            type: postgresql
            connection_string: postgresql://app:${{file:{secret_file}}}@db/app
          - name: relative
            type: postgresql
            connection_string: postgresql://app:${{file:secrets/pg}}@db/app
        """,
    )
    config = load_config(path, environ={"PGUSER": "app", "PGPASSWORD": SECRET})
    assert [db.connection_string for db in config.databases] == [
        f"postgresql://app:{SECRET}@db/app"
    ] * 3


def test_missing_env_var_and_unreadable_file_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        databases:
          - name: a
            type: postgresql
            connection_string: postgresql://app:${PGPASSWORD}@db/${PGDB}
          - name: b
            type: postgresql
            connection_string: postgresql://app:${file:/nonexistent/secret}@db/app
          - name: c
            type: postgresql
            connection_string: postgresql://app:${not valid}@db/app
        """,
    )
    problems = problems_of(path, environ={"PGDB": SECRET})
    assert problems == [
        "databases[0].connection_string: environment variable PGPASSWORD is not set",
        "databases[1].connection_string: cannot read secret file '/nonexistent/secret': "
        "No such file or directory",
        "databases[2].connection_string: invalid ${...} reference "
        "(expected ${NAME} or ${file:/path})",
    ]


def test_secret_never_in_repr_str_or_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "databases: [{name: main, type: postgresql, "
        "connection_string: 'postgresql://app:${PGPASSWORD}@db/app?password=${PGPASSWORD}'}]\n",
    )
    config = load_config(path, environ={"PGPASSWORD": SECRET})
    db = config.database()
    assert SECRET in db.connection_string
    for text in (repr(db), str(db), repr(config), str(config), db.redacted_dsn()):
        assert SECRET not in text
    assert "connection_string" not in repr(db)
    assert db.redacted_dsn() == "postgresql://app:***@db/app?password=***"

    # The same secret, now in a broken config: no problem message may carry it.
    bad = write(
        tmp_path,
        f"""
        databases:
          - name: main
            type: mongodb
            connection_string: postgresql://app:{SECRET}@db/app
            pool_settings: {{min_connections: 5, max_connections: 1}}
          - name: other
            type: redis
            connection_string: ${{PGPASSWORD}}
        """,
        name="bad.yaml",
    )
    problems = problems_of(bad, database_url=f"mysql://u:{SECRET}@h/db", environ={})
    assert len(problems) == 4


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://app:pw@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql://app@db:5432/app", "postgresql://app@db:5432/app"),
        ("postgresql://db:5432/app", "postgresql://db:5432/app"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        (
            "postgresql://db/app?sslmode=require&password=pw",
            "postgresql://db/app?sslmode=require&password=***",
        ),
        ("postgresql://db/app?PassWord=pw&x=1", "postgresql://db/app?PassWord=***&x=1"),
        (
            "mongodb://u:p%40w@h1:27017,h2:27017/db?replicaSet=rs&authMechanismProperties=T:x",
            "mongodb://u:***@h1:27017,h2:27017/db?replicaSet=rs&authMechanismProperties=***",
        ),
        ("postgresql://u:p@w@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p/w?x#y@h/db", "postgresql://u:***@h/db"),
        ("postgresql://[::1]:5432/db", "postgresql://[::1]:5432/db"),
        ("sqlite:///var/lib/x.db", "sqlite:///var/lib/x.db"),
        ("host=db user=app password=pw dbname=x", "host=db user=app password=*** dbname=x"),
        ("host=db password='p w'", "host=db password=***"),
        ("not a dsn at all", "***"),
        ("pw", "***"),
        ("", ""),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


@pytest.mark.parametrize(
    "dsn", ["postgresql://[::1", "postgresql://u:pw", "::::", "postgresql://u:pw@", "%%%@@@"]
)
def test_redact_dsn_unparseable_never_leaks(dsn: str) -> None:
    assert "pw" not in redact_dsn(dsn)
    assert "%%%" not in redact_dsn(dsn)


# --------------------------------------------------------------------------- precedence


def test_cli_overrides_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        server: {host: 0.0.0.0, port: 9000}
        data_dir: /from/file
        collector_url: http://file:8710
        """,
    )
    config = load_config(
        path,
        host="10.0.0.1",
        port=9100,
        data_dir="/from/flag",
        collector_url="https://flag:8710",
        environ={},
    )
    assert config.server == ServerConfig(host="10.0.0.1", port=9100)
    assert config.data_dir == "/from/flag"
    assert config.collector_url == "https://flag:8710"

    unchanged = load_config(path, environ={})
    assert unchanged.server == ServerConfig(host="0.0.0.0", port=9000)
    assert unchanged.data_dir == "/from/file"


def test_bad_cli_overrides_reported() -> None:
    problems = problems_of(host="", port=True, data_dir="", collector_url="x", environ={})
    assert problems == [
        "host: must be a non-empty string",
        "port: must be an integer, got boolean",
        "data_dir: must be a non-empty string",
        "collector_url: must start with http:// or https://",
    ]


@pytest.mark.parametrize(
    ("url", "db_type"),
    [
        ("postgresql://u:pw@h/db", "postgresql"),
        ("postgres://h/db", "postgresql"),
        ("mongodb://h/db", "mongodb"),
        ("mongodb+srv://h/db", "mongodb"),
        ("sqlite:///tmp/x.db", "sqlite"),
    ],
)
def test_database_url_from_environ(url: str, db_type: str) -> None:
    config = load_config(environ={DATABASE_URL_ENV: url})
    assert config.default_database == "default"
    assert config.databases == (DatabaseConfig("default", db_type, url),)


def test_database_url_argument_beats_environ() -> None:
    config = load_config(
        database_url="postgresql://flag/db", environ={DATABASE_URL_ENV: "mongodb://env/db"}
    )
    assert config.database().connection_string == "postgresql://flag/db"


def test_empty_environ_url_is_unset_but_empty_argument_is_a_problem() -> None:
    assert load_config(environ={DATABASE_URL_ENV: ""}).databases == ()
    assert problems_of(database_url="", environ={}) == ["database_url: must not be empty"]


def test_database_url_replaces_default_and_becomes_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        default_database: main
        databases:
          - {name: main, type: postgresql, connection_string: "postgresql://main/db"}
          - {name: default, type: redis, connection_string: "redis://old/0"}
        """,
    )
    config = load_config(path, environ={DATABASE_URL_ENV: "sqlite:///new.db"})
    assert [db.name for db in config.databases] == ["main", "default"]
    assert config.database() == DatabaseConfig("default", "sqlite", "sqlite:///new.db")
    assert config.database("main").type == "postgresql"


def test_environ_url_bad_scheme_named_by_variable() -> None:
    problems = problems_of(environ={DATABASE_URL_ENV: f"mysql://u:{SECRET}@h/db"})
    assert len(problems) == 1
    assert problems[0].startswith(f"{DATABASE_URL_ENV}: unsupported or missing URL scheme")


def test_dsn_pasted_in_the_wrong_place_is_redacted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        databases:
          - name: postgresql://app:{SECRET}@db/app
            type: postgresql
            connection_string: postgresql://db/app
            postgresql://app:{SECRET}@db/app: 1
        """,
    )
    assert problems_of(path, environ={}) == [
        "databases[0].'postgresql://app:***@db/app': unknown key",
        "databases[0].name: must be a letter followed by at most 62 letters, digits, '_' or '-' "
        "(got 'postgresql://app:***@db/app')",
    ]


def test_secret_file_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"\xff\xfe")
    path = write(
        tmp_path,
        "databases: [{name: a, type: postgresql, connection_string: 'postgresql://u:${file:pw}@h'}]\n",
    )
    assert problems_of(path, environ={}) == [
        f"databases[0].connection_string: secret file '{tmp_path / 'pw'}' is not valid UTF-8"
    ]


def test_cache_section_timeouts(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        cache:
          redis_url: redis://127.0.0.1:6379/0
          redis_timeout_seconds: 0.02
          ack_timeout_seconds: 0.2
          collections:
            products: {enabled: true, ttl_seconds: 5}
        """,
    )
    cache = load_config(path, environ={}).cache
    assert cache.redis_timeout_seconds == 0.02 and cache.ack_timeout_seconds == 0.2
    assert cache.ttl("products") == 5 and cache.ttl("other") is None
    assert load_config(environ={}).cache.ack_timeout_seconds == 0.05
    bad = write(tmp_path, "cache:\n  ack_timeout_seconds: 0\n  redis_timeout_seconds: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, environ={})
    assert "cache.ack_timeout_seconds" in str(err.value)
    assert "cache.redis_timeout_seconds" in str(err.value)


def test_collector_push_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        collector_url: http://collector:8710
        collector_push: {interval_seconds: 0.5, max_buffered_batches: 10}
        """,
    )
    config = load_config(path, environ={})
    assert config.collector_push.interval_seconds == 0.5
    assert config.collector_push.max_buffered_batches == 10
    assert load_config(environ={}).collector_push.max_buffered_batches == 100
    bad = write(tmp_path, "collector_push: {interval_seconds: 0, max_buffered_batches: 0, x: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, environ={})
    text = str(err.value)
    assert "collector_push.interval_seconds" in text
    assert "collector_push.max_buffered_batches" in text
    assert "collector_push.x" in text


def test_mongodb_also_takes_two_of_mongodbs_read_preferences(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        databases:
          - {name: m, type: mongodb, connection_string: "mongodb://h/app",
             read_preference: primaryPreferred}
          - {name: n, type: mongodb, connection_string: "mongodb://h/app",
             read_preference: secondaryPreferred}
        """,
    )
    config = load_config(path, environ={})
    assert [d.read_preference for d in config.databases] == [
        "primaryPreferred",
        "secondaryPreferred",
    ]
    path = write(
        tmp_path,
        """
        databases:
          - {name: p, type: postgresql, connection_string: "postgres://h/a",
             read_preference: primaryPreferred}
        """,
        "pg.yaml",
    )
    assert problems_of(path, environ={}) == [
        "databases[0].read_preference: must be one of primary, secondary, nearest "
        "(got 'primaryPreferred')"
    ]


def test_time_partitions_keeper(tmp_path: Path) -> None:
    from proxy.wiring import build_backends

    path = write(
        tmp_path,
        """
        databases:
          - {name: a, type: postgresql, connection_string: "postgres://h/a"}
          - {name: b, type: postgresql, connection_string: "postgres://h/b",
             time_partitions: sidecar}
        """,
    )
    config = load_config(path, environ={})
    assert [d.time_partitions for d in config.databases] == ["pg_partman", "sidecar"]
    backends = build_backends(config)
    assert [getattr(backends[n], "partman", None) for n in "ab"] == [True, False]
    bad = write(
        tmp_path,
        """
        databases:
          - {name: a, type: postgresql, connection_string: "postgres://h/a", time_partitions: x}
        """,
        "bad.yaml",
    )
    assert problems_of(bad, environ={}) == [
        "databases[0].time_partitions: must be one of pg_partman, sidecar (got 'x')"
    ]
