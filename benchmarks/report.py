"""Benchmark results: medians over rounds, sidecar/baseline ratios, JSON + Markdown + PNG."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

MEDIAN_KEYS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "cpu_us_per_req",
    "server_cpu_pct",
    "db_cpu_us_per_req",
    "loadgen_cpu_pct",
    "host_cpu_pct",
    "steal_pct",
    "db_cpu_pct",
    "other_cpu_pct",
)
OTHER_CPU_WARN_PCT = 20.0
SUM_KEYS = ("requests", "errors", "non2xx")
TARGETS = ("sidecar", "baseline")
COLORS = {"sidecar": "#1f77b4", "baseline": "#aaaaaa"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _paired(s_rounds: list[dict], b_rounds: list[dict], key: str) -> dict[str, float | None]:
    """Median and range of round-by-round ratios (round r of the sidecar / round r of the
    baseline, measured back to back), which cancels slow drift of the machine."""
    rs = [_ratio(s[key], b[key]) for s, b in zip(s_rounds, b_rounds, strict=False)]
    vals = [r for r in rs if r is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(vals), 3), "min": min(vals), "max": max(vals)}


def summarize_scenario(name: str, description: str, rounds: dict[str, list[dict]]) -> dict:
    targets: dict[str, Any] = {}
    for target, rs in rounds.items():
        med = {k: round(statistics.median(r[k] for r in rs), 3) for k in MEDIAN_KEYS}
        med.update({k: int(sum(r[k] for r in rs)) for k in SUM_KEYS})
        med["rps_min"] = round(min(r["rps"] for r in rs), 1)
        med["rps_max"] = round(max(r["rps"] for r in rs), 1)
        targets[target] = {"median": med, "rounds": rs}
    s = targets.get("sidecar", {}).get("median", {})
    b = targets.get("baseline", {}).get("median", {})
    ratio: dict[str, Any] = {
        "rps": _ratio(s.get("rps"), b.get("rps")),
        "p99": _ratio(s.get("p99_ms"), b.get("p99_ms")),
        "cpu_per_req": _ratio(s.get("cpu_us_per_req"), b.get("cpu_us_per_req")),
    }
    if "sidecar" in rounds and "baseline" in rounds:
        pairs = (rounds["sidecar"], rounds["baseline"])
        ratio["paired"] = {
            "rps": _paired(*pairs, "rps"),
            "p99": _paired(*pairs, "p99_ms"),
            "cpu_per_req": _paired(*pairs, "cpu_us_per_req"),
        }
    return {"name": name, "description": description, "targets": targets, "ratio": ratio}


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ratio_cell(value: float | None, paired: dict | None) -> str:
    if not paired or paired.get("min") is None:
        return _fmt(value)
    return f"{_fmt(value)} ({_fmt(paired['min'])}..{_fmt(paired['max'])})"


def _host_line(results: dict) -> str:
    """Median machine load while measuring: tells whether the numbers are trustworthy."""
    rounds = [
        r
        for sc in results["scenarios"].values()
        for t in sc["targets"].values()
        for r in t["rounds"]
    ]
    if not rounds:
        return ""
    busy = statistics.median(r["host_cpu_pct"] for r in rounds)
    steal = statistics.median(r["steal_pct"] for r in rounds)
    gen = statistics.median(r["loadgen_cpu_pct"] for r in rounds)
    other = statistics.median(r["other_cpu_pct"] for r in rounds)
    line = (
        f"While measuring (medians; 100% = one core): machine busy {busy:.0f}% of "
        f"{results['meta']['cpus'] * 100}%, load generator {gen:.0f}%, hypervisor steal "
        f"{steal:.0f}%, other processes {other:.0f}%."
    )
    if other > OTHER_CPU_WARN_PCT or steal > OTHER_CPU_WARN_PCT:
        line += (
            " **Warning: something else was using the machine; absolute numbers and small"
            " differences are not reliable — rerun on a quiet machine.**"
        )
    return line


def markdown(results: dict) -> str:
    m = results["meta"]
    pools = m["pool_size"]
    lines = [
        "# dbproxy benchmark: sidecar vs minimal baseline",
        "",
        f"- date {m['date']}, commit `{m['git_commit']}`"
        + (" (proxy/ has uncommitted changes)" if m["git_dirty"] else ""),
        f"- {m['cpus']} CPUs, PostgreSQL {m['postgres']}, Python {m['python']}, "
        f"load average at start {' '.join(m['loadavg_start'])}",
        f"- load: {m['generator']}, closed loop, {m['concurrency']} connections, "
        f"{m['rounds']} rounds x {m['duration_s']} s per target (alternating), "
        f"{m['warmup_s']} s warm-up, {m['seed_docs']} seeded docs",
        f"- pool size: sidecar {pools['sidecar']}, baseline {pools['baseline']}; "
        f"sidecar started via `{m['servers']['sidecar']['mode']}`",
    ]
    lines += [f"- note: {n}" for n in m["notes"]]
    if m["servers"]["sidecar"]["mode"] in ("baseline", "custom"):
        lines.insert(1, "\n**Self-test: the sidecar role is NOT dbproxy** (`--sidecar-cmd`).")
    lines += [
        "",
        "Medians over rounds (errors and non-2xx are totals over rounds).",
        "",
        "| scenario | target | req/s | p50 ms | p90 ms | p99 ms | CPU µs/req | server CPU % "
        "| DB CPU µs/req | errors | non-2xx |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for sc in results["scenarios"].values():
        for t in TARGETS:
            if t not in sc["targets"]:
                continue
            d = sc["targets"][t]["median"]
            lines.append(
                f"| {sc['name']} | {t} | {d['rps']:.0f} | {d['p50_ms']:.2f} | {d['p90_ms']:.2f} "
                f"| {d['p99_ms']:.2f} | {d['cpu_us_per_req']:.0f} | {d['server_cpu_pct']:.0f} "
                f"| {d['db_cpu_us_per_req']:.0f} | {d['errors']} | {d['non2xx']} |"
            )
    lines += ["", _host_line(results), ""]
    lines += [
        "| scenario | throughput sidecar/baseline | p99 sidecar/baseline "
        "| CPU per request sidecar/baseline |",
        "|---|--:|--:|--:|",
    ]
    for sc in results["scenarios"].values():
        r, pr = sc["ratio"], sc["ratio"].get("paired", {})
        cells = [_ratio_cell(r[k], pr.get(k)) for k in ("rps", "p99", "cpu_per_req")]
        lines.append(f"| {sc['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios of the medians; in brackets the range of the round-by-round ratios (each "
        "sidecar round / the baseline round right after it), i.e. the noise. Throughput 1.00 = "
        "as fast as the baseline; p99 and CPU ratios below 1.00 are better than the baseline. "
        "See benchmarks/README.md.",
        "",
    ]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scs = list(results["scenarios"].values())
    names = [sc["name"] for sc in scs]
    panels = [
        ("rps", "requests/s (median, min-max)"),
        ("p99_ms", "p99 latency ms (median)"),
        ("cpu_us_per_req", "server CPU µs per request"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    width = 0.38
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, t in enumerate(TARGETS):
            meds = [sc["targets"].get(t, {}).get("median", {}) for sc in scs]
            xs = [j + (i - 0.5) * width for j in range(len(scs))]
            vals = [d.get(key, 0.0) for d in meds]
            err = None
            if key == "rps":
                err = [
                    [max(0.0, v - d.get("rps_min", v)) for v, d in zip(vals, meds, strict=True)],
                    [max(0.0, d.get("rps_max", v) - v) for v, d in zip(vals, meds, strict=True)],
                ]
            bars = ax.bar(xs, vals, width, label=t, color=COLORS[t], yerr=err, capsize=3)
            ax.bar_label(bars, fmt="%.0f" if key != "p99_ms" else "%.1f", fontsize=7, padding=2)
        ax.set_xticks(range(len(scs)), names)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8)
    m = results["meta"]
    fig.suptitle(
        f"dbproxy sidecar vs baseline — {m['generator']}, c={m['concurrency']}, "
        f"{m['rounds']}x{m['duration_s']}s, {m['git_commit']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_all(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latest.json", out / "latest.md", out / "latest.png"]
    _atomic_write(paths[0], json.dumps(results, indent=2).encode() + b"\n")
    _atomic_write(paths[1], markdown(results).encode())
    tmp_png = out / "latest.png.tmp"
    chart(results, tmp_png)
    os.replace(tmp_png, paths[2])
    return paths
