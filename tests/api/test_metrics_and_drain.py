"""/metrics: every DESIGN.md metric present with HELP, counts consistent with the requests made; SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import metric_sum, start_server

DESIGN_METRICS = {
    "time_to_first_token_seconds": "histogram",
    "inter_token_latency_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram",
    "prompt_tokens": "counter",
    "generation_tokens": "counter",
    "requests": "counter",
    "num_requests_running": "gauge",
    "num_requests_waiting": "gauge",
    "kv_cache_usage_ratio": "gauge",
    "batch_size": "histogram",
    "lora_adapters_resident": "gauge",
    "lora_adapter_loads": "counter",
    "lora_adapter_evictions": "counter",
    "lora_adapter_load_seconds": "histogram",
    "moe_expert_tokens": "counter",
    "spec_decode_draft_tokens": "counter",
    "spec_decode_accepted_tokens": "counter",
}


def test_every_design_metric_is_present_with_help(server):
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in DESIGN_METRICS.items():
        family = families.get(f"modelserve_{name}")
        assert family is not None, name
        assert family.type == kind and len(family.documentation) > 30, name
    assert "first token is not included" in families["modelserve_inter_token_latency_seconds"].documentation


def test_counts_follow_the_requests(server):
    before = server.metrics()
    body = {"prompt": "hello world", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    with server.client() as client:
        for model in ("tiny", "a1", "moe"):
            assert client.post("/v1/completions", json={**body, "model": model}).status_code == 200
        assert client.post("/v1/completions", json={**body, "model": "nope"}).status_code == 404
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("modelserve_requests_total", outcome="length") == 3
    assert delta("modelserve_requests_total", model="tiny", adapter="a1", outcome="length") == 1
    assert delta("modelserve_requests_total", model="moe", adapter="none") == 1
    assert delta("modelserve_generation_tokens_total") == 15
    assert delta("modelserve_prompt_tokens_total", model="tiny") == 2 * delta(
        "modelserve_prompt_tokens_total", model="moe"
    )
    assert delta("modelserve_e2e_request_latency_seconds_count") == 3
    assert delta("modelserve_time_to_first_token_seconds_count") == 3
    assert delta("modelserve_inter_token_latency_seconds_count") == 3 * 4  # 5 tokens: 4 gaps, first excluded
    assert delta("modelserve_request_queue_time_seconds_count") == 3
    assert delta("modelserve_moe_expert_tokens_total", model="moe") > 0
    assert delta("modelserve_batch_size_count", model="moe") >= 5
    assert metric_sum(after, "modelserve_lora_adapters_resident", model="tiny") == 2
    assert metric_sum(after, "modelserve_lora_adapter_loads_total", model="tiny", result="loaded") >= 2
    assert metric_sum(after, "modelserve_lora_adapter_load_seconds_count", model="tiny") >= 2
    assert metric_sum(after, "modelserve_num_requests_running") == 0


async def stream_all(url: str, n: int, started: asyncio.Event) -> list[str]:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 250, "temperature": 0, "ignore_eos": True, "stream": True}
    first_chunks = 0
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n + 4)) as client:

        async def one() -> str:
            nonlocal first_chunks
            finish = None
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                seen = False
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and not seen:
                        seen = True
                        first_chunks += 1
                        if first_chunks == n:
                            started.set()
                    if '"finish_reason":"' in line:
                        finish = line.split('"finish_reason":"')[1].split('"')[0]
            return finish

        return await asyncio.gather(*(one() for _ in range(n)))


def test_sigterm_drains_running_requests_then_exits_0(zoo, tmp_path):
    server = start_server(zoo, tmp_path, adapters=(), max_batch_size=16, drain_timeout_s=30)

    async def scenario():
        started = asyncio.Event()
        streams = asyncio.ensure_future(stream_all(server.url, 10, started))
        await asyncio.wait_for(started.wait(), 30)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            ready = await client.get("/ready")
            late = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        return await streams, ready, late

    try:
        finishes, ready, late = asyncio.run(scenario())
        assert finishes == ["length"] * 10
        assert ready.status_code == 503 and late.status_code == 503
        assert late.json()["error"]["type"] == "service_unavailable"
        assert server.process.wait(30) == 0
    finally:
        server.stop()
