"""The zoo's `student-int8` stage: the trained student quantized to int8 and saved in the quantized layout.

No training: the float student is loaded, quantized with `models.quantization` (every linear layer, the
LM head and the embeddings; int8 weights with one float32 scale per output channel), and saved with
`save_model`, which writes int8 tensors, their scales and a `quantization_config` (layout: the
docstring of `models/quantization.py`). The card records how it was made and what it costs: bytes on
disk against the float student, validation bits per byte of both (same windows), and the greedy
agreement of the two over the first tokens of a few validation prompts. `modelserve serve` serves it
with the zoo (every model directory under artifacts/ is served).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from models.checkpoint import load_model, save_model
from models.generate import SamplingConfig, generate
from models.quantization import QuantizationConfig, quantize_model, weight_bytes
from training.build_context import Context, lm_metrics
from training.cards import read_card, write_card

SOURCE = "student"
NAME = "student-int8"
COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
AGREEMENT_PROMPTS = 8  # validation windows whose prefix starts a greedy continuation
AGREEMENT_TOKENS = 32


def greedy_agreement(a: torch.nn.Module, b: torch.nn.Module, windows: torch.Tensor, prompt_len: int = 16) -> float:
    """Fraction of the first AGREEMENT_TOKENS greedy tokens that two models share, position by position."""
    prompts = [row[:prompt_len].tolist() for row in windows[:AGREEMENT_PROMPTS]]
    config = SamplingConfig(max_new_tokens=AGREEMENT_TOKENS)
    same = total = 0
    for x, y in zip(generate(a, prompts, config), generate(b, prompts, config), strict=True):
        same += sum(int(p == q) for p, q in zip(x, y, strict=True))
        total += len(x)
    return same / max(total, 1)


def build_student_int8(ctx: Context, directory: Path, source: str = SOURCE) -> dict:
    """Quantize `<out>/<source>` into `directory`; returns the card."""
    t0 = time.perf_counter()
    source_dir = ctx.out / source
    directory.mkdir(parents=True, exist_ok=True)
    float_model = load_model(source_dir)
    config = QuantizationConfig()
    model = quantize_model(load_model(source_dir), config)
    save_model(model, directory)
    for name in COPIED:
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, directory / name)
    float_metrics, int8_metrics = lm_metrics(ctx, float_model), lm_metrics(ctx, model)
    float_bpb, int8_bpb = float_metrics["val_bits_per_byte"], int8_metrics["val_bits_per_byte"]
    source_card = read_card(source_dir) or {}
    float_file, int8_file = (d / "model.safetensors" for d in (source_dir, directory))
    card = {
        "name": NAME,
        "summary": f"The {source} quantized to int8 (weights only; every linear layer, the LM head and the "
        "embeddings; symmetric, one float32 scale per output channel). No training.",
        "source_model": source,
        "quantization_config": config.to_dict(),
        "parameters": source_card.get("parameters", sum(p.numel() for p in float_model.parameters())),
        "model_safetensors_bytes": int8_file.stat().st_size,
        "float32_model_safetensors_bytes": float_file.stat().st_size,
        "smaller_on_disk_than_float32": round(float_file.stat().st_size / int8_file.stat().st_size, 3),
        "weight_bytes_in_memory": weight_bytes(model),
        "float32_weight_bytes_in_memory": weight_bytes(float_model),
        "smaller_in_memory_than_float32": round(weight_bytes(float_model) / weight_bytes(model), 3),
        **int8_metrics,
        "float32_val_bits_per_byte": float_bpb,
        "val_bits_per_byte_change": round((int8_bpb - float_bpb) / float_bpb, 5),
        "greedy_agreement_first_32_tokens": round(greedy_agreement(float_model, model, ctx.val["all"]), 4),
        "training_tokens": 0,
        "training_seconds": 0.0,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "command": ctx.command,
        "notes": "Quantized with `models.quantization.quantize_model(load_model(student), QuantizationConfig())` "
        "and saved by `models.checkpoint.save_model` (int8 weights + float32 scales, "
        "`quantization_config.quant_method = modelserve-int8`). Speed, adapters' exact match and the "
        "comparison with bfloat16: `modelserve bench --only quantization`.",
    }
    return write_card(directory, card)
