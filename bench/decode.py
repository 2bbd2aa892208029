"""Benchmark: batch-1 decode through the engine vs `transformers` generate, and MoE vs dense decode.

Models: the zoo's student and teacher (else one random llama of `serving.DENSE`'s shape), the zoo's
MoE (else a random one of `serving.MOE`'s shape), and a random dense model with the MoE's total
parameters (same attention, one SwiGLU of num_experts x expert width; only the routers are missing).
Each is loaded once by the engine and once by `transformers` from the same directory.

One request at a time, a fixed prompt, greedy, exactly `max_tokens` new tokens. Decode tokens/s is
(tokens - 1) / (last token time - first token time) on each side, which leaves the prompt's prefill
out: engine times are when each token's event reached the callback, `transformers` times when
generate handed the token to its streamer. End-to-end tokens/s (submission to last token) is
reported too. All configurations run interleaved, round by round; medians over the rounds.
The engine runs as served with `compile_decode` (models.decode_graph under torch.compile; its warm-up
time is reported) and, beside it, on its eager path (`eager_*` columns), so each row shows both.
Targets: engine decode >= 2x `transformers` on the same model; MoE vs dense: the ratio is reported.

Diagnosis: per model, three per-token costs timed interleaved with each other: the engine's model
forward for one decode token (batch 1, `prompt_len + max_tokens / 2` tokens cached), the
`transformers` model forward for the same (its DynamicCache), and a floor, the matrix-vector
products alone (every Linear a decode token passes through, MoE: top-k experts, on a (1, 1, in)
input, nothing else). Batch-1 decode on CPU reads every weight once per token, so no implementation
of this model beats the floor in float32: `hf_ms_per_token / floor_ms` bounds the speed-up any
engine could reach over `transformers` here. What a token costs beyond the forward is the engine
loop (scheduling, sampling, events) on one side and `generate`'s own work on the other.
The engine side is `bench.serving.EngineHarness` (`Engine.submit`, below the engine client): the
benchmark compares model decode, so the client's per-request work (measured by `http_overhead`) is left out.
"""

from __future__ import annotations

import logging
import re
import statistics
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from bench.common import write_report
from bench.peers import hf_sequential, load_hf
from bench.serving import (
    DENSE,
    MOE,
    TINY_DENSE,
    TINY_MOE,
    EngineHarness,
    LLAMA_512x8,
    ModelSource,
    RunResult,
    bench_scheduler,
    interleaved,
    median_run,
    random_model,
    random_prompts,
    save_random_model,
    served,
    time_blocks,
    zoo_model,
)
from models import AttentionMetadata, CausalLM, KVCache

NAME = "decode"
# Issue 14's batch-1 targets per model (the others: DecodeBenchConfig.target_speedup).
TARGET_SPEEDUPS = {"student": 2.0, "teacher": 1.6, "llama_512x8": 1.3, "llama_512x8_bf16": 2.0}
DENSE_EQUIVALENT = "dense_equal_total_params"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeBenchConfig:
    prompt_len: int = 16
    max_tokens: int = 64
    warmup: int = 1
    reps: int = 7
    cost_block: int = 10  # consecutive calls per timed block of each per-token cost (diagnosis)
    cost_reps: int = 15  # timed blocks
    target_speedup: float = 2.0  # models without their own target in TARGET_SPEEDUPS
    tiny: bool = False
    seed: int = 0
    autotune: bool = True  # a third engine with --compile-autotune (its warm-up is minutes: off in tiny mode)


TINY = DecodeBenchConfig(max_tokens=4, warmup=0, reps=1, cost_block=1, cost_reps=1, tiny=True, autotune=False)
EXPERT = re.compile(r"\.experts\.(\d+)\.")


def matvec_weights(model: CausalLM) -> list[torch.Tensor]:
    """The (out, in) weights one decode token multiplies by: every Linear, MoE experts only the first top-k."""
    top_k = model.config.num_experts_per_tok if model.config.is_moe else 0
    weights = []
    for name, module in model.named_modules():
        expert = EXPERT.search(name + ".")
        if isinstance(module, nn.Linear) and (expert is None or int(expert.group(1)) < top_k):
            weights.append(module.weight)
    return weights


def per_token_costs(model: CausalLM, peer: Any, config: DecodeBenchConfig) -> dict[str, float]:
    """Median ms, timed interleaved: the matrix-vector floor, our model's and transformers' decode forward."""
    context = config.prompt_len + config.max_tokens // 2
    weights = matvec_weights(model)
    inputs = {w.shape[1]: torch.randn(1, 1, w.shape[1], dtype=w.dtype) for w in weights}  # (B=1, T=1, in)
    token = torch.tensor([[3]])  # (B=1, T=1)
    cache = KVCache(model.config, 1, context + 1, dtype=model.dtype)
    with torch.inference_mode():
        prefix = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
        peer_cache = peer(prefix, use_cache=True).past_key_values

    def floor() -> None:
        for weight in weights:
            F.linear(inputs[weight.shape[1]], weight)

    def ours() -> None:
        one = torch.ones(1, dtype=torch.long)  # (B=1,)
        meta = AttentionMetadata.for_cache(cache, slots=one - 1, context_lens=one * context, query_lens=one)
        model(token, meta=meta, logits_positions=one - 1)

    def theirs() -> None:
        peer(token, past_key_values=peer_cache, use_cache=True)
        peer_cache.crop(-1)  # back to `context` tokens for the next call

    with torch.inference_mode():
        fns = {"floor": floor, "ours": ours, "theirs": theirs}
        seconds = time_blocks(fns, config.cost_block, warmup=min(config.cost_reps, 2), reps=config.cost_reps)
    return {name: 1e3 * value for name, value in seconds.items()}


def dense_equivalent(moe: ModelSource, workdir: Path, seed: int) -> ModelSource:
    """A random dense model with the MoE's attention and one MLP as wide as all its experts together."""
    config = moe.config
    dense = config.replace(
        model_type="mistral",  # mixtral's attention; the dense families differ from it only in the MLP
        num_local_experts=0,
        intermediate_size=config.intermediate_size * config.num_local_experts,
        initializer_range=DENSE.init_std,  # random weights: wide enough for clear greedy margins
    )
    return ModelSource(DENSE_EQUIVALENT, save_random_model(dense, workdir / DENSE_EQUIVALENT, seed), "random")


def sources(config: DecodeBenchConfig, workdir: Path) -> list[ModelSource]:
    if config.tiny:
        dense = [random_model("dense", TINY_DENSE, workdir, config.seed)]
        moe = random_model("moe", TINY_MOE, workdir, config.seed)
    else:
        dense = [found for found in (zoo_model("student"), zoo_model("teacher")) if found is not None]
        dense = dense or [random_model("dense", DENSE, workdir, config.seed)]
        moe = zoo_model("moe") or random_model("moe", MOE, workdir, config.seed)
        llama = random_model("llama_512x8", LLAMA_512x8, workdir, config.seed)
        # The same weights served in bfloat16 (transformers stays float32, as a user runs it).
        dense += [llama, ModelSource("llama_512x8_bf16", llama.directory, "random", dtype="bfloat16")]
    return [*dense, moe, dense_equivalent(moe, workdir, config.seed + 1)]


def make_row(
    source: ModelSource,
    engine: list[RunResult],
    eager: list[RunResult],
    hf: list[RunResult],
    costs: dict[str, float],
    tuned: list[RunResult] | None = None,
) -> dict[str, Any]:
    engine_decode = statistics.median(r.decode_tokens_per_s() for r in engine)
    eager_decode = statistics.median(r.decode_tokens_per_s() for r in eager)
    hf_decode = statistics.median(r.decode_tokens_per_s() for r in hf)
    engine_e2e, hf_e2e = median_run(engine).tokens_per_s, median_run(hf).tokens_per_s
    split = median_run(engine).split()
    params = source.describe()
    autotuned = {}
    if tuned:
        tuned_decode = statistics.median(r.decode_tokens_per_s() for r in tuned)
        autotuned = {
            "autotuned_decode_tok_s": tuned_decode,
            "autotuned_speedup": tuned_decode / hf_decode,
            "identical_tokens_autotuned": tuned[0].outputs == engine[0].outputs,
        }
    return autotuned | {
        "model": source.name,
        "origin": source.origin,
        "params_total_m": params["total"] / 1e6,
        "params_active_m": params["active"] / 1e6,
        "engine_decode_tok_s": engine_decode,
        "hf_decode_tok_s": hf_decode,
        "decode_speedup": engine_decode / hf_decode,
        "eager_decode_tok_s": eager_decode,
        "eager_speedup": eager_decode / hf_decode,
        "identical_tokens_eager": engine[0].outputs == eager[0].outputs,
        "engine_e2e_tok_s": engine_e2e,
        "hf_e2e_tok_s": hf_e2e,
        "e2e_speedup": engine_e2e / hf_e2e,
        "identical_tokens": engine[0].outputs == hf[0].outputs,
        "reps": len(engine),
        "engine_ms_per_token": 1e3 / engine_decode,
        "engine_step_ms": split["decode_step_ms"],
        "engine_runner_ms": split["decode_forward_ms"],
        "engine_forward_ms": costs["ours"],
        "hf_ms_per_token": 1e3 / hf_decode,
        "hf_forward_ms": costs["theirs"],
        "floor_ms": costs["floor"],
        "max_speedup_at_floor": (1e3 / hf_decode) / costs["floor"],
    }


def notes(rows: list[dict[str, Any]], verdict: dict[str, Any]) -> list[str]:
    lines = []
    for r in rows:
        met = "met" if verdict["met"][r["model"]] else "missed"
        lines.append(
            f"{r['model']}: engine {r['decode_speedup']:.2f}x transformers at batch-1 decode ({met}; eager path "
            f"{r['eager_speedup']:.2f}x; compile warm-up {r['compile_warmup_s']:.1f} s); per token the "
            f"engine takes {r['engine_ms_per_token']:.2f} ms (step {r['engine_step_ms']:.2f}, of which "
            f"ModelRunner.run {r['engine_runner_ms']:.2f}), transformers {r['hf_ms_per_token']:.2f} ms; bare "
            f"forwards timed side by side: ours {r['engine_forward_ms']:.2f} ms, transformers' "
            f"{r['hf_forward_ms']:.2f} ms, matrix-vector floor {r['floor_ms']:.2f} ms, so no engine could exceed "
            f"{r['max_speedup_at_floor']:.1f}x here"
            + (
                f"; with --compile-autotune {r['autotuned_speedup']:.2f}x (warm-up {r['autotune_warmup_s']:.1f} s, "
                f"same tokens as compiled: {r['identical_tokens_autotuned']})"
                if "autotuned_speedup" in r
                else ""
            )
        )
    by_model = {r["model"]: r for r in rows}
    moe, dense = by_model["moe"], by_model[DENSE_EQUIVALENT]
    outcome = (
        "routing and dispatch cost more than the skipped experts save"
        if moe["engine_forward_ms"] > dense["engine_forward_ms"]
        else "the skipped experts save more than routing and dispatch cost"
    )
    lines.append(
        f"MoE vs dense with the same total parameters, batch-1 decode tokens/s: "
        f"{verdict['moe_vs_dense_decode_ratio_engine']:.2f} through the engine, "
        f"{verdict['moe_vs_dense_decode_ratio_hf']:.2f} through transformers; the MoE's floor is "
        f"{moe['floor_ms']:.2f} ms vs {dense['floor_ms']:.2f} ms ({moe['params_active_m']:.2f}M vs "
        f"{dense['params_active_m']:.2f}M parameters per token), its engine forward {moe['engine_forward_ms']:.2f} ms "
        f"vs {dense['engine_forward_ms']:.2f} ms: at batch 1 {outcome}"
    )
    return lines


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    speed_ax, moe_ax = fig.subplots(1, 2)
    width = 0.38
    positions = range(len(rows))
    sides = [("engine", "engine (compiled)"), ("hf", "transformers generate")]
    if all("autotuned_decode_tok_s" in r for r in rows):
        sides.insert(1, ("autotuned", "engine, --compile-autotune"))
    bar = 2 * width / len(sides)
    for i, (side, label) in enumerate(sides):
        offset = -width + bar * (i + 0.5)
        speed_ax.bar([p + offset for p in positions], [r[f"{side}_decode_tok_s"] for r in rows], bar, label=label)
    for p, r in zip(positions, rows):
        speed_ax.annotate(
            f"{r['decode_speedup']:.2f}x" + (f"\n{r['autotuned_speedup']:.2f}x" if len(sides) == 3 else ""),
            (p, max(r[f"{side}_decode_tok_s"] for side, _ in sides)),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    speed_ax.set_xticks(list(positions), [r["model"].replace("_", "\n") for r in rows], fontsize=8)
    speed_ax.set_ylabel("batch-1 decode tokens / s (median)")
    speed_ax.set_title("engine vs transformers generate (x = speed-ups, in bar order)")
    speed_ax.set_ylim(0, 1.3 * max(r[f"{side}_decode_tok_s"] for r in rows for side, _ in sides))
    speed_ax.legend(loc="upper right")
    pair = [r for r in rows if r["model"] in ("moe", DENSE_EQUIVALENT)]
    for offset, side, label in ((-width / 2, "engine", "engine"), (width / 2, "hf", "transformers generate")):
        rates = [r[f"{side}_decode_tok_s"] for r in pair]
        moe_ax.bar([p + offset for p in range(len(pair))], rates, width, label=label)
    moe_ax.set_xticks(
        list(range(len(pair))),
        [f"{r['model']}\n{r['params_total_m']:.2f}M total, {r['params_active_m']:.2f}M active" for r in pair],
        fontsize=8,
    )
    moe_ax.set_ylim(0, 1.3 * max(max(r["engine_decode_tok_s"], r["hf_decode_tok_s"]) for r in pair))
    moe_ax.set_ylabel("batch-1 decode tokens / s (median)")
    ratio = pair[0]["engine_decode_tok_s"] / pair[1]["engine_decode_tok_s"] if len(pair) == 2 else float("nan")
    moe_ax.set_title(f"MoE vs dense, same total parameters (engine: {ratio:.2f}x)")
    moe_ax.legend(loc="upper right")


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    config = TINY if tiny else DecodeBenchConfig()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        models = sources(config, Path(tmp))
        max_len = config.prompt_len + config.max_tokens
        # The engine as served (decode compiled; batch-1 runs need only the size-1 graph) and its eager path.
        harness = EngineHarness(
            [served(m, max_len) for m in models], bench_scheduler(compile_decode=True, max_batch_size=1)
        )
        eager = EngineHarness([served(m, max_len) for m in models], bench_scheduler(max_batch_size=1))
        tuned_scheduler = bench_scheduler(compile_decode=True, compile_autotune=True, max_batch_size=1)
        tuned = EngineHarness([served(m, max_len) for m in models], tuned_scheduler) if config.autotune else None
        peers = {m.name: load_hf(m.directory) for m in models}
        fns = {}
        for m in models:
            prompt = random_prompts(1, m.config.vocab_size, (config.prompt_len,) * 2, config.seed)
            fns[f"engine {m.name}"] = lambda m=m, p=prompt: harness.run(m.name, p, [None], config.max_tokens)
            fns[f"eager {m.name}"] = lambda m=m, p=prompt: eager.run(m.name, p, [None], config.max_tokens)
            if tuned is not None:
                fns[f"tuned {m.name}"] = lambda m=m, p=prompt: tuned.run(m.name, p, [None], config.max_tokens)
            fns[f"hf {m.name}"] = lambda m=m, p=prompt: hf_sequential(peers[m.name], p, [None], config.max_tokens)
        with (
            harness.running(),
            eager.running(),
            tuned.running() if tuned else nullcontext(),
            tqdm(total=2, desc=NAME, unit="block") as progress,
        ):
            warm_up = {name: worker.compile_seconds for name, worker in harness.engine.workers.items()}
            tuned_warm_up = {name: w.compile_seconds for name, w in tuned.engine.workers.items()} if tuned else {}
            runs = interleaved(fns, config.warmup, config.reps)
            progress.update()
            costs = {
                m.name: per_token_costs(harness.engine.workers[m.name].served.model, peers[m.name], config)
                for m in models
            }
            progress.update()
    rows = [
        make_row(
            m,
            runs[f"engine {m.name}"],
            runs[f"eager {m.name}"],
            runs[f"hf {m.name}"],
            costs[m.name],
            runs.get(f"tuned {m.name}"),
        )
        | {"compile_warmup_s": warm_up[m.name]}
        | ({"autotune_warmup_s": tuned_warm_up[m.name]} if tuned else {})
        for m in models
    ]
    by_model = {r["model"]: r for r in rows}
    moe, dense = by_model["moe"], by_model[DENSE_EQUIVALENT]
    verdict = {
        "decode_speedup_at_least": {r["model"]: TARGET_SPEEDUPS.get(r["model"], config.target_speedup) for r in rows},
        "decode_speedup": {r["model"]: r["decode_speedup"] for r in rows},
        "met": {
            r["model"]: r["decode_speedup"] >= TARGET_SPEEDUPS.get(r["model"], config.target_speedup) for r in rows
        },
        "met_autotuned": {
            r["model"]: r["autotuned_speedup"] >= TARGET_SPEEDUPS.get(r["model"], config.target_speedup)
            for r in rows
            if "autotuned_speedup" in r
        },
        "moe_vs_dense_decode_ratio_engine": moe["engine_decode_tok_s"] / dense["engine_decode_tok_s"],
        "moe_vs_dense_decode_ratio_hf": moe["hf_decode_tok_s"] / dense["hf_decode_tok_s"],
    }
    log.info("%s: speed-ups %s", NAME, ", ".join(f"{k} {v:.2f}x" for k, v in verdict["decode_speedup"].items()))
    meta = {
        "config": asdict(config),
        "models": {m.name: m.describe() for m in models},
        "target": verdict,
        "notes": notes(rows, verdict),
        "columns": "decode_tok_s = (tokens - 1) / (last - first token time), median over rounds; e2e_tok_s = tokens / "
        "median wall s from submission (engine) or the generate call (transformers) to the last token; "
        "identical_tokens: engine and transformers greedy ids equal on the first round (identical_tokens_eager: "
        "compiled and eager engine); eager_*: the engine with compile_decode off; autotuned_*: with compile_autotune "
        "too (Inductor's C++ GEMM template where its autotuning measured it faster than MKL); engine_step_ms, "
        "engine_runner_ms: mean decode step and ModelRunner.run (inputs, metadata, forward) of the median engine "
        "run; engine_forward_ms, hf_forward_ms, floor_ms: one decode token's bare model forward on each side and "
        "the matrix-vector floor, timed interleaved with each other after the runs (compare them with each "
        "other; see the module docstring); max_speedup_at_floor = hf_ms_per_token / floor_ms",
    }
    return write_report(NAME, rows, out_dir, plot, meta)
