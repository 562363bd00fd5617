"""Benchmark orchestration: fresh database, seed, start the servers, alternate rounds, report.

Flow (every step bounded in time): create database -> start the baseline, the sidecar and (if
Redis answers and the sidecar accepts the ``cache:`` section) a second sidecar with the read
cache on, each on a free loopback port -> wait for /api/db/health -> let the sidecar create
its tables with one POST per collection (else create them with the documented DDL) -> seed
documents with COPY -> preflight every request kind on every server -> per scenario and
connection count: warm-up, then rounds alternating the targets (sidecar, sidecar with cache,
baseline, direct asyncpg client, sidecar, ...) -> the open-loop latency runs at a fixed rate
-> RSS of every server after the benchmark -> medians, ratios, targets -> latest.json /
.md / *.png -> stop every process we started -> drop the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from benchmarks import aggregate, load, procstat, report, search, workload
from benchmarks.pgsetup import (
    analyze,
    create_database,
    create_tables,
    drop_database,
    missing_tables,
    reset_for_write_round,
    schema_migration,
    seed,
    server_version,
    with_db,
)
from benchmarks.servers import (
    BASELINE_TEMPLATE,
    LOOPBACK,
    REPO,
    BenchError,
    Processes,
    Target,
    free_port,
    http,
    log_tail,
    metrics_delta,
    sidecar_attempts,
    sidecar_config,
    sidecar_metrics,
    start_cached_sidecar,
    start_target,
    write_yaml,
)
from benchmarks.workload import DEFAULT_SCENARIOS, SCENARIOS, Scenario

DB_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

# the order of the targets inside a round of alternation
TARGET_ORDER = ("sidecar", "sidecar_cached", "baseline", "direct")
CACHED_SCENARIOS = ("get_uniform", "get_zipf", "mixed")  # the cache-on sidecar runs these
# the scenarios that need the schema migration (declared schemas, an index, search)
SCHEMA_SCENARIOS = {"list_indexed", "create_schema6", "agg_group_schema", "search"}
OPEN_LOOP_TARGETS = ("sidecar", "sidecar_cached", "baseline")


# ---------------------------------------------------------------- preparation


def prepare_sidecar_tables(
    a: argparse.Namespace, procs: Processes, sidecar: Target, attempts: list[tuple], db_url: str
) -> tuple[Target, list[str]]:
    """Let the sidecar create its tables with one POST each; returns (sidecar, notes)."""
    collections = sorted({s.collection for s in SCENARIOS.values()})
    notes: list[str] = []
    for attempt in range(len(attempts)):
        answers = {}
        for c in collections:
            body = orjson.dumps({"probe": True, "by": "benchmarks"})
            answers[c] = http("POST", f"{sidecar.url}/api/db/{c}", body, a.header)[0]
        missing = missing_tables(db_url, collections)
        if not missing:
            return sidecar, notes
        if all(s == 201 for s in answers.values()) and attempt + 1 < len(attempts):
            notes.append(f"sidecar answered 201 in mode {sidecar.mode} but wrote elsewhere")
            assert sidecar.proc is not None
            procs.stop(sidecar.proc)
            sidecar = start_target(procs, "sidecar", attempts, a.startup_timeout, attempt + 1)
            continue
        if all(s == 201 for s in answers.values()):
            raise BenchError(
                f"sidecar acknowledged writes but tables {missing} are not in {db_url}"
            )
        notes.append(f"sidecar probe POSTs answered {answers}; tables created by the harness")
        create_tables(db_url, missing)
        return sidecar, notes
    return sidecar, notes


def declare_schemas(a: argparse.Namespace, sidecar: Target) -> None:
    """The declared schemas and bench_list's index through the real API: one
    ``POST /api/db/migrations`` to the sidecar (the others hear of it by NOTIFY), waited
    for when it goes on in the background (202), then ANALYZE for the new index's stats."""
    mig = schema_migration()
    st, got = http("POST", f"{sidecar.url}/api/db/migrations", orjson.dumps(mig), a.header)
    deadline = time.monotonic() + 300
    while st == 202 or (st == 200 and orjson.loads(got).get("status") == "executing"):
        if time.monotonic() > deadline:
            raise BenchError(f"migration {mig['id']} still running after 300 s")
        time.sleep(0.5)
        st, got = http("GET", f"{sidecar.url}/api/db/migrations/{mig['id']}", None, a.header)
    if st not in (200, 201) or orjson.loads(got).get("status") != "completed":
        raise BenchError(f"the schema migration failed: {st} {got[:500]!r}")
    analyze(a.db_url, ["bench_list", "bench_create6", "bench_agg_s", search.COLLECTION])


def preflight(targets: list[Target], scenarios: list[str], a: argparse.Namespace) -> None:
    """One request of each kind the scenarios use, on each HTTP server, before any load."""
    problems = []
    doc_id = workload.doc_id(1)
    group = workload.group_value(0)
    checks: list[tuple[str, str, str, bytes | None, int, bytes | None]] = []
    if {"get_uniform", "get_zipf", "mixed"} & set(scenarios) or a.open_rate:
        checks.append(("get", "GET", f"/api/db/bench/{doc_id}", None, 200, doc_id.encode()))
    if "query" in scenarios:
        body = workload.query_body(group).encode()
        checks.append(("query", "POST", "/api/db/bench/query", body, 200, group.encode()))
    if "create" in scenarios:
        body = workload.CREATE_BODY.encode()
        checks.append(("create", "POST", "/api/db/bench_create", body, 201, None))
    if "create_schema6" in scenarios:
        body = workload.CREATE6_BODY.encode()
        checks.append(("create_schema6", "POST", "/api/db/bench_create6", body, 201, None))
    if "list_indexed" in scenarios:
        body = workload.list_body(3, 100).encode()
        checks.append(("list", "POST", "/api/db/bench_list/query", body, 200, None))
    if "mixed" in scenarios:
        body = workload.INC_BODY.encode()
        checks.append(("update", "PUT", f"/api/db/bench/{doc_id}", body, 200, b'"n"'))
    for t in targets:
        if t.kind != "http":
            continue
        for what, method, path, payload, want, needle in checks:
            st, got = http(method, t.url + path, payload, a.header)
            if st != want or (needle is not None and needle not in got):
                problems.append(f"{t.name}: {what} {method} {path} -> {st} {got[:300]!r}")
            if what == "query" and st == 200:
                n = len(orjson.loads(got).get("items", []))
                if n != 10:
                    problems.append(f"{t.name}: query returned {n} rows, expected 10")
            if what == "list" and st == 200:
                items = orjson.loads(got).get("items", [])
                expect = sorted(
                    d["n"]
                    for d in map(workload.list_doc, range(workload.LIST_DOCS))
                    if d["grp"] == 3 and d["n"] >= 100
                )[:10]
                if [d.get("n") for d in items] != expect:
                    problems.append(f"{t.name}: list query answered {got[:300]!r}")
    problems += aggregate.preflight(targets, scenarios, a.header)
    if "search" in scenarios:
        words = search.QUERY_WORDS
        for first, second in ((words[0], words[1]), (words[50], words[7])):
            body = search.body(first, second).encode()
            answers = {}
            for t in targets:
                if t.kind == "http":
                    st, got = http("POST", t.url + "/api/db/search", body, a.header)
                    answers[t.name] = got if st == 200 else f"{st} {got[:300]!r}".encode()
            problems += search.check(answers)
    if problems:
        raise BenchError("preflight failed:\n" + "\n".join(problems))


# ---------------------------------------------------------------- measuring


def _snapshot(pid: int | None) -> tuple[dict[str, float], tuple[int, int, int], float]:
    return procstat.cpu_snapshot(pid), procstat.host_cpu(), time.monotonic()


def _round_accounting(
    res: dict[str, Any], cpu0: dict, cpu1: dict, host0: tuple, host1: tuple, wall: float
) -> None:
    n = max(int(res["requests"]), 1)
    res["server_cpu_s"] = round(res.get("server_cpu_s", cpu1["server"] - cpu0["server"]), 3)
    res["cpu_us_per_req"] = res["server_cpu_s"] * 1e6 / n
    res["cpu_s_per_1k"] = res["server_cpu_s"] * 1e3 / n
    res["server_cpu_pct"] = res["server_cpu_s"] * 100 / wall
    res["db_cpu_us_per_req"] = (cpu1["postgres"] - cpu0["postgres"]) * 1e6 / n
    res["db_cpu_pct"] = (cpu1["postgres"] - cpu0["postgres"]) * 100 / wall
    res["redis_cpu_us_per_req"] = (cpu1["redis"] - cpu0["redis"]) * 1e6 / n
    res["loadgen_cpu_pct"] = float(res["loadgen_cpu_s"]) * 100 / wall
    busy, total, steal = (x1 - x0 for x0, x1 in zip(host0, host1, strict=True))
    cores = os.cpu_count() or 1
    res["host_cpu_pct"] = busy * 100 / total * cores if total else 0.0  # 100 = one core
    res["steal_pct"] = steal * 100 / total * cores if total else 0.0
    # CPU used by anything else on the machine: high values mean the round was disturbed
    redis_pct = (cpu1["redis"] - cpu0["redis"]) * 100 / wall
    ours = res["server_cpu_pct"] + res["db_cpu_pct"] + res["loadgen_cpu_pct"] + redis_pct
    res["other_cpu_pct"] = max(0.0, res["host_cpu_pct"] - ours)


def run_direct(a: argparse.Namespace, sc: Scenario, tasks: int, duration: float, seed: int):
    cmd = [sys.executable, "-m", "benchmarks.direct", "--database", a.db_url]
    cmd += ["--scenario", sc.name, "--collection", sc.collection, "--tasks", str(tasks)]
    cmd += ["--pool-size", str(a.direct_pool_size), "--duration", str(duration)]
    cmd += ["--n-docs", str(a.seed_docs), "--seed", str(seed)]
    try:
        out, cpu = load.run_child(cmd, duration + 60, a.load_cpus)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"direct asyncpg client failed: {e}") from e
    raw = load.parse_marker(out)
    if raw["requests"] == 0:
        raise BenchError(f"direct asyncpg client completed nothing: {raw.get('last_error')}")
    dur = raw["duration_s"] or 1e-9
    keys = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "errors", "non2xx")
    res: dict[str, Any] = {k: raw[k] for k in keys}
    res.update(
        generator="direct",
        requests=int(raw["requests"]),
        duration_s=round(dur, 4),
        rps=raw["requests"] / dur,
        server_cpu_s=cpu,  # the client IS the load: its CPU is the cost per request
        loadgen_cpu_s=0.0,
        rss_mb=raw["maxrss_mb"],
    )
    if raw.get("last_error"):
        res["last_error"] = raw["last_error"]
    return res


def measure(
    a: argparse.Namespace,
    t: Target,
    sc: Scenario,
    conns: int,
    duration: int,
    seed: int,
    rss: procstat.RssSampler,
) -> dict[str, Any]:
    # the sidecars' own counters (a server without /metrics gives empty ones)
    metrics0 = sidecar_metrics(t) if t.kind == "http" and t.name != "baseline" else None
    pid = t.proc.pid if t.proc is not None else None
    cpu0, host0, w0 = _snapshot(pid)
    if t.kind == "direct":
        res = run_direct(a, sc, conns, duration, seed)
    else:
        spec = load.LoadSpec(
            url=t.url,
            scenario=sc.name,
            collection=sc.collection,
            connections=conns,
            duration_s=duration,
            threads=a.load_threads,
            n_docs=a.seed_docs,
            seed=seed,
            headers=tuple(a.header),
            cpus=frozenset(a.load_cpus) if a.load_cpus else None,
        )
        res = dict(load.run_load(spec, a.generator))
    cpu1, host1, w1 = _snapshot(pid)
    if t.proc is not None and t.proc.poll() is not None:
        raise BenchError(f"{t.name} died during {sc.name}:\n{log_tail(t.log)}")
    _round_accounting(res, cpu0, cpu1, host0, host1, w1 - w0)
    # throughput counts successful answers only: fast refusals (503, 429) must not look fast
    res["rps_all"] = res["rps"]
    res["rps"] = max(0, int(res["requests"]) - int(res["non2xx"])) / float(res["duration_s"])
    if t.kind == "http":
        res["rss_mb"] = rss.sample(t.name)
    if metrics0 is not None:
        metrics1 = sidecar_metrics(t)
        res["error_codes"] = metrics_delta(metrics0, metrics1, "errors")
        if t.name == "sidecar_cached":
            res["cache"] = metrics_delta(metrics0, metrics1, "cache")
    return res


def run_cell(
    a: argparse.Namespace,
    sc: Scenario,
    targets: list[Target],
    conns: int,
    warm: bool,
    rss: procstat.RssSampler,
) -> dict[str, Any]:
    print(f"\n== {sc.name} @ {conns} connections: {sc.description}", flush=True)
    rounds: dict[str, list[dict]] = {t.name: [] for t in targets}
    if warm and a.warmup > 0:
        for t in targets:
            if sc.reset:
                reset_for_write_round(a.db_url, sc)
            w = measure(a, t, sc, conns, a.warmup, 999, rss)
            print(f"  warm-up {t.name:15s} {w['rps']:9.0f} req/s", flush=True)
    for r in range(a.rounds):
        for t in targets:  # alternating: sidecar, sidecar_cached, baseline, direct, sidecar ...
            if sc.reset:
                reset_for_write_round(a.db_url, sc)
            time.sleep(a.pause)
            res = measure(a, t, sc, conns, a.duration, r + 1, rss)
            res["round"] = r + 1
            rounds[t.name].append(res)
            hits = ""
            if "cache" in res:
                hits = f"  cache hit {report.hit_ratio(res['cache']) * 100:5.1f}%"
            print(
                f"  round {r + 1}/{a.rounds} {t.name:15s} {res['rps']:9.0f} req/s"
                f"  p50 {res['p50_ms']:7.2f}  p99 {res['p99_ms']:7.2f} ms"
                f"  cpu {res['cpu_s_per_1k']:6.3f} s/1k  err {res['errors']}"
                f"  non2xx {res['non2xx']}{hits}",
                flush=True,
            )
    return report.summarize_cell(sc.name, conns, rounds)


def run_open_loop(
    a: argparse.Namespace, targets: list[Target], rss: procstat.RssSampler
) -> dict[str, Any]:
    """Fixed-rate GET-by-id runs, alternating the HTTP targets, latency from intended send."""
    sc = SCENARIOS[a.open_scenario]
    order = sorted(
        (t for t in targets if t.name in OPEN_LOOP_TARGETS),
        key=lambda t: TARGET_ORDER.index(t.name),
    )
    print(f"\n== open loop: {a.open_rate:.0f} req/s, {sc.name}, {a.open_connections} conns")
    rounds: dict[str, list[dict]] = {t.name: [] for t in order}
    for r in range(a.open_rounds):
        for t in order:
            time.sleep(a.pause)
            cmd = [sys.executable, "-m", "benchmarks.openloop", "--url", t.url]
            cmd += ["--scenario", sc.name, "--collection", sc.collection]
            cmd += ["--rate", str(a.open_rate), "--duration", str(a.open_duration)]
            cmd += ["--connections", str(a.open_connections), "--n-docs", str(a.seed_docs)]
            cmd += ["--seed", str(r + 1)]
            for h in a.header:
                cmd += ["--header", h]
            assert t.proc is not None
            cpu0, host0, w0 = _snapshot(t.proc.pid)
            try:
                out, gen_cpu = load.run_child(cmd, a.open_duration + 60, a.load_cpus)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                raise BenchError(f"open-loop generator failed: {e}") from e
            cpu1, host1, w1 = _snapshot(t.proc.pid)
            res: dict[str, Any] = dict(load.parse_marker(out))
            res["loadgen_cpu_s"] = gen_cpu
            _round_accounting(res, cpu0, cpu1, host0, host1, w1 - w0)
            res["rss_mb"] = rss.sample(t.name)
            res["round"] = r + 1
            rounds[t.name].append(res)
            print(
                f"  round {r + 1}/{a.open_rounds} {t.name:15s} achieved {res['achieved_rps']:6.0f}"
                f"  p50 {res['p50_ms']:6.2f}  p99 {res['p99_ms']:6.2f}  p99.9 "
                f"{res['p999_ms']:6.2f} ms  generator lag p99 {res['lag']['p99_ms']:.2f} ms"
                f"{'' if res['kept_up'] else '  (rate not held)'}",
                flush=True,
            )
    return report.summarize_open_loop(a.open_rate, sc.name, a.open_connections, rounds)


# ---------------------------------------------------------------- entry point


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 8,64,256: {text!r}") from None


QUICK = {
    "duration": 2,
    "rounds": 2,
    "warmup": 1,
    "pause": 0.3,
    "seed_docs": 2000,
    "open_duration": 5,
    "open_rounds": 1,
    "connections": [64],
}
FULL = {
    "duration": 5,
    "rounds": 3,
    "warmup": 2,
    "pause": 0.5,
    "seed_docs": 10_000,
    "open_duration": 15,
    "open_rounds": 2,
    "connections": [8, 64, 256],
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="dbproxy sidecar vs a minimal aiohttp+asyncpg server vs a direct asyncpg "
        "client: closed-loop rounds at several connection counts, plus an open-loop "
        "latency run at a fixed rate.",
    )
    p.add_argument(
        "--database",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="admin URL (loopback); a fresh database is created next to it and dropped after",
    )
    p.add_argument("--bench-db", default="dbproxy_bench", help="name of the scratch database")
    p.add_argument("--keep-db", action="store_true", help="do not drop the scratch database")
    p.add_argument("--quick", action="store_true", help="smoke run, about 2 minutes")
    slow = [n for n in SCENARIOS if n not in DEFAULT_SCENARIOS]
    p.add_argument(
        "--scenarios",
        help=f"comma list of {','.join(SCENARIOS)} (default all but the slow {','.join(slow)})",
    )
    p.add_argument("--connections", type=_ints, help="closed-loop connection counts (8,64,256)")
    p.add_argument(
        "--agg-connections",
        type=_ints,
        help="connection counts of the aggregation scenarios (agg_group 8, agg_memory 4)",
    )
    p.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)  # old: one count
    p.add_argument("--duration", type=int, help="seconds per measured round (default 5)")
    p.add_argument("--rounds", type=int, help="measured rounds per target and cell (default 3)")
    p.add_argument("--warmup", type=int, help="warm-up seconds per target/scenario (default 2)")
    p.add_argument("--pause", type=float, help="idle seconds before each round (default 0.5)")
    p.add_argument("--seed-docs", type=int, help="documents seeded into bench (default 10000)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--pool-size", type=int, default=10, help="pool size of every target")
    p.add_argument("--sidecar-pool-size", type=int, help="override for the sidecars")
    p.add_argument("--baseline-pool-size", type=int, help="override for the baseline")
    p.add_argument("--direct-pool-size", type=int, help="override for the direct client")
    p.add_argument("--sidecar-workers", type=int, help="pass --workers N to dbproxy serve")
    p.add_argument(
        "--sidecar-arg", action="append", default=[], help="extra args for dbproxy serve"
    )
    p.add_argument(
        "--sidecar-cmd",
        help="replace the sidecar command: 'baseline' (self-test) or a template with "
        "{python} {host} {port} {database} {config} {pool_size}",
    )
    p.add_argument("--no-cache", action="store_true", help="skip the cache-on sidecar")
    p.add_argument("--no-direct", action="store_true", help="skip the direct asyncpg client")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="cache-on sidecar")
    p.add_argument("--cache-ttl", type=float, default=60.0, help="ttl_seconds of the cache")
    p.add_argument("--open-rate", type=float, default=1000.0, help="open-loop req/s (0 = off)")
    p.add_argument("--open-duration", type=int, help="seconds per open-loop run (default 15)")
    p.add_argument("--open-rounds", type=int, help="open-loop runs per target (default 2)")
    p.add_argument("--open-connections", type=int, default=32)
    p.add_argument("--open-scenario", default="get_uniform", choices=["get_uniform", "get_zipf"])
    p.add_argument("--header", action="append", default=[], help="'Name: value' on every request")
    p.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--load-threads", type=int, default=1, help="wrk threads")
    p.add_argument("--server-cpus", type=int, nargs="*", help="pin the servers to these CPUs")
    p.add_argument("--load-cpus", type=int, nargs="*", help="pin the load generators")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    return p


def _problems(a: argparse.Namespace) -> list[str]:
    problems = []
    if unknown := [s for s in a.scenario_list if s not in SCENARIOS]:
        problems.append(f"unknown scenarios {unknown}")
    if urlsplit(a.database).hostname not in LOOPBACK:
        problems.append("--database must point at a loopback address")
    if urlsplit(a.redis_url).hostname not in LOOPBACK:
        problems.append("--redis-url must point at a loopback address")
    if not DB_NAME_RE.match(a.bench_db):
        problems.append("--bench-db must match [a-z][a-z0-9_]*")
    bounds = [("duration", 1, 3600), ("rounds", 1, 100), ("warmup", 0, 600)]
    bounds += [("seed_docs", 10, 999_999), ("open_duration", 1, 3600), ("open_rounds", 1, 100)]
    bounds += [("open_rate", 0, 100_000), ("open_connections", 1, 4096), ("pause", 0, 60)]
    for k, lo, hi in bounds:
        if not lo <= getattr(a, k) <= hi:
            problems.append(f"--{k.replace('_', '-')} must be in [{lo}, {hi}]")
    if not a.connections or any(not 1 <= c <= 10_000 for c in a.connections):
        problems.append("--connections must be integers in [1, 10000]")
    if a.agg_connections is not None and (
        not a.agg_connections or any(not 1 <= c <= 10_000 for c in a.agg_connections)
    ):
        problems.append("--agg-connections must be integers in [1, 10000]")
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _parser()
    a = p.parse_args(argv)
    if a.concurrency and not a.connections:
        a.connections = [a.concurrency]
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.sidecar_pool_size = a.sidecar_pool_size or a.pool_size
    a.baseline_pool_size = a.baseline_pool_size or a.pool_size
    a.direct_pool_size = a.direct_pool_size or a.pool_size
    a.header = tuple(a.header)
    names = [s.strip() for s in (a.scenarios or ",".join(DEFAULT_SCENARIOS)).split(",")]
    names = [s for s in names if s]
    a.scenario_list = [workload.ALIASES.get(s, s) for s in names]
    problems = _problems(a)
    if problems:
        p.error("; ".join(problems))
    return a


def targets_of(sc: Scenario, targets: dict[str, Target]) -> list[Target]:
    names = [n for n in TARGET_ORDER if n in targets]
    if sc.name not in CACHED_SCENARIOS:
        names = [n for n in names if n != "sidecar_cached"]
    return [targets[n] for n in names]


def connections_of(a: argparse.Namespace, sc: Scenario) -> list[int]:
    """The closed-loop connection counts of a scenario: a heavy one (aggregations over the
    whole collection, whose database CPU saturates the cores at a few connections) has its
    own, since more connections would only queue for the pool."""
    if not sc.heavy_connections:
        return list(a.connections)
    return list(a.agg_connections or sc.heavy_connections)


def estimate_s(a: argparse.Namespace, n_targets: dict[str, int]) -> float:
    """Rough wall time of the measuring part (for the progress line)."""
    total = 0.0
    for name in a.scenario_list:
        k = n_targets[name]
        per_round = a.duration + a.pause + 0.4 + (0.3 if SCENARIOS[name].reset else 0)
        cells = len(connections_of(a, SCENARIOS[name]))
        total += k * (a.warmup + 0.5) + cells * a.rounds * k * per_round
    if a.open_rate:
        total += a.open_rounds * min(3, n_targets["get_uniform"]) * (a.open_duration + 1.5)
    return total


def collect_meta(a: argparse.Namespace, targets: dict[str, Target], notes: list) -> dict:
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=10)
            return out.stdout.decode().strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    wrk = load.wrk_path()
    generator = a.generator if a.generator != "auto" else ("wrk" if wrk else "python")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--", "proxy")),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "postgres": asyncio.run(server_version(a.db_url)),
        "generator": generator,
        "wrk": wrk,
        "quick": a.quick,
        "connections": a.connections,
        "agg_connections": {
            n: connections_of(a, SCENARIOS[n])
            for n in a.scenario_list
            if SCENARIOS[n].heavy_connections
        },
        "duration_s": a.duration,
        "rounds": a.rounds,
        "warmup_s": a.warmup,
        "seed_docs": a.seed_docs,
        "zipf": {
            "s": workload.ZIPF_S,
            "top100_share": round(workload.zipf_top_share(a.seed_docs), 3),
        },
        "write_pct": workload.WRITE_PCT,
        "pool_size": {
            "sidecar": a.sidecar_pool_size,
            "baseline": a.baseline_pool_size,
            "direct": a.direct_pool_size,
        },
        "cache": {"redis_url": a.redis_url, "ttl_seconds": a.cache_ttl},
        "open_loop": {
            "rate": a.open_rate,
            "duration_s": a.open_duration,
            "rounds": a.open_rounds,
            "connections": a.open_connections,
            "scenario": a.open_scenario,
        },
        "servers": {t.name: {"mode": t.mode, "cmd": shlex.join(t.cmd)} for t in targets.values()},
        "scenarios": {
            n: {"description": SCENARIOS[n].description, "baseline_sql": SCENARIOS[n].baseline_sql}
            for n in a.scenario_list
        },
        "notes": notes,
    }


def start_all(
    a: argparse.Namespace, procs: Processes, workdir: Path
) -> tuple[dict[str, Target], list[str]]:
    baseline_cmd = BASELINE_TEMPLATE.format(
        python=sys.executable,
        host="127.0.0.1",
        port=free_port(),
        database=a.db_url,
        pool_size=a.baseline_pool_size,
    )
    baseline_attempts = [("baseline", shlex.split(baseline_cmd))]
    baseline = start_target(procs, "baseline", baseline_attempts, a.startup_timeout)
    cfg = workdir / "sidecar.yaml"
    write_yaml(cfg, sidecar_config(a.db_url, a.sidecar_pool_size))
    attempts = sidecar_attempts(a, free_port(), a.db_url, cfg)
    sidecar = start_target(procs, "sidecar", attempts, a.startup_timeout)
    sidecar, notes = prepare_sidecar_tables(a, procs, sidecar, attempts, a.db_url)
    if sidecar.mode == "database":
        notes.append("sidecar did not take --config; started with --database (its own pool size)")
    targets = {"sidecar": sidecar, "baseline": baseline}
    wants_cache = any(s in CACHED_SCENARIOS for s in a.scenario_list) or a.open_rate
    if wants_cache:
        cached, why = start_cached_sidecar(a, procs, workdir, a.db_url)
        if cached is not None:
            targets["sidecar_cached"] = cached
        elif why:
            notes.append(why)
            print(f"  note: {why}", flush=True)
    if not a.no_direct:
        cmd = [sys.executable, "-m", "benchmarks.direct", "--pool-size", str(a.direct_pool_size)]
        targets["direct"] = Target("direct", "direct", cmd=cmd, mode="direct")
    return targets, notes


def benchmark(a: argparse.Namespace, procs: Processes, workdir: Path) -> dict:
    t_start = time.monotonic()
    a.db_url = with_db(a.database, a.bench_db)
    print(f"creating database {a.bench_db}", flush=True)
    create_database(a.database, a.bench_db)
    targets, notes = start_all(a, procs, workdir)
    collections = sorted({s.collection for s in SCENARIOS.values()})
    agg = aggregate.seeded_collections(a.scenario_list)
    if "search" in a.scenario_list:
        agg += (search.COLLECTION,)
    print(f"seeding {a.seed_docs} documents into dbproxy.bench", flush=True)
    if agg:
        print(f"  and the aggregation collections {', '.join(agg)}", flush=True)
    seed(a.db_url, collections, a.seed_docs, agg)
    sidecar = targets.get("sidecar")
    if (
        sidecar is not None
        and sidecar.mode != "baseline"
        and (SCHEMA_SCENARIOS & set(a.scenario_list))
    ):
        print("declaring schemas and indexes: POST /api/db/migrations", flush=True)
        declare_schemas(a, sidecar)
        time.sleep(0.5)  # every sidecar has heard the NOTIFY and reloaded
    preflight(list(targets.values()), a.scenario_list, a)
    rss = procstat.RssSampler()
    for t in targets.values():
        if t.proc is not None:
            rss.add(t.name, t.proc.pid)
    rss.start()
    meta = collect_meta(a, targets, notes)
    n_targets = {n: len(targets_of(SCENARIOS[n], targets)) for n in SCENARIOS}
    print(f"measuring: about {estimate_s(a, n_targets) / 60:.1f} min", flush=True)
    scenarios: dict[str, Any] = {}
    open_loop = None
    # the open-loop runs follow the last GET scenario (warm servers, before any write load)
    gets = [n for n in a.scenario_list if n in ("get_uniform", "get_zipf")]
    open_after = gets[-1] if gets else a.scenario_list[-1]
    try:
        for name in a.scenario_list:
            sc = SCENARIOS[name]
            cells, hwm_reset = {}, False
            if name == aggregate.MEMORY_SCENARIO:
                hwm_reset = aggregate.start_memory_window(rss)
            for i, conns in enumerate(connections_of(a, sc)):
                cells[str(conns)] = run_cell(a, sc, targets_of(sc, targets), conns, i == 0, rss)
            scenarios[name] = {"name": name, "description": sc.description, "cells": cells}
            if name == aggregate.MEMORY_SCENARIO:
                scenarios[name]["rss_peak"] = aggregate.memory_window(rss, hwm_reset)
            if a.open_rate and name == open_after:
                open_loop = run_open_loop(a, list(targets.values()), rss)
        processes = {}
        for t in targets.values():
            if t.proc is None:
                continue
            final = rss.sample(t.name)
            pids = procstat.tree_pids(t.proc.pid)
            processes[t.name] = {
                "pid": t.proc.pid,
                "processes": len(pids),
                "rss_final_mb": round(final, 1),
                "rss_peak_mb": round(max(rss.peak.get(t.name, 0.0), final), 1),
                "vm_hwm_sum_mb": round(rss.hwm(t.name), 1),
            }
    finally:
        rss.stop()
    if "sidecar_cached" in targets:
        notes.extend(report.cache_notes(scenarios))
    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    results: dict[str, Any] = {
        "meta": meta,
        "scenarios": scenarios,
        "open_loop": open_loop,
        "processes": processes,
    }
    results["targets"] = report.check_targets(results)
    return results


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    a.load_cpus = frozenset(a.load_cpus) if a.load_cpus else None
    created_db = False
    with tempfile.TemporaryDirectory(prefix="dbproxy-bench-") as tmp:
        procs = Processes(Path(tmp), set(a.server_cpus) if a.server_cpus else None)
        try:
            created_db = True
            results = benchmark(a, procs, Path(tmp))
        except BenchError as e:
            print(f"\nbenchmark failed: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; cleaning up", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
            if created_db and not a.keep_db:
                with contextlib.suppress(Exception):
                    drop_database(a.database, a.bench_db)
    out = Path(a.out)
    paths = report.write_all(results, out)
    print("\n" + report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
