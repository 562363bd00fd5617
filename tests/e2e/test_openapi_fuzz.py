"""Schemathesis fuzzes a real ``dbproxy serve`` from its own ``/api/db/openapi.json``, on
PostgreSQL and on the embedded store: no 5xx, and every response conforms to the
description (status, content type, body schema). Bounded: a few examples per operation."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_DSN, _admin, _with_db
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
MAX_EXAMPLES = int(os.environ.get("DBPROXY_FUZZ_EXAMPLES", "20"))
SEED = os.environ.get("DBPROXY_FUZZ_SEED", "20")

# Interactive transactions the fuzzer begins are rolled back by the hook
# (tests/e2e/fuzz_hooks.py); those a rollback misses are reaped after a second idle.
CONFIG = """
limits:
  transaction_idle_timeout_seconds: 1
"""


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """A database of this test's own: the fuzzer runs migrations and drops collections."""
    name = f"dbproxy_fuzz_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_db(PG_ADMIN_DSN, name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def fuzz(server: Server, tmp_path: Path) -> str:
    """Run schemathesis's CLI against ``server``; its report (the test fails on any failure)."""
    cli = Path(sys.executable).with_name("schemathesis")
    argv = [
        str(cli),
        "run",
        f"{server.url}/api/db/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        SEED,
        "--phases",
        "examples,coverage,fuzzing",
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "15",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.e2e.fuzz_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env, check=False
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, (
        report[-20000:] + "\n--- sidecar log ---\n" + server.output()[-5000:]
    )
    return report


def check_report(report: str) -> None:
    generated = re.search(r"(\d+) generated", report)
    assert generated is not None and int(generated.group(1)) >= 200, report[-3000:]
    assert re.search(r"Tested:\s+24\b", report) or "24 passed" in report, report[-3000:]
    assert "Server error" not in report


def test_fuzz_on_the_embedded_store(launch: Callable[..., Server], tmp_path: Path) -> None:
    config = tmp_path / "fuzz.yaml"
    config.write_text(CONFIG)
    server = launch("--config", str(config), "--data-dir", str(tmp_path / "data"))
    check_report(fuzz(server, tmp_path))


def test_fuzz_on_postgresql(launch: Callable[..., Server], fresh_pg: str, tmp_path: Path) -> None:
    config = tmp_path / "fuzz.yaml"
    config.write_text(CONFIG)
    server = launch("--config", str(config), "--database", fresh_pg)
    check_report(fuzz(server, tmp_path))
