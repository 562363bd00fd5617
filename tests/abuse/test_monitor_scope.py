"""Issue 13, item 5 (over-wide views): in token mode a ``monitor`` grant shows, in
``/api/db/stats`` and ``/api/db/performance``, only the collections the caller may read
(names and globs), and only its own service's request volume, unless it reads ``"*"``.
Two services share one real ``dbproxy serve`` process, on PostgreSQL and the embedded store."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.policy import hash_token
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

BACKENDS = ["postgresql", "embedded"]
OPS = "[read, list, count, create, update, delete]"


def _policies(tmp_path: Path, tag: str) -> Path:
    d = tmp_path / f"policies-{tag}"
    d.mkdir()
    for name, grants in {
        # one exact name and one glob
        "alpha": f'["a{tag}_one", "a{tag}_g*"]',
        "beta": f'["b{tag}_*"]',
        "root": '["*"]',
    }.items():
        (d / f"{name}.yaml").write_text(
            f"service: {name}\n"
            f"identity:\n  tokens: [{hash_token(name + '-tok')}]\n"
            "grants:\n"
            f"  - collections: {grants}\n    operations: {OPS}\n"
            '  - collections: ["*"]\n    operations: [monitor]\n'
        )
    return d


def _serve(launch: Callable[..., Server], kind: str, pg_dsn: str, tmp: Path, tag: str) -> Server:
    cfg = tmp / f"cfg-{tag}.yaml"
    where = (
        f"databases:\n  - name: main\n    type: postgresql\n    connection_string: {pg_dsn}\n"
        if kind == "postgresql"
        else f"data_dir: {tmp / ('data-' + tag)}\n"
    )
    cfg.write_text("limits: {slow_query_ms: 0.001}\n" + where)  # every operation is slow
    return launch("--config", str(cfg), "--policies", str(_policies(tmp, tag)))


def _auth(service: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {service}-tok"}


async def _get(s: aiohttp.ClientSession, url: str, service: str) -> tuple[int, Any, str]:
    async with s.get(url, headers=_auth(service)) as r:
        text = await r.text()
        return r.status, orjson.loads(text), text


async def _work(s: aiohttp.ClientSession, base: str, service: str, collection: str) -> None:
    url = f"{base}/api/db/{collection}"
    for i in range(3):
        async with s.post(url, json={"_id": f"d{i}", "n": i}, headers=_auth(service)) as r:
            assert r.status == 201, await r.text()
    params = {"filter": orjson.dumps({"n": {"$gte": 1}}).decode()}
    async with s.get(url, params=params, headers=_auth(service)) as r:
        assert r.status == 200, await r.text()
    async with s.get(f"{url}/d1", headers=_auth(service)) as r:
        assert r.status == 200


def _collections(perf: dict[str, Any], stats: dict[str, Any]) -> dict[str, set[str]]:
    return {
        "operations": {row["collection"] for row in perf["operations"]},
        "top_patterns": {row["collection"] for row in perf["top_patterns"]},
        "slow_queries": {row["collection"] for row in perf["slow_queries"]},
        "requests": set(stats["requests"]["collections"]),
        "databases": {name for db in stats["databases"].values() for name in db},
    }


@pytest.mark.parametrize("kind", BACKENDS)
async def test_each_service_sees_only_what_it_may_read(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    mine = {"alpha": {f"a{tag}_one", f"a{tag}_glob"}, "beta": {f"b{tag}_x", f"b{tag}_y"}}
    server = _serve(launch, kind, pg_dsn, tmp_path, tag)
    async with aiohttp.ClientSession() as s:
        for service, names in mine.items():
            for name in sorted(names):
                await _work(s, server.url, service, name)
        seen: dict[str, dict[str, set[str]]] = {}
        for service in ("alpha", "beta", "root"):
            status, perf, perf_text = await _get(s, f"{server.url}/api/db/performance", service)
            assert status == 200, perf
            status, stats, stats_text = await _get(s, f"{server.url}/api/db/stats", service)
            assert status == 200, stats
            seen[service] = _collections(perf, stats)
            seen[service]["services"] = set(stats["services"])
            if service != "root":
                other = f"b{tag}" if service == "alpha" else f"a{tag}"
                # not a name, not a pattern, not a plan mentions the other service's tables
                assert other not in perf_text and other not in stats_text, service
                assert set(stats["services"]) == {service}
            else:
                assert set(stats["services"]) >= {"alpha", "beta"}
        for service, names in mine.items():
            views = seen[service]
            for view in ("operations", "top_patterns", "slow_queries", "requests"):
                assert views[view] == names, (service, view, views[view])
            if kind == "postgresql":  # the embedded store describes no tables
                assert views["databases"] == names, (service, views["databases"])
        everything = mine["alpha"] | mine["beta"]
        for view in ("operations", "top_patterns", "slow_queries", "requests"):
            assert seen["root"][view] >= everything, (view, seen["root"][view])
        if kind == "postgresql":
            assert seen["root"]["databases"] >= everything

        # ranking happens after scoping: top=1 is the caller's own heaviest pattern
        status, perf, _ = await _get(s, f"{server.url}/api/db/performance?top=1", "alpha")
        assert status == 200 and len(perf["top_patterns"]) == 1
        assert perf["top_patterns"][0]["collection"] in mine["alpha"]
        # no parameter widens the view: these endpoints take no collection parameter, and
        # one passed anyway changes nothing
        for path in ("performance", "stats"):
            url = f"{server.url}/api/db/{path}?collection=b{tag}_x&top=200"
            status, _, text = await _get(s, url, "alpha")
            assert status == 200 and f"b{tag}" not in text
