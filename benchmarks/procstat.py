"""Process accounting from /proc: CPU of a process tree, of PostgreSQL and Redis, host CPU, RSS.

CPU of a server = utime+stime of the process, of its live descendants (``--workers``) and
of its reaped children (cutime/cstime). RSS of a server = the sum of ``VmRSS`` over the same
tree; ``RssSampler`` samples it in a background thread to catch the peak between rounds.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _all_stats() -> Iterator[tuple[int, str, list[str]]]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                raw = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            comm = raw[raw.find("(") + 1 : raw.rfind(")")]
            yield int(entry.name), comm, raw[raw.rfind(")") + 2 :].split()


def _ticks(f: list[str]) -> int:
    # after the comm: [0]=state [1]=ppid ... [11]=utime [12]=stime [13]=cutime [14]=cstime
    return int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])


def _tree(stats: dict[int, list[str]], pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p, f in stats.items():
        kids.setdefault(int(f[1]), []).append(p)
    out: list[int] = []
    todo, seen = [pid], set[int]()
    while todo and len(seen) < 100_000:
        p = todo.pop()
        if p in seen or p not in stats:
            continue
        seen.add(p)
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_snapshot(pid: int | None) -> dict[str, float]:
    """CPU seconds so far of the tree under ``pid`` ("server"), of every process named
    postgres and of redis-server (server-wide: other databases count too), in one /proc scan."""
    stats, comms = {}, {}
    for p, comm, f in _all_stats():
        stats[p], comms[p] = f, comm
    server = sum(_ticks(stats[p]) for p in _tree(stats, pid)) if pid else 0
    pg = sum(_ticks(f) for p, f in stats.items() if comms[p] == "postgres")
    redis = sum(_ticks(f) for p, f in stats.items() if comms[p].startswith("redis-server"))
    return {"server": server / CLK_TCK, "postgres": pg / CLK_TCK, "redis": redis / CLK_TCK}


def tree_pids(pid: int) -> list[int]:
    return _tree({p: f for p, _, f in _all_stats()}, pid)


def host_cpu() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies over all cores, from /proc/stat."""
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    vals += [0] * (8 - len(vals))
    return sum(vals) - vals[3] - vals[4], sum(vals), vals[7]


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss_mb(pids: list[int]) -> float:
    return sum(_status_kb(p, "VmRSS") for p in pids) / 1024


def tree_hwm_mb(pids: list[int]) -> float:
    """Sum of the kernel's per-process peaks (VmHWM): exact for one process, an upper bound
    of the tree's peak for several."""
    return sum(_status_kb(p, "VmHWM") for p in pids) / 1024


def reset_hwm(pids: list[int]) -> bool:
    """Reset each process's VmHWM to its current RSS (``/proc/PID/clear_refs``, value 5), so
    that a later VmHWM is the peak since now; False when the kernel refused it."""
    ok = True
    for p in pids:
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


class RssSampler:
    """Samples the summed VmRSS of each registered process tree every ``interval`` seconds
    (the tree's members are refreshed every ``rescan`` seconds) and keeps the peak."""

    def __init__(self, interval: float = 0.5, rescan: float = 5.0, max_s: float = 4 * 3600):
        self.interval, self.rescan, self.max_s = interval, rescan, max_s
        self.roots: dict[str, int] = {}
        self.members: dict[str, list[int]] = {}
        self.peak: dict[str, float] = {}
        self.window: dict[str, float] = {}  # peak since the last start_window()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.roots[name] = pid
            self.members[name] = tree_pids(pid)
            self.peak[name] = max(self.peak.get(name, 0.0), tree_rss_mb(self.members[name]))

    def remove(self, name: str) -> None:
        with self._lock:
            self.roots.pop(name, None)
            self.members.pop(name, None)

    def sample(self, name: str, rescan: bool = True) -> float:
        """The tree's RSS now (MB), also folded into the peak."""
        with self._lock:
            pid = self.roots.get(name)
            if pid is None:
                return 0.0
            if rescan:
                self.members[name] = tree_pids(pid)
            rss = tree_rss_mb(self.members[name])
            self.peak[name] = max(self.peak.get(name, 0.0), rss)
            self.window[name] = max(self.window.get(name, 0.0), rss)
            return rss

    def start_window(self) -> bool:
        """Start a new window of peaks (``window``) for every tree, the kernel's VmHWM
        reset too; False when a VmHWM could not be reset (then ``hwm`` is the lifetime peak)."""
        with self._lock:
            self.window.clear()
            ok = True
            for name, pid in self.roots.items():
                self.members[name] = tree_pids(pid)
                ok = reset_hwm(self.members[name]) and ok
                self.window[name] = tree_rss_mb(self.members[name])
            return ok

    def hwm(self, name: str) -> float:
        with self._lock:
            pid = self.roots.get(name)
            return tree_hwm_mb(tree_pids(pid)) if pid else 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=5)

    def _run(self) -> None:
        t0 = last_scan = time.monotonic()
        while not self._stop.wait(self.interval) and time.monotonic() - t0 < self.max_s:
            rescan = time.monotonic() - last_scan >= self.rescan
            if rescan:
                last_scan = time.monotonic()
            for name in list(self.roots):
                self.sample(name, rescan=rescan)
