"""/metrics beyond the engine: process and platform collectors, build info, refused-as-invalid requests by
code, latency buckets up to request_timeout_s, the adapter load histogram; the JSON request log; `modelserve loadtest
--api-key` against a secured server."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.api.metrics import LATENCY_BUCKETS, Metrics, request_buckets
from tests.api.conftest import ROOT, USER_KEY, metric_sum, start_server


def families(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}


def test_process_platform_and_build_info(server):
    found = families(server.url)
    assert "process_resident_memory_bytes" in found and "process_cpu_seconds" in found
    assert "python_info" in found
    (sample,) = found["modelserve_build_info"].samples
    assert sample.value == 1 and sample.labels["version"]
    assert found["modelserve_model_info"].samples


def test_refused_requests_are_counted_by_code(server):
    before = server.metrics()
    body = {"prompt": "hi", "max_tokens": 2}
    with server.client() as client:
        assert client.post("/v1/completions", json={**body, "model": "nope"}).status_code == 404
        assert client.post("/v1/completions", json={**body, "model": "tiny", "max_tokens": -1}).status_code == 400
        too_big = {**body, "model": "tiny", "prompt": "x" * (9 * 1024**2)}
        assert client.post("/v1/completions", json=too_big).status_code == 413
    after = server.metrics()
    for code in ("404", "400", "413"):
        name = "modelserve_requests_refused_total"
        assert metric_sum(after, name, code=code) - metric_sum(before, name, code=code) == 1, code


def test_latency_buckets_reach_the_request_timeout(server):
    found = families(server.url)
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        bounds = {s.labels["le"] for s in found[f"modelserve_{name}"].samples if s.name.endswith("_bucket")}
        assert {"60.0", "300.0", "600.0", "+Inf"} <= bounds, name
    assert found["modelserve_lora_adapter_load_seconds"].type == "histogram"
    assert request_buckets(600)[-3:] == (120.0, 300.0, 600.0)
    assert request_buckets(900)[-2:] == (600.0, 900.0)
    assert request_buckets(5) == LATENCY_BUCKETS


def test_adapter_load_histogram_observes_each_load(zoo):
    from adapters.registry import AdapterRegistry
    from models import load_model

    registry = AdapterRegistry("tiny", load_model(zoo["tiny"]))
    registry.load("a1", zoo["a1"])  # before the exporter knows the registry: observed when it is added
    metrics = Metrics()
    metrics.add_model("m", registry)
    registry.load("a2", zoo["a2"])
    count = metrics.registry.get_sample_value("modelserve_lora_adapter_load_seconds_count", {"model": "m"})
    total = metrics.registry.get_sample_value("modelserve_lora_adapter_load_seconds_sum", {"model": "m"})
    assert count == 2 and total == sum(info.load_seconds for info in registry.resident.values())


def test_request_log_json_one_line_per_request(zoo, tmp_path):
    srv = start_server(zoo, tmp_path, adapters=("a1",), request_log_json=True)
    try:
        with srv.client() as client:
            body = {"prompt": "hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
            assert client.post("/v1/completions", json={**body, "model": "a1"}).status_code == 200
            assert client.post("/v1/completions", json={**body, "model": "moe"}).status_code == 200
    finally:
        srv.stop()
    lines = [json.loads(line) for line in srv.log.read_text().splitlines() if line.startswith('{"event":"request"')]
    assert len(lines) == 2, srv.log.read_text()
    first, second = lines
    assert first["model"] == "tiny" and first["adapter"] == "a1" and second["adapter"] is None
    for line in lines:
        assert line["request_id"] and line["outcome"] == "length" and line["completion_tokens"] == 3
        assert line["prompt_tokens"] > 0 and 0 < line["ttft_s"] <= line["e2e_s"]


def run_loadtest(srv, out, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "modelserve", "loadtest", "--scenario", "smoke", "--host", srv.url]
    argv += ["--duration", "3", "--rate", "4", "--ready-timeout", "5", "--out", str(out), *extra]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_modelserve_loadtest_against_a_secured_server(auth_server, tmp_path):
    """`modelserve loadtest --api-key` passes (Bearer on every request); without the key every request is a 401."""
    result = run_loadtest(auth_server, tmp_path / "ok", "--api-key", USER_KEY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stats = (tmp_path / "ok" / "locust_stats.csv").read_text()
    assert "/v1/completions" in stats or "/v1/chat/completions" in stats
    assert USER_KEY not in result.stdout + result.stderr
    assert USER_KEY not in (tmp_path / "ok" / "run.json").read_text()
    assert '"--api-key", "***"' not in (tmp_path / "ok" / "run.json").read_text()  # shlex-joined text, not a list
    assert "--api-key '***'" in (tmp_path / "ok" / "run.json").read_text()
    refused = run_loadtest(auth_server, tmp_path / "no-key")
    assert refused.returncode == 1, refused.stdout[-2000:]
    assert "401" in (tmp_path / "no-key" / "locust_failures.csv").read_text()
