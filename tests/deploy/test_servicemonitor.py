"""deploy/k8s/servicemonitor.yaml checked offline against the Prometheus Operator's ServiceMonitor CRD schema
(the subset of `monitoring.coreos.com/v1` fields it uses, copied from the operator's CRD
monitoring.coreos.com_servicemonitors.yaml, v0.84), and against the base it scrapes: the Service it selects,
the port it names. Kept apart from test_k8s.py's strict core-schema check: the CRD is not core Kubernetes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
MONITOR = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
SERVICE = yaml.safe_load((K8S / "base" / "service.yaml").read_text())
DEPLOYMENT = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())

# The operator's duration pattern (interval, scrapeTimeout).
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRINGS = {"type": "array", "items": {"type": "string"}}
ENDPOINT = {
    "type": "object",
    "additionalProperties": False,  # the CRD has more fields; these are the ones this file may use
    "properties": {
        "port": {"type": "string"},
        "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
    },
}
SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["endpoints", "selector"],  # the CRD's own required list
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": STRINGS,
                "targetLabels": STRINGS,
                "endpoints": {"type": "array", "items": ENDPOINT},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": STRINGS},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
            },
        },
    },
}


def test_servicemonitor_matches_the_crd_schema():
    jsonschema.validate(MONITOR, SCHEMA)


@pytest.mark.parametrize(
    "path, value",
    [(("spec", "endpoints", 0, "interval"), "15 seconds"), (("spec", "endpoints", 0, "scheme"), "tcp"),
     (("spec", "endpointz"), []), (("spec", "selector"), None)],
)  # fmt: skip
def test_the_schema_rejects_a_broken_monitor(path, value):
    broken = copy.deepcopy(MONITOR)
    node = broken
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_servicemonitor_scrapes_the_base_service():
    spec = MONITOR["spec"]
    assert spec["selector"]["matchLabels"].items() <= SERVICE["metadata"]["labels"].items()
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {port["name"] for port in SERVICE["spec"]["ports"]}
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    assert endpoint["path"] == annotations["prometheus.io/path"]
    # job = the Service's label named by jobLabel: the `job="modelserve"` of the alert rules.
    assert SERVICE["metadata"]["labels"][spec["jobLabel"]] == "modelserve"
    pod_labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert all(label in pod_labels for label in spec["podTargetLabels"])


def test_servicemonitor_is_not_in_the_kustomize_base():
    for directory in (K8S / "base", K8S / "overlays" / "gpu"):
        assert "servicemonitor" not in (directory / "kustomization.yaml").read_text().lower()
