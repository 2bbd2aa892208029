"""Adapter registry of one base model: load, unload, LRU eviction, pinning and in-use protection.

Adapters are read from PEFT directories (safetensors only), checked against the base model (every
target module exists with matching shapes, rank within `max_lora_rank`) and installed into the
model's `MultiLoRALinear` layers. The resident set is bounded by count and bytes; loading past a
bound evicts the least recently used adapter that is neither pinned nor used by a running or queued
request. Registry methods are thread-safe: the engine thread holds `lock` around each forward, so an
adapter never changes under a running batch; reading files happens outside the lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adapters.multi_lora import TARGETABLE, LoRAContext, MultiLoRALinear, attach
from adapters.peft_format import AdapterError, modules, read_adapter


class AdapterCapacityError(AdapterError):
    """No room: every resident adapter is pinned or in use."""


class AdapterInUseError(AdapterError):
    """Unload refused: requests still use the adapter."""


@dataclass(frozen=True)
class RegistryConfig:
    max_adapters: int = 64  # resident adapters per base model
    max_bytes: int = 512 * 1024**2  # resident adapter weights per base model
    max_lora_rank: int = 64


@dataclass
class AdapterInfo:
    name: str
    path: str
    rank: int
    bytes: int
    modules: int
    load_seconds: float
    pinned: bool = False
    in_use: int = 0
    slot: int = -1  # index into the layers' adapter stacks


@dataclass
class RegistryStats:
    loads: dict[str, int] = field(default_factory=lambda: {"loaded": 0, "error": 0})
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)


class AdapterRegistry:
    def __init__(self, base_name: str, model: nn.Module, config: RegistryConfig | None = None) -> None:
        self.base_name = base_name
        self.config = config or RegistryConfig()
        self.context = LoRAContext()
        self.layers: dict[str, MultiLoRALinear] = attach(model, self.context)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.lock = threading.RLock()
        self.resident: OrderedDict[str, AdapterInfo] = OrderedDict()  # LRU order: oldest first
        self.stats = RegistryStats()
        self._free_slots: list[int] = []  # slots of unloaded adapters, reused before new ones
        self._next_slot = 0

    # ---- loading ----
    def load(self, name: str, path: str | Path, pinned: bool = False) -> AdapterInfo:
        started = time.monotonic()
        try:
            config, tensors = read_adapter(path)
            weights = self._check(name, config, tensors)
        except AdapterError:
            self.stats.loads["error"] += 1
            raise
        nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.values())
        rank = max(a.shape[0] for a, _ in weights.values())
        with self.lock:
            if name in self.resident:
                self._remove(name)
            self._make_room(nbytes)
            slot = self._free_slots.pop() if self._free_slots else self._next_slot
            self._next_slot = max(self._next_slot, slot + 1)
            for module, (a, b) in weights.items():
                self.layers[module].set_adapter(slot, a, b)
            info = AdapterInfo(name, str(path), rank, nbytes, len(weights), time.monotonic() - started, pinned)
            info.slot = slot
            self.resident[name] = info
            self.stats.loads["loaded"] += 1
            self.stats.load_seconds.append(info.load_seconds)
        return info

    def _check(self, name, config, tensors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        bad_targets = sorted(set(config.target_modules) - set(TARGETABLE))
        if bad_targets:
            raise AdapterError(
                f"adapter {name!r} targets {bad_targets}; modelserve applies LoRA to {', '.join(TARGETABLE)} "
                "(not to MoE experts, the router or embeddings)"
            )
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in modules(tensors):
            layer = self.layers.get(module)
            if layer is None:
                raise AdapterError(f"adapter {name!r} targets {module}, which base model {self.base_name!r} lacks")
            a, b = tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]
            rank = a.shape[0]
            if rank > self.config.max_lora_rank:
                raise AdapterError(f"LoRA rank {rank} exceeds max_lora_rank {self.config.max_lora_rank}")
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise AdapterError(
                    f"adapter {name!r} module {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"{self.base_name!r} ({layer.in_features} -> {layer.out_features}): is it for another base model?"
                )
            scaling = config.scaling_for(module, rank)
            weights[module] = (
                a.to(self.device, self.dtype).contiguous(),
                (b.float() * scaling).to(self.device, self.dtype).contiguous(),
            )
        return weights

    def _make_room(self, nbytes: int) -> None:
        if nbytes > self.config.max_bytes:
            raise AdapterCapacityError(f"adapter of {nbytes} bytes exceeds max_bytes {self.config.max_bytes}")
        while len(self.resident) >= self.config.max_adapters or self.resident_bytes + nbytes > self.config.max_bytes:
            victim = next((i for i in self.resident.values() if not i.pinned and i.in_use == 0), None)
            if victim is None:
                raise AdapterCapacityError(
                    f"cannot load: {len(self.resident)} adapters resident (max_adapters {self.config.max_adapters}, "
                    f"max_bytes {self.config.max_bytes}) and all are pinned or in use"
                )
            self._remove(victim.name)
            self.stats.evictions += 1

    def _remove(self, name: str) -> None:
        info = self.resident.pop(name)
        for layer in self.layers.values():
            layer.remove_adapter(info.slot)
        self._free_slots.append(info.slot)

    def unload(self, name: str) -> None:
        with self.lock:
            info = self.resident.get(name)
            if info is None:
                raise AdapterError(f"adapter {name!r} is not loaded")
            if info.in_use:
                raise AdapterInUseError(f"adapter {name!r} is used by {info.in_use} request(s); retry when they finish")
            self._remove(name)

    # ---- use by requests ----
    @property
    def resident_bytes(self) -> int:
        return sum(i.bytes for i in self.resident.values())

    def acquire(self, name: str) -> bool:
        """Mark one more request using the adapter; False when it is not resident."""
        with self.lock:
            info = self.resident.get(name)
            if info is None:
                return False
            info.in_use += 1
            self.resident.move_to_end(name)
            return True

    def release(self, name: str) -> None:
        with self.lock:
            info = self.resident.get(name)
            if info is not None and info.in_use > 0:
                info.in_use -= 1

    @contextmanager
    def activate(self, row_adapters: list[str | None], tokens_per_row: int):
        """Hold the lock for one forward with these rows' adapters (sorted by name by the runner)."""
        del tokens_per_row  # layers see the (B, T, ...) layout and segment by row
        with self.lock:
            slots = [self.resident[a].slot if a is not None and a in self.resident else -1 for a in row_adapters]
            with self.context.activate(slots, self.device):
                yield
