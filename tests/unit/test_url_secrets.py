"""A database given by a URL alone (``serve --database``, ``collector --database``) reads
``${VAR}`` and ``${file:}`` like the config file, and keeps the file to watch for rotation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_config, load_database_url
from proxy.errors import ConfigError

SECRET = "url-secret-pw-0c4d"


def test_a_file_secret_in_a_url_is_resolved_and_watched(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    url = f"postgresql://app:${{file:{secret}}}@db:5432/app?sslmode=require"
    db = load_database_url(url, "--database", name="collector", environ={})
    assert db.name == "collector" and db.type == "postgresql"
    assert db.connection_string == f"postgresql://app:{SECRET}@db:5432/app?sslmode=require"
    assert db.secret is not None and db.secret.files == (str(secret),)
    secret.write_text("rotated\n")
    assert db.secret.render() == "postgresql://app:rotated@db:5432/app?sslmode=require"
    assert SECRET not in repr(db)


def test_serve_database_url_reads_env_and_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(SECRET)
    url = "postgresql://${PGUSER_X}:${file:" + str(secret) + "}@db/app"
    config = load_config(None, database_url=url, environ={"PGUSER_X": "svc"})
    (db,) = config.databases
    assert db.connection_string == f"postgresql://svc:{SECRET}@db/app"
    assert db.secret is not None


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://app:${file:/nonexistent/pw}@db/app", "cannot read secret file"),
        ("postgresql://app:${NOT_SET_X}@db/app", "environment variable NOT_SET_X is not set"),
        ("mongodb://app:pw@db/app", "must be a postgresql:// URL"),
        ("postgresql://db/app?sslmode=bogus", "sslmode must be one of"),
    ],
)
def test_a_bad_url_is_one_clear_problem(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        load_database_url(url, "--database", name="collector", environ={})
    assert "pw@" not in str(info.value)


def test_collector_refuses_an_unreadable_secret_at_start(tmp_path: Path) -> None:
    url = "postgresql://app:${file:missing-pw}@db/app"
    run = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "collector", "--port", "19299", "--database", url],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert "cannot read secret file" in run.stderr and "missing-pw" in run.stderr
