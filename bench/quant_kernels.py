"""The int8 options measured before choosing one: one linear layer, float32 vs every int8 path PyTorch offers.

For the demo student's and teacher's shapes (hidden 128 and 192, intermediate 344 and 512, vocabulary
4096) and a 512-hidden model's MLP, at 1 and 32 rows (batch-1 and batch-32 decode), each option
computes y = x @ W^T from the same float32 x and W, timed interleaved in blocks (`time_blocks`),
medians; `error` is |y - y_float32| / |y_float32|. Options:

- `float32`: `F.linear`, the baseline; `bfloat16`: `F.linear` on bfloat16 x and W (a bfloat16 model,
  no casts counted);
- `wo_int8_f32`: `torch.ops.aten._weight_int8pack_mm` with float32 activations; `wo_int8_bf16`: the
  same kernel fed bfloat16 activations, casts in and out counted (what `QuantizedLinear` does);
- `dyn_int8`: activations quantized per row, `torch._int_mm` (int32 accumulate), scales applied;
- `dequant`: the int8 weight converted to float32 per call, then the float32 matmul, scales applied;
- `ao_dynamic`: `torch.ao.nn.quantized.dynamic.Linear` (fbgemm/x86, per-channel; deprecated API);
- `torchao_wo`, `torchao_dyn`: torchao's `Int8WeightOnlyConfig` and
  `Int8DynamicActivationInt8WeightConfig` (only when torchao is installed; it is not a requirement);
- `ours`: `QuantizedLinear` with kernel "auto" (weight-only up to 8 rows; above, dequant for small
  weights and dynamic for large ones).

`python -m bench.quant_kernels` prints the table; `bench.quantization` puts it in its report.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.serving import time_blocks
from models.int8_kernels import WEIGHT_ONLY_K_MULTIPLE, dequant, dynamic
from models.quantization import QuantizationConfig, QuantizedLinear, quantize_weight

# name -> (out_features, in_features)
SHAPES = {
    "student qkvo 128x128": (128, 128),
    "student up 344x128": (344, 128),
    "student down 128x344": (128, 344),
    "student lm_head 4096x128": (4096, 128),
    "teacher up 512x192": (512, 192),
    "teacher lm_head 4096x192": (4096, 192),
    "512-hidden up 1376x512": (1376, 512),
}
TINY_SHAPES = {"tiny 64x32": (64, 32)}
ROWS = (1, 32)


def _torchao_options(linear: nn.Linear, x: Tensor) -> dict[str, Callable[[], Tensor]]:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except Exception:  # not installed (it is optional): no rows
        return {}
    options = {}
    for name, config in (
        ("torchao_wo", Int8WeightOnlyConfig()),
        ("torchao_dyn", Int8DynamicActivationInt8WeightConfig()),
    ):
        module = copy.deepcopy(linear)
        quantize_(module, config)
        options[name] = lambda module=module: module(x)
    return options


def _ao_dynamic(linear: nn.Linear, x: Tensor) -> Callable[[], Tensor] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            module = quantize_dynamic(nn.Sequential(copy.deepcopy(linear)), {nn.Linear: per_channel_dynamic_qconfig})
    except Exception:  # removed in a later torch
        return None
    return lambda: module(x)


def options(out_features: int, in_features: int, rows: int, seed: int = 0) -> dict[str, Callable[[], Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=gen)
    w = linear.weight.detach()  # (N, K)
    x = torch.randn(rows, in_features, generator=gen)  # (M, K)
    q, scale = quantize_weight(w)
    w_bf16, x_bf16, scale_bf16 = w.bfloat16(), x.bfloat16(), scale.bfloat16()
    ours = QuantizedLinear.from_linear(linear, QuantizationConfig())
    fns: dict[str, Callable[[], Tensor]] = {
        "float32": lambda: F.linear(x, w),
        "bfloat16": lambda: F.linear(x_bf16, w_bf16),
        "wo_int8_f32": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale),
        "dyn_int8": lambda: dynamic(x, q, scale),
        "dequant": lambda: dequant(x, q, scale),
        "ours": lambda: ours(x),
    }
    if rows == 1 or in_features % WEIGHT_ONLY_K_MULTIPLE == 0:  # else the CPU kernel crashes the process
        fns["wo_int8_bf16"] = lambda: torch.ops.aten._weight_int8pack_mm(x_bf16, q, scale_bf16).float()
    ao = _ao_dynamic(linear, x)
    if ao is not None:
        fns["ao_dynamic"] = ao
    fns.update(_torchao_options(linear, x))
    return fns


def measure(tiny: bool) -> list[dict[str, Any]]:
    """One row per (shape, rows, option): median µs per call, speed-up over float32, relative error."""
    shapes = TINY_SHAPES if tiny else SHAPES
    block, reps = (2, 2) if tiny else (30, 15)
    rows_out = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for shape, (n, k) in shapes.items():
            for rows in ROWS:
                fns = options(n, k, rows)
                reference = fns["float32"]().float()
                errors = {name: float((fn().float() - reference).norm() / reference.norm()) for name, fn in fns.items()}
                seconds = time_blocks(fns, block, warmup=2, reps=reps)
                for name, value in seconds.items():
                    rows_out.append(
                        {
                            "shape": shape,
                            "rows": rows,
                            "option": name,
                            "us": 1e6 * value,
                            "speedup_vs_float32": seconds["float32"] / value,
                            "error": errors[name],
                        }
                    )
    return rows_out


def pivot(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table as the README shows it: one row per (shape, rows), one speed-up column per option."""
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        entry = table.setdefault((row["shape"], row["rows"]), {"shape": row["shape"], "rows": row["rows"]})
        if row["option"] == "float32":
            entry["float32_us"] = round(row["us"], 1)
        entry[row["option"]] = round(row["speedup_vs_float32"], 2)
    columns = list(dict.fromkeys(key for entry in table.values() for key in entry))
    return [{column: entry.get(column) for column in columns} for entry in table.values()]  # n/a: not run


def main() -> None:
    from bench.common import markdown_table

    torch.set_num_threads(1)
    rows = measure(tiny=False)
    print(markdown_table(pivot(rows)))  # noqa: T201 (bench/ may print)
    errors = {r["option"]: r["error"] for r in rows if r["rows"] == 32}
    print("relative error at 32 rows (last shape):", {k: f"{v:.1e}" for k, v in errors.items()})  # noqa: T201


if __name__ == "__main__":
    main()
