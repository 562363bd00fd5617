"""The Grafana dashboard only queries metrics the sidecar really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dbproxy-dashboard.json"


def exported_samples() -> set[str]:
    m = Metrics()
    m.observe("get", "users", 200, 0.001, None)
    m.observe("get", "users", 404, 0.001, "not_found")
    m.sources["connections"] = lambda: {
        "main": {
            "endpoints": [
                {
                    "name": "primary",
                    "pool": {"size": 1},
                    "lag_seconds": 0.0,
                    "breaker": {"state": "closed", "trips": 0},
                }
            ]
        }
    }
    m.sources["cache"] = lambda: {"near:hit": 1, "near:miss": 1}
    text = generate_latest(m.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_queries_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"dbproxy_[a-z_]+", e)}
    assert used, "the dashboard queries nothing"
    missing = used - exported_samples()
    assert missing == set(), missing
