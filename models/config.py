"""Model configuration: one typed dataclass with Hugging Face `config.json` field names.

Covers the decoder families modelserve runs (llama, mistral, qwen2 and mixtral), reads and writes
their `config.json`, and validates the invariants the model code relies on. Fields that exist only
while training (μP multipliers, dropout) are kept out of `config.json`: the exporter folds them into
the weights so a saved checkpoint is an ordinary Hugging Face model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
# Fields used only during training; never written to config.json.
TRAINING_ONLY_FIELDS = ("attention_scale", "logits_scale", "hidden_dropout", "attn_implementation")


class ConfigError(ValueError):
    """A config.json that modelserve cannot run, with the broken invariant named."""


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    # Grouped-query attention: each key/value head serves num_attention_heads // num_key_value_heads queries.
    num_key_value_heads: int | None = None
    # None means hidden_size // num_attention_heads (Qwen2 and older Llama configs omit it).
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Llama semantics: bias on q, k, v and o. Qwen2 always has q/k/v bias and no o bias (see qkv_bias).
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    # Mistral/Qwen2: keys older than this many positions are not attended to. None: full attention.
    sliding_window: int | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # Mixture of experts (mixtral): 0 experts means a dense SwiGLU MLP in every layer.
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01
    router_jitter_noise: float = 0.0
    # --- training only (not in config.json) ---
    # Softmax scale on q·k. None: 1/sqrt(head_dim) (standard); μP trains with 1/head_dim.
    attention_scale: float | None = None
    # Multiplier on the logits (μP readout multiplier 1/width_mult); folded into lm_head at export.
    logits_scale: float = 1.0
    # Dropout on each residual branch's output while training.
    hidden_dropout: float = 0.0
    # "sdpa": torch scaled_dot_product_attention (flash/fused kernels); "eager": plain math, for comparison.
    attn_implementation: str = "sdpa"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    # ---- derived ----
    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(
            self.model_type in SUPPORTED_MODEL_TYPES,
            f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({self.num_key_value_heads})",
        )
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        need(
            (self.model_type == "mixtral") == self.is_moe,
            f"model_type {self.model_type!r} with num_local_experts={self.num_local_experts}: "
            "mixtral needs experts and the dense families must have none",
        )
        if self.is_moe:
            need(
                0 < self.num_experts_per_tok <= self.num_local_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_local_experts "
                f"({self.num_local_experts})",
            )
        need(
            self.attn_implementation in ("sdpa", "eager"),
            f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}",
        )
        need(
            self.torch_dtype in ("float32", "bfloat16", "float16"),
            f"torch_dtype must be float32, bfloat16 or float16, got {self.torch_dtype!r}",
        )

    # ---- config.json ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        raw = dict(raw)
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        rope = raw.pop("rope_parameters", None) or {}
        rope_scaling = raw.pop("rope_scaling", None)
        for scaling in (rope_scaling, rope):
            kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
            if kind != "default":
                raise ConfigError(f"rope scaling {kind!r} is not supported; only the default rotary embedding")
        if "rope_theta" in rope and "rope_theta" not in raw:
            raw["rope_theta"] = rope["rope_theta"]
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw.pop("dtype")
        if raw.get("torch_dtype") is None:
            raw["torch_dtype"] = "float32"
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            raw["sliding_window"] = None
        if raw.get("hidden_act") is None:
            raw["hidden_act"] = "silu"
        known = {f.name for f in dataclasses.fields(cls)} - set(TRAINING_ONLY_FIELDS) - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in known}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a field of the wrong type
            raise ConfigError(f"invalid config.json: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": [ARCHITECTURES[self.model_type]]}
        for f in dataclasses.fields(self):
            if f.name in TRAINING_ONLY_FIELDS or f.name == "extra":
                continue
            if f.name in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise"):
                if not self.is_moe:
                    continue
            out[f.name] = getattr(self, f.name)
        out["dtype"] = self.torch_dtype
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
        return out

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: a model directory needs config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total, active per token (MoE: only the routed experts) and embeddings."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q_out, kv_out = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q_out + 2 * h * kv_out + q_out * h
        attn += (q_out + 2 * kv_out) * self.qkv_bias + h * self.o_bias
        expert = 3 * h * i
        experts_total = expert * max(self.num_local_experts, 1) + h * self.num_local_experts
        experts_active = expert * (self.num_experts_per_tok if self.is_moe else 1) + h * self.num_local_experts
        norms = 2 * h
        embed = v * h
        head = 0 if self.tie_word_embeddings else v * h
        layers_total = self.num_hidden_layers * (attn + experts_total + norms)
        layers_active = self.num_hidden_layers * (attn + experts_active + norms)
        return {
            "total": embed + head + layers_total + h,
            "active": embed + head + layers_active + h,
            "embedding": embed,
        }
