"""Benchmark: int8 weight quantization vs float32 and bfloat16 — size, decode speed, quality (issue 17).

Models: the zoo's student and teacher (else a random llama of `serving.DENSE`'s shape; `--tiny`: a
tiny random one), each loaded three ways from the same float32 directory: float32, bfloat16, and
int8 (`load_model(..., quantization="int8")`: every linear layer, the LM head and the embeddings).

- size: bytes of `model.safetensors` as `save_model` writes each variant (int8: the quantized layout),
  and bytes of weights in memory (`models.quantization.weight_bytes`);
- speed: greedy decode through the engine, batch 1 (one request) and batch 32 (32 concurrent
  requests), `max_tokens` each; the figure is the mean engine step of decode-only steps (prefill left
  out), median over rounds; all variants and batch sizes interleaved round by round;
- quality: validation bits per byte (the zoo's validation windows, `training.evaluate`), the task
  adapters' exact match (student-upper, student-lower on their test words, `training.tasks`, adapters
  applied in full precision by the engine's LoRA layers), and greedy agreement with float32 over the
  first 32 tokens of 16 fixed prompts (validation text).

The kernel options measured before choosing (`bench.quant_kernels`) are in the same report.
Targets (issue 17): weights >= 3.5x smaller than float32; bits per byte within 1% of float32;
adapters' exact match unchanged; decode >= 0.8x float32 at batch 1 and >= 1.0x at batch 32 on this
CPU; faster than bfloat16 on a GPU (measured by `bench/gpu_check.sh`, not here).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from adapters.registry import AdapterRegistry
from bench import quant_kernels
from bench.common import write_report
from bench.serving import (
    DENSE,
    TINY_DENSE,
    ZOO,
    EngineHarness,
    ModelSource,
    bench_scheduler,
    interleaved,
    random_model,
    random_prompts,
    zoo_model,
)
from models import CausalLM, SamplingConfig, TextTokenizer, generate, load_model, save_model
from models.quantization import weight_bytes
from service.engine import ServedModel

NAME = "quantization"
# int8: int8 weights, float32 activations (what `--quantization int8` serves on a CPU by default);
# int8_bf16act: the same weights with bfloat16 activations (`--quantization int8` with dtype bfloat16).
VARIANTS = ("float32", "bfloat16", "int8", "int8_bf16act")
TASK_ADAPTERS = ("student-upper", "student-lower")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantBenchConfig:
    prompt_len: int = 16
    max_tokens: int = 32
    batch: int = 32
    warmup: int = 1
    reps: int = 15
    agreement_prompts: int = 16
    agreement_tokens: int = 32
    smaller_at_least: float = 3.5
    bpb_within: float = 0.01  # relative
    batch1_at_least: float = 0.8
    batch32_at_least: float = 1.0
    tiny: bool = False
    seed: int = 0


TINY = QuantBenchConfig(max_tokens=4, batch=4, warmup=0, reps=1, agreement_prompts=2, agreement_tokens=4, tiny=True)


def load_variant(directory: Path, variant: str) -> CausalLM:
    if variant.startswith("int8"):
        return load_model(directory, dtype="bfloat16" if variant == "int8_bf16act" else None, quantization="int8")
    return load_model(directory, dtype=variant)


def sources(config: QuantBenchConfig, workdir: Path) -> list[ModelSource]:
    if config.tiny:
        return [random_model("dense", TINY_DENSE, workdir, config.seed)]
    found = [m for m in (zoo_model("student"), zoo_model("teacher")) if m is not None]
    return found or [random_model("dense", DENSE, workdir, config.seed)]


def disk_bytes(model: CausalLM, directory: Path) -> int:
    save_model(model, directory)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def validation(config: QuantBenchConfig, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(windows (N, T+1), token bytes (V,), where from): the zoo's validation split, or random for --tiny."""
    summary = ZOO / "zoo.json"
    if not config.tiny and summary.is_file() and (ZOO / "tokenizer" / "tokenizer.json").is_file():
        import json

        from training.build_context import make_context
        from training.presets import get_preset

        ctx = make_context(get_preset(json.loads(summary.read_text())["preset"]), ZOO, force=False)
        if ctx.tokenizer.vocab_size == vocab_size:
            return ctx.val["all"], ctx.token_bytes, "zoo validation split (code + English)"
    gen = torch.Generator().manual_seed(config.seed)
    windows = torch.randint(3, vocab_size, (4, 33), generator=gen)
    return windows, torch.ones(vocab_size), "random tokens (1 byte each): only proves the path runs"


def bits_per_byte(model: CausalLM, windows: torch.Tensor, token_bytes: torch.Tensor) -> float:
    from training.evaluate import bits_per_byte as bpb

    return bpb(model, windows, token_bytes)


def agreement(reference: CausalLM, other: CausalLM, prompts: list[list[int]], tokens: int) -> float:
    """Fraction of positions where the two models' greedy continuations agree (first `tokens` each)."""
    sampling = SamplingConfig(max_new_tokens=tokens)
    with torch.inference_mode():
        a, b = generate(reference, prompts, sampling), generate(other, prompts, sampling)
    same = sum(int(x == y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    return same / sum(len(r) for r in a)


def exact_matches(model: CausalLM, source: ModelSource) -> dict[str, float]:
    """Each task adapter's exact match on its test words, applied on `model` by the serving LoRA layers."""
    from training import tasks
    from training.presets import get_preset

    adapters = {
        n: ZOO / "adapters" / n for n in TASK_ADAPTERS if (ZOO / "adapters" / n / "adapter_config.json").is_file()
    }
    if source.origin != "zoo" or source.name != "student" or not adapters:
        return {}
    import json

    preset = get_preset(json.loads((ZOO / "zoo.json").read_text())["preset"])
    tokenizer = TextTokenizer.load(source.directory)
    registry = AdapterRegistry(source.name, model)
    out = {}
    for name, directory in adapters.items():
        registry.load(name, directory)
        target = name.removeprefix("student-")
        test = tasks.make_examples(target, preset.task_test_examples, "test", preset.seed)
        with registry.activate([name] * 64, 1), torch.inference_mode():  # one adapter: one segment of rows
            out[name] = tasks.exact_match(model, tokenizer, test, batch_size=64)
    return out


def decode_runs(models: dict[str, CausalLM], source: ModelSource, config: QuantBenchConfig) -> dict[str, float]:
    """Median ms per decode-only engine step for each variant at batch 1 and batch `config.batch`."""
    max_len = config.prompt_len + config.max_tokens
    tokenizer = TextTokenizer.load(source.directory)
    served = [
        ServedModel(variant, model, tokenizer, max_len, tuple(model.config.eos_token_ids))
        for variant, model in models.items()
    ]
    harness = EngineHarness(served, bench_scheduler(max_batch_size=max(config.batch, 1)))
    vocab = source.config.vocab_size
    one = random_prompts(1, vocab, (config.prompt_len,) * 2, config.seed)
    many = random_prompts(config.batch, vocab, (config.prompt_len,) * 2, config.seed + 1)
    fns = {}
    for variant in models:
        fns[f"{variant} b1"] = lambda v=variant: harness.run(v, one, [None], config.max_tokens)
        fns[f"{variant} b{config.batch}"] = lambda v=variant: harness.run(
            v, many, [None] * len(many), config.max_tokens
        )
    with harness.running():
        runs = interleaved(fns, config.warmup, config.reps)
    return {key: statistics.median(r.split()["decode_step_ms"] for r in results) for key, results in runs.items()}


def measure_model(
    source: ModelSource, config: QuantBenchConfig, workdir: Path, val: tuple[torch.Tensor, torch.Tensor, str]
) -> list[dict[str, Any]]:
    models = {variant: load_variant(source.directory, variant) for variant in VARIANTS}
    windows, token_bytes, _ = val
    prompts = [row[: config.prompt_len].tolist() for row in windows[: config.agreement_prompts]]
    steps = decode_runs(models, source, config)
    rows = []
    for variant, model in models.items():
        b1, bn = steps[f"{variant} b1"], steps[f"{variant} b{config.batch}"]
        rows.append(
            {
                "model": source.name,
                "variant": variant,
                "disk_mb": disk_bytes(model, workdir / f"{source.name}-{variant}") / 1e6,
                "memory_mb": weight_bytes(model) / 1e6,
                "b1_step_ms": b1,
                f"b{config.batch}_step_ms": bn,
                "b1_tok_s": 1e3 / b1,
                f"b{config.batch}_tok_s": 1e3 * config.batch / bn,
                "val_bpb": bits_per_byte(model, windows, token_bytes),
                "greedy_agreement": agreement(models["float32"], model, prompts, config.agreement_tokens),
                **{f"em_{k.removeprefix('student-')}": v for k, v in exact_matches(model, source).items()},
            }
        )
    base = rows[0]
    for row in rows:
        row["smaller_on_disk"] = base["disk_mb"] / row["disk_mb"]
        row["smaller_in_memory"] = base["memory_mb"] / row["memory_mb"]
        row["b1_speed_vs_f32"] = base["b1_step_ms"] / row["b1_step_ms"]
        row[f"b{config.batch}_speed_vs_f32"] = base[f"b{config.batch}_step_ms"] / row[f"b{config.batch}_step_ms"]
        row["bpb_change"] = (row["val_bpb"] - base["val_bpb"]) / base["val_bpb"]
    return rows


def verdicts(rows: list[dict[str, Any]], config: QuantBenchConfig) -> dict[str, Any]:
    n = config.batch
    int8 = {f"{r['model']} {r['variant']}": r for r in rows if r["variant"].startswith("int8")}
    f32 = {f"{r['model']} {v}": r for r in rows if r["variant"] == "float32" for v in VARIANTS}
    ems = {m: [k for k, v in r.items() if k.startswith("em_") and v is not None] for m, r in f32.items()}
    checks = {
        f"weights >= {config.smaller_at_least}x smaller than float32 (disk and memory)": {
            m: r["smaller_on_disk"] >= config.smaller_at_least and r["smaller_in_memory"] >= config.smaller_at_least
            for m, r in int8.items()
        },
        f"bits per byte within {config.bpb_within:.0%} of float32": {
            m: abs(r["bpb_change"]) <= config.bpb_within for m, r in int8.items()
        },
        "adapters' exact match unchanged": {
            m: all(r[k] == f32[m][k] for k in ems[m]) for m, r in int8.items() if ems[m]
        }
        or "not measured (needs the zoo's student and its task adapters)",
        f"batch-1 decode >= {config.batch1_at_least}x float32": {
            m: r["b1_speed_vs_f32"] >= config.batch1_at_least for m, r in int8.items()
        },
        f"batch-{n} decode >= {config.batch32_at_least}x float32": {
            m: r[f"b{n}_speed_vs_f32"] >= config.batch32_at_least for m, r in int8.items()
        },
        "faster than bfloat16 on a GPU": "measured by bench/gpu_check.sh (int8_vs_bf16), not on this CPU",
    }
    return checks


def notes(rows: list[dict[str, Any]], kernels: list[dict[str, Any]], config: QuantBenchConfig) -> list[str]:
    n = config.batch
    out = []
    for r in rows:
        if r["variant"] == "float32":
            continue
        out.append(
            f"{r['model']} {r['variant']}: {r['smaller_on_disk']:.2f}x smaller on disk, "
            f"{r['smaller_in_memory']:.2f}x in memory; decode {r['b1_speed_vs_f32']:.2f}x float32 at batch 1 "
            f"({r['b1_step_ms']:.2f} ms/step), "
            f"{r[f'b{n}_speed_vs_f32']:.2f}x at batch {n} ({r[f'b{n}_step_ms']:.2f} ms/step); bits/byte "
            f"{r['bpb_change']:+.2%}; greedy agreement with float32 {r['greedy_agreement']:.1%}"
        )
    ours = {(k["shape"], k["rows"]): k["speedup_vs_float32"] for k in kernels if k["option"] == "ours"}
    if ours:
        shown = ", ".join(f"{shape} @{rows}: {value:.2f}x" for (shape, rows), value in ours.items())
        out.append(f"QuantizedLinear (auto kernel) vs float32 F.linear, per layer shape and rows: {shown}")
    return out


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    size_ax, speed_ax = fig.subplots(1, 2)
    models = list(dict.fromkeys(r["model"] for r in rows))
    keys = [k for k in rows[0] if k.endswith("_speed_vs_f32")]  # b1_..., b32_...
    groups = [(m, k) for m in models for k in keys]  # speed panel: one group per (model, batch size)
    width = 0.2
    for i, variant in enumerate(VARIANTS):
        mine = {r["model"]: r for r in rows if r["variant"] == variant}
        offset = (i - (len(VARIANTS) - 1) / 2) * width
        size_ax.bar(
            [j + offset for j in range(len(models))], [mine[m]["memory_mb"] for m in models], width, label=variant
        )
        speed_ax.bar([j + offset for j in range(len(groups))], [mine[m][k] for m, k in groups], width, label=variant)
    size_ax.set_xticks(range(len(models)), models)
    size_ax.set_ylabel("weights in memory (MB)")
    size_ax.set_title("size by weight format")
    size_ax.legend()
    speed_ax.axhline(1.0, color="grey", lw=0.8)
    speed_ax.set_xticks(range(len(groups)), [f"{m}\nbatch {k.split('_')[0][1:]}" for m, k in groups])
    speed_ax.set_ylabel("decode speed vs float32 (x, engine steps)")
    speed_ax.set_title("decode speed vs float32")
    speed_ax.legend(fontsize=7)


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    config = TINY if tiny else QuantBenchConfig()
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        models = sources(config, Path(tmp))
        val = validation(config, models[0].config.vocab_size)  # the zoo's models share one tokenizer
        rows = [row for source in models for row in measure_model(source, config, Path(tmp), val)]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    rows = [{key: row.get(key) for key in columns} for row in rows]  # exact match: the student's rows only
    kernels = quant_kernels.measure(tiny)
    checks = verdicts(rows, config)
    log.info("%s: %s", NAME, checks)
    meta = {
        "config": asdict(config),
        "models": {m.name: m.describe() for m in models},
        "validation": val[2],
        "target": checks,
        "notes": notes(rows, kernels, config),
        "kernel_options": quant_kernels.pivot(kernels),
        "kernel_options_errors": {
            f"{k['shape']} @{k['rows']} {k['option']}": round(k["error"], 5) for k in kernels if k["rows"] == 32
        },
        "columns": "disk_mb: model.safetensors as saved; memory_mb: weights in memory (int8 + scales + float rest); "
        "b*_step_ms: mean decode-only engine step, median over rounds; *_speed_vs_f32: float32 step / this step; "
        "val_bpb: validation bits per byte; greedy_agreement: positions where greedy tokens equal float32's; "
        "em_*: task adapter exact match on its test words; kernel_options: speed-up over float32 F.linear per "
        "option (bench/quant_kernels.py)",
    }
    return write_report(NAME, rows, out_dir, plot, meta)
