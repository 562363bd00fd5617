"""Fixtures that start the real ``dbproxy serve`` process and talk HTTP to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(args: list[str], tmp: Path, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    log = tmp / f"dbproxy-{port}.log"
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), *args]
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("DBPROXY_LOG_LEVEL", "INFO")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=tmp)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dbproxy exited early:\n{server.output()}")
        try:
            with urllib.request.urlopen(server.url + "/api/db/health", timeout=1):
                return server
        except urllib.error.HTTPError:  # 503: up, but a database is not ready
            return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"dbproxy did not become healthy:\n{server.output()}")


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def _launch(*args: str, env: dict[str, str] | None = None) -> Server:
        server = start_server(list(args), tmp_path, env)
        servers.append(server)
        return server

    yield _launch
    for server in servers:
        server.stop()


@pytest.fixture
def pg_server(launch: Callable[..., Server], pg_dsn: str) -> Server:
    return launch("--database", pg_dsn)
