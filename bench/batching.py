"""Benchmark: continuous batching, throughput at 1..32 concurrent requests vs sequential batch 1.

One engine serving the zoo's student (else a random llama of `serving.DENSE`'s shape). The
reference is the same 32 requests run one after another (each submitted when the previous one
finished: batch 1 throughout); each concurrency level c submits the first c of them at once.
Greedy with `ignore_eos` and fixed `max_tokens`, so every request generates the same number of
tokens; the 32-concurrent ids must equal the sequential ones (batching must not change results).
Target: 32 concurrent >= 4x sequential batch-1 throughput. Each row also splits the median run's
decode steps into model forward and the rest of the step (scheduling, sampling, detokenizing).
Requests go to the engine itself (`bench.serving.EngineHarness`, `Engine.submit`), not through the
engine client: batching is the engine core's work, and the per-step split needs its step hooks.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from bench.common import write_report
from bench.peers import compare_outputs
from bench.serving import (
    DENSE,
    TINY_DENSE,
    EngineHarness,
    RunResult,
    bench_scheduler,
    interleaved,
    median_run,
    model_or_random,
    random_prompts,
    served,
)

NAME = "batching"
SEQUENTIAL = "sequential batch-1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingBenchConfig:
    requests: int = 32
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    prompt_lens: tuple[int, int] = (16, 32)
    max_tokens: int = 32
    warmup: int = 1
    reps: int = 7
    target_concurrency: int = 32
    target_speedup: float = 4.0
    tiny: bool = False
    seed: int = 0


TINY = BatchingBenchConfig(
    requests=2, concurrency=(1, 2), max_tokens=4, warmup=0, reps=1, target_concurrency=2, tiny=True
)


def make_row(mode: str, concurrency: int, runs: list[RunResult], reference: float | None) -> dict[str, Any]:
    run = median_run(runs)
    split = run.split()
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(run.outputs),
        "tokens": run.tokens,
        "median_s": run.seconds,
        "tokens_per_s": run.tokens_per_s,
        "vs_sequential": run.tokens_per_s / reference if reference else 1.0,
        "reps": len(runs),
        "decode_step_ms": split["decode_step_ms"],
        "decode_forward_ms": split["decode_forward_ms"],
        "decode_other_ms": split["decode_other_ms"],
        "outside_steps_ms": 1e3 * split["outside_steps_s"],
    }


def notes(rows: list[dict[str, Any]], verdict: dict[str, Any]) -> list[str]:
    concurrent = {r["concurrency"]: r for r in rows if r["mode"] == "concurrent"}
    one, top = concurrent[min(concurrent)], concurrent[verdict["concurrency"]]
    per_token_one, per_token_top = one["decode_step_ms"], top["decode_step_ms"] / top["concurrency"]
    return [
        f"{verdict['concurrency']} concurrent = {verdict['speedup']:.2f}x sequential batch-1 (target "
        f"{verdict['speedup_at_least']}: {'met' if verdict['met'] else 'missed'})",
        f"decode step {one['decode_step_ms']:.2f} ms at batch 1 and {top['decode_step_ms']:.2f} ms at batch "
        f"{top['concurrency']}: {per_token_one:.3f} -> {per_token_top:.3f} ms per generated token; the model "
        f"forward is {100 * top['decode_forward_ms'] / top['decode_step_ms']:.0f}% of the batch-"
        f"{top['concurrency']} step (the rest: scheduling, sampling, detokenizing, events)",
    ]


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    rate_ax, step_ax = fig.subplots(1, 2)
    concurrent = [r for r in rows if r["mode"] == "concurrent"]
    sequential = next(r for r in rows if r["mode"] == SEQUENTIAL)
    levels = [r["concurrency"] for r in concurrent]
    rate_ax.plot(levels, [r["tokens_per_s"] for r in concurrent], marker="o", label="concurrent requests")
    rate_ax.axhline(sequential["tokens_per_s"], color="black", linewidth=0.8, label=SEQUENTIAL)
    speedup = BatchingBenchConfig.target_speedup
    target = speedup * sequential["tokens_per_s"]
    rate_ax.axhline(target, color="red", linestyle="--", linewidth=0.8, label=f"target ({speedup:g}x sequential)")
    step_ax.bar([str(c) for c in levels], [r["decode_forward_ms"] for r in concurrent], label="model forward")
    step_ax.bar(
        [str(c) for c in levels],
        [r["decode_other_ms"] for r in concurrent],
        bottom=[r["decode_forward_ms"] for r in concurrent],
        label="rest of the step",
    )
    rate_ax.set_xscale("log", base=2)
    rate_ax.set_xticks(levels, [str(c) for c in levels])
    rate_ax.set_xlabel("concurrent requests")
    rate_ax.set_ylabel("generated tokens / s (median)")
    rate_ax.set_title("continuous batching throughput")
    rate_ax.grid(True, alpha=0.3)
    rate_ax.legend()
    step_ax.set_xlabel("concurrent requests")
    step_ax.set_ylabel("mean decode step (ms)")
    step_ax.set_title("decode step time split")
    step_ax.legend()


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    config = TINY if tiny else BatchingBenchConfig()
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        source = model_or_random("student", TINY_DENSE if tiny else DENSE, Path(tmp), config.seed, tiny)
        model = served(source, config.prompt_lens[1] + config.max_tokens, "base")
        prompts = random_prompts(config.requests, model.model.config.vocab_size, config.prompt_lens, config.seed)
        harness = EngineHarness([model], bench_scheduler(max_batch_size=max(config.concurrency)))
        fns = {SEQUENTIAL: lambda: harness.run("base", prompts, [None] * len(prompts), config.max_tokens, True)}
        for c in config.concurrency:
            fns[f"concurrent {c}"] = lambda c=c: harness.run("base", prompts[:c], [None] * c, config.max_tokens)
        with harness.running(), tqdm(total=1, desc=NAME, unit="block") as progress:
            runs = interleaved(fns, config.warmup, config.reps)
            progress.update()
    reference = median_run(runs[SEQUENTIAL]).tokens_per_s
    rows = [make_row(SEQUENTIAL, 1, runs[SEQUENTIAL], reference)]
    rows += [make_row("concurrent", c, runs[f"concurrent {c}"], reference) for c in config.concurrency]
    at_target = next(r for r in rows if r["mode"] == "concurrent" and r["concurrency"] == config.target_concurrency)
    verdict = {
        "concurrency": config.target_concurrency,
        "speedup": at_target["vs_sequential"],
        "speedup_at_least": config.target_speedup,
        "met": at_target["vs_sequential"] >= config.target_speedup,
    }
    log.info("%s: %d concurrent = %.2fx sequential", NAME, config.target_concurrency, verdict["speedup"])
    checked = runs[f"concurrent {config.target_concurrency}"][0].outputs
    meta = {
        "config": asdict(config),
        "model": source.describe(),
        "target": verdict,
        "notes": notes(rows, verdict),
        "correctness": {
            "concurrent_vs_sequential": compare_outputs(checked, runs[SEQUENTIAL][0].outputs[: len(checked)])
        },
        "columns": "tokens_per_s = generated tokens / median wall s (first submission to last token); "
        "vs_sequential = tokens_per_s / sequential batch-1 tokens_per_s; decode_* = means over the median run's "
        "decode-only steps: whole step, ModelRunner.run (model forward), the rest; outside_steps_ms = wall time "
        "not inside an engine step (submission, waiting between sequential requests)",
    }
    return write_report(NAME, rows, out_dir, plot, meta)
