"""Benchmark: 32 concurrent requests through the engine, over HTTP and in-process, vs one padded
`transformers` batch of the same 32 prompts on the same weights.

A held-out random Llama (hidden 512, 8 layers, 8 heads, SwiGLU 1376, vocab 4096: 118 MB in float32;
tiny mode: a toy one) saved as a Hugging Face directory with a word tokenizer (`w<id>` is token id).
32 prompts of 16-32 tokens, 64 new tokens each, greedy, `ignore_eos`, float32 everywhere, one torch
thread on every side. Variants, interleaved round by round after a warm-up round (medians):

- `transformers` static batch: the 32 prompts left-padded into one batch, one `generate` call
  (`min_new_tokens` = `max_new_tokens` = 64): the best simple form of the baseline;
- engine over HTTP: `modelserve serve` in a subprocess (`compile_decode` on, one torch thread), 32
  concurrent `POST /v1/completions` on keep-alive connections (httpx, asyncio);
- engine in-process, compiled: the same engine inside this process (`EngineHarness`, compiled decode);
- engine in-process, eager: the same with `compile_decode` off.

tokens/s = 32 x 64 / wall seconds from the first request (or the generate call) to the last token.
The floor (`floor` row): the work no engine can skip, timed in the same process with the same thread:
the model's own weight products for the same tokens done the cheapest way (every prompt token in one
product, then 64 steps of 32 rows), and each decode step's one read of every layer's cached keys and
values for the tokens each request holds (float32, contiguous). No engine on this CPU with torch's
matrix products can be faster, so floor / static is the largest ratio to the static batch any engine
could reach here.
The prompts' ids come from the server's own `/tokenize`, so every side feeds the same ids; greedy
outputs are compared with `transformers`' (identical requests counted).
Targets (issue 14): HTTP >= 1.5x the static batch; HTTP >= 0.9x the same requests in-process.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from bench.common import start_service, write_report
from bench.decode import matvec_weights
from bench.peers import compare_outputs, load_hf
from bench.serving import TINY_DENSE, EngineHarness, LLAMA_512x8, bench_scheduler, random_model, random_prompts, served
from models.tokenizer import TextTokenizer

NAME = "throughput"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThroughputConfig:
    requests: int = 32
    max_tokens: int = 64
    prompt_lens: tuple[int, int] = (16, 32)
    warmup: int = 1
    reps: int = 3
    target_vs_static: float = 1.5
    target_http_vs_inprocess: float = 0.9
    compile_decode: bool = True  # the server and the "compiled" in-process engine (tiny: off, for CI's time)
    tiny: bool = False
    seed: int = 0


TINY = ThroughputConfig(requests=4, max_tokens=4, warmup=0, reps=1, compile_decode=False, tiny=True)


def static_batch(model: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """One left-padded `generate` call over every prompt: (seconds, new ids per prompt)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # (B, W)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return time.perf_counter() - started, out[:, width:].tolist()


async def _http_batch(url: str, texts: list[str], max_tokens: int) -> tuple[float, list[str]]:
    """All requests at once over keep-alive connections: (seconds, each answer's text)."""
    limits = httpx.Limits(max_connections=len(texts), max_keepalive_connections=len(texts))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def one(text: str) -> str:
            body = {"model": "m", "prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["choices"][0]["text"]

        await one(texts[0])  # the connection pool's first connection
        started = time.perf_counter()
        outputs = await asyncio.gather(*(one(text) for text in texts))
        return time.perf_counter() - started, list(outputs)


def tokenize(url: str, texts: list[str]) -> list[list[int]]:
    return [httpx.post(f"{url}/tokenize", json={"model": "m", "prompt": t}).json()["tokens"] for t in texts]


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    config = TINY if tiny else ThroughputConfig()
    n, max_tokens = config.requests, config.max_tokens
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        source = random_model("m", TINY_DENSE if tiny else LLAMA_512x8, Path(tmp), config.seed)
        ids = random_prompts(n, source.config.vocab_size, config.prompt_lens, config.seed)
        texts = [" ".join(f"w{i}" for i in prompt) for prompt in ids]
        tokenizer = TextTokenizer.load(source.directory)
        settings = {"torch_threads": 1, "log_level": "warning", "max_batch_size": n, "enable_prefix_caching": False}
        settings["compile_decode"] = config.compile_decode
        process, url, _ = start_service(Path(tmp), settings, ["--model", f"m={source.directory}"], timeout=900)
        try:
            prompts = tokenize(url, texts)
            max_len = max(len(p) for p in prompts) + max_tokens
            engine_models = {compiled: served(source, max_len, name="m") for compiled in (True, False)}
            harnesses = {
                compiled: EngineHarness(
                    [model], bench_scheduler(max_batch_size=n, compile_decode=compiled and config.compile_decode)
                )
                for compiled, model in engine_models.items()
            }
            hf = load_hf(source.directory)
            floor_model = engine_models[False].model  # the eager engine's weights: the floor reads the same ones
            variants = ("static", "http", "compiled", "eager", "floor")
            seconds: dict[str, list[float]] = {k: [] for k in variants}
            outputs: dict[str, list] = {}
            with harnesses[True].running(), harnesses[False].running():
                for rep in tqdm(range(config.warmup + config.reps), desc=NAME, unit="round"):
                    timed = {
                        "static": lambda: static_batch(hf, prompts, max_tokens),
                        "http": lambda: asyncio.run(_http_batch(url, texts, max_tokens)),
                        "compiled": lambda: _inprocess(harnesses[True], prompts, max_tokens),
                        "eager": lambda: _inprocess(harnesses[False], prompts, max_tokens),
                        "floor": lambda: work_floor(floor_model, prompts, max_tokens),
                    }
                    for name, fn in timed.items():
                        took, outputs[name] = fn()
                        if rep >= config.warmup:
                            seconds[name].append(took)
        finally:
            process.terminate()
            process.wait(timeout=60)
    # The HTTP answers are text: compare them with transformers' ids decoded by the served tokenizer.
    outputs["http"] = [
        [tokenizer.decode(ids)] if text == tokenizer.decode(ids) else [text]
        for text, ids in zip(outputs["http"], outputs["static"], strict=True)
    ]
    expected = {"http": [[tokenizer.decode(ids)] for ids in outputs["static"]]}
    tokens = n * max_tokens
    rate = {name: tokens / statistics.median(values) for name, values in seconds.items()}
    rows = [
        {
            "variant": name,
            "tokens_per_s": rate[name],
            "vs_static_batch": rate[name] / rate["static"],
            "median_s": statistics.median(seconds[name]),
            "identical_to_transformers": compare_outputs(outputs[name], expected.get(name, outputs["static"]))[
                "identical"
            ]
            if outputs[name]  # the floor generates nothing
            else None,
        }
        for name in variants
    ]
    vs_static, http_vs_inprocess = rate["http"] / rate["static"], rate["http"] / rate["compiled"]
    verdict = {
        "http_vs_static_batch": vs_static,
        "http_vs_static_at_least": config.target_vs_static,
        "met_vs_static": vs_static >= config.target_vs_static,
        "http_vs_inprocess": http_vs_inprocess,
        "http_vs_inprocess_at_least": config.target_http_vs_inprocess,
        "met_http_vs_inprocess": http_vs_inprocess >= config.target_http_vs_inprocess,
        "largest_ratio_at_floor": rate["floor"] / rate["static"],
        "http_share_of_floor_rate": rate["http"] / rate["floor"],
    }
    log.info(
        "%s: HTTP %.2fx the static batch, %.2fx in-process; the floor is %.2fx the static batch",
        NAME,
        vs_static,
        http_vs_inprocess,
        verdict["largest_ratio_at_floor"],
    )
    meta = {
        "config": asdict(config),
        "model": source.describe(),
        "target": verdict,
        "columns": "tokens_per_s = requests x max_tokens / median wall s; static = one padded transformers "
        "generate; http = modelserve serve (compiled decode) with all requests concurrent; compiled / eager = the "
        "engine in this process with compile_decode on / off; floor = the weights' matrix products and one read of "
        "the cached keys and values per step, for the same tokens (see the module docstring); "
        "identical_to_transformers = requests whose greedy ids equal the static batch's",
    }
    return write_report(NAME, rows, out_dir, plot, meta)


def work_floor(model: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    """Seconds of the work no engine can skip: the model's weight products (every prompt token in one product
    per weight, then max_tokens steps of one row per request) and, each step, one read of every layer's
    cached keys and values for the tokens each request holds. No attention math, norms, sampling or scheduling."""
    config = model.config
    weights = matvec_weights(model)
    prefill = {w.shape[1]: torch.randn(sum(len(p) for p in prompts), w.shape[1]) for w in weights}  # (N, in)
    decode = {w.shape[1]: torch.randn(len(prompts), w.shape[1]) for w in weights}  # (B, in)
    width = 2 * config.num_key_value_heads * config.head_dim  # keys and values of one token
    held = [sum(len(p) for p in prompts) + len(prompts) * step for step in range(1, max_tokens + 1)]
    kv = [torch.randn(held[-1], width) for _ in range(config.num_hidden_layers)]  # (tokens, 2 KVH D) per layer
    started = time.perf_counter()
    with torch.inference_mode():
        for weight in weights:
            F.linear(prefill[weight.shape[1]], weight)
        for step in range(max_tokens):
            for weight in weights:
                F.linear(decode[weight.shape[1]], weight)
            for layer in kv:
                layer[: held[step]].sum()
    return time.perf_counter() - started, []


def _inprocess(harness: EngineHarness, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    result = harness.run("m", prompts, [None] * len(prompts), max_tokens)
    return result.seconds, result.outputs


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    ax = fig.subplots()
    labels = {
        "static": "transformers\nstatic batch",
        "http": "modelserve\nover HTTP",
        "compiled": "engine in-process\n(compiled)",
        "eager": "engine in-process\n(eager)",
        "floor": "floor: weight products\n+ KV reads",
    }
    ax.bar([labels[r["variant"]] for r in rows], [r["tokens_per_s"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['vs_static_batch']:.2f}x", (i, r["tokens_per_s"]), ha="center", va="bottom")
    ax.set_ylabel("generated tokens / s (median)")
    ax.set_title("32 concurrent requests vs one padded transformers batch (x = ratio to it)")
