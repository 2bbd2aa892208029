"""deploy/prometheus/alerts.yml: `promtool test rules` on alerts_test.yml (every alert fires where it should and
one outage pages once), every alert covered by a firing test case, and every `runbook_url` an anchor of the
README's Runbooks section. Installs Debian's `prometheus` (promtool) when missing, as test_stack.py does.
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


def test_every_alert_has_severity_and_a_readme_runbook():
    readme = (ROOT / "README.md").read_text()
    anchors = set(re.findall(r'<a id="(runbook-[\w-]+)"></a>', readme))
    assert "## Runbooks" in readme
    for rule in RULES:
        assert rule["labels"]["severity"] in ("page", "warn"), rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url.split("#")[0].endswith("/README.md"), url
        assert url.split("#")[1] == f"runbook-{rule['alert'].lower()}" and url.split("#")[1] in anchors, url
        assert f"### {rule['alert']} ({rule['labels']['severity']})" in readme, rule["alert"]


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
