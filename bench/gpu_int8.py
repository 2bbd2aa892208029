"""`bench/gpu_check.py`'s int8 check: an int8 model against the same model in bfloat16 on the device.

Correctness (decides PASS): a tiny model quantized to int8 serves through the engine the greedy tokens
its own `models.generate` gives, and its logits stay within int8 tolerance of the unquantized model's.
Speed (reported, issue 17's GPU target "int8 faster than bfloat16"): one decode token's model forward
with a KV cache at batch 1 and batch 32, timed interleaved in blocks, bfloat16 weights vs int8 weights
(bfloat16 activations), on a Llama of TinyLlama's shape (1.1B parameters; random weights, which do
not change the speed) on CUDA, on a small one on the CPU (where this only proves the path runs). The
int8 kernel used on CUDA is reported too ("weight_only": `_weight_int8pack_mm`; "dequant" where
that op has no CUDA kernel).
"""

from __future__ import annotations

import torch

from bench.serving import time_blocks
from models import AttentionMetadata, CausalLM, KVCache, ModelConfig, SamplingConfig, generate
from models.int8_kernels import _MISSING
from models.quantization import quantize_model, weight_bytes

GPU_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)  # fmt: skip
CPU_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512)  # fmt: skip
CONTEXT = {"cuda": 256, "cpu": 16}  # tokens already cached when the timed decode token runs
BATCHES = (1, 32)


def decode_token_ms(models: dict[str, CausalLM], batch: int, device: str, block: int, reps: int) -> dict[str, float]:
    """Median ms of one decode forward (batch rows, CONTEXT[device] cached tokens each) per model, interleaved."""
    fns = {}
    for name, model in models.items():
        context = CONTEXT[device]
        cache = KVCache(model.config, batch, context + 1, model.dtype, device)
        rows = torch.arange(batch, device=device)
        token = torch.full((batch, 1), 3, device=device)  # (B, 1)

        def step(model=model, cache=cache, rows=rows, token=token, context=context) -> None:
            ones = torch.ones(batch, dtype=torch.long, device=device)
            meta = AttentionMetadata.for_cache(cache, slots=rows, context_lens=ones * context, query_lens=ones)
            model(token, meta=meta, logits_positions=ones - 1)
            if device == "cuda":
                torch.cuda.synchronize()

        fns[name] = step
    with torch.inference_mode():
        seconds = time_blocks(fns, block, warmup=2, reps=reps)
    return {name: 1e3 * value for name, value in seconds.items()}


def speed(device: str) -> dict:
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    config = ModelConfig(max_position_embeddings=CONTEXT[device] + 8, **shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    built = []
    for _ in range(2):  # the same weights twice: quantized from float32, then the float parts cast
        torch.manual_seed(0)
        with torch.device(device):
            built.append(CausalLM(config).eval())
    bf16, int8 = built[0].to(dtype), quantize_model(built[1], "int8").to(dtype)
    models = {"bf16": bf16, "int8": int8}
    out: dict = {"params": sum(p.numel() for p in bf16.parameters()), "dtype": str(dtype)}
    out["weight_bytes"] = {name: weight_bytes(m) for name, m in models.items()}
    for batch in BATCHES:
        ms = decode_token_ms(
            models, batch, device, block=5 if device == "cuda" else 2, reps=7 if device == "cuda" else 2
        )
        out[f"b{batch}_ms"] = ms
        out[f"b{batch}_int8_speedup_vs_bf16"] = ms["bf16"] / ms["int8"]
    out["int8_kernels_missing_on_device"] = sorted(kernel for dev, kernel in _MISSING if dev == device)
    out["faster_than_bf16"] = all(out[f"b{b}_int8_speedup_vs_bf16"] > 1.0 for b in BATCHES)
    return out


def check_int8_vs_bf16(device: str) -> dict:
    from bench.gpu_check import run_engine
    from tests.service.engine_fixtures import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reference = tiny_model(tokenizer.vocab_size).to(device, dtype)
    model = quantize_model(tiny_model(tokenizer.vocab_size).to(device), "int8").to(dtype)
    prompts = [(tokenizer.encode(t), None) for t in ("hello world", "the lazy dog", "def f")]
    # One request at a time, as `generate` runs them: the int8 kernel is chosen by the number of rows
    # (models/int8_kernels.py), so a batched row may round differently from a batch-1 one.
    engine_tokens = [run_engine(model, tokenizer, [p], 16)[0] for p in prompts]
    alone = [generate(model, [p], SamplingConfig(max_new_tokens=16))[0] for p, _ in prompts]
    ids = torch.tensor([prompts[0][0]], device=device)
    with torch.inference_mode():
        a, b = reference(ids).logits.float(), model(ids).logits.float()
    error = float((a - b).norm() / a.norm())
    result = {"ok": engine_tokens == alone and error < 0.08, "engine_equals_generate": engine_tokens == alone}
    result["logits_rel_error_vs_unquantized"] = error
    result["speed"] = speed(device)
    return result
