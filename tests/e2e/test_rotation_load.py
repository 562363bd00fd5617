"""The rotation of issue 22 as an operator does it, under concurrent HTTP load through real
``dbproxy serve`` processes on a private cluster: ALTER ROLE, the ``${file:}`` secret
rewritten, picked up (by the file watch, or SIGHUP to every ``--workers`` process), the
sessions opened with the old password replaced without anyone ending them, then every
session ended — 0 failed requests, every acknowledged write stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_tls_listener import _wait
from tests.pgcluster import binaries_missing
from tests.rotation_support import (
    HttpLoad,
    app_cluster,
    children,
    count,
    end_app_sessions,
    password_works,
    pg_connections_by_process,
    rotate_password,
    sessions_since,
    wait_for_log,
    wait_for_old_sessions_to_go,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(binaries_missing() is not None, reason=str(binaries_missing())),
]
RELOADED = "database main: credentials reloaded"


def _config(tmp_path: Path, pg_port: int, password: str) -> tuple[Path, Path]:
    secret = tmp_path / "pg-password"
    secret.write_text(password + "\n")
    config = tmp_path / "dbproxy.yaml"
    dsn = f"postgresql://app:${{file:{secret}}}@127.0.0.1:{pg_port}/postgres"
    config.write_text(
        "databases:\n  - name: main\n    type: postgresql\n"
        f"    connection_string: {dsn}\n"
        "    pool_settings: {min_connections: 2, max_connections: 6}\n"
    )
    return config, secret


def _serve(tmp_path: Path, port: int, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "dbproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    _wait(proc, port)
    return proc, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _workers(parent: int, log: Path) -> list[int]:
    """The two worker processes, once both listen (the parent binds the port itself, so
    the port answering says nothing about them)."""
    assert wait_for_log(log, "dbproxy listening on", count=2, timeout=30) == 2, log.read_text()
    workers = children(parent)
    assert len(workers) == 2, workers
    return workers


def _check_stored(base: str, load: HttpLoad) -> None:
    """Every acknowledged create is there, every acknowledged patch too."""
    assert count(base, "items", {}) == load.ok["create"]
    assert count(base, "items", {"patched": True}) == load.ok["patch"]


def test_rotation_by_the_file_watch_under_mixed_load(tmp_path: Path) -> None:
    """One sidecar, no signal: the watch (every 0.5 s) sees the new secret."""
    port, pg_port, old, new = 19220, 19221, "load-old-pw-3e9c", "load-new-pw-b07d"
    cluster = app_cluster(pg_port, old)
    try:
        config, secret = _config(tmp_path, pg_port, old)
        proc, log = _serve(tmp_path, port, "--config", str(config), "--secrets-interval", "0.5")
        base = f"http://127.0.0.1:{port}"
        try:
            load = HttpLoad(base, "items", threads=8)
            load.settle(1.0)
            rotated = rotate_password(cluster, new)
            secret.write_text(new + "\n")
            assert wait_for_log(log, RELOADED) == 1, log.read_text()[-2000:]
            left = wait_for_old_sessions_to_go(cluster, rotated)
            load.settle(1.0)
            load.writes_at_least(51)
            load.reads_only.set()  # a session ended under a write is a 503 by design
            time.sleep(0.3)
            ended = end_app_sessions(cluster)
            load.settle(1.5)
            load.stop()
            _check_stored(base, load)
        finally:
            _stop(proc)
        text = log.read_text()
        assert not password_works(cluster, old)
    finally:
        cluster.destroy()
    assert load.failed == [], load.failed[:5]
    assert left[0] == 0, left  # the old sessions were replaced, nobody ended them
    assert ended >= 1
    assert load.ok["create"] > 50 and load.ok["patch"] > 50, load.ok
    assert old not in text and new not in text


def test_every_worker_picks_up_the_rotation_on_sighup(tmp_path: Path) -> None:
    """``--workers 2``: SIGHUP to the parent reaches each worker; each reloads (two log
    lines), each holds connections opened after the change, none keeps an old one, and
    after every session is ended each worker reconnects with the new password."""
    port, pg_port, old, new = 19210, 19211, "wrk-old-pw-6a1d", "wrk-new-pw-c58e"
    cluster = app_cluster(pg_port, old)
    try:
        config, secret = _config(tmp_path, pg_port, old)
        args = ("--config", str(config), "--secrets-interval", "60", "--workers", "2")
        proc, log = _serve(tmp_path, port, *args)
        base = f"http://127.0.0.1:{port}"
        try:
            workers = _workers(proc.pid, log)
            load = HttpLoad(base, "items", threads=8)
            load.settle(1.5)
            before = pg_connections_by_process(pg_port)
            rotated = rotate_password(cluster, new)
            secret.write_text(new + "\n")
            os.kill(proc.pid, signal.SIGHUP)
            reloads = wait_for_log(log, RELOADED, count=2)
            left = wait_for_old_sessions_to_go(cluster, rotated)
            load.settle(1.0)
            after = pg_connections_by_process(pg_port)
            load.writes_at_least(51)
            load.reads_only.set()
            time.sleep(0.3)
            ended = end_app_sessions(cluster)
            load.settle(2.0)
            reconnected = pg_connections_by_process(pg_port)
            fresh = sessions_since(cluster, rotated)
            load.stop()
            _check_stored(base, load)
        finally:
            _stop(proc)
        text = log.read_text()
    finally:
        cluster.destroy()
    assert load.failed == [], load.failed[:5]
    assert reloads == 2, text[-3000:]
    for worker in workers:  # each worker served (had sessions) before and after
        assert before.get(worker, 0) >= 1, (workers, before)
        assert after.get(worker, 0) >= 1, (workers, after)
        assert reconnected.get(worker, 0) >= 1, (workers, reconnected)
    assert left[0] == 0, left
    assert ended >= 2 and fresh[0] == 0 and fresh[1] >= 2, (ended, fresh)
    assert load.ok["create"] > 50 and load.ok["patch"] > 50, load.ok
    assert old not in text and new not in text
