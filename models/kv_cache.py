"""Paged key/value cache: one preallocated pool of fixed-size blocks, addressed through block tables.

Each layer has one key and one value tensor, (num_blocks + 1, block_size, kv_heads, head_dim): separate
tensors per layer, so a compiled decode step writes each in place (a view of one tensor holding every
layer would be copied whole by the compiler). The last block is scratch: never handed out, it takes
the writes of a compiled step's padding rows.
A sequence's keys and values live in the blocks its block table lists, in order: position p is
offset p % block_size of block table[p // block_size]. Memory is held for the tokens in use, blocks
can be shared by sequences with a common prefix (prefix caching), and which blocks a sequence gets is
decided outside the model (the engine's block manager) - the model only reads and writes through the
tables it is given (PagedAttention, Kwon et al. 2023).

`KVCache` is the simple fixed-slot form on the same pool, for `generate`, benchmarks and tests: each
of `num_slots` slots owns `max_seq_len` tokens of consecutive blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16  # tokens per block (vLLM's default)


class CacheFullError(RuntimeError):
    """No free slot: the caller admitted more sequences than the cache was sized for."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens."""
    return -(-num_tokens // block_size)


class PagedKVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of one token (got {num_blocks} x {block_size})")
        shape = (num_blocks + 1, block_size, config.num_key_value_heads, config.head_dim)
        self.k: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks  # written by padding rows, read by nobody
        self.block_size = block_size
        self.max_position_embeddings = config.max_position_embeddings

    @property
    def bytes(self) -> int:
        return 2 * sum(k.numel() * k.element_size() for k in self.k)

    def write(self, layer: int, blocks: Tensor, offsets: Tensor, k: Tensor, v: Tensor) -> None:
        # blocks, offsets (N,); k, v (N, KVH, D)
        self.k[layer][blocks, offsets] = k
        self.v[layer][blocks, offsets] = v

    def read(self, layer: int, block_tables: Tensor) -> tuple[Tensor, Tensor]:
        """block_tables (B, nb) -> k, v (B, KVH, nb * block_size, D), in position order."""
        b, nb = block_tables.shape
        k = self.k[layer][block_tables]  # (B, nb, bs, KVH, D)
        v = self.v[layer][block_tables]
        k = k.reshape(b, nb * self.block_size, k.shape[-2], k.shape[-1]).transpose(1, 2)  # (B, KVH, L, D)
        v = v.reshape(b, nb * self.block_size, v.shape[-2], v.shape[-1]).transpose(1, 2)
        return k, v


class KVCache(PagedKVCache):
    """Fixed slots on the paged pool: slot s owns blocks [s * per_slot, (s + 1) * per_slot)."""

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds max_position_embeddings {config.max_position_embeddings}"
            )
        per_slot = blocks_for(max_seq_len, block_size)
        super().__init__(config, num_slots * per_slot, block_size, dtype, device)
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.slot_tables = torch.arange(num_slots * per_slot, device=device).view(num_slots, per_slot)  # (S, per)
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} KV cache slots are in use")
        return self._free.pop()

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def tables(self, slots: Tensor) -> Tensor:
        """(B,) slots -> (B, blocks per slot) block tables."""
        return self.slot_tables[slots.to(self.slot_tables.device)]
