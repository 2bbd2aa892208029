"""deploy/prometheus/alerts.yml: `promtool test rules` on alerts_test.yml (every alert fires where it should and
one outage pages once), every alert covered by a firing test case, and every `runbook_url` the path of a runbook
file in docs/runbooks/ that names only real metrics and settings. Installs Debian's `prometheus` (promtool) when
missing, as test_stack.py does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.deploy.test_stack import ensure_debian_package

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RUNBOOKS = ROOT / "docs" / "runbooks"
RULES = [rule for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for rule in group["rules"]]
TESTS = yaml.safe_load((PROM / "alerts_test.yml").read_text())


def promtool() -> str:
    return ensure_debian_package("promtool", "prometheus")


def test_promtool_unit_tests_pass():
    result = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_the_unit_tests_can_fail(tmp_path):
    """Without its `unless`, the error-rate alert pages during an outage already paged: the tests catch it."""
    rules = (PROM / "alerts.yml").read_text()
    broken = re.sub(r"\n\s*unless on \(\) \(.*?\n\s*\)\n", "\n", rules, count=1, flags=re.S)
    assert broken != rules
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "alertname: ModelserveHighErrorRate" in output, output


def test_every_alert_has_a_firing_test_case():
    firing = {
        case["alertname"]
        for test in TESTS["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {case["alertname"] for test in TESTS["tests"] for case in test.get("alert_rule_test", [])}
    names = {rule["alert"] for rule in RULES}
    assert names <= firing, f"alerts never tested firing: {sorted(names - firing)}"
    assert names <= quiet


def test_every_alert_has_severity_and_a_runbook_file():
    """`runbook_url` is `docs/runbooks/<AlertName>.md` from the repository root (a base URL completes it), the
    file exists with the alert's name and severity as its title, and the README and the runbooks' index link it."""
    readme = (ROOT / "README.md").read_text()
    index = (RUNBOOKS / "README.md").read_text()
    assert "## Runbooks" in readme
    for rule in RULES:
        name, severity = rule["alert"], rule["labels"]["severity"]
        assert severity in ("page", "warn"), name
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/runbooks/{name}.md", url
        assert (ROOT / url).is_file(), f"{url} is missing"
        assert (ROOT / url).read_text().startswith(f"# {name} ({severity})\n"), url
        assert f"]({url})" in readme and f"[{name}]({name}.md) | {severity} |" in index, name
    files = {path.stem for path in RUNBOOKS.glob("*.md")} - {"README"}
    assert files == {rule["alert"] for rule in RULES}, "a runbook without its alert, or the reverse"


def test_runbooks_name_only_real_metrics_and_settings():
    """Every `modelserve_*` metric a runbook names is exported, and every `snake_case` name in backticks is a
    setting (or a metric, or a request field), so a renamed metric or setting cannot leave a runbook stale."""
    from service.api.metrics import Metrics
    from service.settings import Settings

    exported = set(re.findall(r"^# TYPE (\S+)", Metrics().render().decode(), re.M))
    exported.add("modelserve_queue_depth")  # the HPA's custom metric (deploy/k8s/prometheus-adapter.yaml)
    other_names = {"max_tokens", "runbook_url"}  # a request field; the annotation
    for path in sorted(RUNBOOKS.glob("*.md")):
        text = path.read_text()
        for metric in re.findall(r"\b(modelserve_[a-z0-9_]+)", text):
            assert metric in exported, f"{path.name}: {metric} is not a metric"
        for name in re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", text):
            if not name.startswith("modelserve_"):
                assert name in Settings.model_fields or name in other_names, f"{path.name}: {name} is not a setting"


def test_selectors_match_the_scrape_setups():
    """`up` is selected by the job every setup gives modelserve, or the pod label Kubernetes scrapes carry."""
    for path in (PROM / "prometheus.yml", ROOT / "deploy" / "ray" / "prometheus.yml"):
        jobs = [job["job_name"] for job in yaml.safe_load(path.read_text())["scrape_configs"]]
        assert "modelserve" in jobs, path
    monitor = yaml.safe_load((ROOT / "deploy" / "k8s" / "servicemonitor.yaml").read_text())
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert "app.kubernetes.io/name" in monitor["spec"]["podTargetLabels"]
    for rule in RULES:
        for selector in re.findall(r"\bup\{([^}]*)\}", rule["expr"]):
            assert selector in ('job="modelserve"', 'app_kubernetes_io_name="modelserve"'), (rule["alert"], selector)
