"""Baseline for the paged KV cache: the slot cache it replaced, and a batch-32 decode step timed both ways.

`SlotKVCache` is the old `models/kv_cache.py` (commit bdd9381) copied verbatim but for its name: one
(layers, slots, kv_heads, max_seq_len, head_dim) tensor per key and value, a sequence owning one
slot; reading a batch gathers `k[layer, slots, :, :length]`. `SlotMetadata` is the cached branch of
the old `AttentionMetadata.prepare` (same commit): a mask over exactly the longest row's length and
writes addressed by (slot, position). It hands today's `Attention` module a per-pass view of the old
cache (`_SlotPass`) whose `write`/`read` are the old ones, so the same model, weights and attention
kernel run on either layout and only the KV addressing differs.

`decode_costs` fills both layouts with the same random keys and values, checks that one decode step
gives the same logits on each, then times it interleaved, one call of each per round (medians; the
ratios paged / slot are medians of each round's ratio, so a machine's load drifting cancels):
- `slot`: the old slot cache;
- `paged_slots`: today's `KVCache`, fixed slots on the paged pool (each slot's blocks consecutive);
- `paged_scattered`: `PagedKVCache` with every sequence's blocks spread over the pool in random
  order, as the engine's block manager leaves them after some churn.
With them, for `slot` and `paged_scattered`, the two parts of attention that could differ:
`*_read_ms`, every layer's key/value read (the gather), and `*_attend_ms`, the attention kernel
(`models.attention.attend`, GQA expansion included) on what was read, with a decode query and mask.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.serving import interleaved
from models import AttentionMetadata, CausalLM, KVCache, ModelConfig, PagedKVCache
from models.attention import attend
from models.kv_cache import blocks_for


class SlotKVCache:
    """The slot cache of commit bdd9381 (`KVCache` then), verbatim apart from the name."""

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.num_hidden_layers, num_slots, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.v: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len

    def write(self, layer: int, slot_idx: Tensor, pos_idx: Tensor, k: Tensor, v: Tensor) -> None:
        # slot_idx, pos_idx (N,); k, v (N, KVH, D)
        self.k[layer, slot_idx, :, pos_idx] = k
        self.v[layer, slot_idx, :, pos_idx] = v

    def read(self, layer: int, slots: Tensor, length: int) -> tuple[Tensor, Tensor]:
        # -> k, v (B, KVH, length, D)
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]


class _SlotPass:
    """One forward pass's view of a SlotKVCache: `read` with the pass's length, as the old Attention called it."""

    def __init__(self, cache: SlotKVCache) -> None:
        self.cache = cache
        self.kv_len = 0

    def write(self, layer: int, slot_idx: Tensor, pos_idx: Tensor, k: Tensor, v: Tensor) -> None:
        self.cache.write(layer, slot_idx, pos_idx, k, v)

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.read(layer, slots, self.kv_len)


@dataclass
class SlotMetadata(AttentionMetadata):
    """The old cached layout: row b continues slot slots[b] holding context_lens[b] tokens."""

    slots: Tensor | None = None  # (B,)

    @classmethod
    def for_slots(cls, cache: SlotKVCache, slots: Tensor, context_lens: Tensor, query_lens: Tensor) -> SlotMetadata:
        return cls(cache=_SlotPass(cache), slots=slots, context_lens=context_lens, query_lens=query_lens)

    def prepare(self, batch: int, seq: int, sliding_window: int | None, device: torch.device) -> None:
        """bdd9381's cached branch; write_blocks/write_offsets carry (slot, position), read_tables the slots."""
        steps = torch.arange(seq, device=device)
        context = self.context_lens.to(device)
        queries = self.query_lens.to(device)
        kv_len = int((context + queries).max())
        self.cache.kv_len = kv_len
        q_pos = context[:, None] + steps[None, :]  # (B, T)
        k_pos = torch.arange(kv_len, device=device)  # (L,)
        allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # (B, T, L)
        if sliding_window is not None:
            allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        self.mask = allowed[:, None]  # (B, 1, T, L)
        valid = steps[None, :] < queries[:, None]  # (B, T)
        self.valid_tokens = valid.reshape(-1)
        self.write_blocks = self.slots.to(device)[:, None].expand(batch, seq)[valid]
        self.write_offsets = q_pos[valid]
        self.write_rows = torch.nonzero(self.valid_tokens).squeeze(1)
        self.read_tables = self.slots.to(device)


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    context: int  # tokens already cached in every row
    warmup: int
    reps: int


def _fill(model: CausalLM, case: DecodeCase, seed: int) -> tuple[SlotKVCache, KVCache, PagedKVCache, Tensor]:
    """Three caches holding the same random keys/values for `batch` rows of `context` tokens; the scattered
    cache's block tables (B, nb)."""
    config, b, ctx = model.config, case.batch, case.context
    slot = SlotKVCache(config, b, ctx + 1)
    paged = KVCache(config, b, ctx + 1)
    per_row = blocks_for(ctx + 1, paged.block_size)
    scattered = PagedKVCache(config, b * per_row, paged.block_size)
    generator = torch.Generator().manual_seed(seed)
    tables = torch.randperm(b * per_row, generator=generator).view(b, per_row)  # (B, nb) blocks in random order
    shape = (config.num_hidden_layers, b, config.num_key_value_heads, ctx, config.head_dim)
    for name in ("k", "v"):
        values = torch.randn(shape, generator=generator)  # (layers, B, KVH, ctx, D)
        getattr(slot, name)[:, :, :, :ctx] = values
        padded = torch.zeros(*shape[:3], per_row * paged.block_size, shape[-1])
        padded[..., :ctx, :] = values
        blocks = padded.view(*shape[:3], per_row, paged.block_size, shape[-1]).permute(0, 1, 3, 4, 2, 5)
        for layer in range(shape[0]):  # blocks[layer] (B, nb, bs, KVH, D); each pool ends with its scratch block
            pool = getattr(paged, name)[layer]
            pool[: b * per_row].view(b, per_row, *pool.shape[1:])[:] = blocks[layer]
            getattr(scattered, name)[layer][tables] = blocks[layer]
    return slot, paged, scattered, tables


def decode_costs(model: CausalLM, case: DecodeCase, seed: int = 0) -> dict[str, float]:
    """Median ms of one batch-`batch` decode forward on each layout (timed interleaved), and the largest
    logit difference between the paged layouts and the slot baseline."""
    slot, paged, scattered, tables = _fill(model, case, seed)
    rows = torch.arange(case.batch)  # (B,)
    ones = torch.ones(case.batch, dtype=torch.long)  # (B,)
    context = ones * case.context
    token = torch.randint(3, model.config.vocab_size, (case.batch, 1), generator=torch.Generator().manual_seed(seed))
    last = ones - 1  # logits at the only position of each row

    def run_slot() -> Tensor:
        return model(token, meta=SlotMetadata.for_slots(slot, rows, context, ones), logits_positions=last).logits

    def run_paged() -> Tensor:
        return model(token, meta=AttentionMetadata.for_cache(paged, rows, context, ones), logits_positions=last).logits

    def run_scattered() -> Tensor:
        meta = AttentionMetadata.for_blocks(scattered, tables, context, ones)
        return model(token, meta=meta, logits_positions=last).logits

    fns = {"slot": run_slot, "paged_slots": run_paged, "paged_scattered": run_scattered}
    reads = {
        "slot": lambda i: slot.read(i, rows, case.context + 1),
        "paged_scattered": lambda i: scattered.read(i, tables),
    }
    with torch.inference_mode():
        reference = run_slot()
        diffs = {name: float((fn() - reference).abs().max()) for name, fn in fns.items() if name != "slot"}
        seconds = interleaved({name: _timed(fn) for name, fn in (fns | _read_and_attend(model, case, reads)).items()},
                              case.warmup, case.reps)  # fmt: skip
    result = {f"{name}_ms": 1e3 * statistics.median(values) for name, values in seconds.items()}
    for name in ("paged_slots", "paged_scattered"):  # each round's calls ran back to back: load drift cancels
        result[f"{name}_ratio"] = statistics.median(p / s for p, s in zip(seconds[name], seconds["slot"]))
    return result | {f"{name}_max_abs_diff": diff for name, diff in diffs.items()}


def _timed(fn: Any) -> Any:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def _read_and_attend(model: CausalLM, case: DecodeCase, reads: dict[str, Any]) -> dict[str, Any]:
    """Per layout: `<name>_read`, its reads over every layer, and `<name>_attend`, attention over what they read."""
    config = model.config
    scale = config.attention_scale if config.attention_scale is not None else config.head_dim**-0.5
    q = torch.randn(case.batch, config.num_attention_heads, 1, config.head_dim)  # (B, H, T=1, D)
    layers = range(config.num_hidden_layers)
    fns = {}
    for name, read in reads.items():
        kv = [read(i) for i in layers]  # per layer: k, v (B, KVH, L, D)
        mask = torch.ones(case.batch, 1, 1, kv[0][0].shape[2], dtype=torch.bool)  # (B, 1, T, L)
        fns[f"{name}_read"] = lambda read=read: [read(i) for i in layers]
        fns[f"{name}_attend"] = lambda kv=kv, mask=mask: [
            attend(q, k, v, mask, scale, config.attn_implementation) for k, v in kv
        ]
    return fns
