"""MongoDB GET-by-id, issue 18's target: dbproxy (``--database mongodb://…``) against the
minimal aiohttp + async PyMongo server (``mongo_baseline``), the same documents, the same
server, alternating rounds in one run; the ratio of req/s is the figure.

    python -m benchmarks.mongo [--mongo-url mongodb://…] [--docs 10000] [--connections 64]

Without ``--mongo-url`` a private SecantusDB server (the test dependency ``secantusdb``) is
started in its own process on a free port and removed afterwards. The documents are
``workload.seed_doc`` (ids ``doc-000001`` …), written through the sidecar's bulk create so
that both servers read what the sidecar stores. Before any load both answer the same
documents (user fields compared); the load is the harness's ``get_uniform`` (wrk when
present)."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks import load, procstat, workload
from benchmarks.servers import (
    BenchError,
    Processes,
    Target,
    free_port,
    http,
    log_tail,
    sidecar_base_cmd,
    wait_healthy,
)

COLLECTION = "bench_mongo"
DATABASE = "dbproxy_bench_mongo"
SEED_CHUNK = 500


def start_secantus(procs: Processes, storage: Path) -> str:
    port = free_port()
    cmd = [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--storage-path", str(storage), "--log-level", "WARNING"]
    proc, log = procs.start("secantus", cmd)
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    deadline = time.monotonic() + 30
    from pymongo import MongoClient  # the benchmark's extra; imported only when it runs

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"SecantusDB exited:\n{log_tail(log)}")
        try:
            client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=500)
            with client:
                client.admin.command("ping")
            return url
        except Exception:  # not up yet
            time.sleep(0.3)
    raise BenchError(f"SecantusDB did not answer within 30 s:\n{log_tail(log)}")


def with_database(url: str, database: str) -> str:
    head, _, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    hosts = rest.split("/", 1)[0]
    return f"{scheme}://{hosts}/{database}" + (f"?{query}" if query else "")


def start(procs: Processes, name: str, cmd: list[str], port: int) -> Target:
    proc, log = procs.start(name, cmd)
    target = Target(name, "http", port, proc, log, cmd, name)
    if not wait_healthy(target, 30):
        raise BenchError(f"{name} did not become healthy:\n{log_tail(log)}")
    return target


def seed(sidecar: Target, n_docs: int) -> None:
    rng = random.Random(7)
    groups = workload.n_groups(n_docs)
    docs = []
    for i in range(1, n_docs + 1):
        doc = workload.seed_doc(i, rng, groups)
        doc.pop("_version")
        docs.append(doc)
    for at in range(0, n_docs, SEED_CHUNK):
        body = orjson.dumps(docs[at : at + SEED_CHUNK])
        status, out = http("POST", f"{sidecar.url}/api/db/{COLLECTION}", body, timeout=120)
        if status not in (200, 201):
            raise BenchError(f"seeding through the sidecar answered {status}: {out[:300]!r}")


def user_fields(raw: bytes) -> dict[str, Any]:
    doc = orjson.loads(raw)
    return {k: v for k, v in doc.items() if k == "_id" or not k.startswith("_")}


def preflight(targets: list[Target], n_docs: int) -> None:
    for i in (1, 2, n_docs // 2, n_docs):
        answers = []
        for t in targets:
            status, body = http("GET", f"{t.url}/api/db/{COLLECTION}/{workload.doc_id(i)}")
            if status != 200:
                raise BenchError(f"{t.name} answered {status} for {workload.doc_id(i)}: {body!r}")
            answers.append(user_fields(body))
        if any(a != answers[0] for a in answers):
            raise BenchError(f"the servers answer {workload.doc_id(i)} differently: {answers}")


def round_of(t: Target, a: argparse.Namespace, seed_no: int) -> dict[str, Any]:
    assert t.proc is not None
    before = procstat.cpu_snapshot(t.proc.pid)["server"]
    spec = load.LoadSpec(
        url=t.url,
        scenario="get_uniform",
        collection=COLLECTION,
        connections=a.connections,
        duration_s=a.duration,
        n_docs=a.docs,
        seed=seed_no,
    )
    res = load.run_load(spec)
    cpu = procstat.cpu_snapshot(t.proc.pid)["server"] - before
    requests = float(res["requests"]) or 1.0
    return {**res, "cpu_ms_per_req": round(cpu * 1e3 / requests, 4)}


def summary(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    side, base = rounds["sidecar"], rounds["baseline"]
    ratios = [s["rps"] / b["rps"] for s, b in zip(side, base, strict=True) if b["rps"]]
    med = {
        name: {
            k: round(statistics.median(float(r[k]) for r in rs), 4)
            for k in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req", "errors", "non2xx")
        }
        for name, rs in rounds.items()
    }
    ratio = med["sidecar"]["rps"] / med["baseline"]["rps"] if med["baseline"]["rps"] else 0.0
    return {
        "median": med,
        "ratio": round(ratio, 3),
        "round_ratios": [round(x, 3) for x in ratios],
        "target": 1.5,
        "met": ratio >= 1.5,
    }


def report(s: dict[str, Any], a: argparse.Namespace, server: str) -> str:
    lines = [
        f"MongoDB GET-by-id ({server}, {a.docs} documents, {a.connections} connections, "
        f"{a.rounds} x {a.duration} s)",
        "",
        "| target | req/s | p50 ms | p99 ms | CPU ms/req | errors | non-2xx |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, m in s["median"].items():
        lines.append(
            f"| {name} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
            f"{m['cpu_ms_per_req']:.3f} | {m['errors']:.0f} | {m['non2xx']:.0f} |"
        )
    rr = s["round_ratios"]
    lines += [
        "",
        f"sidecar ÷ baseline req/s: **{s['ratio']:.2f} x** (rounds {min(rr):.2f}..{max(rr):.2f}); "
        f"target >= {s['target']} x: {'met' if s['met'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def run(a: argparse.Namespace, procs: Processes, work: Path) -> dict[str, Any]:
    server = a.mongo_url or start_secantus(procs, work / "secantus")
    db_url = with_database(server, DATABASE)
    sport, bport = free_port(), free_port()
    side_cmd = [*sidecar_base_cmd(), "serve", "--host", "127.0.0.1", "--port", str(sport)]
    sidecar = start(procs, "sidecar", [*side_cmd, "--database", db_url], sport)
    seed(sidecar, a.docs)
    base_cmd = [sys.executable, "-m", "benchmarks.mongo_baseline", "--port", str(bport)]
    base_cmd += ["--mongo-url", server, "--database", DATABASE]
    baseline = start(procs, "baseline", base_cmd, bport)
    preflight([sidecar, baseline], a.docs)
    for t in (sidecar, baseline):  # warm both up: connections, caches, the server's pages
        load.run_load(
            load.LoadSpec(t.url, "get_uniform", COLLECTION, a.connections, 2, n_docs=a.docs)
        )
    rounds: dict[str, list[dict[str, Any]]] = {"sidecar": [], "baseline": []}
    for r in range(a.rounds):
        order = (sidecar, baseline) if r % 2 == 0 else (baseline, sidecar)
        for t in order:
            rounds[t.name].append(round_of(t, a, seed_no=r + 1))
    return {"rounds": rounds, **summary(rounds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mongo", description=__doc__)
    p.add_argument("--mongo-url", help="an existing server (default: a private SecantusDB)")
    p.add_argument("--docs", type=int, default=10_000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mongo"))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dbproxy-bench-mongo-") as tmp:
        procs = Processes(Path(tmp), None)
        try:
            result = run(a, procs, Path(tmp))
        except BenchError as err:
            print(f"benchmark failed: {err}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    text = report(result, a, "the given server" if a.mongo_url else "SecantusDB")
    Path(a.out + ".json").write_text(json.dumps(result, indent=2))
    Path(a.out + ".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
