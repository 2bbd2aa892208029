"""Benchmark: what the HTTP layer adds to a request, side by side with the same request through the engine client.

One random model (saved as a Hugging Face dir with a byte-level BPE tokenizer) is served twice on
the same machine in the same run, from the same settings: by `modelserve serve` in a subprocess
(uvicorn + FastAPI, one torch thread), and by `service.loading.build_client` inside this process (the
same loading, engine, scheduler, KV cache and `EngineClient` the server builds; one torch thread).
The request is a 16-token greedy completion (`ignore_eos`, so both generate exactly 16 tokens).
Timed, interleaved (client, HTTP, HTTP streaming, client, ...) after warm-up:

- client: what a route does below the HTTP layer, on an asyncio loop in this thread: `resolve`,
  `admit`, `tokenize`, `sampling_params`, `generate`, `await result()` (text assembled), `close()`;
- http: `POST /v1/completions` over a keep-alive connection (httpx), JSON parsed;
- http_stream: the same with `stream: true`, read until `data: [DONE]`.

overhead = median(http) - median(client): exactly the HTTP layer (uvicorn, FastAPI routing, auth,
pydantic schemas, the route's own work, JSON or SSE, the metrics exporter's per-request work; the
in-process client has a no-op observer) plus the loopback socket. The issue's target is <= 2 ms; it is
written down as met or not, nothing here is tuned to meet it. The model's size hardly matters (both
sides run the same forwards); it is kept small so the difference is not lost in the noise of the forwards.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from matplotlib.figure import Figure
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bench.common import start_service, write_report
from models import ModelConfig, save_model
from models.decoder import CausalLM
from models.tokenizer import TextTokenizer
from service.engine.client import EngineClient
from service.loading import build_client
from service.settings import Settings

NAME = "http_overhead"
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "the quick brown fox jumps over the lazy dog"
SERVER_SETTINGS = {"torch_threads": 1, "log_level": "warning"}  # both sides: Settings(**these, models=...)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpOverheadConfig:
    max_tokens: int = 16
    warmup: int = 20
    reps: int = 200
    hidden_size: int = 128
    layers: int = 2
    target_overhead_ms: float = 2.0
    startup_timeout_s: float = 120.0


TINY = HttpOverheadConfig(warmup=2, reps=5)


def build_model_dir(directory: Path, config: HttpOverheadConfig) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([PROMPT] * 10, trainer)
    text_tokenizer = TextTokenizer(tokenizer, {"bos_token": "<s>", "eos_token": "</s>"})
    torch.manual_seed(0)
    model_config = ModelConfig(
        vocab_size=text_tokenizer.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.hidden_size * 3,
        num_hidden_layers=config.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    save_model(CausalLM(model_config).eval(), directory)
    text_tokenizer.save(directory)


def start_server(model_dir: Path, workdir: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    process, url, _ = start_service(workdir, SERVER_SETTINGS, ["--model", f"bench={model_dir}"], timeout)
    return process, url


class _NoTracker:
    def on_event(self, event: Any) -> None:
        pass

    def finish(self, outcome: str, event: Any = None) -> None:
        pass


class NoObserver:
    """The client's request observer with nothing behind it (the server's is the metrics exporter)."""

    def track(self, model: str, adapter: str | None, prompt_tokens: int, arrival: float) -> _NoTracker:
        return _NoTracker()

    def rejected(self, model: str, adapter: str | None) -> None:
        pass


def client_call(client: EngineClient, loop: asyncio.AbstractEventLoop, config: HttpOverheadConfig):
    """A blocking call that runs one request through the client as the completions route does."""

    async def request() -> str:
        target = client.resolve("bench")
        client.admit(target)
        try:
            prompt_ids = await client.tokenize(target, PROMPT)
            params = client.sampling_params(
                len(prompt_ids), target, config.max_tokens, config.max_tokens, temperature=0.0, ignore_eos=True
            )
            handle = await client.generate(target, prompt_ids, params, streaming=False)
        except BaseException:
            client.release(target)
            raise
        try:
            text, event = await handle.result()
            error = handle.failure(event)
            if error is not None:
                raise error
            return text
        finally:
            handle.close()

    return lambda: loop.run_until_complete(request())


def http_calls(client: httpx.Client, config: HttpOverheadConfig):
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": config.max_tokens, "temperature": 0, "ignore_eos": True}

    def plain() -> str:
        response = client.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["text"]

    def stream() -> str:
        parts = []
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    break
                parts.append(line)
        return "".join(parts)

    return plain, stream


def measure(calls: dict[str, Any], warmup: int, reps: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    ax = fig.subplots()
    names = [r["path"] for r in rows]
    ax.bar(names, [r["median_ms"] for r in rows], yerr=None, color=["#4c72b0", "#dd8452", "#55a868"][: len(rows)])
    for i, row in enumerate(rows):
        ax.errorbar(
            i,
            row["median_ms"],
            yerr=[[row["median_ms"] - row["p10_ms"]], [row["p90_ms"] - row["median_ms"]]],
            color="black",
            capsize=6,
        )
    ax.set_ylabel("latency of a 16-token greedy completion (ms), median, p10-p90")
    ax.set_title("HTTP layer vs the engine client in-process")
    ax.grid(True, axis="y", alpha=0.3)


def run(tiny: bool, out_dir: str | Path) -> dict[str, Path]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    config = TINY if tiny else HttpOverheadConfig()
    with tempfile.TemporaryDirectory(prefix="http_overhead_") as tmp:
        model_dir = Path(tmp) / "bench"
        build_model_dir(model_dir, config)
        server, url = start_server(model_dir, Path(tmp), config.startup_timeout_s)
        settings = Settings(**SERVER_SETTINGS, models={"bench": model_dir})  # as the server is configured
        client = build_client(settings, NoObserver())
        loop = asyncio.new_event_loop()
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                plain, stream = http_calls(http, config)
                in_process = client_call(client, loop, config)
                same_text = in_process() == plain()
                samples = measure(
                    {"client": in_process, "http": plain, "http_stream": stream}, config.warmup, config.reps
                )
        finally:
            client.engine.stop()
            loop.close()
            server.send_signal(signal.SIGTERM)
            server_exit = server.wait(60)
    rows = []
    for name, times in samples.items():
        ms = sorted(t * 1e3 for t in times)
        rows.append(
            {
                "path": name,
                "median_ms": statistics.median(ms),
                "p10_ms": ms[len(ms) // 10],
                "p90_ms": ms[(len(ms) * 9) // 10],
                "reps": len(ms),
            }
        )
    client_ms = rows[0]["median_ms"]
    for row in rows:
        row["overhead_ms"] = row["median_ms"] - client_ms
    overhead = rows[1]["overhead_ms"]
    meta = {
        "config": asdict(config),
        "same_text_http_and_client": same_text,
        "server_exit_code_after_sigterm": server_exit,
        "target": {
            "overhead_ms_at_most": config.target_overhead_ms,
            "overhead_ms": overhead,
            "met": overhead <= config.target_overhead_ms,
        },
        "columns": "overhead_ms = median_ms(path) - median_ms(client); timed interleaved, one torch thread each side",
    }
    log.info("%s: client %.2f ms, http %.2f ms, overhead %.2f ms", NAME, client_ms, rows[1]["median_ms"], overhead)
    return write_report(NAME, rows, out_dir, plot, meta)
