"""The injected sidecar as it would run in the pod: the real ``dbproxy`` started with exactly
the container's args (the database URL in the environment, as the Secret puts it), and the
container's exec probes run against it: ready with PostgreSQL up, started-but-not-ready
while the database is unreachable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import serve_args_problem
from proxy.inject import InjectorSettings, plan
from tests.deploy.support import deployment_pod
from tests.deploy.test_injector_https import port_in_range

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def the_sidecar(port: int, policies: Path) -> dict[str, Any]:
    settings = InjectorSettings(
        image="dbproxy:test", policies_mount=str(policies), check_args=serve_args_problem
    )
    pod = deployment_pod({"dbproxy.io/inject": "true", "dbproxy.io/port": str(port)})
    answer = plan(pod, settings)
    assert answer.denied is None
    (op,) = [o for o in answer.ops if "initContainers" in o["path"]]
    container = op["value"]
    return container[0] if isinstance(container, list) else container


def probe(container: dict[str, Any], name: str) -> int:
    command = list(container[name]["exec"]["command"])
    assert command[0] == "python"  # the image's venv python (on its PATH)
    command[0] = sys.executable
    return subprocess.run(command, capture_output=True, timeout=10).returncode


def wait_for(condition: Any, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def run_sidecar(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []
    policies = tmp_path / "policies"  # what the ConfigMap volume holds
    policies.mkdir()
    shutil.copy(ROOT / "policies" / "users.yaml", policies / "users.yaml")

    def start(database_url: str) -> dict[str, Any]:
        port = port_in_range(18450, 18499)
        container = the_sidecar(port, policies)
        env = {**os.environ, "DBPROXY_DATABASE_URL": database_url}
        cmd = [sys.executable, "-m", "proxy.cli", *container["args"]]
        with (tmp_path / f"sidecar-{port}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
            )
        return container

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_probes_pass_against_a_sidecar_with_its_database(run_sidecar: Any, pg_dsn: str) -> None:
    container = run_sidecar(pg_dsn)
    assert wait_for(lambda: probe(container, "startupProbe") == 0)
    assert probe(container, "livenessProbe") == 0
    assert wait_for(lambda: probe(container, "readinessProbe") == 0)


def test_a_sidecar_without_its_database_is_started_but_not_ready(run_sidecar: Any) -> None:
    closed = port_in_range(18400, 18449)  # nothing listens there
    container = run_sidecar(f"postgresql://postgres@127.0.0.1:{closed}/none")
    assert wait_for(lambda: probe(container, "startupProbe") == 0)
    assert probe(container, "livenessProbe") == 0
    assert probe(container, "readinessProbe") != 0  # /api/db/health answers 503
