"""Key/value cache preallocated per sequence slot.

One tensor per key and value holds every layer: (layers, slots, kv_heads, max_seq_len, head_dim).
A sequence owns one slot from prefill to finish; slots are handed out and returned by the cache, so
continuous batching can run sequences at different positions side by side and reuse a finished
sequence's slot without allocating.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.config import ModelConfig


class CacheFullError(RuntimeError):
    """No free slot: the caller admitted more sequences than the cache was sized for."""


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds max_position_embeddings {config.max_position_embeddings}"
            )
        shape = (config.num_hidden_layers, num_slots, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.v: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
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

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, slot_idx: Tensor, pos_idx: Tensor, k: Tensor, v: Tensor) -> None:
        # slot_idx, pos_idx (N,); k, v (N, KVH, D)
        self.k[layer, slot_idx, :, pos_idx] = k
        self.v[layer, slot_idx, :, pos_idx] = v

    def read(self, layer: int, slots: Tensor, length: int) -> tuple[Tensor, Tensor]:
        # -> k, v (B, KVH, length, D)
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]
