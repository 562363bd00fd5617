"""Benchmark orchestration: fresh database, seed, start sidecar + baseline, alternate A/B rounds.

Flow (every step bounded in time): create database -> start baseline and sidecar on free
loopback ports -> wait for /api/db/health -> let the sidecar create its tables with one POST
per collection (else create them with the documented DDL) -> seed documents with COPY ->
preflight one GET/POST per target -> per scenario: warm-up each target, then rounds alternating
sidecar, baseline, sidecar, baseline ... -> medians, ratios -> latest.json / .md / .png ->
stop every process we started -> drop the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import yaml

from benchmarks import load, report

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DB_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
CLK_TCK = os.sysconf("SC_CLK_TCK")
ID_PREFIX, ID_WIDTH = "doc-", 6

DDL = """CREATE TABLE IF NOT EXISTS dbproxy."{c}" (_id text PRIMARY KEY, doc jsonb NOT NULL,
_version bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
updated_at timestamptz NOT NULL DEFAULT now())"""

BASELINE_TEMPLATE = (
    "{python} -m benchmarks.baseline --host {host} --port {port} "
    "--database {database} --pool-size {pool_size}"
)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    collection: str
    write: bool
    description: str


SCENARIOS = {
    "get": Scenario("get", "bench", False, "GET /api/db/bench/{random seeded id}"),
    "create": Scenario("create", "bench_create", True, "POST /api/db/bench_create small object"),
}


@dataclasses.dataclass
class Target:
    name: str  # "sidecar" | "baseline"
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    cmd: list[str]
    mode: str  # how it was configured: config | database | baseline | custom

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------- small helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str, url: str, body: bytes | None = None, headers: tuple[str, ...] = ()
) -> tuple[int, bytes]:
    """One loopback request; (0, reason) when nothing answered."""
    hdrs = dict(h.split(":", 1) for h in headers)
    hdrs = {k.strip(): v.strip() for k, v in hdrs.items()}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, method=method, headers=hdrs)
    try:
        with _OPENER.open(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e).encode()


def log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- CPU accounting


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()  # fields from #3 (state) on


def _all_stats() -> Iterator[tuple[int, str, list[str]]]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                raw = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            comm = raw[raw.find("(") + 1 : raw.rfind(")")]
            yield int(entry.name), comm, raw[raw.rfind(")") + 2 :].split()


def _ticks(f: list[str], children: bool = True) -> int:
    # after the comm: [0]=state [1]=ppid ... [11]=utime [12]=stime [13]=cutime [14]=cstime
    t = int(f[11]) + int(f[12])
    return t + int(f[13]) + int(f[14]) if children else t


def tree_cpu_s(pid: int) -> float:
    """utime+stime of pid, of its live descendants (workers), and of its reaped children."""
    stats = {p: f for p, _, f in _all_stats()}
    if pid not in stats:
        return 0.0
    kids: dict[int, list[int]] = {}
    for p, f in stats.items():
        kids.setdefault(int(f[1]), []).append(p)
    total, todo, seen = 0, [pid], set()
    while todo and len(seen) < 100_000:
        p = todo.pop()
        if p in seen or p not in stats:
            continue
        seen.add(p)
        total += _ticks(stats[p])
        todo.extend(kids.get(p, ()))
    return total / CLK_TCK


def postgres_cpu_s() -> float:
    """CPU of every process named postgres (server-wide: other databases count too)."""
    return sum(_ticks(f) for _, comm, f in _all_stats() if comm == "postgres") / CLK_TCK


def host_cpu() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies over all cores, from /proc/stat."""
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    vals += [0] * (8 - len(vals))
    return sum(vals) - vals[3] - vals[4], sum(vals), vals[7]


# ---------------------------------------------------------------- database


async def _admin(admin_url: str, *stmts: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        for s in stmts:
            await conn.execute(s, timeout=60)
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)


def create_database(admin_url: str, name: str) -> None:
    asyncio.run(
        _admin(
            admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
        )
    )


def drop_database(admin_url: str, name: str) -> None:
    asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _missing_tables(url: str, collections: list[str]) -> list[str]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        q = "SELECT to_regclass(format('dbproxy.%I', $1::text)) IS NULL"
        return [c for c in collections if await conn.fetchval(q, c, timeout=10)]
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)


def missing_tables(url: str, collections: list[str]) -> list[str]:
    return asyncio.run(_missing_tables(url, collections))


def create_tables(url: str, collections: list[str]) -> None:
    stmts = ["CREATE SCHEMA IF NOT EXISTS dbproxy", *(DDL.format(c=c) for c in collections)]
    asyncio.run(_admin(url, *stmts))


def seed_doc(i: int, rng: random.Random) -> dict[str, Any]:
    return {
        "_id": f"{ID_PREFIX}{i:0{ID_WIDTH}d}",
        "_version": 1,
        "name": f"user {i}",
        "email": f"user{i}@example.com",
        "age": 18 + i % 60,
        "score": round(rng.random() * 100, 3),
        "active": i % 3 != 0,
        "tags": rng.sample(["red", "green", "blue", "vip", "new", "eu", "us"], 3),
        "address": {"city": rng.choice(["Berlin", "Lyon", "Oslo", "Porto"]), "zip": f"{i:05d}"},
    }


async def _seed(url: str, collection: str, n: int) -> None:
    rng = random.Random(42)
    rows = []
    for i in range(1, n + 1):
        doc = seed_doc(i, rng)
        rows.append((doc["_id"], orjson.dumps(doc).decode(), 1))
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.copy_records_to_table(
            collection, schema_name="dbproxy", columns=["_id", "doc", "_version"], records=rows
        )
        await conn.execute(f'ANALYZE dbproxy."{collection}"', timeout=60)
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)


def seed(url: str, collection: str, n: int) -> None:
    asyncio.run(_seed(url, collection, n))


def reset_for_write_round(url: str, collection: str) -> None:
    """Same starting point for every write round: empty table, no pending checkpoint."""
    asyncio.run(_admin(url, f'TRUNCATE dbproxy."{collection}"', "CHECKPOINT"))


async def _server_version(url: str) -> str:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return str(await conn.fetchval("SHOW server_version", timeout=10))
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)


# ---------------------------------------------------------------- processes


class Processes:
    """Every server process we start; stop_all() is idempotent and always runs."""

    def __init__(self, workdir: Path, cpus: set[int] | None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("DBPROXY_DATABASE_URL", None)  # the server gets only what we pass explicitly
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
            )
        self.procs.append(proc)
        if self.cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, self.cpus)
        return proc, log

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)  # own session: pgid == pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        # workers may outlive their parent; the group is ours alone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def wait_healthy(target: Target, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if target.proc.poll() is not None:
            return False
        status, _ = http("GET", target.url + "/api/db/health")
        if status == 200:
            return True
        time.sleep(0.2)
    return False


def sidecar_base_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "dbproxy"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "proxy.cli"]


def write_sidecar_config(path: Path, db_url: str, pool: int) -> None:
    cfg = {
        "databases": [
            {
                "name": "main",
                "type": "postgresql",
                "connection_string": db_url,
                "pool_settings": {
                    "min_connections": pool,
                    "max_connections": pool,
                    "timeout_seconds": 5,
                },
            }
        ]
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def sidecar_attempts(a: argparse.Namespace, port: int, db_url: str, cfg: Path) -> list[tuple]:
    """[(mode, argv)] to try in order until one becomes healthy."""
    fields = {
        "python": sys.executable,
        "host": "127.0.0.1",
        "port": port,
        "database": db_url,
        "config": str(cfg),
        "pool_size": a.sidecar_pool_size,
    }
    if a.sidecar_cmd:
        template = BASELINE_TEMPLATE if a.sidecar_cmd == "baseline" else a.sidecar_cmd
        mode = "baseline" if a.sidecar_cmd == "baseline" else "custom"
        return [(mode, shlex.split(template.format(**fields)))]
    base = [*sidecar_base_cmd(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    extra = [*(["--workers", str(a.sidecar_workers)] if a.sidecar_workers else [])]
    extra += [x for arg in a.sidecar_arg for x in shlex.split(arg)]
    return [
        ("config", [*base, "--config", str(cfg), *extra]),
        ("database", [*base, "--database", db_url, *extra]),
    ]


def start_target(
    procs: Processes, name: str, attempts: list[tuple], timeout_s: float, skip: int = 0
) -> Target:
    problems = []
    for mode, cmd in attempts[skip:]:
        port = int(next(x for i, x in enumerate(cmd) if i and cmd[i - 1] == "--port"))
        proc, log = procs.start(f"{name}-{mode}", cmd)
        target = Target(name, port, proc, log, cmd, mode)
        if wait_healthy(target, timeout_s):
            print(f"  {name}: healthy on :{port} ({mode}) pid={proc.pid}", flush=True)
            return target
        problems.append(f"[{mode}] {shlex.join(cmd)}\n{log_tail(log)}")
        procs.stop(proc)
    raise BenchError(f"{name} did not become healthy:\n" + "\n\n".join(problems))


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


def preflight(targets: list[Target], scenarios: list[str], headers: tuple[str, ...]) -> None:
    """One request of each scenario to be run, on each target, before any load."""
    problems = []
    doc_id = f"{ID_PREFIX}{1:0{ID_WIDTH}d}"
    body = load.CREATE_BODY.encode()
    for t in targets:
        if "get" in scenarios:
            st, got = http("GET", f"{t.url}/api/db/bench/{doc_id}", None, headers)
            if st != 200 or doc_id.encode() not in got:
                problems.append(f"{t.name}: GET /api/db/bench/{doc_id} -> {st} {got[:300]!r}")
        if "create" in scenarios:
            st, got = http("POST", f"{t.url}/api/db/bench_create", body, headers)
            if st != 201:
                problems.append(f"{t.name}: POST /api/db/bench_create -> {st} {got[:300]!r}")
    if problems:
        raise BenchError("preflight failed:\n" + "\n".join(problems))


# ---------------------------------------------------------------- measuring


def measure(a: argparse.Namespace, t: Target, sc: Scenario, duration: int, seed: int) -> dict:
    spec = load.LoadSpec(
        url=t.url,
        scenario=sc.name,
        collection=sc.collection,
        connections=a.concurrency,
        duration_s=duration,
        threads=a.load_threads,
        id_prefix=ID_PREFIX,
        id_count=a.seed_docs,
        id_width=ID_WIDTH,
        seed=seed,
        headers=tuple(a.header),
        cpus=frozenset(a.load_cpus) if a.load_cpus else None,
    )
    cpu0, pg0, host0, w0 = tree_cpu_s(t.proc.pid), postgres_cpu_s(), host_cpu(), time.monotonic()
    res: dict[str, Any] = dict(load.run_load(spec, a.generator))
    cpu1, pg1, host1, w1 = tree_cpu_s(t.proc.pid), postgres_cpu_s(), host_cpu(), time.monotonic()
    if t.proc.poll() is not None:
        raise BenchError(f"{t.name} died during {sc.name}:\n{log_tail(t.log)}")
    n = max(int(res["requests"]), 1)
    res["server_cpu_s"] = round(cpu1 - cpu0, 3)
    res["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / n
    res["server_cpu_pct"] = (cpu1 - cpu0) * 100 / (w1 - w0)
    res["db_cpu_us_per_req"] = (pg1 - pg0) * 1e6 / n
    res["loadgen_cpu_pct"] = float(res["loadgen_cpu_s"]) * 100 / (w1 - w0)
    busy, total, steal = (x1 - x0 for x0, x1 in zip(host0, host1, strict=True))
    cores = os.cpu_count() or 1
    res["host_cpu_pct"] = busy * 100 / total * cores if total else 0.0  # 100 = one core
    res["steal_pct"] = steal * 100 / total * cores if total else 0.0
    res["db_cpu_pct"] = (pg1 - pg0) * 100 / (w1 - w0)
    # CPU used by anything else on the machine: high values mean the round was disturbed
    ours = res["server_cpu_pct"] + res["db_cpu_pct"] + res["loadgen_cpu_pct"]
    res["other_cpu_pct"] = max(0.0, res["host_cpu_pct"] - ours)
    return res


def run_scenario(a: argparse.Namespace, sc: Scenario, targets: list[Target], db_url: str) -> dict:
    print(f"\n== {sc.name}: {sc.description}", flush=True)
    rounds: dict[str, list[dict]] = {t.name: [] for t in targets}
    for t in targets:
        if a.warmup > 0:
            if sc.write:
                reset_for_write_round(db_url, sc.collection)
            w = measure(a, t, sc, a.warmup, seed=999)
            print(f"  warm-up {t.name:8s} {w['rps']:9.0f} req/s", flush=True)
    for r in range(a.rounds):
        for t in targets:  # alternating A/B: sidecar, baseline, sidecar, baseline ...
            if sc.write:
                reset_for_write_round(db_url, sc.collection)
            time.sleep(a.pause)
            res = measure(a, t, sc, a.duration, seed=r + 1)
            res["round"] = r + 1
            rounds[t.name].append(res)
            print(
                f"  round {r + 1}/{a.rounds} {t.name:8s} {res['rps']:9.0f} req/s"
                f"  p50 {res['p50_ms']:7.2f}  p99 {res['p99_ms']:7.2f} ms"
                f"  cpu {res['cpu_us_per_req']:6.0f} us/req  err {res['errors']}"
                f"  non2xx {res['non2xx']}",
                flush=True,
            )
    return report.summarize_scenario(sc.name, sc.description, rounds)


# ---------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Sidecar vs minimal baseline: closed-loop load, alternating A/B rounds.",
    )
    p.add_argument(
        "--database",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="admin URL (loopback); a fresh database is created next to it and dropped after",
    )
    p.add_argument("--bench-db", default="dbproxy_bench", help="name of the scratch database")
    p.add_argument("--keep-db", action="store_true", help="do not drop the scratch database")
    p.add_argument("--duration", type=int, help="seconds per measured round (default 10)")
    p.add_argument("--rounds", type=int, help="measured rounds per target (default 5)")
    p.add_argument("--warmup", type=int, help="warm-up seconds per target/scenario (default 3)")
    p.add_argument("--concurrency", type=int, default=64, help="connections (closed loop)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s x 2 rounds, 2,000 docs")
    p.add_argument("--scenarios", default="get,create", help=f"of {','.join(SCENARIOS)}")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--seed-docs", type=int, help="documents seeded into bench (default 10000)")
    p.add_argument("--pool-size", type=int, default=10, help="pool size of both servers")
    p.add_argument("--sidecar-pool-size", type=int, help="override for the sidecar")
    p.add_argument("--baseline-pool-size", type=int, help="override for the baseline")
    p.add_argument("--sidecar-workers", type=int, help="pass --workers N to dbproxy serve")
    p.add_argument(
        "--sidecar-arg", action="append", default=[], help="extra args for dbproxy serve"
    )
    p.add_argument(
        "--sidecar-cmd",
        help="replace the sidecar command: 'baseline' (self-test) or a template with "
        "{python} {host} {port} {database} {config} {pool_size}",
    )
    p.add_argument("--header", action="append", default=[], help="'Name: value' on every request")
    p.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--load-threads", type=int, default=1, help="wrk threads")
    p.add_argument("--server-cpus", type=int, nargs="*", help="pin both servers to these CPUs")
    p.add_argument("--load-cpus", type=int, nargs="*", help="pin the load generator")
    p.add_argument("--pause", type=float, default=1.0, help="idle seconds before each round")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    quick = {"duration": 3, "rounds": 2, "warmup": 1, "seed_docs": 2000}
    full = {"duration": 10, "rounds": 5, "warmup": 3, "seed_docs": 10_000}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.sidecar_pool_size = a.sidecar_pool_size or a.pool_size
    a.baseline_pool_size = a.baseline_pool_size or a.pool_size
    a.header = tuple(a.header)
    a.scenario_list = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    problems = []
    if unknown := [s for s in a.scenario_list if s not in SCENARIOS]:
        problems.append(f"unknown scenarios {unknown}")
    if urlsplit(a.database).hostname not in LOOPBACK:
        problems.append("--database must point at a loopback address")
    if not DB_NAME_RE.match(a.bench_db):
        problems.append("--bench-db must match [a-z][a-z0-9_]*")
    bounds = [("duration", 1, 3600), ("rounds", 1, 100), ("warmup", 0, 600)]
    bounds += [("concurrency", 1, 10_000), ("seed_docs", 1, 999_999)]
    for k, lo, hi in bounds:
        if not lo <= getattr(a, k) <= hi:
            problems.append(f"--{k.replace('_', '-')} must be in [{lo}, {hi}]")
    if problems:
        p.error("; ".join(problems))
    return a


def collect_meta(a: argparse.Namespace, db_url: str, targets: list[Target], notes: list) -> dict:
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
        "postgres": asyncio.run(_server_version(db_url)),
        "generator": generator,
        "wrk": wrk,
        "concurrency": a.concurrency,
        "duration_s": a.duration,
        "rounds": a.rounds,
        "warmup_s": a.warmup,
        "seed_docs": a.seed_docs,
        "pool_size": {"sidecar": a.sidecar_pool_size, "baseline": a.baseline_pool_size},
        "servers": {t.name: {"mode": t.mode, "cmd": shlex.join(t.cmd)} for t in targets},
        "notes": notes,
    }


def benchmark(a: argparse.Namespace, procs: Processes, workdir: Path) -> dict:
    db_url = with_db(a.database, a.bench_db)
    print(f"creating database {a.bench_db}", flush=True)
    create_database(a.database, a.bench_db)
    baseline_cmd = BASELINE_TEMPLATE.format(
        python=sys.executable,
        host="127.0.0.1",
        port=free_port(),
        database=db_url,
        pool_size=a.baseline_pool_size,
    )
    baseline_attempts = [("baseline", shlex.split(baseline_cmd))]
    baseline = start_target(procs, "baseline", baseline_attempts, a.startup_timeout)
    cfg = workdir / "sidecar.yaml"
    write_sidecar_config(cfg, db_url, a.sidecar_pool_size)
    attempts = sidecar_attempts(a, free_port(), db_url, cfg)
    sidecar = start_target(procs, "sidecar", attempts, a.startup_timeout)
    sidecar, notes = prepare_sidecar_tables(a, procs, sidecar, attempts, db_url)
    if sidecar.mode == "database":
        notes.append("sidecar did not take --config; started with --database (its own pool size)")
    print(f"seeding {a.seed_docs} documents into dbproxy.bench", flush=True)
    seed(db_url, "bench", a.seed_docs)
    targets = [sidecar, baseline]
    preflight(targets, a.scenario_list, a.header)
    meta = collect_meta(a, db_url, targets, notes)
    scenarios = {
        name: run_scenario(a, SCENARIOS[name], targets, db_url) for name in a.scenario_list
    }
    return {"meta": meta, "scenarios": scenarios}


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    a.load_cpus = set(a.load_cpus) if a.load_cpus else None
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
