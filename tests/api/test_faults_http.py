"""Fault injection behind the real HTTP server: faults fail only the requests they touch.

The server runs in this process (uvicorn on a thread, the real app and loader) so the test can wrap
the engine's model: a forward that raises on a chosen step, and a row of NaN logits for one request.
Mixed traffic (base and adapter, greedy, sampled with extreme values, streaming) runs meanwhile; the
requests the faults hit answer a clear error, all others complete, `/ready` and `/health` stay 200,
and `running` goes back to 0.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn

from service.api.app import create_app
from service.settings import Settings
from tests.api.conftest import free_port, metric_sum

PARAMS = [
    {"temperature": 0},
    {"temperature": 1e-40},
    {"temperature": 1.0, "top_p": 5e-324},
    {"temperature": 2.0, "top_k": 3, "seed": 3},
    {"temperature": 0.8, "top_p": 0.9},
]


@pytest.fixture(scope="module")
def live(zoo):
    port = free_port()
    settings = Settings(
        port=port,
        device="cpu",
        models={"tiny": zoo["tiny"], "moe": zoo["moe"]},
        adapters={"a1": zoo["a1"], "a2": zoo["a2"]},
        adapter_roots=[zoo["a1"].parent],
        torch_threads=1,
        log_level="warning",
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        raise RuntimeError("in-process server not ready in 60 s")
    yield url, app.state.service
    server.should_exit = True
    thread.join(30)


def one_request(url: str, i: int, marker: str = "") -> tuple[int, str]:
    model = ("tiny", "a1", "a2", "moe")[i % 4]
    body = {"model": model, "prompt": f"{marker}hello {i}", "max_tokens": 12, "ignore_eos": True, **PARAMS[i % 5]}
    if i % 3 == 0:
        body["stream"] = True
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            text = "".join(response.iter_text())
            if response.status_code != 200:
                return response.status_code, text
            return (200 if text.rstrip().endswith("data: [DONE]") else 599), text
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    return response.status_code, response.text


def settle(url: str) -> dict:
    for _ in range(100):
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        if all(
            line.endswith(" 0.0")
            for line in metrics.splitlines()
            if line.startswith("modelserve_num_requests_running{")
        ):
            return metrics
        time.sleep(0.05)
    raise AssertionError("running did not go back to 0")


def test_a_forward_that_raises_mid_traffic_fails_only_its_step(live):
    url, state = live
    model = state.engine.workers["tiny"].runner.model
    forward, calls = model.forward, [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 8:
            raise RuntimeError("injected forward fault")
        return forward(*args, **kwargs)

    model.forward = faulty
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda i: one_request(url, i), range(24)))
    finally:
        model.forward = forward
    failed = [text for status, text in results if status != 200 or "injected" in text]
    assert failed, "the injected fault hit no request"
    assert all("injected forward fault" in text for text in failed), failed
    assert len(failed) < len(results)
    assert httpx.get(f"{url}/ready").status_code == 200 and httpx.get(f"{url}/health").status_code == 200
    settle(url)
    assert one_request(url, 1)[0] == 200


def test_nan_logits_for_one_request_fail_it_alone(live):
    url, state = live
    worker = state.engine.workers["tiny"]
    run = worker.runner.run
    tokenizer = worker.served.tokenizer
    marker_ids = tokenizer.encode("zzzz", False)

    def poisoned(rows):
        output = run(rows)
        for row in rows:
            seq = row.sequence
            prompt = seq.request.prompt_ids
            if marker_ids in (prompt[: len(marker_ids)], prompt[1 : 1 + len(marker_ids)]) and id(seq) in output.logits:
                output.logits[id(seq)] = torch.full_like(output.logits[id(seq)], float("nan"))
        return output

    worker.runner.run = poisoned
    before = httpx.get(f"{url}/metrics").text
    try:
        with ThreadPoolExecutor(8) as pool:
            others = pool.map(lambda i: one_request(url, i), [0, 1, 2, 4, 5, 6])
            poisoned_result = pool.submit(one_request, url, 4, "zzzz ")
            results = list(others)
            status, text = poisoned_result.result()
    finally:
        worker.runner.run = run
    assert all(code == 200 for code, _ in results), results
    assert status == 500 and "non-finite" in text and '"type":"server_error"' in text.replace(" ", "")
    after = settle(url)
    assert httpx.get(f"{url}/ready").status_code == 200 and httpx.get(f"{url}/health").status_code == 200
    assert _errors(after) == _errors(before) + 1


def _errors(metrics_text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
    }
    return metric_sum(samples, "modelserve_requests_total", outcome="error")
