"""Concurrency over HTTP: mixed adapters equal each alone, overload gives 429s (never 5xx), disconnects abort."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.api.conftest import metric_sum


def completion(model: str, prompt: str, max_tokens: int = 12, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


def test_mixed_adapters_concurrently_equal_each_alone(server):
    plan = [(m, p) for m in ("tiny", "a1", "a2", "moe") for p in ("hello world", "the lazy dog", "def f(x)")]
    bodies = [completion(m, p) for m, p in plan]
    with server.client() as client:
        alone = [client.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    together = asyncio.run(post_all(server.url, bodies))
    assert [r.status_code for r in together] == [200] * len(bodies)
    assert [r.json()["choices"][0]["text"] for r in together] == alone


def test_overload_gets_429_with_retry_after_and_no_5xx(server):
    before = server.metrics()
    bodies = [completion("tiny", "hello world", max_tokens=24) for _ in range(64)]  # capacity is 24 + 8
    responses = asyncio.run(post_all(server.url, bodies))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 64 - 32 and codes.count(200) >= 1
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
    after = server.metrics()
    rejected = metric_sum(after, "modelserve_requests_total", outcome="rejected", model="tiny")
    assert rejected - metric_sum(before, "modelserve_requests_total", outcome="rejected", model="tiny") == codes.count(
        429
    )


async def open_and_drop_streams(url: str, n: int) -> None:
    body = completion("tiny", "hello world", max_tokens=200, stream=True)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=n)) as client:

        async def first_chunk_then_close() -> None:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        return  # leaving the block closes the connection mid-stream

        await asyncio.gather(*(first_chunk_then_close() for _ in range(n)))


def test_closing_streams_aborts_them_and_frees_the_kv_cache(server):
    before = metric_sum(server.metrics(), "modelserve_requests_total", outcome="abort", model="tiny")
    asyncio.run(open_and_drop_streams(server.url, 20))
    closed = time.monotonic()
    while True:
        m = server.metrics()
        running = metric_sum(m, "modelserve_num_requests_running", model="tiny")
        kv = metric_sum(m, "modelserve_kv_cache_usage_ratio", model="tiny")
        aborted = metric_sum(m, "modelserve_requests_total", outcome="abort", model="tiny") - before
        if (running, kv, aborted) == (0, 0, 20) or time.monotonic() - closed > 1.0:
            break
        time.sleep(0.05)
    assert (running, kv, aborted) == (0, 0, 20)


def test_non_streaming_disconnect_aborts(server):
    before = metric_sum(server.metrics(), "modelserve_requests_total", outcome="abort", model="tiny")
    with server.client(timeout=0.05) as client:
        try:
            client.post("/v1/completions", json=completion("tiny", "hello", max_tokens=240))
        except httpx.ReadTimeout:
            pass
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        m = server.metrics()
        if metric_sum(m, "modelserve_requests_total", outcome="abort", model="tiny") - before == 1:
            break
        time.sleep(0.05)
    assert metric_sum(m, "modelserve_requests_total", outcome="abort", model="tiny") - before == 1
    assert metric_sum(m, "modelserve_num_requests_running", model="tiny") == 0
