"""Server settings (issue 13, item 8): the file's ``server`` section and the flags that
override it; and the database name a missing-database message uses (item 15)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.backends.postgres import dsn_database
from proxy.cli import _parser, _with_server_flags
from proxy.config import ServerConfig, load_config
from proxy.errors import ConfigError


def test_defaults() -> None:
    s = load_config(environ={}).server
    assert (s.max_connections, s.header_timeout_seconds) == (4096, 10.0)
    assert (s.body_timeout_seconds, s.idle_timeout_seconds) == (30.0, 60.0)


def test_file_values_and_problems(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server: {max_connections: 100, header_timeout_seconds: 2.5, idle_timeout_seconds: 5}\n"
    )
    s = load_config(str(path), environ={}).server
    assert s == ServerConfig(
        max_connections=100, header_timeout_seconds=2.5, idle_timeout_seconds=5.0
    )
    path.write_text("server: {max_connections: 0, body_timeout_seconds: -1, idle: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert info.value.problems == [
        "server.idle: unknown key",
        "server.max_connections: must be >= 1 (got 0)",
        "server.body_timeout_seconds: must be a positive number (got -1)",
    ]


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {max_connections: 100, header_timeout_seconds: 2.5}\n")
    args = _parser().parse_args(["serve", "--max-connections", "7", "--idle-timeout", "1.5"])
    s = _with_server_flags(load_config(str(path), environ={}), args).server
    assert (s.max_connections, s.header_timeout_seconds, s.idle_timeout_seconds) == (7, 2.5, 1.5)


@pytest.mark.parametrize(
    "flag", [["--max-connections", "0"], ["--header-timeout", "nan"], ["--body-timeout", "-2"]]
)
def test_bad_flags_exit_2(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["serve", *flag])
    assert info.value.code == 2
    assert flag[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    ("dsn", "name"),
    [
        ("postgresql://u:pw@h:5432/nosuchdb", "nosuchdb"),
        ("postgres://h/some%20db?sslmode=disable", "some db"),
        ("postgresql://h/?dbname=other", "other"),
        ("postgresql://h", None),
    ],
)
def test_dsn_database(dsn: str, name: str | None) -> None:
    assert dsn_database(dsn) == name
