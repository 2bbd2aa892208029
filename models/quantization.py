"""Weight quantization: int8 with one scale per output channel, applied to a built model by swapping modules.

`quantize_model(model, QuantizationConfig())` replaces every `nn.Linear` of a dense or MoE model (the
attention and MLP projections, the MoE experts, the LM head) with a `QuantizedLinear` and the token
embedding with a `QuantizedEmbedding`, the way `adapters.multi_lora.attach` swaps in LoRA layers.
The LM head and the embeddings can each be kept in float (`quantize_lm_head`, `quantize_embeddings`);
the MoE router stays float unless `quantize_router` (see the field). Norms, biases and rotary tables
stay float. `QuantizedLinear` subclasses `nn.Linear` (in_features, out_features, bias), so LoRA
attaches on top of it unchanged and adapters apply in full precision: base(x) is int8, B(A(x)) float.

Scheme: symmetric, per output channel: scale = max|W[row]| / 127, q = round(W / scale) in [-127, 127],
W ≈ q * scale[:, None]; the error of each weight is at most scale / 2. The matrix products are
PyTorch's own int8 kernels, picked per call by shape (`models.int8_kernels`).

Checkpoint layout (`models.checkpoint.save_model` of a quantized model; `load_model` reads it back):
- `config.json` gains `"quantization_config": {"quant_method": "modelserve-int8", "bits": 8,
  "format_version": 1, "scheme": "symmetric-per-output-channel", "quantize_lm_head": bool,
  "quantize_embeddings": bool, "quantize_router": bool}`; `torch_dtype` is the dtype of everything
  left in float (norms, biases, scales in memory).
- `model.safetensors` (or shards), Hugging Face tensor names: each quantized linear `<path>.weight`
  int8 (out, in) plus `<path>.weight_scale` float32 (out,); the embedding `model.embed_tokens.weight`
  int8 (vocab, hidden) plus `model.embed_tokens.weight_scale` float32 (vocab,) (one scale per token
  row); with tied embeddings the LM head reuses the embedding's int8 table and scales and writes
  nothing of its own. Every other tensor is float in `torch_dtype`.
Any other `quant_method` (gptq, awq, bitsandbytes, fp8, ...) is refused by name: those need their own
kernels and layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.int8_kernels import KERNELS, int8_matmul

QUANT_METHOD = "modelserve-int8"
FORMAT_VERSION = 1
METHODS = ("int8",)  # what `--quantization` accepts (vLLM's spelling)
ROUTER_SUFFIX = "block_sparse_moe.gate"


class QuantizationError(ValueError):
    """A quantization request or checkpoint modelserve cannot honour, with the reason named."""


@dataclass
class QuantizationConfig:
    method: str = "int8"  # the only method: int8 weights, symmetric, one scale per output channel
    quantize_lm_head: bool = True
    quantize_embeddings: bool = True
    # The MoE router (experts x hidden per layer) is ~0.1% of the weights; int8 rounding of its logits can
    # flip which experts a token goes to, so it stays float unless asked.
    quantize_router: bool = False
    # Runtime only (not saved): "auto" picks by shape and device; see models.int8_kernels.
    kernel: str = "auto"
    # Runtime only: with kernel "auto" on CPU, weight-only int8 up to this many rows, "dequant" or dynamic
    # int8 above (measured crossover on the demo shapes: bench/quant_kernels.py).
    weight_only_max_rows: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"quantization {self.method!r} is not supported; supported: {', '.join(METHODS)}")
        if self.kernel not in KERNELS:
            raise QuantizationError(f"int8 kernel {self.kernel!r} is unknown; known: {', '.join(KERNELS)}")

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` entry of config.json."""
        return {
            "quant_method": QUANT_METHOD,
            "bits": 8,
            "format_version": FORMAT_VERSION,
            "scheme": "symmetric-per-output-channel",
            "quantize_lm_head": self.quantize_lm_head,
            "quantize_embeddings": self.quantize_embeddings,
            "quantize_router": self.quantize_router,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> QuantizationConfig:
        """Parse a checkpoint's `quantization_config`; anything but modelserve-int8 is refused by name."""
        if not isinstance(raw, dict):
            raise QuantizationError(f"{where}: quantization_config must be an object, got {type(raw).__name__}")
        method = raw.get("quant_method")
        if method != QUANT_METHOD:
            raise QuantizationError(
                f"{where}: quantization_config.quant_method {method!r} is not supported: modelserve loads float "
                f"checkpoints and its own {QUANT_METHOD!r} layout only ({method!r} needs its own kernels and "
                "tensor layout); serve the float checkpoint with --quantization int8 instead"
            )
        if raw.get("bits", 8) != 8 or raw.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise QuantizationError(
                f"{where}: {QUANT_METHOD} with bits={raw.get('bits')!r}, format_version={raw.get('format_version')!r}; "
                f"this version reads bits=8, format_version={FORMAT_VERSION}"
            )
        flags = ("quantize_lm_head", "quantize_embeddings", "quantize_router")
        return cls(**{flag: bool(raw[flag]) for flag in flags if flag in raw})


def resolve(method: str | QuantizationConfig | None) -> QuantizationConfig | None:
    """A serving-side request ("int8", a config, or None/"none") as a config."""
    if method is None or isinstance(method, QuantizationConfig):
        return method
    if method in ("", "none"):
        return None
    return QuantizationConfig(method=method)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: weight (N, K) float -> (q (N, K) int8, scale (N,) float32)."""
    w32 = weight.detach().float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """(N, K) int8 and (N,) scales -> (N, K) float32."""
    return q.float() * scale.float()[:, None]


class QuantizedLinear(nn.Linear):
    """y = x @ (q * scale)^T + bias with q int8 (out, in): buffers `weight` (int8) and `weight_scale` (out,)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        config: QuantizationConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        self.in_features, self.out_features = in_features, out_features
        self.kernel, self.weight_only_max_rows = config.kernel, config.weight_only_max_rows
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))
        # The weight-only kernel takes bfloat16 scales; kept here so no call converts them.
        self.register_buffer(
            "scale_bf16", torch.ones(out_features, dtype=torch.bfloat16, device=device), persistent=False
        )
        bias_param = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_parameter("bias", bias_param)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantizationConfig, values: bool = True) -> QuantizedLinear:
        """values=False: only the structure (a checkpoint's tensors are copied in next)."""
        weight = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, config, weight.dtype, weight.device
        )
        if values:
            _set(layer, weight)
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.detach())
        return layer

    def refresh(self) -> None:
        """Recompute derived buffers after `weight_scale` was written (loading a checkpoint does this)."""
        self.scale_bf16 = self.weight_scale.detach().to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        # x (..., in) -> (..., out). Tensors are read from _buffers/_parameters directly: nn.Module's
        # __getattr__ costs ~1 µs each, and a decode step at batch 1 is mostly such fixed costs.
        return _int8_forward(self, x, self._buffers, self._parameters["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _int8_forward(layer: nn.Linear, x: Tensor, buffers: dict, bias: Tensor | None) -> Tensor:
    """x (..., in) -> (..., out) through an int8 table and its scales (`buffers`: weight, weight_scale,
    scale_bf16), with the layer's kernel choice."""
    flat = x.reshape(-1, layer.in_features)  # (M, in)
    y = int8_matmul(
        flat,
        buffers["weight"],
        buffers["weight_scale"],
        buffers["scale_bf16"],
        layer.kernel,
        layer.weight_only_max_rows,
    )  # (M, out)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], layer.out_features)  # (..., out)


class QuantizedEmbedding(nn.Module):
    """Token embedding from an int8 table (vocab, hidden) with one scale per token row."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32, device=None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=dtype, device=device))
        # For a tied LM head (QuantizedTiedHead), which multiplies by this table.
        self.register_buffer(
            "scale_bf16", torch.ones(num_embeddings, dtype=torch.bfloat16, device=device), persistent=False
        )

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, values: bool = True) -> QuantizedEmbedding:
        weight = embedding.weight
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, weight.dtype, weight.device)
        if values:
            _set(layer, weight)
        return layer

    def refresh(self) -> None:
        self.scale_bf16 = self.weight_scale.detach().to(torch.bfloat16)

    def forward(self, ids: Tensor) -> Tensor:
        # ids (B, T) -> (B, T, H) in the scales' dtype
        rows = F.embedding(ids, self.weight).to(self.weight_scale.dtype)  # (B, T, H)
        return rows * self.weight_scale[ids].unsqueeze(-1)  # (B, T, 1) scales


class QuantizedTiedHead(nn.Linear):
    """LM head tied to a QuantizedEmbedding: reads the embedding's int8 table and scales, owns no tensors."""

    def __init__(self, embedding: QuantizedEmbedding, config: QuantizationConfig) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.kernel, self.weight_only_max_rows = config.kernel, config.weight_only_max_rows
        self.register_parameter("bias", None)
        # Not a submodule (its tensors would be saved twice and moved twice); .to() on the model moves
        # the embedding, which this reads at every call.
        object.__setattr__(self, "tied_embedding", embedding)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.tied_embedding.weight

    def forward(self, x: Tensor) -> Tensor:
        # x (..., hidden) -> (..., vocab)
        return _int8_forward(self, x, self.tied_embedding._buffers, None)


def _wanted(path: str, config: QuantizationConfig) -> bool:
    path = path.removesuffix(".base")  # a layer already wrapped by adapters.multi_lora
    if path == "lm_head":
        return config.quantize_lm_head
    if path.endswith(ROUTER_SUFFIX):
        return config.quantize_router
    return True


def _set(layer: QuantizedLinear | QuantizedEmbedding, weight: Tensor) -> None:
    q, scale = quantize_weight(weight)
    layer.weight.copy_(q)
    layer.weight_scale.copy_(scale)
    layer.refresh()


def quantize_model(model: nn.Module, config: QuantizationConfig | str = "int8", values: bool = True) -> nn.Module:
    """Swap the model's float layers for int8 ones in place (see the module docstring); returns the model.

    values=False swaps in the structure only, for a quantized checkpoint's tensors to be copied into
    (then call `refresh(model)`)."""
    config = resolve(config)
    if getattr(model, "quantization", None) is not None:
        raise QuantizationError("the model is already quantized")
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if tied and config.quantize_lm_head != config.quantize_embeddings:
        raise QuantizationError(
            "tie_word_embeddings: the LM head and the embedding share one weight, so quantize_lm_head "
            f"({config.quantize_lm_head}) and quantize_embeddings ({config.quantize_embeddings}) must be equal"
        )
    with torch.no_grad():
        for path, module in list(model.named_modules()):
            for name, child in list(module.named_children()):
                full = f"{path}.{name}" if path else name
                if type(child) is nn.Linear and not (tied and full == "lm_head") and _wanted(full, config):
                    setattr(module, name, QuantizedLinear.from_linear(child, config, values))
        if config.quantize_embeddings:
            model.model.embed_tokens = QuantizedEmbedding.from_embedding(model.model.embed_tokens, values)
            if tied:
                model.lm_head = QuantizedTiedHead(model.model.embed_tokens, config)
    model.quantization = config
    return model


def refresh(model: nn.Module) -> None:
    """Recompute every quantized layer's derived buffers (after its scales were overwritten in place)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear | QuantizedEmbedding):
            module.refresh()


def quantization_of(model: nn.Module) -> QuantizationConfig | None:
    return getattr(model, "quantization", None)


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """Persistent tensors (parameters and saved buffers), each shared tensor once."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights in memory (int8 weights, their scales, the float rest; shared once)."""
    return sum(t.numel() * t.element_size() for t in _unique_state(model).values())


def weight_count(model: nn.Module) -> int:
    """Number of weights (parameters), quantized or not; scales are not counted."""
    return sum(t.numel() for name, t in _unique_state(model).items() if not name.endswith("weight_scale"))


def describe(model: nn.Module) -> dict[str, str | None]:
    """{"dtype": compute dtype of the float parts, "quantization": "int8" or None} for /v1/models."""
    dtype = getattr(model, "dtype", None)
    config = quantization_of(model)
    return {
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "quantization": config.method if config else None,
    }
