"""Benchmark: speculative decoding, the teacher with the distilled student as draft, vs the teacher alone;
and prompt-lookup (n-gram) speculation on a code-editing workload, vs the teacher alone on it.

Batch 1, greedy, same prompts and weights, through the engine (continuous batching off: one request
at a time). Checks the tokens are identical, then reports decode throughput, the speed-up and the
draft acceptance rate for several draft lengths k. The code-editing workload: a function from the
standard library, then the request to write it again with its first line given, so the output
largely repeats the prompt (what n-gram speculation exploits, as when an assistant edits code).
Uses the demo zoo's teacher and student from artifacts/ (a random pair has nothing to accept, so a
full run without the zoo is refused); tiny mode uses two random tiny models to prove the benchmark runs.
Requests go to the engine itself (`Engine.submit`), not through the engine client: acceptance is
read from the engine's per-step stats (`on_step`), and decoding is the engine core's work.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from bench.common import write_report
from models import ModelConfig, TextTokenizer, load_model
from models.decoder import CausalLM
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, ServedModel
from service.engine.speculative import SpeculativeConfig

NAME = "speculative"
ARTIFACTS = Path("artifacts")
PROMPTS = [
    "def main(args):\n    ",
    "import os\nimport sys\n\n",
    "The function returns",
    "class Config:\n    def __init__(self",
    "for i in range(len(items)):\n",
    "This module provides",
]
EDITED_FUNCTIONS = [
    "textwrap.dedent",
    "html.escape",
    "shlex.quote",
    "json.dumps",
    "fnmatch.translate",
    "base64.b64encode",
]
log = logging.getLogger(__name__)


def edit_prompts(count: int, max_chars: int) -> list[str]:
    """Code-editing prompts: a stdlib function (its first max_chars), then its first line again to be continued."""
    import importlib
    import inspect

    prompts = []
    for dotted in EDITED_FUNCTIONS[:count]:
        module, name = dotted.rsplit(".", 1)
        source = inspect.getsource(getattr(importlib.import_module(module), name))[:max_chars]
        prompts.append(f"{source}\n\n# The same function again, unchanged:\n{source.splitlines()[0]}\n")
    return prompts


@dataclass(frozen=True)
class SpecBenchConfig:
    draft_lengths: tuple[int, ...] = (2, 4, 6)
    ngram_lengths: tuple[int, ...] = (4, 8)
    max_tokens: int = 64
    reps: int = 3


TINY = SpecBenchConfig(draft_lengths=(2,), ngram_lengths=(4,), max_tokens=6, reps=1)


def load_pair(tiny: bool) -> tuple[CausalLM, CausalLM, TextTokenizer]:
    if not tiny:
        if not (ARTIFACTS / "teacher" / "config.json").is_file():
            raise SystemExit("speculative benchmark needs the demo zoo: run `modelserve build --preset demo` first")
        tokenizer = TextTokenizer.load(ARTIFACTS / "teacher")
        return load_model(ARTIFACTS / "teacher"), load_model(ARTIFACTS / "student"), tokenizer
    from tests.service.engine_fixtures import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = ModelConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
        models.append(CausalLM(config).eval())
    return models[0], models[1], tokenizer


def generate_one(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """One request alone through the engine: (tokens, seconds from submit to the last token)."""
    tokens: list[int] = []
    done = threading.Event()

    def on_event(event):
        tokens.extend(event.token_ids)
        if event.finish_reason:
            done.set()

    started = time.perf_counter()
    engine.submit(GenerationRequest("b", "teacher", prompt, SamplingParams(max_tokens, 0.0, ignore_eos=True)), on_event)
    done.wait()
    return tokens, time.perf_counter() - started


def make_engine(
    teacher: CausalLM, tokenizer: TextTokenizer, draft: CausalLM | None, k: int, ngram: bool = False
) -> tuple[Engine, list]:
    stats: list = []
    engine = Engine(EngineConfig(), on_step=stats.append)
    spec = SpeculativeConfig(num_draft_tokens=k) if draft is not None else None
    if ngram:
        spec = SpeculativeConfig(num_draft_tokens=k, method="ngram")
    max_len = min(teacher.config.max_position_embeddings, 1024)
    engine.add_model(
        ServedModel("teacher", teacher, tokenizer, max_model_len=max_len, draft_model=draft, speculative=spec)
    )
    engine.start()
    return engine, stats


def measure(
    engines: dict[str, tuple[Engine, list]], prompts: list[list[int]], config: SpecBenchConfig, base: str
) -> list[dict[str, Any]]:
    """Interleaved repetitions of every variant on the prompts; one row per variant, ratios to `base`."""
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[str, list[list[int]]] = {name: [] for name in engines}
    for prompt in prompts:  # warm-up
        for engine, _ in engines.values():
            generate_one(engine, prompt, config.max_tokens)
    for _ in tqdm(range(config.reps), desc=NAME, unit="rep"):
        for name, (engine, stats) in engines.items():  # interleaved: noise hits every variant
            stats.clear()
            total = 0.0
            outputs[name] = []
            for prompt in prompts:
                tokens, took = generate_one(engine, prompt, config.max_tokens)
                outputs[name].append(tokens)
                total += took
            seconds[name].append(total)
    generated = len(prompts) * config.max_tokens
    base_seconds = statistics.median(seconds[base])
    rows = []
    for name, (_, stats) in engines.items():
        median = statistics.median(seconds[name])
        drafted = sum(s.spec_draft_tokens for s in stats)
        accepted = sum(s.spec_accepted_tokens for s in stats)
        rows.append(
            {
                "variant": name,
                "tokens_per_s": generated / median,
                "speedup": base_seconds / median,
                "acceptance_rate": accepted / drafted if drafted else float("nan"),
                "identical_tokens": outputs[name] == outputs[base],
            }
        )
    return rows


def verdict(rows: list[dict[str, Any]], target: float) -> tuple[dict[str, Any], str]:
    best = max(rows[1:], key=lambda r: r["speedup"])
    met = best["speedup"] >= target and best["identical_tokens"]
    return best, f"best {best['variant']}: {best['speedup']:.2f}x ({'met' if met else 'not met'})"


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    config = TINY if tiny else SpecBenchConfig()
    teacher, student, tokenizer = load_pair(tiny)
    prompts = [tokenizer.encode(p) for p in PROMPTS[: 2 if tiny else len(PROMPTS)]]
    edits = [tokenizer.encode(p) for p in edit_prompts(1 if tiny else len(EDITED_FUNCTIONS), 24 if tiny else 700)]
    draft_engines = {"teacher": make_engine(teacher, tokenizer, None, 0)}
    for k in config.draft_lengths:
        draft_engines[f"k={k}"] = make_engine(teacher, tokenizer, student, k)
    ngram_engines = {"teacher (code editing)": make_engine(teacher, tokenizer, None, 0)}
    for k in config.ngram_lengths:
        ngram_engines[f"ngram k={k} (code editing)"] = make_engine(teacher, tokenizer, None, k, ngram=True)
    try:
        draft_rows = measure(draft_engines, prompts, config, "teacher")
        ngram_rows = measure(ngram_engines, edits, config, "teacher (code editing)")
    finally:
        for engine, _ in [*draft_engines.values(), *ngram_engines.values()]:
            engine.stop()
    _, draft_verdict = verdict(draft_rows, 1.5)
    _, ngram_verdict = verdict(ngram_rows, 1.5)
    meta = {
        "config": asdict(config),
        "models": "random tiny pair" if tiny else "artifacts/teacher with artifacts/student as draft",
        "teacher_params": teacher.config.num_parameters()["total"],
        "draft_params": student.config.num_parameters()["total"],
        "target": f">= 1.5x the teacher alone with identical tokens; draft model {draft_verdict}; "
        f"n-gram on code editing {ngram_verdict}",
        "edited_functions": EDITED_FUNCTIONS,
    }
    return write_report(NAME, draft_rows + ngram_rows, out_dir, plot, meta)


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    speed, accept = fig.subplots(1, 2)
    names = [r["variant"].replace(" (code editing)", "\n(code edit)") for r in rows]
    colours = ["grey" if r["variant"].startswith("teacher") else "tab:blue" for r in rows]
    speed.bar(names, [r["speedup"] for r in rows], color=colours)
    speed.axhline(1.5, color="tab:red", linestyle="--", label="target 1.5x")
    speed.set_ylabel("speed-up vs teacher alone")
    speed.set_title("Speculative decoding, batch 1, greedy")
    speed.legend()
    spec_rows = [r for r in rows if not r["variant"].startswith("teacher")]
    accept.bar(
        [r["variant"].replace(" (code editing)", "\n(code edit)") for r in spec_rows],
        [r["acceptance_rate"] for r in spec_rows],
        color="tab:green",
    )
    accept.set_ylim(0, 1)
    accept.set_ylabel("draft tokens accepted")
    accept.set_title("Acceptance rate by draft length k")
