"""Benchmark: many LoRA adapters in one continuous batch vs the base model alone and vs peft.

Weights: the zoo's student (else a random llama of `serving.DENSE`'s shape) and N random rank-8
PEFT adapters on all seven projections, written by `peft`, loaded by both sides. Workload: greedy,
`ignore_eos`, fixed prompts and `max_tokens`, so every configuration generates the same tokens.

Target block (interleaved rounds, medians): 32 concurrent requests through the engine
- on the base model served without LoRA layers ("base"; the reference),
- on the base model served with LoRA layers attached but no adapter requested,
- each on a different adapter ("mixed"),
- and the peer a user would otherwise write: `transformers` generate on a `PeftModel`, one request
  after another, `set_adapter` per request.
Targets: mixed >= 0.9x base, mixed >= 5x peer. The engine runs with `compile_decode` (its decode steps,
adapter rows included, as compiled graphs; `compile_decode=False` in the config for the eager path).
The engine's greedy ids are compared with the peer's.

Curve block: 64 concurrent requests over 1, 4, 16, 32 and 64 distinct adapters (request i uses
adapter i mod N) vs the same 64 on the base. Diagnosis: per-step split of the median runs (model
forward vs the rest of the step) and one decode forward of the target batch timed per LoRA kernel.

The engine is driven through `bench.serving.EngineHarness` (`Engine.submit`), not the engine client:
the benchmark measures the engine core (continuous batching with LoRA) and splits each step into model
forward and the rest, which needs the engine's per-step hooks; the client's per-request work is the
same on every side of the comparison and is measured by `bench/http_overhead.py`.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from adapters.registry import AdapterRegistry, RegistryConfig
from bench.common import write_report
from bench.peers import compare_outputs, hf_sequential, load_peft
from bench.serving import (
    DENSE,
    TINY_DENSE,
    EngineHarness,
    LLAMA_512x8,
    ModelSource,
    RunResult,
    bench_scheduler,
    interleaved,
    make_peft_adapters,
    median_run,
    model_or_random,
    random_model,
    random_prompts,
    served,
    time_blocks,
)
from models import AttentionMetadata, KVCache

NAME = "multi_lora"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MultiLoRABenchConfig:
    requests: int = 32  # the target block: concurrent requests, each on its own adapter
    curve_requests: int = 64  # the curve: enough requests for its largest adapter count
    curve_adapters: tuple[int, ...] = (1, 4, 16, 32, 64)
    rank: int = 8
    lora_std: float = 0.05  # init of the random A and B (alpha = 2 r): visibly changes the greedy ids
    prompt_lens: tuple[int, int] = (16, 32)
    max_tokens: int = 32
    warmup: int = 1
    reps: int = 7
    peer_reps: int = 3  # the sequential peft peer takes ~10x longer per round
    kernel_block: int = 5  # consecutive decode forwards per timed block of each LoRA kernel (diagnosis)
    kernel_reps: int = 10  # timed blocks
    target_vs_base: float = 0.9  # issue 14: 32 adapters >= 0.9x 32 base requests on the student
    target_vs_peer: float = 5.0
    compile_decode: bool = True  # the engine as served with --compile-decode (adapter rows compiled too)
    # The target block again on the held-out 512 x 8 llama (its 32 all-linear adapters weigh two thirds of
    # the base and are read every step): issue 14's >= 0.8x; fewer rounds (its peft peer takes ~30 s a round).
    llama: bool = True
    llama_reps: int = 3
    target_llama_vs_base: float = 0.8
    tiny: bool = False
    seed: int = 0

    @property
    def num_adapters(self) -> int:
        return max((self.requests, *self.curve_adapters))


TINY = MultiLoRABenchConfig(
    requests=2,
    curve_requests=2,
    curve_adapters=(1, 2),
    max_tokens=4,
    warmup=0,
    reps=1,
    peer_reps=1,
    kernel_block=1,
    kernel_reps=1,
    compile_decode=False,  # CI: the compiled path is tested in tests/service/test_compiled_decode.py
    llama=False,
    tiny=True,
)


@dataclass
class Setup:
    source: ModelSource
    adapters: list[Path]
    harness: EngineHarness
    registry: AdapterRegistry


def build(config: MultiLoRABenchConfig, workdir: Path, source: ModelSource | None = None) -> Setup:
    """The model (the zoo's student unless given) served plain and with LoRA layers, num_adapters adapters loaded."""
    if source is None:
        source = model_or_random("student", TINY_DENSE if config.tiny else DENSE, workdir, config.seed, config.tiny)
    count = config.num_adapters
    adapters = make_peft_adapters(
        source.directory, workdir / "adapters", count, config.rank, config.lora_std, config.seed
    )
    max_len = config.prompt_lens[1] + config.max_tokens
    # The same weights served twice: plain, and with LoRA layers attached and every adapter loaded.
    models = [served(source, max_len, "base"), served(source, max_len, "lora", RegistryConfig(max_adapters=count))]
    registry = models[1].registry
    for i, directory in enumerate(adapters):
        registry.load(f"lora{i:02d}", directory)
    batch = max(config.requests, config.curve_requests)
    scheduler = bench_scheduler(max_batch_size=batch, max_waiting=2 * batch, compile_decode=config.compile_decode)
    return Setup(source, adapters, EngineHarness(models, scheduler), registry)


def row(block: str, setup_name: str, runs: list[RunResult], adapters: int, reference: float | None) -> dict[str, Any]:
    run = median_run(runs)
    split = run.split() if run.steps else {}
    return {
        "block": block,
        "setup": setup_name,
        "requests": len(run.outputs),
        "distinct_adapters": adapters,
        "tokens": run.tokens,
        "median_s": run.seconds,
        "tokens_per_s": run.tokens_per_s,
        "vs_base": run.tokens_per_s / reference if reference else 1.0,
        "reps": len(runs),
        "decode_step_ms": split.get("decode_step_ms"),
        "decode_forward_ms": split.get("decode_forward_ms"),
        "decode_other_ms": split.get("decode_other_ms"),
    }


def target_block(
    config: MultiLoRABenchConfig, setup: Setup, block: str = "target"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    n = config.requests
    prompts = random_prompts(n, _vocab(setup), config.prompt_lens, config.seed)
    names = [f"lora{i:02d}" for i in range(n)]
    peer = load_peft(setup.source.directory, {name: setup.adapters[i] for i, name in enumerate(names)})
    run = setup.harness.run
    fns = {
        "engine base": lambda: run("base", prompts, [None] * n, config.max_tokens),
        "engine base, LoRA layers": lambda: run("lora", prompts, [None] * n, config.max_tokens),
        "engine mixed": lambda: run("lora", prompts, names, config.max_tokens),
        "peft sequential": lambda: hf_sequential(peer, prompts, names, config.max_tokens),
    }
    reps = dict.fromkeys(fns, config.reps) | {"peft sequential": config.peer_reps}
    runs = interleaved(fns, config.warmup, reps)
    base = median_run(runs["engine base"]).tokens_per_s
    adapters = {"engine base": 0, "engine base, LoRA layers": 0, "engine mixed": n, "peft sequential": n}
    rows = [row(block, name, runs[name], adapters[name], base) for name in fns]
    checks = {
        "engine_mixed_vs_peft": compare_outputs(runs["engine mixed"][0].outputs, runs["peft sequential"][0].outputs),
        "engine_base_vs_base_with_lora_layers": compare_outputs(
            runs["engine base"][0].outputs, runs["engine base, LoRA layers"][0].outputs
        ),
        "mixed_differs_from_base": sum(
            a != b for a, b in zip(runs["engine mixed"][0].outputs, runs["engine base"][0].outputs)
        ),
    }
    return rows, {"runs": runs, "checks": checks}


def llama_block(config: MultiLoRABenchConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The target block on the held-out 512 x 8 llama (random weights, 32 random all-linear adapters)."""
    llama_config = replace(
        config, curve_requests=config.requests, curve_adapters=(), reps=config.llama_reps, peer_reps=1
    )
    with tempfile.TemporaryDirectory(prefix="bench-multi-lora-llama-") as tmp:
        source = random_model("llama_512x8", LLAMA_512x8, Path(tmp), config.seed)
        setup = build(llama_config, Path(tmp), source)
        with setup.harness.running():
            return target_block(llama_config, setup, block="llama 512x8 target")


def curve_block(config: MultiLoRABenchConfig, setup: Setup) -> list[dict[str, Any]]:
    n = config.curve_requests
    prompts = random_prompts(n, _vocab(setup), config.prompt_lens, config.seed + 1)
    run = setup.harness.run
    fns = {"engine base": lambda: run("base", prompts, [None] * n, config.max_tokens)}
    for count in config.curve_adapters:
        names = [f"lora{i % count:02d}" for i in range(n)]
        fns[f"engine {count} adapters"] = lambda names=names: run("lora", prompts, names, config.max_tokens)
    runs = interleaved(fns, config.warmup, config.reps)
    base = median_run(runs["engine base"]).tokens_per_s
    counts = [0, *config.curve_adapters]
    return [row("curve", name, runs[name], count, base) for name, count in zip(fns, counts)]


def kernel_times(config: MultiLoRABenchConfig, setup: Setup) -> dict[str, float]:
    """One decode forward of the target batch (each row its own adapter), ms: per kernel and without LoRA."""
    plain = setup.harness.engine.workers["base"].served.model
    lora = setup.harness.engine.workers["lora"].served.model
    n, context = config.requests, config.prompt_lens[1]
    names = [f"lora{i:02d}" for i in range(n)]
    cache = KVCache(plain.config, n, context + 1)
    tokens = torch.randint(3, plain.config.vocab_size, (n, 1), generator=torch.Generator().manual_seed(0))  # (B, 1)
    context_lens, query_lens = torch.full((n,), context), torch.ones(n, dtype=torch.long)

    def forward(model: Any, adapters: list[str | None], kernel: str) -> Any:
        setup.registry.context.kernel = kernel
        meta = AttentionMetadata.for_cache(cache, torch.arange(n), context_lens, query_lens)
        active = setup.registry.activate(adapters, 1) if any(adapters) else nullcontext()
        with active, torch.inference_mode():
            return model(tokens, meta=meta, logits_positions=query_lens - 1).logits

    fns = {
        "no LoRA layers": lambda: forward(plain, [None] * n, "auto"),
        "LoRA layers, no adapter": lambda: forward(lora, [None] * n, "auto"),
        "segment kernel": lambda: forward(lora, names, "segment"),
        "gather kernel": lambda: forward(lora, names, "gather"),
    }
    try:
        seconds = time_blocks(fns, config.kernel_block, warmup=min(2, config.kernel_reps), reps=config.kernel_reps)
    finally:
        setup.registry.context.kernel = "auto"
    return {name: 1e3 * s for name, s in seconds.items()}


def lora_cost(setup: Setup, rank: int) -> dict[str, float]:
    """LoRA layer calls per forward and the low-rank products' FLOPs relative to the base projections'."""
    layers = list(setup.registry.layers.values())
    base = sum(layer.in_features * layer.out_features for layer in layers)
    low_rank = sum(rank * (layer.in_features + layer.out_features) for layer in layers)
    return {"lora_layer_calls_per_forward": len(layers), "lora_flops_over_base_projection_flops": low_rank / base}


def diagnose(rows: list[dict[str, Any]], kernels: dict[str, float], cost: dict[str, float]) -> dict[str, Any]:
    """The target rows' decode-step split and the kernel timings, with the differences that explain a miss."""
    by_setup = {r["setup"]: r for r in rows if r["block"] == "target"}
    base, mixed = by_setup["engine base"], by_setup["engine mixed"]
    calls = cost["lora_layer_calls_per_forward"]
    idle = kernels["LoRA layers, no adapter"]
    per_call_us = {k: 1e3 * (kernels[f"{k} kernel"] - idle) / calls for k in ("segment", "gather")}
    return {
        "decode_step_ms": {"base": base["decode_step_ms"], "mixed": mixed["decode_step_ms"]},
        "decode_forward_ms": {"base": base["decode_forward_ms"], "mixed": mixed["decode_forward_ms"]},
        "decode_other_ms": {"base": base["decode_other_ms"], "mixed": mixed["decode_other_ms"]},
        "kernel_forward_ms": kernels,
        "lora_us_per_layer_call": per_call_us,
        **cost,
    }


def notes(verdict: dict[str, Any], diagnosis: dict[str, Any]) -> list[str]:
    step, forward, other = (diagnosis[k] for k in ("decode_step_ms", "decode_forward_ms", "decode_other_ms"))
    kernels = diagnosis["kernel_forward_ms"]
    idle = kernels["LoRA layers, no adapter"]
    lines = [
        f"mixed = {verdict['mixed_vs_base']:.2f}x base (target {verdict['mixed_vs_base_at_least']}: "
        f"{'met' if verdict['mixed_vs_base_met'] else 'missed'}); mixed = {verdict['mixed_vs_peft']:.1f}x the "
        f"sequential peft peer (target {verdict['mixed_vs_peft_at_least']}: "
        f"{'met' if verdict['mixed_vs_peft_met'] else 'missed'})",
        f"decode step {step['mixed']:.2f} ms mixed vs {step['base']:.2f} ms base: the model forward takes "
        f"{forward['mixed'] - forward['base']:+.2f} ms of the difference, the rest of the step (scheduling, "
        f"sampling, detokenizing) {other['mixed'] - other['base']:+.2f} ms",
        f"one decode forward of the batch: {idle:.2f} ms with LoRA layers but no adapter requested "
        f"({kernels['no LoRA layers']:.2f} ms without LoRA layers), {kernels['gather kernel']:.2f} ms with the "
        f"gather kernel, {kernels['segment kernel']:.2f} ms with the segment kernel: "
        f"{diagnosis['lora_us_per_layer_call']['gather']:.0f} / {diagnosis['lora_us_per_layer_call']['segment']:.0f}"
        f" us per LoRA layer call ({diagnosis['lora_layer_calls_per_forward']} calls per forward), while the "
        f"low-rank products add only {100 * diagnosis['lora_flops_over_base_projection_flops']:.1f}% to the "
        "projections' FLOPs: the cost is per-call work, not arithmetic",
    ]
    return lines


def _vocab(setup: Setup) -> int:
    return setup.harness.engine.workers["base"].served.model.config.vocab_size


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    bars_ax, curve_ax = fig.subplots(1, 2)
    target = [r for r in rows if r["block"] == "target"]
    positions = range(len(target))
    bars = bars_ax.bar(positions, [r["tokens_per_s"] for r in target], color=["C0", "C1", "C2", "C3"][: len(target)])
    for bar, r in zip(bars, target):
        bars_ax.annotate(
            f"{r['vs_base']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
        )
    bars_ax.set_xticks(list(positions), [r["setup"].replace(", ", ",\n") for r in target], fontsize=8)
    by_setup = {r["setup"]: r for r in target}
    config = MultiLoRABenchConfig
    lines = (
        ("engine base", config.target_vs_base, "target: base x"),
        ("peft sequential", config.target_vs_peer, "target: peft x"),
    )
    for (setup_name, factor, label), color in zip(lines, ("red", "purple")):
        if setup_name in by_setup:
            level = factor * by_setup[setup_name]["tokens_per_s"]
            bars_ax.axhline(level, color=color, linestyle="--", linewidth=0.8, label=f"{label}{factor:g}")
    bars_ax.legend(loc="upper right", fontsize=8)
    bars_ax.set_ylabel("generated tokens / s (median)")
    bars_ax.set_title(f"{target[0]['requests']} requests (x = throughput / engine base)")
    curve = [r for r in rows if r["block"] == "curve" and r["distinct_adapters"] > 0]
    counts = [r["distinct_adapters"] for r in curve]
    curve_ax.plot(counts, [r["vs_base"] for r in curve], marker="o", label="engine, mixed adapters")
    curve_ax.axhline(1.0, color="black", linewidth=0.8, label="engine base")
    curve_ax.axhline(MultiLoRABenchConfig.target_vs_base, color="red", linestyle="--", linewidth=0.8, label="target")
    curve_ax.set_xscale("log", base=2)
    curve_ax.set_xticks(counts, [str(c) for c in counts])
    curve_ax.set_ylim(0, 1.2)
    curve_ax.set_xlabel("distinct adapters in the batch")
    curve_ax.set_ylabel("throughput / base-only throughput")
    curve_ax.set_title(f"{curve[0]['requests'] if curve else 0} concurrent requests")
    curve_ax.grid(True, alpha=0.3)
    curve_ax.legend()


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    config = TINY if tiny else MultiLoRABenchConfig()
    with tempfile.TemporaryDirectory(prefix="bench-multi-lora-") as tmp:
        setup = build(config, Path(tmp))
        with setup.harness.running(), tqdm(total=3, desc=NAME, unit="block") as progress:
            target_rows, target = target_block(config, setup)
            progress.update()
            curve_rows = curve_block(config, setup)
            progress.update()
            kernels = kernel_times(config, setup)
            progress.update()
        cost = lora_cost(setup, config.rank)
    llama_rows: list[dict[str, Any]] = []
    if config.llama:
        llama_rows, llama = llama_block(config)
    rows = target_rows + curve_rows + llama_rows
    by_setup = {r["setup"]: r for r in target_rows}
    mixed = by_setup["engine mixed"]
    vs_peer = mixed["tokens_per_s"] / by_setup["peft sequential"]["tokens_per_s"]
    verdict = {
        "mixed_vs_base": mixed["vs_base"],
        "mixed_vs_base_at_least": config.target_vs_base,
        "mixed_vs_base_met": mixed["vs_base"] >= config.target_vs_base,
        "mixed_vs_peft": vs_peer,
        "mixed_vs_peft_at_least": config.target_vs_peer,
        "mixed_vs_peft_met": vs_peer >= config.target_vs_peer,
    }
    if llama_rows:
        llama_mixed = next(r for r in llama_rows if r["setup"] == "engine mixed")
        verdict |= {
            "llama_mixed_vs_base": llama_mixed["vs_base"],
            "llama_mixed_vs_base_at_least": config.target_llama_vs_base,
            "llama_mixed_vs_base_met": llama_mixed["vs_base"] >= config.target_llama_vs_base,
            "llama_correctness": llama["checks"],
        }
    log.info("%s: mixed %.2fx base, %.2fx peft", NAME, mixed["vs_base"], vs_peer)
    diagnosis = diagnose(rows, kernels, cost)
    meta = {
        "config": asdict(config),
        "model": setup.source.describe(),
        "lora": {"rank": config.rank, "alpha": 2 * config.rank, "targets": "q,k,v,o,gate,up,down"},
        "target": verdict,
        "correctness": target["checks"],
        "diagnosis": diagnosis,
        "notes": notes(verdict, diagnosis),
        "columns": "tokens_per_s = generated tokens / median wall s (first submission to last token); "
        "vs_base = tokens_per_s / that of 'engine base' in the same block; decode_* = means over decode-only "
        "steps of the median run: whole step, ModelRunner.run (forward incl. LoRA), the rest of the step",
    }
    return write_report(NAME, rows, out_dir, plot, meta)
