"""Shared set-up of the engine benchmarks (multi_lora, batching, decode): weights, workloads, timing.

Weights: the demo zoo in `artifacts/` when it is built (HF-format directories with tokenizer.json),
else a random model of the same shape class saved with `models.save_model`, so that the engine and
`transformers` load the very same weights from one directory. Random PEFT adapters are written by
`peft` itself, so the peft baseline and the engine load identical adapter files.

Workloads are greedy (temperature 0) with `ignore_eos`, so every side generates exactly
`max_tokens` per request. `EngineHarness` measures the engine core, below the engine client: it
submits token ids with `Engine.submit` and a callback from another thread, and records, per engine
step, the step time (`StepStats.step_seconds`) and the time spent in the model runner (it wraps
`runner.run`: forward passes, LoRA included), so a run's time splits into model forward, the rest of
the step (scheduling, sampling, detokenizing, events) and time outside steps. It keeps the engine
rather than `EngineClient` because those per-step hooks are engine internals the client does not
expose, and the client's work per request (admission, tokenizing, validation, handing events to an
asyncio loop) is the HTTP path's cost, which `bench/http_overhead.py` measures through the client.
The peers (`transformers` generate, with `peft` for adapters) are in `bench/peers.py`.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from adapters.registry import AdapterRegistry, RegistryConfig
from bench.common import time_interleaved
from models import CausalLM, ModelConfig, TextTokenizer, load_model, save_model
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, SchedulerConfig, ServedModel

ZOO = Path("artifacts")  # where `modelserve build` writes the demo zoo (relative to the working directory)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RUN_TIMEOUT_S = 600.0
T = TypeVar("T")


@dataclass(frozen=True)
class ModelShape:
    """A random model's shape; the defaults are the dense fallback of the full-size benchmarks."""

    hidden_size: int = 256
    intermediate_size: int = 688  # per expert when num_experts > 0
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int | None = None
    vocab_size: int = 4096
    num_experts: int = 0
    top_k: int = 2
    # Wider than the training init so logits have clear margins: greedy tokens must not hinge on
    # float round-off when the engine's batched result is compared with a peer's.
    init_std: float = 0.05
    max_positions: int = 1024

    def config(self) -> ModelConfig:
        moe = dict(model_type="mixtral", num_local_experts=self.num_experts, num_experts_per_tok=self.top_k)
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_positions,
            initializer_range=self.init_std,
            bos_token_id=1,
            eos_token_id=2,
            **(moe if self.num_experts else dict(model_type="llama")),
        )


DENSE = ModelShape()  # the brief's fallback: llama, hidden 256, 4 layers, 8 heads, vocab 4096
LLAMA_512x8 = ModelShape(512, 1376, 8, 8)  # issue 14's held-out Llama: 118 MB in float32
MOE = ModelShape(128, 256, 2, 4, num_experts=8)  # the demo preset's MoE shape: 8 experts of 256, top-2
TINY_DENSE = ModelShape(32, 64, 2, 2, vocab_size=512, max_positions=256)
TINY_MOE = ModelShape(32, 32, 2, 2, vocab_size=512, num_experts=4, max_positions=256)


@dataclass(frozen=True)
class ModelSource:
    name: str
    directory: Path
    origin: str  # "zoo" (artifacts/, trained) or "random"
    dtype: str | None = None  # the engine's weights (None: the checkpoint's); peers always load float32
    config: ModelConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:  # read now: a random model's directory is deleted after the run
        object.__setattr__(self, "config", ModelConfig.load(self.directory))

    def describe(self) -> dict[str, Any]:
        shape = {k: getattr(self.config, k) for k in ("model_type", "hidden_size", "num_hidden_layers")}
        return {"dir": str(self.directory), "origin": self.origin, **shape, **self.config.num_parameters()}


def zoo_model(name: str) -> ModelSource | None:
    """The zoo's model `name` when artifacts/<name> holds config.json and tokenizer.json."""
    directory = ZOO / name
    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return ModelSource(name, directory, "zoo")
    return None


def word_tokenizer(vocab_size: int) -> TextTokenizer:
    """A word-level tokenizer with one token per id (the random models' ids decode to `w<id>`)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TextTokenizer(tokenizer, {"bos_token": "<s>", "eos_token": "</s>"})


def save_random_model(config: ModelConfig, directory: Path, seed: int) -> Path:
    """A seeded random model (and a word tokenizer) saved as a Hugging Face-format directory."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CausalLM(config).eval()
    save_model(model, directory)
    word_tokenizer(config.vocab_size).save(directory)
    return directory


def random_model(name: str, shape: ModelShape, workdir: Path, seed: int) -> ModelSource:
    return ModelSource(name, save_random_model(shape.config(), workdir / name, seed), "random")


def model_or_random(zoo_name: str, shape: ModelShape, workdir: Path, seed: int, tiny: bool) -> ModelSource:
    """The zoo model at full size when it is built; otherwise (and always in tiny mode) a random one."""
    found = None if tiny else zoo_model(zoo_name)
    return found or random_model(zoo_name, shape, workdir, seed)


def bench_scheduler(**settings: Any) -> SchedulerConfig:
    """The engine's scheduler for a benchmark: prefix caching off unless asked for. Benchmarks send the same
    prompts round after round; with the cache on, every round after the first would skip the prefills that
    the peer (`transformers`, or the other variant) pays for. Only `prefix_cache` measures caching."""
    return SchedulerConfig(**{"enable_prefix_caching": False, **settings})


def served(
    source: ModelSource, max_model_len: int, name: str | None = None, adapters: RegistryConfig | None = None
) -> ServedModel:
    """Load the directory into a ServedModel named `name` (default: the source's); with `adapters`, LoRA
    layers are attached and an empty adapter registry comes with it."""
    model = load_model(source.directory, dtype=source.dtype)
    name = name or source.name
    registry = AdapterRegistry(name, model, adapters) if adapters is not None else None
    eos = tuple(model.config.eos_token_ids)
    return ServedModel(name, model, TextTokenizer.load(source.directory), max_model_len, eos, registry)


def make_peft_adapters(base_dir: Path, out_dir: Path, count: int, rank: int, std: float, seed: int) -> list[Path]:
    """Write `count` random rank-`rank` LoRA adapters on all of LORA_TARGETS with peft; return their dirs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS)))
    lora = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    directories = []
    with torch.no_grad():
        for i in range(count):
            generator = torch.Generator().manual_seed(seed + i)
            for p in lora:
                p.normal_(0.0, std, generator=generator)
            directories.append(out_dir / f"lora{i:02d}")
            peft_model.save_pretrained(directories[-1])
    return directories


def random_prompts(count: int, vocab_size: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """`count` prompts of seeded random ids in [3, vocab); lengths spread over [lo, hi]."""
    generator = torch.Generator().manual_seed(seed)
    lo, hi = lengths
    sizes = [lo + (i * 7) % (hi - lo + 1) for i in range(count)]
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in sizes]


# ---- timing ----
def interleaved(fns: dict[str, Callable[[], T]], warmup: int, reps: int | dict[str, int]) -> dict[str, list[T]]:
    """Results of `reps` timed calls of each fn (each fn times itself), called in turn round by round.

    `reps` may differ per fn (an expensive baseline repeated less): a fn sits out the rounds after its
    count is done. Warm-up rounds call every fn and discard the results.
    """
    counts = reps if isinstance(reps, dict) else dict.fromkeys(fns, reps)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    results: dict[str, list[T]] = {name: [] for name in fns}
    for round_index in range(max(counts.values())):
        for name, fn in fns.items():
            if round_index < counts[name]:
                results[name].append(fn())
    return results


def time_blocks(fns: dict[str, Callable[[], object]], block: int, warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed interleaved in blocks of `block` consecutive calls.

    Consecutive calls on one model keep its weights in the CPU caches, as consecutive decode steps do;
    alternating single calls between models with separate weights would time every call cold.
    """
    blocks = {name: (lambda fn=fn: [fn() for _ in range(block)]) for name, fn in fns.items()}
    return {name: seconds / block for name, seconds in time_interleaved(blocks, warmup, reps).items()}


@dataclass
class StepRecord:
    sequences: int  # rows in the step's batch
    tokens: int  # tokens fed (prefill chunks + decode tokens)
    step_s: float  # StepStats.step_seconds: the whole engine step
    forward_s: float  # inside ModelRunner.run: inputs, metadata, forward passes (LoRA included)
    at: float = 0.0  # perf_counter when the engine reported the step (after its events were sent)

    def clipped(self, start: float, end: float) -> StepRecord:
        """The step with its duration cut to the run's [start, end]: the last step goes on after the run's
        last token (finishing the sequence, and waiting for the GIL while this thread wakes up)."""
        step_s = max(0.0, min(self.at, end) - max(self.at - self.step_s, start))
        return StepRecord(self.sequences, self.tokens, step_s, min(self.forward_s, step_s), self.at)


@dataclass
class RunResult:
    """One run of a workload: all requests to completion."""

    seconds: float  # first submission -> last token received
    outputs: list[list[int]]  # generated ids per request, in submission order
    token_times: list[list[float]] = field(default_factory=list)  # perf_counter when each token arrived
    steps: list[StepRecord] = field(default_factory=list)  # engine runs only

    @property
    def tokens(self) -> int:
        return sum(len(out) for out in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time from first to last token, per request, averaged (batch 1)."""
        rates = [(len(t) - 1) / (t[-1] - t[0]) for t in self.token_times if len(t) > 1 and t[-1] > t[0]]
        return statistics.fmean(rates) if rates else float("nan")

    def split(self) -> dict[str, float]:
        """Where the run's time went: totals (s) and, over decode-only steps, means per step (ms)."""
        step_total = sum(s.step_s for s in self.steps)
        forward_total = sum(s.forward_s for s in self.steps)
        decode = [s for s in self.steps if s.tokens == s.sequences]
        return {
            "steps": len(self.steps),
            "decode_steps": len(decode),
            "forward_s": forward_total,
            "other_step_s": step_total - forward_total,
            "outside_steps_s": self.seconds - step_total,
            "decode_step_ms": _mean_ms([s.step_s for s in decode]),
            "decode_forward_ms": _mean_ms([s.forward_s for s in decode]),
            "decode_other_ms": _mean_ms([s.step_s - s.forward_s for s in decode]),
        }


def _mean_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.fmean(seconds) if seconds else float("nan")


def median_run(runs: list[RunResult]) -> RunResult:
    """The run of median duration (the upper median for an even count)."""
    return sorted(runs, key=lambda run: run.seconds)[len(runs) // 2]


class EngineHarness:
    """An engine serving some models, instrumented per step; runs workloads through `Engine.submit`."""

    def __init__(self, models: list[ServedModel], scheduler: SchedulerConfig) -> None:
        self.engine = Engine(EngineConfig(scheduler=scheduler), on_step=self._on_step)
        for model in models:
            self.engine.add_model(model)
            self._time_runner(self.engine.workers[model.name].runner)
        self._ids = itertools.count()
        self._forward_s = 0.0
        self._steps: list[StepRecord] = []
        self._reported = threading.Condition()

    def _time_runner(self, runner: Any) -> None:
        run = runner.run

        def timed(rows):  # instance attribute: only this benchmark's engine is instrumented
            start = time.perf_counter()
            try:
                return run(rows)
            finally:
                self._forward_s += time.perf_counter() - start

        runner.run = timed

    def _on_step(self, stats: Any) -> None:  # engine thread, after each step
        record = StepRecord(stats.num_sequences, stats.num_tokens, stats.step_seconds, self._forward_s)
        record.at = time.perf_counter()
        self._forward_s = 0.0
        with self._reported:
            self._steps.append(record)
            self._reported.notify_all()

    @contextmanager
    def running(self) -> Iterator[EngineHarness]:
        self.engine.start()
        try:
            yield self
        finally:
            self.engine.stop()

    def run(
        self,
        model: str,
        prompts: list[list[int]],
        adapters: list[str | None],
        max_tokens: int,
        sequential: bool = False,
    ) -> RunResult:
        """All requests submitted at once (or, sequential, each after the previous finished)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outputs: list[list[int]] = [[] for _ in prompts]
        times: list[list[float]] = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]  # per request: sequential runs wait on each
        all_done = threading.Event()  # one wake-up of this thread per run when concurrent
        remaining = [len(prompts)]  # callbacks all run on the engine thread: no lock needed
        failures: list[str] = []

        def on_event(index: int, event: Any) -> None:
            now = time.perf_counter()
            outputs[index].extend(event.token_ids)
            times[index].extend([now] * len(event.token_ids))
            if event.finish_reason is not None:
                if event.finish_reason != "length":
                    failures.append(f"{event.request_id}: {event.finish_reason} {event.error or ''}")
                remaining[0] -= 1
                done[index].set()
                if remaining[0] == 0:
                    all_done.set()

        self._steps = []
        start = time.perf_counter()
        for index, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
            request = GenerationRequest(f"bench-{next(self._ids)}", model, prompt, params, adapter=adapter)
            self.engine.submit(request, lambda event, index=index: on_event(index, event))
            if sequential:
                self._wait(done[index])
        self._wait(all_done)
        end = max(t[-1] for t in times if t)
        with self._reported:  # the last step is reported after its final events: wait for its record
            if not self._reported.wait_for(lambda: self._steps and self._steps[-1].at >= end, RUN_TIMEOUT_S):
                raise TimeoutError("the engine did not report its last step")
            steps = list(self._steps)
        if failures:
            raise RuntimeError(f"requests did not finish normally: {failures[:3]}")
        return RunResult(end - start, outputs, times, [record.clipped(start, end) for record in steps])

    @staticmethod
    def _wait(event: threading.Event) -> None:
        if not event.wait(RUN_TIMEOUT_S):
            raise TimeoutError(f"benchmark requests did not finish within {RUN_TIMEOUT_S} s")
