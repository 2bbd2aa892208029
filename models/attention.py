"""Grouped-query self-attention with two interchangeable kernels and three batch layouts.

Kernels: "sdpa" calls `torch.nn.functional.scaled_dot_product_attention`, which picks the flash
kernel where the device has one (CUDA, and the CPU flash kernel in recent PyTorch); "eager" is the
plain math path (scores, softmax, weighted sum), kept to compare speed, memory and numerics.

Layouts, described by `AttentionMetadata` and prepared once per forward pass:
- plain causal (B, T) batches (training, a single prompt): no mask, `is_causal`;
- packed, padding-free batches: several sequences in one row told apart by segment ids;
- cached: each row continues a sequence whose keys and values live in the paged KV cache's blocks
  (its block table), with its own number of cached tokens and of new tokens, which covers prefill,
  chunked prefill, prefill after a prefix-cache hit, batched decode at different positions and
  speculative verification with one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.kv_cache import KVCache, PagedKVCache, blocks_for
from models.layers import RotaryEmbedding, apply_rotary


@dataclass
class AttentionMetadata:
    """How the tokens of a (B, T) batch attend. Leave everything None for a plain causal batch."""

    # Packed layout: (B, T) segment id per token; tokens attend causally within their segment; -1 is padding.
    segment_ids: Tensor | None = None
    # Cached layout: row b continues the sequence stored in the blocks block_tables[b] lists (in position
    # order; padded with any valid block id), which already hold context_lens[b] tokens; the row's
    # first query_lens[b] tokens are new, the rest padding.
    cache: PagedKVCache | None = None
    block_tables: Tensor | None = None  # (B, max blocks)
    context_lens: Tensor | None = None  # (B,)
    query_lens: Tensor | None = None  # (B,)
    # Filled by prepare(): shared by every layer of one forward pass.
    mask: Tensor | None = None  # (B, 1, T, L) bool, True = may attend
    read_tables: Tensor | None = None  # (B, nb) the blocks read this pass; L = nb * block_size
    write_blocks: Tensor | None = None  # (N,)
    write_offsets: Tensor | None = None  # (N,)
    write_rows: Tensor | None = None  # (N,) flat row*T+t index of each new token
    valid_tokens: Tensor | None = None  # (B*T,) bool, False for padding

    @classmethod
    def for_cache(cls, cache: KVCache, slots: Tensor, context_lens: Tensor, query_lens: Tensor) -> AttentionMetadata:
        """Rows continuing fixed slots of a `KVCache`."""
        return cls.for_blocks(cache, cache.tables(slots), context_lens, query_lens)

    @classmethod
    def for_blocks(
        cls, cache: PagedKVCache, block_tables: Tensor, context_lens: Tensor, query_lens: Tensor
    ) -> AttentionMetadata:
        """Rows continuing sequences of a paged cache, given their block tables (B, nb)."""
        return cls(cache=cache, block_tables=block_tables, context_lens=context_lens, query_lens=query_lens)

    def positions(self, batch: int, seq: int, device: torch.device) -> Tensor:
        """Default rotary positions (B, T) for this layout."""
        steps = torch.arange(seq, device=device)[None, :]  # (1, T)
        if self.cache is not None:
            return self.context_lens.to(device)[:, None] + steps
        if self.segment_ids is not None:
            seg = self.segment_ids
            starts = torch.ones_like(seg, dtype=torch.bool)
            starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
            start_index = torch.where(starts, steps.expand_as(seg), torch.zeros_like(seg))
            return steps - torch.cummax(start_index, dim=1).values
        return steps.expand(batch, seq)

    def prepare(self, batch: int, seq: int, sliding_window: int | None, device: torch.device) -> None:
        steps = torch.arange(seq, device=device)
        if self.cache is not None:
            context = self.context_lens.to(device)
            queries = self.query_lens.to(device)
            block_size = self.cache.block_size
            num_blocks = blocks_for(int((context + queries).max()), block_size)
            self.read_tables = self.block_tables.to(device)[:, :num_blocks]  # (B, nb)
            q_pos = context[:, None] + steps[None, :]  # (B, T)
            k_pos = torch.arange(num_blocks * block_size, device=device)  # (L,)
            allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # (B, T, L)
            if sliding_window is not None:
                allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
            self.mask = allowed[:, None]  # (B, 1, T, L)
            valid = steps[None, :] < queries[:, None]  # (B, T)
            self.valid_tokens = valid.reshape(-1)
            positions = q_pos[valid]  # (N,)
            rows = torch.arange(batch, device=device)[:, None].expand(batch, seq)[valid]  # (N,)
            self.write_blocks = self.read_tables[rows, positions // block_size]
            self.write_offsets = positions % block_size
            self.write_rows = torch.nonzero(self.valid_tokens).squeeze(1)
            return
        if self.segment_ids is not None:
            seg = self.segment_ids.to(device)
            causal = steps[None, :, None] >= steps[None, None, :]  # (1, T, T)
            same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)  # (B, T, T)
            allowed = (same & causal) | torch.eye(seq, dtype=torch.bool, device=device)[None]
            if sliding_window is not None:
                allowed &= steps[None, None, :] > steps[None, :, None] - sliding_window
            self.mask = allowed[:, None]
            self.valid_tokens = (seg >= 0).reshape(-1)
            return
        if sliding_window is not None and seq > sliding_window:
            causal = steps[:, None] >= steps[None, :]
            in_window = steps[None, :] > steps[:, None] - sliding_window
            self.mask = (causal & in_window)[None, None].expand(batch, 1, seq, seq)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, implementation: str) -> Tensor:
    """Softmax attention. q (B, H, T, D); k, v (B, KVH, L, D); mask (B, 1, T, L) or None for causal."""
    groups = q.shape[1] // k.shape[1]
    t, length = q.shape[2], k.shape[2]
    if mask is None and t != length:  # causal with a cached prefix: align the diagonal to the last key
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)
    if implementation == "sdpa":  # grouped-query heads read their shared K/V without copies (enable_gqa)
        causal = mask is None and t > 1
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=groups > 1
        )
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, L, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, L)
    if mask is None:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v  # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale if config.attention_scale is not None else self.head_dim**-0.5
        self.implementation = config.attn_implementation
        hidden, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_out, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_out, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=config.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata | None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask = meta.mask if meta is not None else None
        if meta is not None and meta.cache is not None:
            new_k = k.transpose(1, 2).reshape(b * t, self.num_kv_heads, self.head_dim)[meta.write_rows]  # (N, KVH, D)
            new_v = v.transpose(1, 2).reshape(b * t, self.num_kv_heads, self.head_dim)[meta.write_rows]
            meta.cache.write(self.layer_index, meta.write_blocks, meta.write_offsets, new_k, new_v)
            k, v = meta.cache.read(self.layer_index, meta.read_tables)  # (B, KVH, L, D)
        out = attend(q, k, v, mask, self.scale, self.implementation)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def build_rotary(config: ModelConfig) -> RotaryEmbedding:
    return RotaryEmbedding(config.head_dim, config.rope_theta)
