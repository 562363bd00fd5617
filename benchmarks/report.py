"""Benchmark results: medians over rounds, ratios to the baseline, targets; JSON, Markdown, PNG."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from benchmarks import aggregate, workload

MEDIAN_KEYS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
    "cpu_us_per_req",
    "cpu_s_per_1k",
    "server_cpu_pct",
    "db_cpu_us_per_req",
    "redis_cpu_us_per_req",
    "loadgen_cpu_pct",
    "host_cpu_pct",
    "steal_pct",
    "db_cpu_pct",
    "other_cpu_pct",
)
OTHER_CPU_WARN_PCT = 20.0
SUM_KEYS = ("requests", "errors", "non2xx")
TARGETS = ("sidecar", "sidecar_cached", "baseline", "direct")
LABELS = {
    "sidecar": "sidecar",
    "sidecar_cached": "sidecar, cache on",
    "baseline": "baseline aiohttp+asyncpg",
    "direct": "direct asyncpg (no HTTP)",
}
COLORS = {
    "sidecar": "#1f77b4",
    "sidecar_cached": "#2ca02c",
    "baseline": "#999999",
    "direct": "#ff7f0e",
}
TARGET_CONNS = 64  # the connection count the targets name


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _paired(s_rounds: list[dict], b_rounds: list[dict], key: str) -> dict[str, float | None]:
    """Median and range of round-by-round ratios (round r of a target / round r of the
    baseline, measured close together), which cancels slow drift of the machine."""
    rs = [_ratio(s[key], b[key]) for s, b in zip(s_rounds, b_rounds, strict=False)]
    vals = [r for r in rs if r is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(vals), 3), "min": min(vals), "max": max(vals)}


def _lookups(cache: dict[str, float]) -> float:
    hits = sum(v for k, v in cache.items() if k.endswith(":hit"))
    return hits + cache.get("any:miss", 0.0) + cache.get("any:bypass", 0.0)


def hit_ratio(cache: dict[str, float]) -> float:
    """Share of cached-path reads answered from the near cache or Redis."""
    n = _lookups(cache)
    return sum(v for k, v in cache.items() if k.endswith(":hit")) / n if n else 0.0


def bypass_ratio(cache: dict[str, float]) -> float:
    """Share of cached-path reads that skipped the cache (Redis deemed down or slow)."""
    n = _lookups(cache)
    return cache.get("any:bypass", 0.0) / n if n else 0.0


def _median_block(rs: list[dict]) -> dict[str, Any]:
    med: dict[str, Any] = {k: round(statistics.median(r[k] for r in rs), 4) for k in MEDIAN_KEYS}
    med.update({k: int(sum(r[k] for r in rs)) for k in SUM_KEYS})
    med["rps_min"] = round(min(r["rps"] for r in rs), 1)
    med["rps_max"] = round(max(r["rps"] for r in rs), 1)
    med["rss_mb"] = round(max(r.get("rss_mb", 0.0) for r in rs), 1)
    codes: dict[str, float] = {}
    for r in rs:
        for k, v in r.get("error_codes", {}).items():
            codes[k] = codes.get(k, 0.0) + v
    if codes:
        med["error_codes"] = {k: int(v) for k, v in sorted(codes.items())}
    if any("cache" in r for r in rs):
        total: dict[str, float] = {}
        for r in rs:
            for k, v in r.get("cache", {}).items():
                total[k] = total.get(k, 0.0) + v
        med["cache"] = total
        med["cache_hit_ratio"] = round(hit_ratio(total), 4)
        med["cache_bypass_ratio"] = round(bypass_ratio(total), 4)
    return med


def summarize_cell(scenario: str, conns: int, rounds: dict[str, list[dict]]) -> dict:
    targets: dict[str, dict[str, Any]] = {
        t: {"median": _median_block(rs), "rounds": rs} for t, rs in rounds.items() if rs
    }
    base = targets.get("baseline", {}).get("median")
    direct = targets.get("direct", {}).get("median")
    ratios: dict[str, Any] = {}
    for t, d in targets.items():
        if t == "baseline" or base is None:
            continue
        m = d["median"]
        pairs = (rounds[t], rounds["baseline"])
        ratios[t] = {
            "rps": _ratio(m["rps"], base["rps"]),
            "p99": _ratio(m["p99_ms"], base["p99_ms"]),
            "cpu_per_req": _ratio(m["cpu_us_per_req"], base["cpu_us_per_req"]),
            "paired": {
                "rps": _paired(*pairs, "rps"),
                "p99": _paired(*pairs, "p99_ms"),
                "cpu_per_req": _paired(*pairs, "cpu_us_per_req"),
            },
        }
    vs_direct = {
        t: _ratio(d["median"]["rps"], direct["rps"])
        for t, d in targets.items()
        if direct is not None and t != "direct"
    }
    return {
        "scenario": scenario,
        "connections": conns,
        "targets": targets,
        "ratio_to_baseline": ratios,
        "rps_ratio_to_direct": vs_direct,
    }


def summarize_open_loop(rate: float, scenario: str, conns: int, rounds: dict[str, list]) -> dict:
    keys = ("achieved_rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "cpu_s_per_1k")
    targets: dict[str, Any] = {}
    for t, rs in rounds.items():
        if not rs:
            continue
        med: dict[str, Any] = {k: round(statistics.median(r[k] for r in rs), 4) for k in keys}
        med["service_p99_ms"] = round(statistics.median(r["service"]["p99_ms"] for r in rs), 4)
        if all("strict" in r for r in rs):
            med["strict_p99_ms"] = round(statistics.median(r["strict"]["p99_ms"] for r in rs), 4)
        med["lag_p50_ms"] = round(statistics.median(r["lag"]["p50_ms"] for r in rs), 4)
        med["lag_p99_ms"] = round(statistics.median(r["lag"]["p99_ms"] for r in rs), 4)
        med["loadgen_cpu_pct"] = round(statistics.median(r["loadgen_cpu_pct"] for r in rs), 1)
        med.update({k: int(sum(r[k] for r in rs)) for k in ("errors", "non2xx", "dropped")})
        med["kept_up"] = all(r["kept_up"] for r in rs)
        med["rss_mb"] = round(max(r.get("rss_mb", 0.0) for r in rs), 1)
        targets[t] = {"median": med, "rounds": rs}
    base = targets.get("baseline", {}).get("median")
    delta = {
        t: round(d["median"]["p99_ms"] - base["p99_ms"], 3)
        for t, d in targets.items()
        if base is not None and t != "baseline"
    }
    return {
        "rate": rate,
        "scenario": scenario,
        "connections": conns,
        "targets": targets,
        "p99_minus_baseline_ms": delta,
        "rate_held_by_all": all(d["median"]["kept_up"] for d in targets.values()),
        # the generator's self-check: it held the rate against the baseline
        "generator_kept_up": targets.get("baseline", {}).get("median", {}).get("kept_up"),
    }


def cache_notes(scenarios: dict) -> list[str]:
    notes = []
    for name, sc in scenarios.items():
        for conns, cell in sc["cells"].items():
            m = cell["targets"].get("sidecar_cached", {}).get("median")
            if m is None or "cache" not in m:
                continue
            ratio = m["cache_hit_ratio"]
            c = {k: int(v) for k, v in sorted(m["cache"].items()) if v}
            notes.append(
                f"cache on, {name} @ {conns}: hit ratio {ratio * 100:.1f}%, bypassed "
                f"{m['cache_bypass_ratio'] * 100:.1f}% (events: {c})"
            )
            if ratio == 0:
                notes.append(
                    f"**the cache-on sidecar served no cache hits in {name} @ {conns}: "
                    "is the `cache:` section ignored?**"
                )
    return notes


# ---------------------------------------------------------------- targets (issue 8, §5)


def _cell(results: dict, scenario: str) -> tuple[dict | None, int | None]:
    """The cell at TARGET_CONNS connections, else the measured count closest to it."""
    sc = results["scenarios"].get(scenario)
    if not sc or not sc["cells"]:
        return None, None
    conns = min((int(c) for c in sc["cells"]), key=lambda c: (abs(c - TARGET_CONNS), c))
    return sc["cells"][str(conns)], conns


def _rps_target(results: dict, name: str, scenario: str, target: str, want: float) -> dict:
    row = {"name": name, "threshold": f">= {want:.1f} x baseline req/s"}
    cell, conns = _cell(results, scenario)
    if cell is None or target not in cell["targets"] or "baseline" not in cell["targets"]:
        why = f"{scenario} not run"
        if cell is not None:
            why = "cache-on sidecar not run" if target == "sidecar_cached" else f"no {target}"
        return {**row, "measured": f"not measured ({why})", "met": "n/a", "value": None}
    t, b = cell["targets"][target]["median"]["rps"], cell["targets"]["baseline"]["median"]["rps"]
    ratio = t / b if b else 0.0
    at = f" at {conns} conns" if conns != TARGET_CONNS else ""
    return {
        **row,
        "measured": f"{ratio:.2f} x ({t:.0f} vs {b:.0f} req/s{at})",
        "met": "yes" if ratio >= want else "no",
        "value": round(ratio, 3),
    }


def _self_ratio_target(
    results: dict, name: str, scenario: str, reference: str, want: float
) -> dict:
    """The sidecar's req/s in ``scenario`` over its own in ``reference`` (same run)."""
    row = {"name": name, "threshold": f">= {want:.1f} x sidecar {reference} req/s"}
    cell, conns = _cell(results, scenario)
    ref, _ = _cell(results, reference)
    if (
        cell is None
        or ref is None
        or "sidecar" not in cell["targets"]
        or ("sidecar" not in ref["targets"])
    ):
        return {
            **row,
            "measured": f"not measured ({scenario} or {reference} not run)",
            "met": "n/a",
            "value": None,
        }
    t = cell["targets"]["sidecar"]["median"]["rps"]
    r = ref["targets"]["sidecar"]["median"]["rps"]
    ratio = t / r if r else 0.0
    at = f" at {conns} conns" if conns != TARGET_CONNS else ""
    return {
        **row,
        "measured": f"{ratio:.2f} x ({t:.0f} vs {r:.0f} req/s{at})",
        "met": "yes" if ratio >= want else "no",
        "value": round(ratio, 3),
    }


def check_targets(results: dict) -> list[dict]:
    """The targets of issue 8 §5, checked against this run (report only, never a test)."""
    rows = [
        _rps_target(results, "uncached GET-by-id, 64 conns", "get_uniform", "sidecar", 2.0),
        _rps_target(
            results, "cached GET-by-id (Zipf), 64 conns", "get_zipf", "sidecar_cached", 3.0
        ),
        _rps_target(results, "create, 64 conns", "create", "sidecar", 1.0),
        _rps_target(
            results,
            "list query on declared, indexed fields, 64 conns",
            "list_indexed",
            "sidecar",
            1.5,
        ),
        _self_ratio_target(
            results, "create with a 6-field schema, 64 conns", "create_schema6", "create", 0.9
        ),
        _rps_target(
            results,
            f"aggregation ($match + $group) over {workload.AGG_DOCS:,} documents",
            "agg_group",
            "sidecar",
            0.9,
        ),
        _rps_target(
            results,
            f"aggregation ($match + $group) over {workload.AGG_DOCS:,} documents "
            "of a declared schema",
            "agg_group_schema",
            "sidecar",
            0.9,
        ),
        _rps_target(
            results,
            "search (two words, 20 hits, highlights) over 100,000 declared documents",
            "search",
            "sidecar",
            0.8,
        ),
        aggregate.memory_target(results),
    ]
    ol = results.get("open_loop")
    row = {"name": "open-loop p99 (sidecar)", "threshold": "<= baseline p99 + 1 ms"}
    if ol and "sidecar" in ol["targets"] and "baseline" in ol["targets"]:
        s = ol["targets"]["sidecar"]["median"]["p99_ms"]
        b = ol["targets"]["baseline"]["median"]["p99_ms"]
        rate = f" at {ol['rate']:.0f} req/s"
        caveat = ""
        if ol["generator_kept_up"] is False:
            caveat = "; the generator could not hold the rate even against the baseline"
        elif not ol["targets"]["sidecar"]["median"]["kept_up"]:
            caveat = "; the sidecar did not hold the rate"
        rows.append(
            {
                **row,
                "name": row["name"] + rate,
                "measured": f"{s:.2f} ms vs {b:.2f} ms ({s - b:+.2f} ms{caveat})",
                "met": "yes" if s <= b + 1.0 else "no",
                "value": round(s - b, 3),
            }
        )
    else:
        rows.append({**row, "measured": "not measured", "met": "n/a", "value": None})
    for t in ("sidecar", "sidecar_cached"):
        p = results.get("processes", {}).get(t)
        name = f"{LABELS[t]} RSS after the benchmark"
        if p is None:
            rows.append(
                {"name": name, "threshold": "<= 80 MB", "measured": "not run", "met": "n/a"}
            )
            continue
        procs = f", {p['processes']} processes" if p["processes"] > 1 else ""
        rows.append(
            {
                "name": name,
                "threshold": "<= 80 MB",
                "measured": f"{p['rss_final_mb']:.1f} MB (peak {p['rss_peak_mb']:.1f}{procs})",
                "met": "yes" if p["rss_final_mb"] <= 80 else "no",
                "value": p["rss_final_mb"],
            }
        )
    return rows


# ---------------------------------------------------------------- Markdown


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ratio_cell(value: float | None, paired: dict | None) -> str:
    if not paired or paired.get("min") is None or paired["min"] == paired["max"]:
        return _fmt(value)
    return f"{_fmt(value)} ({_fmt(paired['min'])}..{_fmt(paired['max'])})"


def _all_rounds(results: dict) -> list[dict]:
    out: list[dict] = []
    for sc in results["scenarios"].values():
        for cell in sc["cells"].values():
            for t in cell["targets"].values():
                out.extend(r for r in t["rounds"] if r.get("generator") != "direct")
    return out


def _host_line(results: dict) -> str:
    """Median machine load while measuring: tells whether the numbers are trustworthy."""
    rounds = _all_rounds(results)
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


def _header(results: dict) -> list[str]:
    m = results["meta"]
    pools = m["pool_size"]
    ol = m["open_loop"]
    conns = "/".join(str(c) for c in m["connections"])
    heavy = m.get("agg_connections") or {}
    if isinstance(heavy, dict) and heavy:
        each = ", ".join(f"{n} {'/'.join(str(c) for c in cs)}" for n, cs in heavy.items())
        conns = f"{conns} ({each})" if set(m["scenarios"]) - set(heavy) else each
    lines = [
        "# dbproxy benchmark: sidecar vs minimal baseline vs direct asyncpg",
        "",
        f"- {m['date']}, commit `{m['git_commit']}`"
        + (" (proxy/ has uncommitted changes)" if m["git_dirty"] else "")
        + (", **--quick** (smoke run: short rounds, few connection counts)" if m["quick"] else ""),
        f"- {m['cpus']} CPUs, PostgreSQL {m['postgres']}, Python {m['python']}, "
        f"load average at start {' '.join(m['loadavg_start'])}, "
        f"run took {m['wall_s'] / 60:.1f} min",
        f"- closed loop ({m['generator']}): {conns} connections, {m['rounds']} rounds x "
        f"{m['duration_s']} s per target (alternating), {m['warmup_s']} s warm-up; "
        f"{m['seed_docs']} seeded docs; Zipf s={m['zipf']['s']} (the 100 hottest ids get "
        f"{m['zipf']['top100_share'] * 100:.0f}% of requests); mixed = "
        f"{100 - m['write_pct']}% GET / {m['write_pct']}% PUT $inc",
        f"- open loop: {ol['rate']:.0f} req/s of {ol['scenario']}, {ol['connections']} "
        f"connections, {ol['rounds']} x {ol['duration_s']} s per target, queueing counted "
        "from the intended send time"
        if ol["rate"]
        else "- open loop: off",
        f"- pool size: sidecar {pools['sidecar']}, baseline {pools['baseline']}, direct "
        f"{pools['direct']}; sidecar started via `{m['servers']['sidecar']['mode']}`"
        + (
            "; cache on: a second sidecar with `cache: {collections: {bench: {enabled: true, "
            f"ttl_seconds: {m['cache']['ttl_seconds']:g}}}}}, redis_url: "
            f"{m['cache']['redis_url']}}}` and `--redis {m['cache']['redis_url']}`"
            if "sidecar_cached" in m["servers"]
            else ""
        ),
    ]
    lines += [f"- note: {n}" for n in m["notes"]]
    if m["servers"]["sidecar"]["mode"] in ("baseline", "custom"):
        lines.insert(1, "\n**Self-test: the sidecar role is NOT dbproxy** (`--sidecar-cmd`).")
    return lines


def _targets_table(results: dict) -> list[str]:
    lines = [
        "## Targets (issue 8 §5; reported, never enforced)",
        "",
        "| target | threshold | measured | met |",
        "|---|---|---|---|",
    ]
    for r in results.get("targets", []):
        lines.append(f"| {r['name']} | {r['threshold']} | {r['measured']} | {r['met']} |")
    return lines


def closed_loop_table(results: dict) -> list[str]:
    lines = [
        "| scenario | conns | target | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
        "| CPU s/1k req | RSS MB | req/s ÷ baseline | p99 ÷ baseline | CPU ÷ baseline "
        "| errors | non-2xx |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, sc in results["scenarios"].items():
        for conns, cell in sc["cells"].items():
            for t in TARGETS:
                if t not in cell["targets"]:
                    continue
                d = cell["targets"][t]["median"]
                r = cell["ratio_to_baseline"].get(t)
                if r is None:
                    ratios = ["1.00" if t == "baseline" else "n/a"] * 3
                else:
                    pr = r["paired"]
                    keys = ("rps", "p99", "cpu_per_req")
                    ratios = [_ratio_cell(r[k], pr.get(k)) for k in keys]
                label = LABELS[t]
                if "cache_hit_ratio" in d:
                    label += f" ({d['cache_hit_ratio'] * 100:.0f}% hits"
                    if d["cache_bypass_ratio"] >= 0.005:
                        label += f", {d['cache_bypass_ratio'] * 100:.0f}% bypassed"
                    label += ")"
                lines.append(
                    f"| {name} | {conns} | {label} | {d['rps']:.0f} | {d['p50_ms']:.2f} "
                    f"| {d['p90_ms']:.2f} | {d['p99_ms']:.2f} | {d['p999_ms']:.2f} "
                    f"| {d['cpu_s_per_1k']:.3f} | {d['rss_mb']:.0f} | "
                    + " | ".join(ratios)
                    + f" | {d['errors']} | {d['non2xx']} |"
                )
    return lines


def failure_notes(results: dict) -> list[str]:
    """One line per cell and target that had socket errors or non-2xx answers."""
    out: list[str] = []
    for name, sc in results["scenarios"].items():
        for conns, cell in sc["cells"].items():
            for t, d in cell["targets"].items():
                m = d["median"]
                if not (m["errors"] or m["non2xx"]):
                    continue
                share = m["non2xx"] / max(1, m["requests"]) * 100
                codes = m.get("error_codes")
                by = f" — by code: {codes}" if codes else ""
                out.append(
                    f"- **{name} @ {conns}, {LABELS[t]}: {m['non2xx']} non-2xx answers "
                    f"({share:.1f}% of responses) and {m['errors']} socket errors{by}**"
                )
    if out:
        out.insert(0, "Failed requests (req/s above counts successful answers only):")
        out.insert(1, "")
    return out


def _with_blank(lines: list[str]) -> list[str]:
    return [*lines, ""] if lines else []


def open_loop_table(results: dict) -> list[str]:
    ol = results.get("open_loop")
    if not ol:
        return []
    lines = [
        f"## Open loop: {ol['rate']:.0f} req/s of {ol['scenario']} (queueing counted from "
        "the intended send time)",
        "",
        "| target | achieved req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| p99 minus baseline p99 | p99 ms all from due time | service-time p99 ms "
        "| generator lag p99 ms | CPU s/1k req | errors | rate held |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for t in TARGETS:
        if t not in ol["targets"]:
            continue
        d = ol["targets"][t]["median"]
        delta = ol["p99_minus_baseline_ms"].get(t)
        lines.append(
            f"| {LABELS[t]} | {d['achieved_rps']:.0f} | {d['p50_ms']:.2f} | {d['p90_ms']:.2f} "
            f"| {d['p99_ms']:.2f} | {d['p999_ms']:.2f} | {d['max_ms']:.2f} "
            f"| {'—' if delta is None else f'{delta:+.2f} ms'} "
            f"| {_fmt(d.get('strict_p99_ms'))} | {d['service_p99_ms']:.2f} "
            f"| {d['lag_p99_ms']:.2f} | {d['cpu_s_per_1k']:.3f} | {d['errors']} "
            f"| {'yes' if d['kept_up'] else '**no**'} |"
        )
    lines += [
        "",
        "Latency counts from the request's due time whenever its connection was still busy "
        "at that time (queueing behind the server), else from the actual send; 'all from due "
        "time' charges every request from its due time, including the generator's timer "
        "jitter (uvloop timers: 1 ms resolution; see 'generator lag'). Service time: from the "
        "actual send, what a closed-loop tool reports.",
    ]
    base = ol["targets"].get("baseline", {}).get("median")
    if base is not None and not base["kept_up"]:
        lines += [
            "",
            "**The open-loop generator could not hold the rate even against the baseline** "
            "(achieved < 98 %, its send lag p99 > 5 ms, errors or dropped sends): the machine "
            "is too busy for this rate; rerun on a quieter machine or pin it with `--load-cpus`.",
        ]
    elif not ol["rate_held_by_all"]:
        lines += [
            "",
            "**The rate was not held for some target** (see 'rate held'): when the generator "
            "lag stayed small, the server could not sustain the rate and queued.",
        ]
    return lines


def processes_table(results: dict) -> list[str]:
    procs = results.get("processes") or {}
    lines = [
        "| server | processes | RSS peak MB | RSS after the benchmark MB |",
        "|---|--:|--:|--:|",
    ]
    for t in TARGETS:
        p = procs.get(t)
        if p:
            lines.append(
                f"| {LABELS[t]} | {p['processes']} | {p['rss_peak_mb']:.1f} "
                f"| {p['rss_final_mb']:.1f} |"
            )
    direct = [
        r.get("rss_mb", 0.0)
        for sc in results["scenarios"].values()
        for cell in sc["cells"].values()
        for r in cell["targets"].get("direct", {}).get("rounds", [])
    ]
    if direct:
        lines.append(f"| {LABELS['direct']} (one per round) | 1 | {max(direct):.1f} | — |")
    return lines


def markdown(results: dict) -> str:
    lines = _header(results)
    lines += ["", *_targets_table(results), ""]
    lines += [
        "## Closed loop (medians over rounds; errors and non-2xx are totals)",
        "",
        *closed_loop_table(results),
        "",
        *_with_blank(failure_notes(results)),
        *_with_blank(aggregate.cpu_lines(results)),
        _host_line(results),
        "",
        "req/s: successful (2xx) answers per second. "
        "Ratios: of the medians; in brackets the range of the round-by-round ratios (each "
        "round of a target / the baseline round of the same alternation), i.e. the noise. "
        "req/s ÷ baseline above 1.00 is faster than the baseline; p99 and CPU ratios below "
        "1.00 are better. CPU s/1k req: CPU seconds the server process tree (or the direct "
        "client) spent per 1,000 requests. RSS: largest RSS after a round (direct: its peak). "
        "See benchmarks/README.md.",
        "",
    ]
    if ol := open_loop_table(results):
        lines += [*ol, ""]
    lines += ["## Memory", "", *processes_table(results), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- charts


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_y(ax) -> None:
    from matplotlib.ticker import FormatStrFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=6)


def _grid(n: int):
    plt = _plt()
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return plt, fig, flat[:n]


def _title(results: dict, what: str) -> str:
    m = results["meta"]
    quick = " (quick)" if m["quick"] else ""
    run = f"{m['generator']}, {m['rounds']}x{m['duration_s']}s, {m['git_commit']}"
    return f"dbproxy — {what}{quick} — {run}"


def chart_throughput(results: dict, path: Path) -> None:
    scs = list(results["scenarios"].items())
    plt, fig, axes = _grid(max(1, len(scs)))
    for ax, (name, sc) in zip(axes, scs, strict=False):
        conns = list(sc["cells"])
        present = [t for t in TARGETS if any(t in c["targets"] for c in sc["cells"].values())]
        width = 0.8 / max(1, len(present))
        for i, t in enumerate(present):
            meds = [sc["cells"][c]["targets"].get(t, {}).get("median", {}) for c in conns]
            xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(conns))]
            vals = [d.get("rps", 0.0) for d in meds]
            err = [
                [max(0.0, v - d.get("rps_min", v)) for v, d in zip(vals, meds, strict=True)],
                [max(0.0, d.get("rps_max", v) - v) for v, d in zip(vals, meds, strict=True)],
            ]
            bars = ax.bar(xs, vals, width, label=LABELS[t], color=COLORS[t], yerr=err, capsize=2)
            ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=2, rotation=90)
        ax.set_xticks(range(len(conns)), [f"{c} conns" for c in conns])
        ax.set_title(f"{name}: req/s (median, min-max)", fontsize=9)
        ax.margins(y=0.25)
    axes[0].legend(fontsize=7)
    fig.suptitle(_title(results, "closed-loop throughput"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def chart_latency(results: dict, path: Path) -> None:
    scs = list(results["scenarios"].items())
    plt, fig, axes = _grid(max(1, len(scs)))
    keys = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))
    for ax, name in zip(axes, [n for n, _ in scs], strict=False):
        cell, conns = _cell(results, name)
        if cell is None:
            continue
        present = [t for t in TARGETS if t in cell["targets"]]
        width = 0.8 / max(1, len(present))
        for i, t in enumerate(present):
            d = cell["targets"][t]["median"]
            xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(xs, [d[k] for k, _ in keys], width, label=LABELS[t], color=COLORS[t])
        ax.set_xticks(range(len(keys)), [lbl for _, lbl in keys])
        _log_y(ax)
        ax.set_ylabel("ms", fontsize=8)
        ax.set_title(f"{name} @ {conns} conns: latency", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(_title(results, "closed-loop latency percentiles"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def chart_open_loop(results: dict, path: Path) -> None:
    ol = results["open_loop"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pcts = (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p999_ms", 99.9))
    xs = list(range(len(pcts)))
    for t in TARGETS:
        if t not in ol["targets"]:
            continue
        d = ol["targets"][t]["median"]
        ax.plot(xs, [d[k] for k, _ in pcts], marker="o", label=LABELS[t], color=COLORS[t])
    ax.set_xticks(xs, [f"p{p:g}" for _, p in pcts])
    _log_y(ax)
    ax.set_ylabel("ms (queueing counted from the intended send)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    m = results["meta"]
    ax.set_title(
        f"open loop {ol['rate']:.0f} req/s, {ol['scenario']} — {m['git_commit']}"
        + ("" if ol["generator_kept_up"] is not False else " (generator fell behind)"),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def chart_cost(results: dict, path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=[2, 1])
    names = list(results["scenarios"])
    width = 0.2
    for i, t in enumerate(TARGETS):
        xs, vals = [], []
        for j, n in enumerate(names):
            cell, _ = _cell(results, n)
            d = (cell or {}).get("targets", {}).get(t)
            if d is not None:
                xs.append(j + (i - 1.5) * width)
                vals.append(d["median"]["cpu_s_per_1k"])
        if vals:
            bars = ax1.bar(xs, vals, width, label=LABELS[t], color=COLORS[t])
            ax1.bar_label(bars, fmt="%.2f", fontsize=6, padding=2, rotation=90)
    ax1.set_xticks(range(len(names)), names, fontsize=8)
    ax1.set_title(f"CPU seconds per 1,000 requests (@ {TARGET_CONNS} conns)", fontsize=9)
    ax1.margins(y=0.2)
    ax1.legend(fontsize=7)
    procs = results.get("processes") or {}
    shown = [t for t in TARGETS if t in procs]
    xs = list(range(len(shown)))
    peak = [procs[t]["rss_peak_mb"] for t in shown]
    final = [procs[t]["rss_final_mb"] for t in shown]
    ax2.bar([x - 0.2 for x in xs], peak, 0.4, label="peak", color="#555555")
    ax2.bar([x + 0.2 for x in xs], final, 0.4, label="after the run", color="#bbbbbb")
    ax2.axhline(80, color="red", linewidth=0.8, linestyle="--", label="80 MB target")
    ax2.set_xticks(xs, [LABELS[t].split(" (")[0].replace(", ", "\n") for t in shown], fontsize=7)
    ax2.set_title("server RSS MB", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(_title(results, "cost"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_all(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latest.json", out / "latest.md"]
    _atomic_write(paths[0], json.dumps(results, indent=2).encode() + b"\n")
    _atomic_write(paths[1], markdown(results).encode())
    charts = [("latest.png", chart_throughput), ("latest-latency.png", chart_latency)]
    charts.append(("latest-cost.png", chart_cost))
    if results.get("open_loop"):
        charts.append(("latest-openloop.png", chart_open_loop))
    for name, fn in charts:
        tmp = out / f"{name}.tmp"
        fn(results, tmp)
        os.replace(tmp, out / name)
        paths.append(out / name)
    return paths
