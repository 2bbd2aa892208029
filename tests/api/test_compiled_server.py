"""A real server started with `--compile-decode` (and a `--chat-template` for every model): it warms up
before `/ready`, and its greedy answers over HTTP, base and adapter, equal the eager server's."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import start_server

# Warm-up compiles 3 graphs (tiny with and without LoRA, moe) at batch bucket 1 before /ready: about 40 s
# on a quiet 2-core machine with a cold Inductor cache, so the bounds are generous.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


def test_compiled_server_answers_like_the_eager_one(zoo, server, tmp_path):
    compiled = start_server(
        zoo,
        tmp_path,
        adapters=("a1",),
        ready_timeout=400,
        compile_decode=True,
        max_batch_size=1,
        chat_template=TEMPLATE,
        log_level="info",
    )
    try:
        for model in ("tiny", "a1", "moe"):
            body = {"model": model, "prompt": "hello world", "max_tokens": 12, "temperature": 0}
            want = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            got = httpx.post(f"{compiled.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            assert got == want, model
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        prompt_tokens = httpx.post(f"{compiled.url}/v1/chat/completions", json=chat, timeout=60).json()["usage"]
        rendered = httpx.post(
            f"{compiled.url}/tokenize", json={"model": "tiny", "prompt": "<user>hi<assistant>"}, timeout=60
        ).json()
        assert prompt_tokens["prompt_tokens"] == rendered["count"]  # the --chat-template was used
    finally:
        compiled.stop()
