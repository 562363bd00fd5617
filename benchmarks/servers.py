"""The servers under test: start (each in its own process group, loopback only), health, stop.

Also the small HTTP helpers the harness uses outside the load (health, preflight, /metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = ("127.0.0.1", "localhost", "::1")
BASELINE_TEMPLATE = (
    "{python} -m benchmarks.baseline --host {host} --port {port} "
    "--database {database} --pool-size {pool_size}"
)


@dataclasses.dataclass
class Target:
    name: str  # one of TARGET_ORDER
    kind: str  # "http" | "direct"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    cmd: list[str] = dataclasses.field(default_factory=list)
    mode: str = ""  # how it was configured: config | database | baseline | custom | direct

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------- small helpers


def free_port() -> int:
    """A free loopback port: any (the kernel's choice), or one of ``DBPROXY_BENCH_PORTS``
    (``LOW-HIGH``) on a machine whose ports are shared out."""
    span = os.environ.get("DBPROXY_BENCH_PORTS")
    candidates = [0]
    if span:
        low, high = (int(x) for x in span.split("-", 1))
        candidates = list(range(low, high + 1))
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            if not port:
                return int(s.getsockname()[1])
            if port not in _GIVEN:
                _GIVEN.add(port)
                return port
    raise RuntimeError(f"no free port in {span}")


_GIVEN: set[int] = set()  # ports handed out (a server may not have bound its own yet)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: tuple[str, ...] = (),
    timeout: float = 5,
) -> tuple[int, bytes]:
    """One loopback request; (0, reason) when nothing answered."""
    hdrs = dict(h.split(":", 1) for h in headers)
    hdrs = {k.strip(): v.strip() for k, v in hdrs.items()}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, method=method, headers=hdrs)
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e).encode()


def log_tail(path: Path | None, n: int = 30) -> str:
    if path is None:
        return "(no log)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def redis_ping(url: str, timeout: float = 2.0) -> str | None:
    """None when Redis at url answers PING, else the reason."""
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        return f"{url} is not a loopback address"
    try:
        with socket.create_connection((parts.hostname, parts.port or 6379), timeout) as s:
            s.sendall(b"PING\r\n")
            got = s.recv(64)
    except OSError as e:
        return f"Redis at {url} is not reachable ({e})"
    if not (got.startswith(b"+PONG") or got.startswith(b"-NOAUTH")):
        return f"Redis at {url} answered {got[:40]!r} to PING"
    return None if got.startswith(b"+PONG") else f"Redis at {url} requires AUTH"


_SAMPLE = re.compile(r"^(dbproxy_cache_events|dbproxy_errors)(?:_total)?\{(.*)\}\s+(\S+)$")


def sidecar_metrics(target: Target) -> dict[str, dict[str, float]]:
    """From the sidecar's /metrics: read-cache events ("near:hit", "any:miss", ...) and
    errors by stable code; empty when the target has no such endpoint (the baseline)."""
    status, body = http("GET", target.url + "/metrics")
    out: dict[str, dict[str, float]] = {"cache": {}, "errors": {}}
    if status != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if m.group(1) == "dbproxy_cache_events":
            key, into = f"{labels.get('level', '?')}:{labels.get('event', '?')}", out["cache"]
        else:
            key, into = labels.get("code", "?"), out["errors"]
        with contextlib.suppress(ValueError):
            into[key] = into.get(key, 0.0) + float(m.group(3))
    return out


def metrics_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], kind: str
) -> dict[str, float]:
    b, a = before.get(kind, {}), after.get(kind, {})
    return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0)}


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
        for var in ("DBPROXY_DATABASE_URL", "DBPROXY_REDIS_URL"):
            env.pop(var, None)  # the server gets only what we pass explicitly
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
        if target.proc is None or target.proc.poll() is not None:
            return False
        status, _ = http("GET", target.url + "/api/db/health")
        if status == 200:
            return True
        time.sleep(0.2)
    return False


def sidecar_base_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "dbproxy"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "proxy.cli"]


def sidecar_config(db_url: str, pool: int, name: str = "main") -> dict[str, Any]:
    return {
        "databases": [
            {
                "name": name,
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


def write_yaml(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def sidecar_extra(a: argparse.Namespace) -> list[str]:
    extra = [*(["--workers", str(a.sidecar_workers)] if a.sidecar_workers else [])]
    return extra + [x for arg in a.sidecar_arg for x in shlex.split(arg)]


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
    return [
        ("config", [*base, "--config", str(cfg), *sidecar_extra(a)]),
        ("database", [*base, "--database", db_url, *sidecar_extra(a)]),
    ]


def start_target(
    procs: Processes, name: str, attempts: list[tuple], timeout_s: float, skip: int = 0
) -> Target:
    problems = []
    for mode, cmd in attempts[skip:]:
        port = int(next(x for i, x in enumerate(cmd) if i and cmd[i - 1] == "--port"))
        proc, log = procs.start(f"{name}-{mode}", cmd)
        target = Target(name, "http", port, proc, log, cmd, mode)
        if wait_healthy(target, timeout_s):
            print(f"  {name}: healthy on :{port} ({mode}) pid={proc.pid}", flush=True)
            return target
        problems.append(f"[{mode}] {shlex.join(cmd)}\n{log_tail(log)}")
        procs.stop(proc)
    raise BenchError(f"{name} did not become healthy:\n" + "\n\n".join(problems))


def start_cached_sidecar(
    a: argparse.Namespace, procs: Processes, workdir: Path, db_url: str
) -> tuple[Target | None, str | None]:
    """The second sidecar, with the read cache on for ``bench``: (target, None), or (None,
    why it was skipped). A sidecar that refuses the ``cache:`` section is detected from its
    exit and its log, so the run goes on without the cached scenarios."""
    if a.no_cache:
        return None, "cached scenarios off (--no-cache)"
    if a.sidecar_cmd:
        return None, "cached scenarios skipped: --sidecar-cmd replaces the sidecar"
    if reason := redis_ping(a.redis_url):
        return None, f"cached scenarios skipped: {reason}"
    # a database name of its own: the cache keys carry it, so entries a previous run left in
    # Redis (they live ttl_seconds) can never be served to this run
    cfg = sidecar_config(db_url, a.sidecar_pool_size, name=f"bench{os.getpid()}")
    cfg["cache"] = {
        "redis_url": a.redis_url,
        "collections": {"bench": {"enabled": True, "ttl_seconds": a.cache_ttl}},
    }
    path = workdir / "sidecar-cached.yaml"
    write_yaml(path, cfg)
    port = free_port()
    cmd = [*sidecar_base_cmd(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--config", str(path), "--redis", a.redis_url, *sidecar_extra(a)]
    proc, log = procs.start("sidecar_cached-config", cmd)
    target = Target("sidecar_cached", "http", port, proc, log, cmd, "config+cache")
    if wait_healthy(target, a.startup_timeout):
        print(f"  sidecar_cached: healthy on :{port} (cache on) pid={proc.pid}", flush=True)
        return target, None
    exited = proc.poll() is not None
    procs.stop(proc)
    tail = log_tail(log, 12)
    lines = [ln.strip() for ln in tail.splitlines() if "cache" in ln.lower()]
    if exited and lines and any(w in tail.lower() for w in ("unknown", "invalid", "error")):
        return None, (
            "cached scenarios skipped: the sidecar rejected the `cache:` config section "
            f"({' / '.join(lines[:3])[:300]}); they run as soon as it accepts it"
        )
    return None, f"cached scenarios skipped: the cache-on sidecar did not start: {tail[-400:]}"
