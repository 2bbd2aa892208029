"""A small batched `generate` over the KV cache, for tests and the CLI (the serving engine is separate).

Prefills every prompt in one cached forward, then decodes all unfinished sequences together, each at
its own position. Greedy when temperature is 0; otherwise temperature, top-k and top-p sampling from a
seeded generator, through the shared sampler (`models.sampling`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.attention import AttentionMetadata
from models.decoder import CausalLM
from models.kv_cache import KVCache
from models.sampling import is_greedy, sample_tokens


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()


def sample_next(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next token ids (B,), through the shared sampler (models/sampling.py)."""
    if is_greedy(config.temperature, config.top_k):
        return logits.argmax(dim=-1)
    rows = len(logits)
    ids = sample_tokens(
        logits, [config.temperature] * rows, [config.top_k] * rows, [config.top_p] * rows, [generator] * rows
    )
    return torch.tensor(ids, device=logits.device)


@torch.inference_mode()
def generate(model: CausalLM, prompts: list[list[int]], config: SamplingConfig) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt; returns only the new tokens (EOS included)."""
    device = model.device
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    cache = KVCache(model.config, batch, longest + config.max_new_tokens, model.dtype, device)
    slots = torch.tensor([cache.allocate() for _ in prompts], device=device)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)  # (B, T) right-padded
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    context = torch.zeros(batch, dtype=torch.long, device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(batch))
    eos = set(config.eos_token_ids)
    query_lens = lengths
    for _ in range(config.max_new_tokens):
        meta = AttentionMetadata.for_cache(cache, slots[active], context[active], query_lens)
        logits = model(tokens, meta=meta, logits_positions=query_lens - 1).logits  # (b, V)
        next_ids = sample_next(logits, config, generator)
        context[active] += query_lens
        still: list[int] = []
        for row, token in zip(active, next_ids.tolist(), strict=True):
            outputs[row].append(token)
            if token not in eos:
                still.append(row)
        if not still:
            break
        keep = [active.index(r) for r in still]
        tokens = next_ids[keep][:, None]  # (b, 1)
        active = still
        query_lens = torch.ones(len(active), dtype=torch.long, device=device)
    return outputs
