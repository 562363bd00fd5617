"""Token mode: no bearer token (the right one or a wrong one) and no database password ever
shows in the log (at DEBUG), in answers and errors, in /api/db/health, /connections,
/stats, /performance, /audit or /metrics — with the default database reachable, and with
it unreachable (every request a 503)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from proxy.policy import hash_token
from tests.e2e.test_tls_listener import _stop, _wait

pytestmark = pytest.mark.e2e
TOKEN = "tok-canary-9f2e4b1c"
WRONG = "wrong-canary-31ad70"
PASSWORD = "pw-canary-77c1e3"
CANARIES = (TOKEN, WRONG, PASSWORD)
UNREACHABLE = 19249  # nothing listens there


def _policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "svc.yaml").write_text(
        "service: svc\n"
        f"identity: {{tokens: ['{hash_token(TOKEN)}']}}\n"
        "grants:\n  - collections: ['*']\n    operations: [read, list, count, create, "
        "update, delete, aggregate, transaction, schema, monitor]\n"
    )
    return directory


def _config(tmp_path: Path, pg_dsn: str, reachable: bool) -> Path:
    gone = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{UNREACHABLE}/postgres"
    main = pg_dsn.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    assert PASSWORD in main
    config = tmp_path / "dbproxy.yaml"
    first, second = (main, gone) if reachable else (gone, main)
    config.write_text(
        "databases:\n"
        f"  - {{name: first, type: postgresql, connection_string: '{first}'}}\n"
        f"  - {{name: second, type: postgresql, connection_string: '{second}'}}\n"
    )
    return config


def _call(url: str, method: str = "GET", body: object = None, token: str | None = TOKEN):
    req = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), method=method
    )
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", token if token.startswith("Basic") else f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read().decode(), str(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), str(err.headers)


def _requests(base: str) -> list[tuple[str, tuple[int, str, str]]]:
    api = f"{base}/api/db"
    return [
        ("create", _call(f"{api}/items", "POST", {"_id": "a", "n": 1})),
        ("read", _call(f"{api}/items/a")),
        ("patch", _call(f"{api}/items/a", "PATCH", {"m": 2})),
        ("query", _call(f"{api}/items/query", "POST", {"filter": {"n": 1}})),
        ("count", _call(f"{api}/items/count")),
        ("aggregate", _call(f"{api}/items/aggregate", "POST", {"pipeline": [{"$match": {}}]})),
        (
            "batch",
            _call(
                f"{api}/transaction",
                "POST",
                {"operations": [{"op": "create", "collection": "items", "document": {"n": 3}}]},
            ),
        ),
        ("schema", _call(f"{api}/schema/items")),
        ("wrong token", _call(f"{api}/items/a", token=WRONG)),
        ("wrong token, write", _call(f"{api}/items", "POST", {"n": 1}, token=WRONG)),
        ("not bearer", _call(f"{api}/items/a", token=f"Basic {WRONG}")),
        ("wrong token, monitor", _call(f"{api}/connections", token=WRONG)),
        ("no token", _call(f"{api}/items/a", token=None)),
        ("health", _call(f"{api}/health")),
        ("connections", _call(f"{api}/connections")),
        ("stats", _call(f"{api}/stats")),
        ("performance", _call(f"{api}/performance")),
        ("audit", _call(f"{api}/audit")),
        ("metrics", _call(f"{base}/metrics")),
    ]


@pytest.mark.parametrize("reachable", [True, False], ids=["reachable", "unreachable"])
def test_no_token_or_password_anywhere(tmp_path: Path, pg_dsn: str, reachable: bool) -> None:
    port = 19240 + int(reachable)
    log = tmp_path / "dbproxy.log"
    args = ["--config", str(_config(tmp_path, pg_dsn, reachable))]
    args += ["--policies", str(_policies(tmp_path))]  # no --service: token mode
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "DBPROXY_LOG_LEVEL": "DEBUG"},
        )
    try:
        _wait(proc, port)
        answers = dict(_requests(f"http://127.0.0.1:{port}"))
    finally:
        _stop(proc)
    text = log.read_text(errors="replace")
    for name, (_, body, headers) in answers.items():
        for canary in CANARIES:
            assert canary not in body, (name, canary, body[:300])
            assert canary not in headers, (name, canary)
    for canary in CANARIES:
        assert canary not in text, (canary, text[-2000:])
    for name in ("wrong token", "wrong token, write", "not bearer", "no token"):
        assert answers[name][0] == 401, (name, answers[name][:2])
    assert answers["wrong token, monitor"][0] == 401
    assert " DEBUG " in text  # the most talkative level was on
    data = ("create", "read", "patch", "query", "count", "aggregate", "batch")
    if reachable:
        assert answers["create"][0] == 201, answers["create"][:2]
        assert all(answers[n][0] == 200 for n in data[1:]), {n: answers[n][:2] for n in data}
        health = json.loads(answers["health"][1])["databases"]
        assert health["first"]["status"] == "up" and health["second"]["status"] == "down"
    else:
        for name in data:
            status, body, _ = answers[name]
            assert status == 503, (name, status, body)
            assert json.loads(body)["error"]["code"] == "database_unavailable", body
        assert answers["health"][0] == 503
    assert "***" in answers["connections"][1]  # the connection strings shown, redacted
