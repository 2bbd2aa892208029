"""One short run that verifies the CUDA path end to end (`bash bench/gpu_check.sh` on a GPU machine).

Checks, each printed as PASS/FAIL with its numbers, then written to reports/gpu_check.json:
- tiny Llama/Qwen2/Mixtral from `transformers`: our float32 logits equal theirs on the device;
- bfloat16 weights load and generate, and the engine's greedy tokens equal `models.generate`;
- the SDPA flash kernel runs for causal prefill (forced with `sdpa_kernel(FLASH_ATTENTION)`) and agrees
  with the math path;
- a mixed batch of LoRA adapters equals `peft` per adapter; speculative decoding keeps greedy tokens;
- the engine's compiled decode step (`compile_decode`) gives the eager engine's tokens (float32, bfloat16);
- an int8-quantized model serves its own greedy tokens, and its decode speed against bfloat16 at
  batch 1 and 32 (`bench/gpu_int8.py`; issue 17's GPU target).
Then the benchmarks run at full size with the device's timings. With `--device cpu` it runs the same
checks on the CPU (that is how CI keeps it from rotting).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.gpu_int8 import check_int8_vs_bf16

log = logging.getLogger("gpu_check")


def check_hf_parity(device: str) -> dict:
    from models import load_model
    from tests.models.hf_fixtures import VOCAB, save_hf_model

    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llama", "qwen2", "mixtral"):
            hf = save_hf_model(family, Path(tmp) / family).to(device)
            ours = load_model(Path(tmp) / family, device=device)
            ids = torch.randint(3, VOCAB, (2, 33), device=device)
            with torch.no_grad():
                worst = max(worst, float((ours(ids).logits - hf(ids).logits).abs().max()))
    return {"ok": worst < 1e-3, "max_abs_diff_fp32": worst}


def check_flash_and_bf16(device: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.attention import attend

    q = torch.randn(1, 8, 1024, 64, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    k, v = torch.randn_like(q), torch.randn_like(q)
    backend = SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        flash = attend(q, k, v, None, 0.125, "sdpa")
    math = attend(q.float(), k.float(), v.float(), None, 0.125, "eager")
    diff = float((flash.float() - math).abs().max())
    return {"ok": diff < 2e-2, "flash_vs_math_max_abs_diff": diff, "dtype": str(q.dtype)}


def run_engine(model, tokenizer, prompts, max_tokens, scheduler=None, **served) -> list[list[int]]:
    from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, SchedulerConfig, ServedModel

    engine = Engine(EngineConfig(scheduler=scheduler or SchedulerConfig()))
    engine.add_model(ServedModel("m", model, tokenizer, max_model_len=128, **served))
    engine.start()
    out: dict[str, list[int]] = {}
    done = threading.Event()

    def on_event(event):
        out.setdefault(event.request_id, []).extend(event.token_ids)
        if event.finish_reason and sum(1 for _ in out) == len(prompts):
            done.set()

    try:
        for i, (prompt, adapter) in enumerate(prompts):
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            engine.submit(GenerationRequest(str(i), "m", prompt, params, adapter=adapter), on_event)
        done.wait(120)
        time.sleep(0.2)
    finally:
        engine.stop()
    return [out[str(i)] for i in range(len(prompts))]


def check_engine_bf16(device: str) -> dict:
    from models import SamplingConfig, generate
    from tests.service.engine_fixtures import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model(tokenizer.vocab_size).to(device, dtype)
    prompts = [(tokenizer.encode(t), None) for t in ("hello world", "the lazy dog", "def f")]
    engine_tokens = run_engine(model, tokenizer, prompts, 16)
    alone = [generate(model, [p], SamplingConfig(max_new_tokens=16))[0] for p, _ in prompts]
    draft = tiny_model(tokenizer.vocab_size, seed=3).to(device, dtype)
    spec_tokens = run_engine(model, tokenizer, prompts, 16, draft_model=draft)
    return {
        "ok": engine_tokens == alone and spec_tokens == alone,
        "dtype": str(dtype),
        "engine_equals_generate": engine_tokens == alone,
        "speculative_equals_generate": spec_tokens == alone,
    }


def check_compile(device: str) -> dict:
    """The engine's compiled decode (models/decode_graph.py) gives the eager engine's greedy tokens, in
    float32 and (CUDA) bfloat16, batch buckets 1-4; its warm-up and tokens/s against eager are reported."""
    from service.engine import SchedulerConfig
    from tests.service.engine_fixtures import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    prompts = [(tokenizer.encode(text), None) for text in ("hello world", "the quick brown fox", "def f(x):", "a")]
    result: dict = {"ok": True}
    for dtype in [torch.float32] + ([torch.bfloat16] if device == "cuda" else []):
        model = tiny_model(tokenizer.vocab_size).to(device=device, dtype=dtype)
        timings = {}
        tokens = {}
        for compiled in (False, True):
            scheduler = SchedulerConfig(max_batch_size=4, compile_decode=compiled)
            started = time.perf_counter()
            tokens[compiled] = run_engine(model, tokenizer, prompts, 32, scheduler)
            timings[compiled] = time.perf_counter() - started
        same = tokens[True] == tokens[False]
        result[str(dtype)] = {
            "tokens_equal_eager": same,
            "eager_run_s": round(timings[False], 2),
            "compiled_run_s_with_warmup": round(timings[True], 2),
        }
        result["ok"] = result["ok"] and same
    return result


CHECKS: dict[str, Callable[[str], dict]] = {
    "hf_parity": check_hf_parity,
    "flash_bf16": check_flash_and_bf16,
    "engine_bf16_speculative": check_engine_bf16,
    "compile": check_compile,
    "int8_vs_bf16": check_int8_vs_bf16,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--skip", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device: run with --device cpu to check the script itself")
        return 2
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
    failed = False
    for name, check in CHECKS.items():
        if name in args.skip:
            continue
        try:
            result = check(args.device)
        except Exception as exc:  # a check that crashes is a failed check, reported with the others
            result = {"ok": False, "error": repr(exc)}
        failed |= not result["ok"]
        results[name] = result
        log.info("%s %s %s", "PASS" if result["ok"] else "FAIL", name, json.dumps(result))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
