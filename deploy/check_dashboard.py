"""Evaluate every query of the Grafana dashboard against a real Prometheus scraping a running modelserve.

    python deploy/check_dashboard.py --target 127.0.0.1:8000            # check, then stop Prometheus
    python deploy/check_dashboard.py --target 127.0.0.1:8000 --keep     # leave Prometheus up to browse

Steps: `promtool check config` and `check rules` on the project's files; start `prometheus` on
loopback with deploy/prometheus/prometheus.yml, changing only the scrape interval and the modelserve
target (the alert rules are the project's own); run a short headless load (`python -m loadtest
--scenario smoke`, skip with --no-load); then evaluate every PromQL expression of
deploy/grafana/dashboards/modelserve.json (panel targets, and the template variables'
`label_values(...)` as `count by (label) (...)`) through Prometheus's HTTP API, with `$model` and
`$adapter` set to All and `$__rate_interval` to --rate-window. Each query is `ok` (a finite value),
`nan` (series, but no finite value: e.g. an acceptance rate with no drafts) or `empty`. Also checks
that every alert rule evaluates without error. Exit 0 when no query is empty (and, with --strict,
none is nan) and every rule is healthy; --json writes the per-query results.

Needs the `prometheus` and `promtool` binaries (Debian: `apt-get install -y prometheus`) and PyYAML.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

log = logging.getLogger("check_dashboard")
ROOT = Path(__file__).resolve().parents[1]
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "modelserve.json"


@dataclass(frozen=True)
class CheckConfig:
    target: str  # host:port of the running service
    prometheus_port: int
    scrape_interval: str  # Prometheus duration, e.g. "1s": shorter than the stack's 5s so a short run has data
    rate_window: str  # what $__rate_interval becomes
    load_scenario: str | None  # None: no load (the service already has traffic)
    load_duration_s: float
    strict: bool  # nan results fail too
    keep: bool  # leave Prometheus running after the checks
    prometheus_bin: str
    promtool_bin: str


@dataclass
class QueryResult:
    panel: str
    ref: str
    expr: str  # as evaluated (variables substituted)
    status: str  # ok | nan | empty | error
    series: int
    detail: str = ""


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def query(url: str, expr: str) -> dict:
    return get_json(url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def prometheus_config(config: CheckConfig) -> dict:
    """The project's prometheus.yml with the loopback target and the shorter intervals."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = config.scrape_interval
    cfg["rule_files"] = [str(RULES)]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    service = jobs["modelserve"]
    for key in [k for k in service if k.endswith("_sd_configs")]:
        del service[key]
    service["static_configs"] = [{"targets": [config.target]}]
    if "prometheus" in jobs:
        jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{config.prometheus_port}"]}]
    return cfg


def run_checked(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    log.info("%s: ok", " ".join(Path(a).name if "/" in a else a for a in argv))


def start_prometheus(config: CheckConfig, workdir: Path) -> subprocess.Popen:
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config(config), sort_keys=False))
    run_checked([config.promtool_bin, "check", "config", str(PROM_CONFIG)])
    run_checked([config.promtool_bin, "check", "rules", str(RULES)])
    run_checked([config.promtool_bin, "check", "config", str(config_path)])
    argv = [
        config.prometheus_bin,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{config.prometheus_port}",
        "--storage.tsdb.retention.time=1d",
    ]
    process = subprocess.Popen(argv, stdout=(workdir / "prometheus.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{config.prometheus_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited {process.returncode}:\n{(workdir / 'prometheus.log').read_text()}")
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=2) as response:
                if response.status == 200:
                    log.info("prometheus ready on %s (scrape interval %s)", url, config.scrape_interval)
                    return process
        except OSError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError("prometheus not ready in 30 s")


def wait_scraped(url: str, timeout_s: float = 30) -> None:
    """Until the modelserve target has been scraped successfully at least twice (rate needs two samples)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = get_json(
            url + "/api/v1/query?" + urllib.parse.urlencode({"query": 'count_over_time(up{job="modelserve"}[1h])'})
        )
        up = get_json(url + "/api/v1/query?" + urllib.parse.urlencode({"query": 'up{job="modelserve"}'}))
        samples = [float(r["value"][1]) for r in data["data"]["result"]]
        if samples and samples[0] >= 2 and up["data"]["result"] and up["data"]["result"][0]["value"][1] == "1":
            return
        time.sleep(0.5)
    raise RuntimeError("prometheus did not scrape the service successfully (is --target right and /metrics open?)")


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str, str]]:
    """(panel title, refId, raw expression) of every panel target and template variable."""
    dashboard = json.loads(path.read_text())
    out = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", ""), target.get("refId", ""), target["expr"]))

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            out.append((f"variable ${variable['name']}", variable["name"], query))
    return out


def substitute(expr: str, rate_window: str) -> str:
    """Grafana variables -> values: `$model`/`$adapter` (and any other) to All (`.*`), `$__rate_interval`."""
    expr = expr.replace("$__rate_interval", rate_window).replace("${__rate_interval}", rate_window)
    expr = re.sub(r"\$\{?(\w+)\}?", ".*", expr)
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", expr, flags=re.S)
    if match:  # Grafana's label_values(metric, label): the label's values, i.e. the series of count by (label)
        return f"count by ({match.group(2)}) ({match.group(1)})"
    return expr


def evaluate(url: str, panel: str, ref: str, expr: str) -> QueryResult:
    try:
        data = query(url, expr)
    except OSError as exc:  # a 400 (bad PromQL) arrives here with Prometheus's message in the body
        body = exc.read().decode() if hasattr(exc, "read") else str(exc)
        return QueryResult(panel, ref, expr, "error", 0, body[:300])
    result = data["data"]["result"]
    values = [float(r["value"][1]) for r in result]
    finite = [v for v in values if math.isfinite(v)]
    status = "ok" if finite else ("nan" if result else "empty")
    return QueryResult(panel, ref, expr, status, len(result), f"values {sorted(finite)[:3]}..." if finite else "")


def check_rules(url: str) -> list[str]:
    """Problems with the loaded alert rules (empty when every rule evaluated without error)."""
    groups = get_json(url + "/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    problems = [
        f"rule {r['name']}: health {r['health']} {r.get('lastError', '')}" for r in rules if r["health"] != "ok"
    ]
    if not rules:
        problems.append("no alert rules loaded")
    return problems


def run_load(config: CheckConfig, workdir: Path) -> None:
    argv = [sys.executable, "-m", "loadtest", "--scenario", config.load_scenario, "--host", f"http://{config.target}"]
    argv += ["--duration", str(config.load_duration_s), "--out", str(workdir / "loadtest")]
    log.info("load: %s", " ".join(argv[1:]))
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=config.load_duration_s + 180)
    if result.returncode != 0:
        raise RuntimeError(
            f"load run failed (exit {result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )


def check(config: CheckConfig, workdir: Path) -> tuple[list[QueryResult], list[str]]:
    url = f"http://127.0.0.1:{config.prometheus_port}"
    prometheus = start_prometheus(config, workdir)
    try:
        wait_scraped(url)
        if config.load_scenario:
            run_load(config, workdir)
        time.sleep(3 * float(config.scrape_interval.rstrip("s")) + 1)  # the last scrape follows the load's end
        results = [evaluate(url, p, r, substitute(e, config.rate_window)) for p, r, e in dashboard_queries()]
        problems = check_rules(url)
        log_results(results, problems, config.strict)
        if config.keep:
            log.info("prometheus stays up on %s (graph UI: %s/graph); Ctrl-C stops it", url, url)
            try:
                prometheus.wait()
            except KeyboardInterrupt:
                pass
        return results, problems
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(10)
        except subprocess.TimeoutExpired:
            prometheus.kill()


def log_results(results: list[QueryResult], problems: list[str], strict: bool) -> bool:
    """Log one line per query and every failure; True when the check passed."""
    for r in results:
        log.info("%-5s %3d series  %-45.45s %s", r.status, r.series, f"{r.panel} [{r.ref}]", r.detail or r.expr[:90])
    bad = [r for r in results if r.status in ("empty", "error") or (strict and r.status == "nan")]
    for r in bad:
        log.error("%s: %s [%s]: %s %s", r.status, r.panel, r.ref, r.expr, r.detail)
    for problem in problems:
        log.error("%s", problem)
    log.info("%d queries: %d ok, %d nan, %d empty/error; %d rule problems", len(results),
             sum(r.status == "ok" for r in results), sum(r.status == "nan" for r in results),
             sum(r.status in ("empty", "error") for r in results), len(problems))  # fmt: skip
    return not bad and not problems


def parse_args(argv: list[str] | None) -> tuple[CheckConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:8000", help="host:port of the running modelserve")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--scrape-interval", default="1s", help="seconds, e.g. 1s (the stack uses 5s)")
    parser.add_argument("--rate-window", default="1m", help="the value of $__rate_interval")
    parser.add_argument("--load-scenario", default="smoke", help="loadtest scenario run before the queries")
    parser.add_argument("--load-duration", type=float, default=20.0)
    parser.add_argument("--no-load", action="store_true", help="skip the load run")
    parser.add_argument("--strict", action="store_true", help="a query with only NaN values fails too")
    parser.add_argument("--keep", action="store_true", help="leave Prometheus running to browse the queries")
    parser.add_argument("--json", type=Path, help="write the per-query results here")
    parser.add_argument("--prometheus-bin", default="prometheus")
    parser.add_argument("--promtool-bin", default="promtool")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d+(\.\d+)?s", args.scrape_interval):
        parser.error("--scrape-interval must be in seconds, e.g. 1s")
    for tool in (args.prometheus_bin, args.promtool_bin):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (Debian: apt-get install -y prometheus)")
    config = CheckConfig(
        args.target, args.prometheus_port, args.scrape_interval, args.rate_window,
        None if args.no_load else args.load_scenario, args.load_duration, args.strict, args.keep,
        args.prometheus_bin, args.promtool_bin,
    )  # fmt: skip
    return config, args.json


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    config, json_path = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="modelserve-prom-") as tmp:
        results, problems = check(config, Path(tmp))
    if json_path is not None:
        json_path.write_text(json.dumps({"queries": [asdict(r) for r in results], "rule_problems": problems}, indent=2))
    bad = [r for r in results if r.status in ("empty", "error") or (config.strict and r.status == "nan")]
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())
