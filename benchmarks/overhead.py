"""What the sidecar's own features cost on the hot path, measured in ONE run.

``python -m benchmarks.overhead`` starts the same sidecar several times against one scratch
database, each copy with one feature switched (policies on in sidecar mode, policies on in
token mode, stats and metrics off, the stats collector blackholed), and alternates them:
closed-loop GET-by-id rounds at a fixed connection count (throughput, CPU per request),
then open-loop rounds at a fixed rate (latency from the intended send time). The first
variant of each round rotates, so slow drift of the machine spreads over every variant.
Reports medians and the ratios each feature is judged by:

- policies (issue 5): GET-by-id req/s with policies on / off >= 0.90;
- stats and metrics (issue 7): req/s with them on / off >= 0.90;
- collector blackholed (issue 7): open-loop p99 within 5 % of the same sidecar with no
  collector configured, batches dropped and counted.

Results: ``overhead.json`` and ``overhead.md`` in ``--out`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import os
import platform
import re
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks import load, procstat, workload
from benchmarks.pgsetup import create_database, drop_database, seed, with_db
from benchmarks.run import _raise_interrupt
from benchmarks.servers import (
    BenchError,
    Processes,
    Target,
    free_port,
    http,
    log_tail,
    sidecar_base_cmd,
    sidecar_config,
    start_target,
    write_yaml,
)
from benchmarks.workload import SCENARIOS

REPO = Path(__file__).resolve().parents[1]
COLLECTION = "bench"


@dataclass
class Variant:
    name: str
    what: str
    args: list[str] = field(default_factory=list)
    headers: tuple[str, ...] = ()
    target: Target | None = None


# name -> (description, the question it answers)
VARIANTS: dict[str, str] = {
    "plain": "no policies, stats and metrics on, no collector (the reference)",
    "plain_again": "the same as plain: the A/A pair that shows the noise floor of every ratio",
    "policies": "--policies DIR --service bench (sidecar mode)",
    "token": "--policies DIR, Authorization: Bearer (token mode: one hash per request)",
    "no_metrics": "--no-metrics (no stats recorder, no Prometheus)",
    "collector_blackholed": "--collector pointing at a socket that accepts and never answers "
    "(pushes every 0.5 s, buffer of 10 batches)",
}

# (label, variant, reference, metric, bound, kind) — the ratios the issues judge
CHECKS: tuple[tuple[str, str, str, str, float, str], ...] = (
    ("A/A: plain_again / plain, req/s (noise)", "plain_again", "plain", "rps", 0.0, "info"),
    (
        "A/A: plain_again / plain, open-loop p99 (noise)",
        "plain_again",
        "plain",
        "open_p99_ms",
        0.0,
        "info",
    ),
    ("policies on / off, req/s (issue 5)", "policies", "plain", "rps", 0.90, "min"),
    ("token mode / off, req/s (issue 5)", "token", "plain", "rps", 0.90, "min"),
    ("stats+metrics on / off, req/s (issue 7)", "plain", "no_metrics", "rps", 0.90, "min"),
    (
        "collector blackholed / none, open-loop p99 (issue 7)",
        "collector_blackholed",
        "plain",
        "open_p99_ms",
        1.05,
        "max",
    ),
)


def write_policy(directory: Path, token: str) -> None:
    """A realistic policy for the ``bench`` service: several grants, a field rule and a row
    rule on OTHER collections (they are compiled too), a generous rate limit and in-flight
    cap so that the limiter runs on every request without refusing any."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.yaml").write_text(
        f"""service: bench
description: benchmark service
identity:
  tokens: ["sha256:{digest}"]
grants:
  - collections: [bench, "bench_*"]
    operations: [read, list, count, create, update, delete, transaction]
  - collections: [orders, "archive_*"]
    operations: [read, list, count]
  - collections: ["*"]
    operations: [monitor]
fields:
  orders:
    readable: [_id, total, status, tenant_id]
rows:
  orders:
    tenant_id: {{header: X-Tenant-Id}}
limits:
  rate: {{per_second: 1000000, burst: 1000000}}
  max_in_flight: 100000
"""
    )


class Blackhole:
    """A listening socket that accepts connections and never reads or answers: a push to
    it connects, sends, and then waits for a reply that never comes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self._stop = False

        self._thread = threading.Thread(target=self._accept, daemon=True, name="blackhole")
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self.sock.accept()
                self.held.append(conn)  # kept open, never read

    def close(self) -> None:
        self._stop = True
        self._thread.join(1)
        for c in self.held:
            with contextlib.suppress(OSError):
                c.close()
        self.sock.close()


def stats_batches(t: Target) -> dict[str, float]:
    """``dbproxy_stats_batches_total`` by outcome, from the sidecar's /metrics."""
    status, body = http("GET", t.url + "/metrics")
    out: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines() if status == 200 else ():
        m = re.match(r'dbproxy_stats_batches_total\{outcome="(\w+)"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _pooled(rounds: list[dict[str, Any]], q: float) -> float | None:
    """The ``q`` quantile of every latency of every round together: the tail of 24,000
    requests is steadier than the median of four tails of 6,000."""
    lat = sorted(x for r in rounds for x in r.get("latencies_ms", ()))
    if not lat:
        return None
    return float(lat[min(len(lat) - 1, int(q * len(lat)))])


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def closed_round(a: argparse.Namespace, v: Variant, seed_: int, duration: int) -> dict[str, Any]:
    t = v.target
    assert t is not None and t.proc is not None
    cpu0 = procstat.cpu_snapshot(t.proc.pid)["server"]
    spec = load.LoadSpec(
        url=t.url,
        scenario="get_uniform",
        collection=COLLECTION,
        connections=a.connections,
        duration_s=duration,
        threads=a.load_threads,
        n_docs=a.seed_docs,
        seed=seed_,
        headers=v.headers,
    )
    res: dict[str, Any] = dict(load.run_load(spec, a.generator))
    cpu1 = procstat.cpu_snapshot(t.proc.pid)["server"]
    if t.proc.poll() is not None:
        raise BenchError(f"{v.name} died:\n{log_tail(t.log)}")
    ok = max(0, int(res["requests"]) - int(res["non2xx"]))
    res["rps"] = ok / float(res["duration_s"])
    res["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / max(int(res["requests"]), 1)
    return res


def open_round(a: argparse.Namespace, v: Variant, seed_: int) -> dict[str, Any]:
    t = v.target
    assert t is not None
    cmd = [sys.executable, "-m", "benchmarks.openloop", "--url", t.url]
    cmd += ["--scenario", "get_uniform", "--collection", COLLECTION]
    cmd += ["--rate", str(a.open_rate), "--duration", str(a.open_duration)]
    cmd += ["--connections", str(a.open_connections), "--n-docs", str(a.seed_docs)]
    cmd += ["--seed", str(seed_), "--raw"]
    for h in v.headers:
        cmd += ["--header", h]
    out, _ = load.run_child(cmd, a.open_duration + 60)
    return dict(load.parse_marker(out))


def rotate(items: list[Variant], r: int) -> list[Variant]:
    k = r % len(items)
    return items[k:] + items[:k]


def summarize(rounds: dict[str, list[dict[str, Any]]], opens: dict[str, list[dict[str, Any]]]):
    out: dict[str, dict[str, Any]] = {}
    for name, rs in rounds.items():
        os_ = opens.get(name, [])
        out[name] = {
            "rps": _median([r["rps"] for r in rs]),
            "rps_rounds": [round(r["rps"]) for r in rs],
            "cpu_us_per_req": _median([r["cpu_us_per_req"] for r in rs]),
            "p50_ms": _median([r["p50_ms"] for r in rs]),
            "p99_ms": _median([r["p99_ms"] for r in rs]),
            "errors": sum(int(r["errors"]) + int(r["non2xx"]) for r in rs),
            "open_p50_ms": _median([r["p50_ms"] for r in os_]),
            "open_p99_ms": _pooled(os_, 0.99),
            "open_p99_median_of_rounds_ms": _median([r["p99_ms"] for r in os_]),
            "open_p999_ms": _pooled(os_, 0.999),
            "open_p99_rounds": [round(r["p99_ms"], 3) for r in os_],
            "open_kept_up": all(bool(r.get("kept_up", True)) for r in os_),
            "open_errors": sum(int(r.get("errors", 0)) + int(r.get("non2xx", 0)) for r in os_),
        }
    return out


def checks(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, var, ref, metric, bound, kind in CHECKS:
        if var not in summary or ref not in summary:
            continue
        x, y = summary[var].get(metric), summary[ref].get(metric)
        ratio = x / y if x is not None and y else None
        if kind == "info":
            ok = None
        else:
            ok = ratio is not None and (ratio >= bound if kind == "min" else ratio <= bound)
        # the same question asked of CPU per request: the steadier of the two figures
        cpu = None
        if metric == "rps":
            cx, cy = summary[var]["cpu_us_per_req"], summary[ref]["cpu_us_per_req"]
            cpu = cy / cx if cx and cy else None
        out.append(
            {
                "check": label,
                "ratio": ratio,
                "bound": "-"
                if kind == "info"
                else f"{'>=' if kind == 'min' else '<='} {bound:.2f}",
                "met": ok,
                "cpu_ratio": cpu,
            }
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    lines = [
        "# dbproxy feature overhead (GET-by-id, one run, alternating variants)",
        "",
        f"{m['date']} · commit {m['git_commit']} · {m['cpus']} CPUs · Python {m['python']} · "
        f"{m['rounds']} closed-loop rounds x {m['duration_s']} s at {m['connections']} "
        f"connections; {m['open_rounds']} open-loop rounds x {m['open_duration_s']} s at "
        f"{m['open_rate']} req/s. Medians over rounds.",
        "",
        "| variant | req/s | CPU µs/req | p99 ms (closed) | open-loop p50 / p99 / p99.9 ms "
        "(all rounds pooled) "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def f(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    for name, s in results["summary"].items():
        lines.append(
            f"| `{name}` | {f(s['rps'], '.0f')} | {f(s['cpu_us_per_req'], '.0f')} "
            f"| {f(s['p99_ms'])} | {f(s['open_p50_ms'])} / {f(s['open_p99_ms'])} / "
            f"{f(s['open_p999_ms'])} | {s['errors'] + s['open_errors']} |"
        )
    lines += [
        "",
        "| check | ratio | bound | met | same ratio from CPU/request |",
        "|---|---:|---|---|---:|",
    ]
    for c in results["checks"]:
        lines.append(
            f"| {c['check']} | {f(c['ratio'], '.3f')} | {c['bound']} | "
            f"{'-' if c['met'] is None else 'yes' if c['met'] else '**no**'} | "
            f"{f(c['cpu_ratio'], '.3f')} |"
        )
    lines += ["", "Variants:", ""]
    lines += [f"- `{n}`: {VARIANTS[n]}" for n in results["summary"]]
    if results.get("collector"):
        c = results["collector"]
        lines += [
            "",
            f"Blackholed collector: stats batches dropped {c.get('dropped', 0):.0f}, "
            f"failed pushes {c.get('failures', 0):.0f}, sent {c.get('sent', 0):.0f} "
            "(from the sidecar's `dbproxy_stats_batches_total`).",
        ]
    lines += ["", "Reproduce: `" + m["command"] + "`", ""]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__)
    p.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--bench-db", default="dbproxy_overhead")
    p.add_argument("--variants", default=",".join(VARIANTS), help=",".join(VARIANTS))
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pause", type=float, default=0.3)
    p.add_argument("--open-rate", type=float, default=1000)
    p.add_argument("--open-rounds", type=int, default=4)
    p.add_argument("--open-duration", type=float, default=6)
    p.add_argument("--open-connections", type=int, default=32)
    p.add_argument("--seed-docs", type=int, default=10_000)
    p.add_argument("--pool-size", type=int, default=10)
    p.add_argument("--load-threads", type=int, default=2)
    p.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--startup-timeout", type=float, default=30)
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 s, 2 open rounds")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return p


def run(a: argparse.Namespace, procs: Processes, workdir: Path) -> dict[str, Any]:
    names = [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "plain" not in names:
        raise BenchError(f"variants must include plain and be among {list(VARIANTS)}")
    token = secrets.token_urlsafe(24)
    poldir = workdir / "policies"
    write_policy(poldir, token)
    cfg = workdir / "sidecar.yaml"
    write_yaml(cfg, sidecar_config(a.db_url, a.pool_size))
    hole = Blackhole() if "collector_blackholed" in names else None
    # the blackholed sidecar pushes every 0.5 s into a buffer of 10 batches, so that its
    # buffer overflows (and drops are counted) within the run, not after 200 s
    pushing = sidecar_config(a.db_url, a.pool_size)
    pushing["collector_push"] = {"interval_seconds": 0.5, "max_buffered_batches": 10}
    cfg_push = workdir / "sidecar-push.yaml"
    write_yaml(cfg_push, pushing)
    args = {
        "plain": ["--config", str(cfg)],
        "plain_again": ["--config", str(cfg)],
        "policies": ["--config", str(cfg), "--policies", str(poldir), "--service", "bench"],
        "token": ["--config", str(cfg), "--policies", str(poldir)],
        "no_metrics": ["--config", str(cfg), "--no-metrics"],
        "collector_blackholed": [
            "--config",
            str(cfg_push),
            "--collector",
            f"http://127.0.0.1:{hole.port if hole else 0}",
        ],
    }
    variants = [
        Variant(
            n, VARIANTS[n], args[n], (f"Authorization: Bearer {token}",) if n == "token" else ()
        )
        for n in names
    ]
    try:
        for v in variants:
            port = free_port()
            cmd = [*sidecar_base_cmd(), "serve", "--host", "127.0.0.1", "--port", str(port)]
            cmd += v.args
            v.target = start_target(procs, v.name, [("config", cmd)], a.startup_timeout)
        # tables: the first sidecar creates them with one write, then the harness seeds
        st, body = http(
            "POST",
            f"{variants[0].target.url}/api/db/{COLLECTION}",  # type: ignore[union-attr]
            orjson.dumps({"probe": True}),
            (),
        )
        if st != 201:
            raise BenchError(f"creating the bench table failed: {st} {body[:200]!r}")
        print(f"seeding {a.seed_docs} documents", flush=True)
        seed(a.db_url, [COLLECTION], a.seed_docs)
        doc = workload.doc_id(1)
        for v in variants:
            assert v.target is not None
            st, body = http("GET", f"{v.target.url}/api/db/{COLLECTION}/{doc}", None, v.headers)
            if st != 200 or doc.encode() not in body:
                raise BenchError(f"{v.name}: preflight GET -> {st} {body[:200]!r}")
        for v in variants:
            w = closed_round(a, v, 999, a.warmup)
            print(f"  warm-up {v.name:22s} {w['rps']:8.0f} req/s", flush=True)
        rounds: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        for r in range(a.rounds):
            for v in rotate(variants, r):
                time.sleep(a.pause)
                res = closed_round(a, v, r + 1, a.duration)
                rounds[v.name].append(res)
                print(
                    f"  round {r + 1}/{a.rounds} {v.name:22s} {res['rps']:8.0f} req/s"
                    f"  cpu {res['cpu_us_per_req']:6.0f} µs/req  p99 {res['p99_ms']:6.2f} ms"
                    f"  err {res['errors']} non2xx {res['non2xx']}",
                    flush=True,
                )
        opens: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        if a.open_rate:
            for r in range(a.open_rounds):
                for v in rotate(variants, r):
                    time.sleep(a.pause)
                    res = open_round(a, v, r + 1)
                    opens[v.name].append(res)
                    print(
                        f"  open {r + 1}/{a.open_rounds} {v.name:22s} achieved "
                        f"{res['achieved_rps']:6.0f}  p50 {res['p50_ms']:6.2f}  p99 "
                        f"{res['p99_ms']:6.2f}  p99.9 {res['p999_ms']:6.2f} ms",
                        flush=True,
                    )
        collector: dict[str, float] = {}
        for v in variants:
            if v.name == "collector_blackholed" and v.target is not None:
                collector = stats_batches(v.target)
    finally:
        if hole is not None:
            hole.close()
    summary = summarize(rounds, opens)
    return {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "rounds": a.rounds,
            "duration_s": a.duration,
            "connections": a.connections,
            "open_rounds": a.open_rounds,
            "open_duration_s": a.open_duration,
            "open_rate": a.open_rate,
            "command": "python -m benchmarks.overhead " + shlex.join(sys.argv[1:]),
            "servers": {v.name: shlex.join(v.target.cmd) for v in variants if v.target},
        },
        "summary": summary,
        "checks": checks(summary),
        "collector": collector,
        "rounds": rounds,
        "open_rounds": {
            n: [{k: v for k, v in r.items() if k != "latencies_ms"} for r in rs]
            for n, rs in opens.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.quick:
        a.rounds, a.duration, a.open_rounds, a.open_duration, a.warmup = 2, 2, 2, 3, 1
    a.db_url = with_db(a.database, a.bench_db)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    assert SCENARIOS["get_uniform"].collection == COLLECTION
    with tempfile.TemporaryDirectory(prefix="dbproxy-overhead-") as tmp:
        procs = Processes(Path(tmp), None)
        create_database(a.database, a.bench_db)
        try:
            results = run(a, procs, Path(tmp))
        except BenchError as e:
            print(f"\noverhead benchmark failed: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; cleaning up", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
            with contextlib.suppress(Exception):
                drop_database(a.database, a.bench_db)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_bytes(
        orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    text = markdown(results)
    (out / "overhead.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
