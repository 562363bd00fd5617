"""The README's "A first session" stays true: its curl commands run in order against a fresh
``dbproxy serve`` on the embedded store, and every output it claims in a comment is checked."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import PG_ADMIN_DSN, _admin, _with_db
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## A first session"


@dataclass
class Step:
    line: int  # in README.md, for the failure message
    argv: list[str]
    claims: list[str]  # the comment on the command's line and comment lines right after it


def session_block(text: str) -> tuple[int, list[str]]:
    """(line number of the block's first line, the lines of the section's ```bash block)."""
    lines = text.splitlines()
    start = lines.index(SECTION)
    opening = next(i for i in range(start, len(lines)) if lines[i].strip() == "```bash")
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].strip() == "```")
    return opening + 2, lines[opening + 1 : closing]


def comment_of(line: str) -> str | None:
    """The comment of a shell line (a ``#`` outside quotes that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[i + 1 :].strip()
    return None


def parse_steps(text: str) -> list[Step]:
    first, lines = session_block(text)
    steps: list[Step] = []
    pending = ""
    pending_line = 0
    last: Step | None = None
    for offset, line in enumerate(lines):
        number = first + offset
        if not pending and line.lstrip().startswith("#"):
            if last is not None:  # a comment line right after a command is about it
                last.claims.append(line.lstrip()[1:].strip())
            continue
        if not pending and not line.strip():
            last = None
            continue
        pending = f"{pending}\n{line}" if pending else line
        pending_line = pending_line or number
        try:
            argv = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        comment = comment_of(pending.splitlines()[-1])
        last = None
        if argv and argv[0] == "curl":
            last = Step(pending_line, argv, [comment] if comment else [])
            steps.append(last)
        pending, pending_line = "", 0
    assert not pending, f"unterminated command at README.md line {pending_line}"
    return steps


def run(step: Step, port: int) -> tuple[int, bytes]:
    argv = [a.replace("localhost:8700", f"127.0.0.1:{port}") for a in step.argv]
    done = subprocess.run(
        [*argv, "--max-time", "20", "-w", "\n%{http_code}"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, (step.line, done.stderr)
    body, _, status = done.stdout.rpartition(b"\n")
    if b"\r\n\r\n" in body:  # -i: the headers come first
        body = body.split(b"\r\n\r\n", 1)[1]
    return int(status), body


def without_generated_id(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "_id" or not _generated(v)}
    return value


def _generated(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9A-Z]{26}", value) is not None


def check_claims(step: Step, status: int, body: bytes) -> None:
    where = f"README.md line {step.line}: {shlex.join(step.argv)[:120]}"
    statuses = {int(s) for c in step.claims for s in re.findall(r"\b([1-5]\d\d)\b", c)}
    if statuses:
        assert status in statuses, (where, status, body)
    else:
        assert status < 400, (where, status, body)
    for claim in step.claims:
        if not claim.startswith(("{", "[")):
            continue
        expected = json.loads(claim)
        got = json.loads(body)
        assert without_generated_id(got) == without_generated_id(expected), (where, got)


def test_the_session_parses() -> None:
    steps = parse_steps(README.read_text())
    assert len(steps) >= 10
    assert any(c.startswith("{") for s in steps for c in s.claims)


def test_a_first_session_is_true(launch: Callable[..., Server]) -> None:
    server = launch()
    port = int(server.url.rsplit(":", 1)[1])
    for step in parse_steps(README.read_text()):
        status, body = run(step, port)
        check_claims(step, status, body)


def test_the_migrate_example_applies_the_example_directory() -> None:
    """The README's ``dbproxy migrate`` line, as written, on a database of its own: the
    example migrations apply (exit 0), again as a no-op (exit 0), and leave the schema."""
    line = next(ln for ln in README.read_text().splitlines() if "dbproxy migrate examples/" in ln)
    argv = shlex.split(line, comments=True)
    url = argv[argv.index("--database") + 1]
    assert url.startswith("postgresql://")
    name = f"dbproxy_readme_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        argv[argv.index("--database") + 1] = _with_db(PG_ADMIN_DSN, name)
        argv[0] = str(ROOT / argv[0]) if not Path(argv[0]).is_absolute() else argv[0]
        for _ in range(2):  # the second run: every migration applied already
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
            )
            assert done.returncode == 0, (done.stdout, done.stderr)
        schemas = asyncio.run(_fetch(_with_db(PG_ADMIN_DSN, name)))
        assert schemas == ["users"]
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _fetch(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT collection FROM dbproxy._schemas ORDER BY 1")
        return [r[0] for r in rows]
    finally:
        await conn.close()
