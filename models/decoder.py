"""The decoder-only transformer shared by every family: dense (llama, mistral, qwen2) and MoE (mixtral).

Module names mirror Hugging Face's, so a checkpoint's tensor names are this model's state-dict keys.
The MoE model is the same decoder with the feed-forward swapped for `SparseMoeBlock`; nothing else
differs. Speed tricks (compile, CUDA graphs) belong to the engine, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import Attention, AttentionMetadata, build_rotary
from models.config import ModelConfig
from models.layers import RMSNorm, SwiGLU
from models.moe import Routing, SparseMoeBlock


@dataclass
class DecoderOutput:
    logits: Tensor  # (B, T, V), or (B, V) when logits_positions was given
    # One Routing per MoE layer (training losses); empty for dense models.
    routings: list[Routing] = field(default_factory=list)
    # (num_layers, E) tokens routed to each expert in this pass (padding excluded); None for dense models.
    expert_counts: Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe:
            self.block_sparse_moe = SparseMoeBlock(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata | None
    ) -> tuple[Tensor, Routing | None, Tensor | None]:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, meta))
        h = self.post_attention_layernorm(x)
        if hasattr(self, "mlp"):
            return x + self.dropout(self.mlp(h)), None, None
        out, routing, counts = self.block_sparse_moe(h)
        if meta is not None and meta.valid_tokens is not None:
            counts = torch.bincount(routing.expert_index[meta.valid_tokens].reshape(-1), minlength=counts.numel())
        return x + self.dropout(out), routing, counts


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder + language-model head. `forward` takes token ids (B, T) and returns logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = build_rotary(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # The final norm's: the embedding may be an int8 table (models.quantization).
        return self.model.norm.weight.dtype

    def reset_parameters(self, scaled_residual: bool = True) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms.

        With scaled_residual, the projections that write into the residual stream (o_proj, down_proj,
        w2) are scaled by 1/sqrt(2 * layers), so the residual's variance stays O(1) with depth (GPT-2).
        """
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers) if scaled_residual else std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("o_proj", "down_proj", ".w2"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        meta: AttentionMetadata | None = None,
        logits_positions: Tensor | None = None,
    ) -> DecoderOutput:
        """input_ids (B, T); positions (B, T) rotary positions (default: from the layout);
        logits_positions (B,) index along T whose logits to return (skips the head elsewhere)."""
        b, t = input_ids.shape
        if meta is not None:
            meta.prepare(b, t, self.config.sliding_window, input_ids.device)
            if positions is None:
                positions = meta.positions(b, t, input_ids.device)
        elif self.config.sliding_window is not None and t > self.config.sliding_window:
            meta = AttentionMetadata()
            meta.prepare(b, t, self.config.sliding_window, input_ids.device)
        if positions is None:
            positions = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary(positions, x.dtype)  # (B, T, D)
        routings: list[Routing] = []
        counts: list[Tensor] = []
        for layer in self.model.layers:
            x, routing, layer_counts = layer(x, cos, sin, meta)
            if routing is not None:
                routings.append(routing)
                counts.append(layer_counts)
        x = self.model.norm(x)
        if logits_positions is not None:
            x = x[torch.arange(b, device=x.device), logits_positions]  # (B, H)
        logits = self.lm_head(x)
        if self.config.logits_scale != 1.0:
            logits = logits * self.config.logits_scale
        return DecoderOutput(logits, routings, torch.stack(counts) if counts else None)

    def loss(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, DecoderOutput]:
        """Next-token cross-entropy (labels already shifted; -100 ignored). input_ids, labels (B, T)."""
        out = self(input_ids)
        ce = F.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
        )
        return ce, out
