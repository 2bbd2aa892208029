"""deploy/grafana/dashboards/modelserve.json checked statically (test_stack.py evaluates every query against a
real Prometheus): the data source is a variable (no hard-coded uid), every modelserve_* selector is filtered by
the `instance` and `replica` variables, every latency panel has a unit and thresholds, and rate()/increase()
only ever read counters (`_total`, or a histogram's `_bucket`/`_sum`/`_count`)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "modelserve.json").read_text())
sys.path.insert(0, str(ROOT / "deploy"))
import check_dashboard  # noqa: E402


def panels(items: list[dict]) -> list[dict]:
    return [p for item in items for p in (item, *panels(item.get("panels", [])))]


PANELS = panels(DASHBOARD["panels"])
VARIABLES = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
EXPRS = [expr for _, _, expr in check_dashboard.dashboard_queries()]


def datasources(node) -> list:
    if isinstance(node, dict):
        found = [node["datasource"]] if "datasource" in node else []
        return found + [d for value in node.values() for d in datasources(value)]
    if isinstance(node, list):
        return [d for value in node for d in datasources(value)]
    return []


def test_datasource_is_a_variable():
    assert VARIABLES["datasource"]["type"] == "datasource" and VARIABLES["datasource"]["query"] == "prometheus"
    refs = datasources(DASHBOARD)
    assert len(refs) > 30
    assert all(ref == {"type": "prometheus", "uid": "${datasource}"} for ref in refs), refs


def test_instance_and_replica_variables_filter_every_query():
    for name in ("instance", "replica", "model", "adapter"):
        assert VARIABLES[name]["includeAll"] and VARIABLES[name]["allValue"] == ".*", name
    chained = {VARIABLES["instance"]["definition"], VARIABLES["replica"]["definition"]}  # they filter each other
    for expr in set(EXPRS) - chained:
        for selector in re.findall(r"modelserve_\w+(\{[^}]*\})?", expr):
            assert 'instance=~"$instance"' in selector and 'replica=~"$replica"' in selector, expr


def test_latency_panels_have_units_and_thresholds():
    latency = [p for p in PANELS if any("_seconds" in t.get("expr", "") for t in p.get("targets", []))]
    assert len(latency) >= 9
    for panel in latency:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] == "s", panel["title"]
        steps = defaults["thresholds"]["steps"]
        assert steps[0]["value"] is None and len(steps) >= 2, panel["title"]
        assert [s["value"] for s in steps[1:]] == sorted(s["value"] for s in steps[1:]), panel["title"]
        assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", panel["title"]


def test_rates_only_over_counters():
    calls = [m for expr in EXPRS for m in re.finditer(r"\b(rate|irate|increase)\((\w+)", expr)]
    assert len(calls) > 30
    for call in calls:
        assert re.search(r"(_total|_bucket|_sum|_count)$", call.group(2)), call.group(0)


def test_the_check_substitutes_every_variable():
    for expr in EXPRS:
        evaluated = check_dashboard.substitute(expr, "1m")
        assert "$" not in evaluated, evaluated
