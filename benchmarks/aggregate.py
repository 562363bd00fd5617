"""The aggregation scenarios' own parts (issue 16): what they seed, their answer checks, the
peak-RSS window of agg_memory and its target row; the rest goes through the common harness."""

from __future__ import annotations

from typing import Any

import orjson

from benchmarks import procstat, workload
from benchmarks.servers import Target, http

# scenario -> the collection pgsetup.seed fills for it
SEEDED = {
    "agg_group": "bench_agg",
    "agg_group_schema": "bench_agg_s",
    "agg_memory": "bench_agg_big",
}
MEMORY_SCENARIO = "agg_memory"
MEMORY_LIMIT_MB = 80.0
PREFLIGHT_TIMEOUT_S = 60.0  # one aggregation over 1,000,000 documents, alone


def seeded_collections(scenarios: list[str]) -> tuple[str, ...]:
    return tuple(SEEDED[s] for s in scenarios if s in SEEDED)


def _aggregate(t: Target, collection: str, body: str, headers: tuple[str, ...]) -> Any:
    """The items of one aggregate request, or the problem as a string."""
    url = f"{t.url}/api/db/{collection}/aggregate"
    st, got = http("POST", url, body.encode(), headers, timeout=PREFLIGHT_TIMEOUT_S)
    if st != 200:
        return f"{t.name}: POST {url} -> {st} {got[:300]!r}"
    try:
        items = orjson.loads(got).get("items")
    except (orjson.JSONDecodeError, AttributeError):
        return f"{t.name}: POST {url} answered {got[:300]!r}"
    return items


def _as_want(items: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {str(it["_id"]): {k: v for k, v in it.items() if k != "_id"} for it in items}


def _check_group(
    targets: list[Target], collection: str, n_docs: int, headers: tuple[str, ...]
) -> list[str]:
    """Every target's $group answer against the truth (computed from workload.agg_doc), and
    the sidecar's against the baseline's: the same groups, numbers within 1e-9 relative."""
    truth = workload.agg_group_answer(n_docs)
    problems, answers = [], {}
    for t in targets:
        items = _aggregate(t, collection, workload.AGG_GROUP_BODY, headers)
        if isinstance(items, str):
            problems.append(items)
            continue
        wrong = workload.agg_group_problems(items, truth)
        problems += [f"{t.name}: {collection} $group: {w}" for w in wrong[:5]]
        if not wrong:
            answers[t.name] = items
    base = answers.get("baseline")
    for name, items in answers.items():
        if base is not None and name != "baseline":
            wrong = workload.agg_group_problems(items, _as_want(base))
            problems += [f"{name} vs baseline: {collection} $group: {w}" for w in wrong[:5]]
    return problems


def _check_top(
    targets: list[Target], collection: str, n_docs: int, headers: tuple[str, ...]
) -> list[str]:
    """The $sort + $limit answer: the same documents in the same order (ties in _id order)."""
    want = workload.agg_top_answer(n_docs)
    problems = []
    for t in targets:
        items = _aggregate(t, collection, workload.AGG_TOP_BODY, headers)
        if isinstance(items, str):
            problems.append(items)
            continue
        ids = [it.get("_id") if isinstance(it, dict) else it for it in items]
        if ids != want:
            at = next((i for i, (g, w) in enumerate(zip(ids, want, strict=False)) if g != w), None)
            problems.append(
                f"{t.name}: {collection} $sort+$limit: {len(ids)} documents, first "
                f"difference at {at if at is not None else min(len(ids), len(want))}"
            )
    return problems


def preflight(targets: list[Target], scenarios: list[str], headers: tuple[str, ...]) -> list[str]:
    """The answer checks of the aggregation scenarios on every HTTP server."""
    servers = [t for t in targets if t.kind == "http"]
    problems = []
    for name in ("agg_group", "agg_group_schema"):
        if name in scenarios:
            problems += _check_group(servers, SEEDED[name], workload.AGG_DOCS, headers)
    if MEMORY_SCENARIO in scenarios:
        big = SEEDED[MEMORY_SCENARIO]
        problems += _check_group(servers, big, workload.AGG_BIG_DOCS, headers)
        problems += _check_top(servers, big, workload.AGG_BIG_DOCS, headers)
    return problems


# ---------------------------------------------------------------- agg_memory's peak RSS


def start_memory_window(rss: procstat.RssSampler) -> bool:
    """Before agg_memory's first round: peaks from now on (sampled, and the kernel's)."""
    return rss.start_window()


def memory_window(rss: procstat.RssSampler, hwm_reset: bool) -> dict[str, Any]:
    """After agg_memory's last round: per server, the sampled peak RSS during the scenario
    (every 0.5 s and after each round) and the kernel's peak (sum of VmHWM over the tree:
    exact for one process) since the window started, or over its life when it could not be
    reset."""
    out: dict[str, Any] = {"hwm_since": "scenario start" if hwm_reset else "process start"}
    for name in list(rss.roots):
        sampled = rss.sample(name)
        sampled = max(sampled, rss.window.get(name, 0.0))
        out[name] = {"sampled_peak_mb": round(sampled, 1), "hwm_mb": round(rss.hwm(name), 1)}
    return out


def memory_target(results: dict[str, Any]) -> dict[str, Any]:
    """The target row: the sidecar's peak RSS during agg_memory <= 80 MB."""
    row = {
        "name": f"sidecar peak RSS during {MEMORY_SCENARIO} "
        f"({workload.AGG_BIG_DOCS:,} documents aggregated)",
        "threshold": f"<= {MEMORY_LIMIT_MB:.0f} MB",
    }
    sc = results["scenarios"].get(MEMORY_SCENARIO)
    peaks = (sc or {}).get("rss_peak", {})
    p = peaks.get("sidecar")
    if p is None:
        return {**row, "measured": f"not measured ({MEMORY_SCENARIO} not run)", "met": "n/a"}
    peak = max(p["sampled_peak_mb"], p["hwm_mb"])
    since = peaks.get("hwm_since", "?")
    return {
        **row,
        "measured": f"{peak:.1f} MB (sampled {p['sampled_peak_mb']:.1f}, "
        f"VmHWM since {since} {p['hwm_mb']:.1f})",
        "met": "yes" if peak <= MEMORY_LIMIT_MB else "no",
        "value": round(peak, 1),
    }


def cpu_lines(results: dict[str, Any]) -> list[str]:
    """Where an aggregation's time goes: PostgreSQL's CPU per request (all ``postgres``
    processes) next to the server's own, per target, for the report under the table."""
    out = []
    for name in SEEDED:
        for conns, cell in (results["scenarios"].get(name) or {}).get("cells", {}).items():
            parts = [
                f"{t} {d['median']['db_cpu_us_per_req'] / 1e3:.1f} ms database + "
                f"{d['median']['cpu_us_per_req'] / 1e3:.2f} ms own"
                for t, d in cell["targets"].items()
            ]
            out.append(f"- {name} @ {conns}, CPU per request: {'; '.join(parts)}")
    if out:
        out.insert(0, "Aggregations, CPU per request (medians; direct: the client's own):")
        out.insert(1, "")
    return out
