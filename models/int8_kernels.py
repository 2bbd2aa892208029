"""The int8 matrix products behind `QuantizedLinear`: PyTorch's own kernels, chosen per call by shape.

A quantized weight is `w` (N, K) int8 with one float scale per output channel `scale` (N,), so
`W ≈ w * scale[:, None]` and `x @ W^T = (x @ w^T) * scale`. Three ways to compute it, all maintained
PyTorch ops (no hand-written kernels):

- "weight_only": `torch.ops.aten._weight_int8pack_mm(x_bf16, w, scale_bf16)` reads the int8 weight
  directly; activations go in as bfloat16 (with float32 activations the CPU kernel is 4-30x slower
  than float32 `F.linear`, measured). Fast for a few rows (decode), slow for many. On this CPU the
  kernel crashes the process (segmentation fault) when K % 16 != 0 and more than one row is given,
  so it is only called with K % 16 == 0.
- "dynamic": activations quantized per row (per token: symmetric, absmax / 127), then
  `torch._int_mm(x_int8, w^T)` (int32 accumulate, VNNI/AMX on x86) and both scales applied to the
  output. Fast for many rows (batched decode, prefill); its fixed cost (~8 small ops) makes it slow
  for tiny layers at one row.
- "dequant": `x @ w.to(x.dtype)^T * scale`: the weight converted to the activations' dtype on every call
  (a transient float copy), then the float matmul. The readable reference, the fallback on devices
  where neither kernel exists, and on CPU the fastest int8 path for small weights at many rows: there
  the conversion costs less than the dynamic kernel's fixed ~8 small ops.

`auto` on CPU: "weight_only" up to `weight_only_max_rows` rows (when K % 16 == 0); above that (or
when K % 16 != 0) "dequant" for weights of at most DEQUANT_MAX_WEIGHTS entries and "dynamic" for
larger ones. On other devices: "weight_only" (with "dequant" where the op is missing there). The
choice was measured (`python -m bench.quant_kernels`; README, Quantization). Every kernel is
row-independent, but which kernel runs depends on the number of rows, so a row's logits can differ
in the last digits with the batch it is in (int8 vs bfloat16 rounding of activations).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KERNELS = ("auto", "weight_only", "dynamic", "dequant")
# `_weight_int8pack_mm` on x86 CPUs (torch 2.13) segfaults for K % 16 != 0 with more than one row.
WEIGHT_ONLY_K_MULTIPLE = 16
# CPU, more rows than weight_only_max_rows: converting a weight this small per call beats quantizing the
# activations (measured at 16-64 rows: 128x128 .. 192x512 weights 0.6-0.8x float32 with "dequant",
# 0.2-0.6x with "dynamic"; 4096x128 and larger: "dynamic" 0.9-2.3x, "dequant" ~0.7x).
DEQUANT_MAX_WEIGHTS = 1 << 18
_MISSING: set[tuple[str, str]] = set()  # (device type, kernel) pairs whose op raised NotImplementedError


def weight_only(x: Tensor, w: Tensor, scale_bf16: Tensor) -> Tensor:
    """x (M, K) float, w (N, K) int8, scale_bf16 (N,) bfloat16 -> (M, N) in x's dtype.

    Casts are no-ops for a bfloat16 model (x and scales already bfloat16)."""
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w, scale_bf16.to(torch.bfloat16))
    return y.to(x.dtype)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: x (M, K) -> (x_int8 (M, K), row scale (M, 1) float32)."""
    amax = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True, dtype=torch.float32)  # (M, 1)
    row_scale = amax.clamp_(min=1e-12).div_(127.0)
    # |x / row_scale| <= 127 by construction, so no clamp is needed before the cast.
    return torch.div(x, row_scale).round_().to(torch.int8), row_scale


def dynamic(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """x (M, K) float, w (N, K) int8, scale (N,) -> (M, N) in x's dtype; activations int8 per row."""
    x_int8, row_scale = quantize_rows(x)
    acc = torch._int_mm(x_int8, w.t())  # (M, N) int32; w.t() is a view: (K, N) column-major
    return (acc * row_scale).mul_(scale.float()).to(x.dtype)  # int32 * float32 -> float32 in one op


def dequant(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """x (M, K) float, w (N, K) int8, scale (N,) -> (M, N): the reference (a float copy of w per call)."""
    return torch.mm(x, w.t().to(x.dtype)).mul_(scale.to(x.dtype))  # (M, K) @ (K, N), then per column


def choose(
    kernel: str, rows: int, in_features: int, out_features: int, device: torch.device, weight_only_max_rows: int
) -> str:
    """The kernel that `auto` (or an explicit choice) resolves to for this call."""
    fits_weight_only = in_features % WEIGHT_ONLY_K_MULTIPLE == 0 or device.type != "cpu"
    small = in_features * out_features <= DEQUANT_MAX_WEIGHTS
    if kernel == "auto":
        if device.type != "cpu":
            kernel = "weight_only"
        elif rows <= weight_only_max_rows and fits_weight_only:
            kernel = "weight_only"
        else:
            kernel = "dequant" if small else "dynamic"
    if kernel == "weight_only" and not fits_weight_only:
        kernel = "dynamic"  # never call the crashing CPU case
    if kernel == "dynamic" and device.type == "cuda" and (rows <= 16 or in_features % 8 or out_features % 8):
        kernel = "weight_only"  # cuBLAS int8 GEMM needs M > 16 and K, N multiples of 8
    if (device.type, kernel) in _MISSING:
        kernel = "dequant"
    return kernel


def int8_matmul(
    x: Tensor, w: Tensor, scale: Tensor, scale_bf16: Tensor, kernel: str = "auto", weight_only_max_rows: int = 8
) -> Tensor:
    """x (M, K) float, w (N, K) int8, per-output-channel scale (N,) -> x @ (w * scale)^T, (M, N)."""
    chosen = choose(kernel, x.shape[0], x.shape[1], w.shape[0], x.device, weight_only_max_rows)
    try:
        if chosen == "weight_only":
            return weight_only(x, w, scale_bf16)
        if chosen == "dynamic":
            return dynamic(x, w, scale)
    except NotImplementedError:  # the op has no kernel on this device: remember, use the reference
        _MISSING.add((x.device.type, chosen))
    return dequant(x, w, scale)
