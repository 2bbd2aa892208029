"""Benchmark: the paged KV cache with prefix caching vs the slot cache it replaced (`--only prefix_cache`).

One random llama with 4,096 positions (hidden 256, 4 layers, 8 query and 2 key/value heads: GQA as in
Llama 3 and Mistral), saved once and loaded by every engine; requests go through `Engine.submit` as
the HTTP layer sends them (`bench.serving.EngineHarness`). Greedy, `ignore_eos`.

1. Time to first token (submission to the first token's event) of a 1,024-token prefix + a new
   32-token suffix: `cold` on an engine with prefix caching off, `warm` on one with it on after the
   prefix was served once (a new suffix each round, so only the prefix's 64 blocks can hit), and
   `miss` (caching on, a prefix never seen) for the cost of looking up and registering. Rounds
   interleave the three; medians. The same prompt must give the same first token cold and warm.
2. Under a fixed KV budget (32 x 1,024 tokens), a burst of requests of mixed lengths (most short, one
   in eight long): the paged engine (`max_batch_size` 256) vs today's slot cache at the same memory,
   emulated by the same engine with `max_batch_size = budget // max_model_len` (a slot per sequence of
   `max_model_len` tokens is exactly what that memory held). Maximum sequences running at once (the
   engine's `StepStats.num_running`), output tokens/s, preemptions; both must generate the same ids.
   Prefix caching is off on both sides here (the prompts share nothing; repetitions must not hit).
3. A batch-32 decode forward of the same model on the old slot layout (a faithful copy of it,
   `bench.slot_baseline`) vs the paged pool, at 256 and 1,024 cached tokens per row.

Targets: warm TTFT >= 5x faster than cold; >= 3x the slot cache's concurrency; paged decode <= 1.10x
the slot cache's time (judged on the engine's layout, blocks scattered over the pool).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from bench.common import write_report
from bench.serving import DENSE, TINY_DENSE, EngineHarness, ModelShape, random_model, random_prompts, served
from bench.slot_baseline import DecodeCase, decode_costs
from models import load_model
from models.kv_cache import blocks_for
from service.engine import SchedulerConfig

NAME = "prefix_cache"
MODEL = "llama4k"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixBenchConfig:
    shape: ModelShape = replace(DENSE, num_kv_heads=2, max_positions=4096)
    max_model_len: int = 4096
    # 1. TTFT
    prefix_len: int = 1024
    suffix_len: int = 32
    ttft_pool_tokens: int = 16384  # the TTFT engines' KV pool
    ttft_warmup: int = 1
    ttft_reps: int = 7
    # 2. concurrency under a fixed budget
    budget_tokens: int = 32 * 1024
    paged_max_batch: int = 256  # vLLM's default max_num_seqs
    requests: int = 128
    long_every: int = 8  # every 8th request is long
    short_prompt: tuple[int, int] = (24, 160)
    long_prompt: tuple[int, int] = (768, 1536)
    max_tokens: int = 32
    mix_reps: int = 3
    # 3. decode
    decode_batch: int = 32
    decode_contexts: tuple[int, ...] = (256, 1024)
    decode_warmup: int = 2
    decode_reps: int = 31
    # targets
    target_ttft_speedup: float = 5.0
    target_concurrency_ratio: float = 3.0
    target_decode_slowdown: float = 1.10
    tiny: bool = False
    seed: int = 0


TINY = PrefixBenchConfig(
    shape=replace(TINY_DENSE, max_positions=256),
    max_model_len=128,
    prefix_len=64,
    suffix_len=8,
    ttft_pool_tokens=1024,
    ttft_warmup=0,
    ttft_reps=1,
    budget_tokens=512,
    paged_max_batch=64,
    requests=24,
    long_every=6,
    short_prompt=(8, 24),
    long_prompt=(64, 96),
    max_tokens=4,
    mix_reps=1,
    decode_batch=4,
    decode_contexts=(32,),
    decode_warmup=0,
    decode_reps=1,
    tiny=True,
)


class CountingHarness(EngineHarness):
    """An EngineHarness that also keeps each step's running sequences and the preemptions, and counts the
    padding of its forwards: a forward is one right-padded (B, T) batch whose every row reads as many KV
    blocks as its longest row, so it computes B x T tokens and scores B x T x L (query, key) pairs where
    its rows need sum(new tokens) and sum(new tokens x (cached + new))."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reset()
        self._count_kv(self.worker().runner, self.worker().cache.block_size)

    def reset(self) -> None:
        self.counts: list[int] = []
        self.times: list[float] = []  # perf_counter at each step's report
        self.preemptions = 0
        self.padding = dict.fromkeys(("tokens_computed", "tokens_needed", "pairs_scored", "pairs_needed"), 0)

    def _count_kv(self, runner: Any, block_size: int) -> None:
        forward = runner.forward

        def counted(tokens, block_tables, context_lens, *args, **kwargs):  # instance attribute: this engine only
            ends = [context + len(row) for context, row in zip(context_lens, tokens)]
            width = max(len(row) for row in tokens)
            self.padding["tokens_computed"] += len(tokens) * width
            self.padding["tokens_needed"] += sum(len(row) for row in tokens)
            self.padding["pairs_scored"] += len(tokens) * width * blocks_for(max(ends), block_size) * block_size
            self.padding["pairs_needed"] += sum(len(row) * end for row, end in zip(tokens, ends))
            return forward(tokens, block_tables, context_lens, *args, **kwargs)

        runner.forward = counted

    def _on_step(self, stats: Any) -> None:  # engine thread; before the base class reports the step
        self.counts.append(stats.num_running)
        self.times.append(time.perf_counter())
        self.preemptions += stats.preemptions
        super()._on_step(stats)

    def worker(self) -> Any:
        return self.engine.workers[MODEL]


def measure_ttft(config: PrefixBenchConfig, source: Any) -> dict[str, Any]:
    """TTFT (s) per round of cold / warm / miss, the prefix tokens found cached, and first-token agreement."""
    vocab = source.config.vocab_size
    rounds = config.ttft_warmup + config.ttft_reps
    prefix, *fresh = random_prompts(rounds + 1, vocab, (config.prefix_len,) * 2, config.seed)
    suffixes = random_prompts(rounds + 1, vocab, (config.suffix_len,) * 2, config.seed + 1)
    pool = dict(kv_cache_tokens=config.ttft_pool_tokens, max_batch_size=4)
    cold = CountingHarness([served(source, config.max_model_len)], SchedulerConfig(**pool, enable_prefix_caching=False))
    warm = CountingHarness([served(source, config.max_model_len)], SchedulerConfig(**pool, enable_prefix_caching=True))
    times: dict[str, list[float]] = {"cold": [], "warm": [], "miss": []}
    hits, same_token = [], []
    with cold.running(), warm.running():
        # The prefix is served once. Two tokens: a sequence that finishes in the step that computed its prompt
        # registers none of its blocks (the worker registers after the step, only sequences still running).
        warm.run(MODEL, [prefix + suffixes[-1]], [None], 2)
        for i in range(rounds):
            prompt = prefix + suffixes[i]
            cold_run = cold.run(MODEL, [prompt], [None], 1)
            before = warm.worker().blocks.stats.hits
            warm_run = warm.run(MODEL, [prompt], [None], 1)
            found = warm.worker().blocks.stats.hits - before
            miss_run = warm.run(MODEL, [fresh[i] + suffixes[i]], [None], 1)
            if i >= config.ttft_warmup:
                for name, result in (("cold", cold_run), ("warm", warm_run), ("miss", miss_run)):
                    times[name].append(result.seconds)
                hits.append(found)
                same_token.append(cold_run.outputs == warm_run.outputs)
        warm.worker().blocks.check()
    return {"seconds": times, "cached_tokens": hits, "same_first_token": all(same_token)}


def mixed_prompts(config: PrefixBenchConfig, vocab: int) -> list[list[int]]:
    """`requests` prompts; every `long_every`-th one long, the others short (lengths spread over each range)."""
    count_long = config.requests // config.long_every
    short = random_prompts(config.requests - count_long, vocab, config.short_prompt, config.seed + 2)
    long = random_prompts(count_long, vocab, config.long_prompt, config.seed + 3)
    return [long.pop(0) if (i + 1) % config.long_every == 0 else short.pop(0) for i in range(config.requests)]


def measure_mix(config: PrefixBenchConfig, source: Any) -> dict[str, Any]:
    """Paged vs slot emulation on the same burst: per repetition, seconds, max running, preemptions, steps."""
    prompts = mixed_prompts(config, source.config.vocab_size)
    slots = config.budget_tokens // config.max_model_len
    common = dict(kv_cache_tokens=config.budget_tokens, max_waiting=len(prompts), enable_prefix_caching=False)
    harnesses = {
        "paged": CountingHarness(
            [served(source, config.max_model_len)], SchedulerConfig(config.paged_max_batch, **common)
        ),
        "slot": CountingHarness([served(source, config.max_model_len)], SchedulerConfig(slots, **common)),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in harnesses}
    outputs: dict[str, list[list[int]]] = {}
    with harnesses["paged"].running(), harnesses["slot"].running():
        for _ in range(config.mix_reps):
            for name, harness in harnesses.items():
                harness.reset()
                result = harness.run(MODEL, prompts, [None] * len(prompts), config.max_tokens)
                outputs[name] = result.outputs
                split = result.split()
                runs[name].append(
                    {
                        "seconds": result.seconds,
                        "tokens": result.tokens,
                        "max_running": max(harness.counts),
                        "mean_running": statistics.fmean(harness.counts),
                        "preemptions": harness.preemptions,
                        "tokens_computed_over_needed": harness.padding["tokens_computed"]
                        / harness.padding["tokens_needed"],
                        "attention_pairs_over_needed": harness.padding["pairs_scored"]
                        / harness.padding["pairs_needed"],
                        "forward_s": split["forward_s"],
                        "decode_steps": split["decode_steps"],
                        "decode_step_ms": split["decode_step_ms"],
                        "running_per_step": list(harness.counts),
                        "step_s": [t - harness.times[0] for t in harness.times],
                    }
                )
        for harness in harnesses.values():
            harness.worker().blocks.check()
    prompt_tokens = [len(p) for p in prompts]
    return {
        "runs": runs,
        "slots": slots,
        "same_tokens": outputs["paged"] == outputs["slot"],
        "prompt_tokens": {"total": sum(prompt_tokens), "min": min(prompt_tokens), "max": max(prompt_tokens)},
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]


def build_rows(config: PrefixBenchConfig, ttft: dict, mix: dict, decode: dict[int, dict]) -> list[dict[str, Any]]:
    cold, warm = (1e3 * statistics.median(ttft["seconds"][k]) for k in ("cold", "warm"))
    paged, slot = _median_run(mix["runs"]["paged"]), _median_run(mix["runs"]["slot"])
    paged_max = max(run["max_running"] for run in mix["runs"]["paged"])
    slot_max = max(run["max_running"] for run in mix["runs"]["slot"])
    paged_rate, slot_rate = paged["tokens"] / paged["seconds"], slot["tokens"] / slot["seconds"]

    def row(measure: str, baseline: str, base: float, ours: str, value: float, ratio: float, target: str, met):
        return {"measure": measure, "baseline": baseline, "baseline_value": base, "paged": ours,
                "paged_value": value, "ratio": ratio, "target": target, "met": met}  # fmt: skip

    target_ttft, target_conc = config.target_ttft_speedup, config.target_concurrency_ratio
    rows = [
        row(f"TTFT ms, {config.prefix_len}-token prefix + {config.suffix_len} new", "cold: prefix caching off",
            cold, "warm: prefix cached", warm, cold / warm, f">= {target_ttft:g}x faster", cold / warm >= target_ttft),
        row(f"max sequences running, KV budget {config.budget_tokens} tokens", f"slot cache: {mix['slots']} slots",
            slot_max, "paged", paged_max, paged_max / slot_max, f">= {target_conc:g}x",
            paged_max / slot_max >= target_conc),
        row("output tokens/s, same burst", f"slot cache: {mix['slots']} slots", slot_rate, "paged", paged_rate,
            paged_rate / slot_rate, "report", None),
    ]  # fmt: skip
    limit = config.target_decode_slowdown
    for context, costs in decode.items():
        for layout, label in (("paged_scattered", "paged, engine layout"), ("paged_slots", "paged, KVCache slots")):
            ratio = costs[f"{layout}_ratio"]
            met = ratio <= limit if layout == "paged_scattered" else None
            rows.append(
                row(f"batch-{config.decode_batch} decode forward ms, {context} cached", "slot cache (bdd9381)",
                    costs["slot_ms"], label, costs[f"{layout}_ms"], ratio, f"<= {limit:.2f}x the time", met)
            )  # fmt: skip
    return rows


def notes(config: PrefixBenchConfig, rows: list[dict[str, Any]], ttft: dict, mix: dict, decode: dict) -> list[str]:
    verdict = {True: "met", False: "missed"}
    ttft_row, conc_row, rate_row = rows[:3]
    miss = 1e3 * statistics.median(ttft["seconds"]["miss"])
    lines = [
        f"TTFT: {verdict[ttft_row['met']]}: {ttft_row['ratio']:.1f}x faster with the prefix cached "
        f"({ttft_row['baseline_value']:.1f} ms cold vs {ttft_row['paged_value']:.1f} ms warm; the warm request "
        f"found {'/'.join(str(n) for n in sorted(set(ttft['cached_tokens'])))} tokens cached and prefilled only the "
        f"rest). A prefix never seen, with caching on, took {miss:.1f} ms, {miss / ttft_row['baseline_value']:.2f}x "
        f"cold (the cost of the lookup and registration). Same first token cold and warm: {ttft['same_first_token']}.",
    ]
    paged_pre = [run["preemptions"] for run in mix["runs"]["paged"]]
    lines.append(
        f"Concurrency: {verdict[conc_row['met']]}: at most {conc_row['paged_value']} sequences ran at once on the "
        f"paged pool vs {conc_row['baseline_value']} on the slot emulation ({conc_row['ratio']:.1f}x), with "
        f"{config.requests} requests ({mix['prompt_tokens']['total']} prompt tokens, {mix['prompt_tokens']['min']}-"
        f"{mix['prompt_tokens']['max']} each, +{config.max_tokens} output) submitted at once; paged preemptions per "
        f"run {paged_pre}. Same greedy ids on both: {mix['same_tokens']}."
    )
    paged, slot = _median_run(mix["runs"]["paged"]), _median_run(mix["runs"]["slot"])
    lines.append(
        f"Throughput on that burst: paged {rate_row['ratio']:.2f}x the slot emulation ({rate_row['paged_value']:.0f} "
        f"vs {rate_row['baseline_value']:.0f} output tokens/s; median runs, {paged['mean_running']:.1f} vs "
        f"{slot['mean_running']:.1f} sequences per step on average, decode steps {paged['decode_step_ms']:.0f} vs "
        f"{slot['decode_step_ms']:.0f} ms, model forward {paged['forward_s']:.2f} vs {slot['forward_s']:.2f} s). "
        f"A forward is one right-padded (B, T) batch reading every row up to its longest row's blocks: the paged "
        f"engine's forwards computed {paged['tokens_computed_over_needed']:.2f}x the tokens they were fed (prompts "
        f"prefilled together pad to the longest chunk) and scored {paged['attention_pairs_over_needed']:.1f}x the "
        f"(query, key) pairs their rows need, vs {slot['tokens_computed_over_needed']:.2f}x and "
        f"{slot['attention_pairs_over_needed']:.1f}x on the slot emulation"
        + (
            ", whose few rows pad less."
            if paged["tokens_computed_over_needed"] > slot["tokens_computed_over_needed"]
            else "; padding does not explain the difference here."
        )  # fmt: skip
    )
    for context, costs in decode.items():
        scattered = costs["paged_scattered_ratio"]
        ok = scattered <= config.target_decode_slowdown
        lines.append(
            f"Decode, batch {config.decode_batch}, {context} cached tokens per row: {verdict[ok]}: paged (blocks "
            f"scattered, as in the engine) {scattered:.2f}x the slot cache's time, paged with consecutive blocks "
            f"(KVCache) {costs['paged_slots_ratio']:.2f}x ({costs['slot_ms']:.1f} ms slot). Where it "
            f"goes, per forward ({config.shape.num_layers} layers): KV read {costs['slot_read_ms']:.1f} ms slot vs "
            f"{costs['paged_scattered_read_ms']:.1f} ms paged; attention kernel on the read keys/values "
            f"{costs['slot_attend_ms']:.1f} ms vs {costs['paged_scattered_attend_ms']:.1f} ms (the paged read hands "
            f"SDPA a strided (B, KVH, L, D) view of (B, L, KVH, D) blocks; the slot read is contiguous). Logits equal "
            f"to {max(costs['paged_slots_max_abs_diff'], costs['paged_scattered_max_abs_diff']):.1e}."
        )
    return lines


def plot(fig: Figure, ttft: dict, mix: dict, decode: dict, config: PrefixBenchConfig) -> None:
    ttft_ax, conc_ax, dec_ax = fig.subplots(1, 3)
    labels = {"cold": "cold\n(caching off)", "miss": "new prefix\n(caching on)", "warm": "prefix cached"}
    values = [1e3 * statistics.median(ttft["seconds"][k]) for k in labels]
    ttft_ax.bar(list(labels.values()), values, color=["tab:gray", "tab:orange", "tab:green"])
    for x, v in enumerate(values):
        ttft_ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom")
    ttft_ax.set_ylabel("time to first token, ms (median)")
    ttft_ax.set_title(f"{config.prefix_len}-token prefix + {config.suffix_len} new tokens")
    for name, color in (("paged", "tab:green"), ("slot", "tab:gray")):
        run = _median_run(mix["runs"][name])
        series = run["running_per_step"]
        conc_ax.plot(run["step_s"], series, color=color, label=f"{name} (max {max(series)})")
    conc_ax.set_xlabel("seconds since the first step (median run)")
    conc_ax.set_ylabel("sequences running")
    conc_ax.set_title(f"mixed burst, KV budget {config.budget_tokens} tokens")
    conc_ax.legend()
    layouts = {"slot_ms": "slot (bdd9381)", "paged_slots_ms": "paged, slots", "paged_scattered_ms": "paged, scattered"}
    width = 0.8 / len(layouts)
    for i, (key, label) in enumerate(layouts.items()):
        dec_ax.bar(
            [c + (i - 1) * width for c in range(len(decode))], [d[key] for d in decode.values()], width, label=label
        )
    dec_ax.set_xticks(range(len(decode)), [f"{c} cached" for c in decode])
    dec_ax.set_ylabel(f"batch-{config.decode_batch} decode forward, ms (median)")
    dec_ax.set_title("decode step: paged vs slot layout")
    dec_ax.legend()


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    config = TINY if tiny else PrefixBenchConfig()
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp, tqdm(total=3, desc=NAME, unit="part") as bar:
        source = random_model(MODEL, config.shape, Path(tmp), config.seed)
        ttft = measure_ttft(config, source)
        bar.update()
        mix = measure_mix(config, source)
        bar.update()
        model = load_model(source.directory)
        decode = {
            ctx: decode_costs(
                model,
                DecodeCase(config.decode_batch, ctx, config.decode_warmup, config.decode_reps),
            )
            for ctx in config.decode_contexts
        }
        bar.update()
    rows = build_rows(config, ttft, mix, decode)
    targets = {r["measure"]: {"target": r["target"], "ratio": r["ratio"], "met": r["met"]} for r in rows}
    log.info("%s: %s", NAME, "; ".join(f"{r['measure']}: {r['ratio']:.2f}" for r in rows))
    mix_summary = {
        name: [{k: v for k, v in run.items() if k not in ("running_per_step", "step_s")} for run in runs]
        for name, runs in mix["runs"].items()
    }
    meta = {
        "config": asdict(config),
        "model": source.describe(),
        "target": targets,
        "notes": notes(config, rows, ttft, mix, decode),
        "ttft_ms": {k: [1e3 * s for s in v] for k, v in ttft["seconds"].items()},
        "ttft_cached_tokens": ttft["cached_tokens"],
        "mix_runs": mix_summary,
        "decode": decode,
        "correctness": {
            "same_first_token_cold_warm": ttft["same_first_token"],
            "same_ids_paged_slot": mix["same_tokens"],
        },
        "columns": "ratio: cold/warm TTFT, paged/slot concurrency and tokens/s, paged/slot decode time (the median of "
        "each round's ratio); TTFT from submission to the first token's event (median of rounds); max sequences "
        "running = max StepStats.num_running over all repetitions; tokens/s from the median-duration repetition",
    }
    return write_report(NAME, rows, out_dir, lambda fig, _rows: plot(fig, ttft, mix, decode, config), meta)
