"""deploy/k8s checked offline: every manifest (the base, the GPU overlay applied as kustomize's strategic merge
would, the Prometheus adapter ConfigMap) against the Kubernetes OpenAPI schemas bundled by `kubernetes-validate`
(strict: unknown fields are errors), and the invariants between them: probes on /ready and /health, a preStop
hook, a grace period longer than preStop + the drain timeout, the HPA's metric produced by the adapter rule.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization renders: its resources (recursively), then its patches merged in."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += kustomize(path) if path.is_dir() else load_all(path)
    for patch_entry in kustomization.get("patches", []):
        for patch in load_all(directory / patch_entry["path"]):
            targets = [
                r
                for r in resources
                if r["kind"] == patch["kind"] and r["metadata"]["name"] == patch["metadata"]["name"]
            ]
            assert len(targets) == 1, f"patch {patch_entry['path']} matches {len(targets)} resources"
            strategic_merge(targets[0], patch)
    return resources


def strategic_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Kubernetes' strategic merge for what these patches use: maps merge, lists of named items merge by name."""
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            strategic_merge(current, value)
        elif isinstance(value, list) and isinstance(current, list) and all("name" in v for v in value + current):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    strategic_merge(by_name[item["name"]], item)
                else:
                    current.append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


BASE = kustomize(K8S / "base")
GPU = kustomize(K8S / "overlays" / "gpu")
ADAPTER = load_all(K8S / "prometheus-adapter.yaml")


@pytest.mark.parametrize(
    "resource",
    [pytest.param(r, id=f"{variant}-{r['kind']}") for variant, rs in (("base", BASE), ("gpu", GPU)) for r in rs]
    + [pytest.param(r, id=f"adapter-{r['kind']}") for r in ADAPTER],
)
def test_manifest_matches_kubernetes_schema(resource):
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_validator_rejects_a_broken_manifest():
    """The check above can fail: an unknown field and a wrong type are both caught."""
    broken = copy.deepcopy(by_kind(BASE, "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(by_kind(BASE, "Deployment"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    (main,) = [c for c in by_kind(resources, "Deployment")["spec"]["template"]["spec"]["containers"]]
    return main


@pytest.mark.parametrize("resources", [BASE, GPU], ids=["base", "gpu"])
def test_probes_and_graceful_drain(resources):
    deployment = by_kind(resources, "Deployment")
    main = container(resources)
    assert main["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    settings = by_kind(resources, "ConfigMap")["data"]
    assert main["envFrom"][0]["configMapRef"]["name"] == by_kind(resources, "ConfigMap")["metadata"]["name"]
    drain = float(settings["MODELSERVE_DRAIN_TIMEOUT_S"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + drain, "SIGKILL would cut the drain short"
    # The probes and the Service use the port the server listens on.
    port = int(settings["MODELSERVE_PORT"])
    assert main["ports"][0]["containerPort"] == port
    assert by_kind(resources, "Service")["spec"]["ports"][0]["targetPort"] == main["ports"][0]["name"]
    # The artifacts volume is the PVC, filled by the init container on the same mount path.
    spec = deployment["spec"]["template"]["spec"]
    claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == by_kind(resources, "PersistentVolumeClaim")["metadata"]["name"]
    assert spec["initContainers"][0]["volumeMounts"][0]["mountPath"] == settings["MODELSERVE_ARTIFACTS_DIR"]


def test_gpu_overlay_requests_a_gpu_and_keeps_the_base():
    main = container(GPU)
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert main["image"].endswith(":gpu")
    assert by_kind(GPU, "ConfigMap")["data"]["MODELSERVE_DEVICE"] == "cuda"
    assert main["readinessProbe"] == container(BASE)["readinessProbe"]  # the patch merged, not replaced
    assert "nvidia.com/gpu" not in str(container(BASE)["resources"])


def test_hpa_metric_is_served_by_the_prometheus_adapter():
    hpa = by_kind(BASE, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind(BASE, "Deployment")["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rules = yaml.safe_load(by_kind(ADAPTER, "ConfigMap")["data"]["config.yaml"])["rules"]
    served = {}
    for rule in rules:
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        served[re.sub(rule["name"]["matches"], rule["name"]["as"], series)] = series
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert metric["pods"]["metric"]["name"] in served
    # The source series is one the service exports.
    metrics_source = (K8S.parents[1] / "service" / "api" / "metrics.py").read_text()
    source = served[metric["pods"]["metric"]["name"]].removeprefix("modelserve_")
    assert f'PREFIX + "{source}"' in metrics_source
