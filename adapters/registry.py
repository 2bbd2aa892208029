"""Adapter registry of one base model: load, unload, LRU eviction, pinning and in-use protection.

Adapters are read from PEFT directories (safetensors only), checked against the base model (every
target module exists with matching shapes, rank within `max_lora_rank`) and installed into the
model's `MultiLoRALinear` layers. The resident set is bounded by count and bytes; loading past a
bound evicts the least recently used adapter that is neither pinned nor used by a running or queued
request; an adapter in use is never evicted, unloaded or replaced.

Registry methods are thread-safe, with two locks taken in this order: `lock` guards the layers'
weights (the engine thread holds it around each forward, so an adapter never changes under a running
batch), `_state` guards the resident table and the in-use counts (so `acquire`/`release`, called
from the event loop, never wait for a forward). Files are read outside both; `ensure` lets one
thread reload an evicted adapter while others asking for it wait for that load.

`resolve_under_roots` is the path policy of admin loads: a directory strictly inside one of the
adapter roots after resolving symlinks, re-applied whenever an evicted adapter is reloaded.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adapters.multi_lora import TARGETABLE, LoRAContext, MultiLoRALinear, attach
from adapters.peft_format import CONFIG_FILE, MAX_ABS_WEIGHT, WEIGHTS_FILE, AdapterError, modules, read_adapter

PATH_MAX = 4096  # Linux's limit on a whole path (bytes); longer ones cannot name a file


_LOAD_IDS = itertools.count(1)


class AdapterCapacityError(AdapterError):
    """No room: every resident adapter is pinned or in use."""


class AdapterInUseError(AdapterError):
    """Unload or replacement refused: requests still use the adapter."""


class AdapterPathError(AdapterError):
    """The adapter path is invalid, missing, or not inside the adapter roots."""


def resolve_under_roots(raw: str, roots: list[Path]) -> Path:
    """The adapter directory `raw`, resolved, if it lies strictly inside one of `roots`; else AdapterPathError.

    Symlinks are resolved first (so `..` and links pointing outside are refused), and the two adapter
    files must not be links out of the root either.
    """
    if not isinstance(raw, str | Path):
        raise AdapterPathError(f"the adapter path must be a string, got {type(raw).__name__}")
    raw = str(raw)
    if "\0" in raw:
        raise AdapterPathError("the adapter path contains a NUL byte")
    if not raw or len(raw.encode("utf-8", "surrogatepass")) > PATH_MAX:
        raise AdapterPathError(f"the adapter path has {len(raw)} characters; a path has 1 to {PATH_MAX} bytes")
    resolved_roots = [root.resolve() for root in roots]
    try:
        directory = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise AdapterPathError(f"adapter path {raw[:200]!r} does not exist or cannot be resolved ({reason})") from exc
    inside = [root for root in resolved_roots if directory.is_relative_to(root) and directory != root]
    shown = ", ".join(str(r) for r in resolved_roots)
    try:
        if not inside or not directory.is_dir():
            raise AdapterPathError(f"{directory} is not a directory inside the adapter roots ({shown})")
        for name in (CONFIG_FILE, WEIGHTS_FILE):  # the files themselves must not be links out of the root
            file = directory / name
            if file.exists() and not file.resolve().is_relative_to(inside[0]):
                raise AdapterPathError(f"{file} links outside the adapter roots ({shown})")
    except OSError as exc:
        raise AdapterPathError(f"{directory} cannot be inspected ({exc.strerror or exc})") from exc
    return directory


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
    # Unique per load (a reload, or another adapter loaded under the same name, gets a new one): the prefix
    # cache keys blocks by it, so KV computed under one load is never reused under another.
    load_id: int = field(default_factory=lambda: next(_LOAD_IDS))


@dataclass
class RegistryStats:
    loads: dict[str, int] = field(default_factory=lambda: {"loaded": 0, "error": 0})
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)
    # Called with each load's seconds (the metrics exporter's histogram), besides recording it above.
    on_load: Callable[[float], None] | None = None


class AdapterRegistry:
    def __init__(self, base_name: str, model: nn.Module, config: RegistryConfig | None = None) -> None:
        self.base_name = base_name
        self.config = config or RegistryConfig()
        self.context = LoRAContext()
        self.layers: dict[str, MultiLoRALinear] = attach(model, self.context)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.lock = threading.RLock()  # the layers' weights: held around each forward and each install
        self._state = threading.Lock()  # `resident` and in-use counts; taken after `lock`, never before it
        self.resident: OrderedDict[str, AdapterInfo] = OrderedDict()  # LRU order: oldest first
        self._reloads: dict[str, tuple[threading.Lock, int]] = {}  # name -> (lock, waiters) for `ensure`
        self.stats = RegistryStats()
        self._free_slots: list[int] = []  # slots of unloaded adapters, reused before new ones
        self._next_slot = 0

    # ---- loading ----
    def load(self, name: str, path: str | Path, pinned: bool = False) -> AdapterInfo:
        """Read, check and install an adapter (replacing an idle resident one of that name).

        Raises AdapterError (bad files), AdapterCapacityError (no room) or AdapterInUseError (`name` is
        resident and used by requests: it is never replaced under them).
        """
        started = time.monotonic()
        try:
            config, tensors = read_adapter(path)
            weights = self._check(name, path, config, tensors)
            nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.values())
            rank = max(a.shape[0] for a, _ in weights.values())
            with self.lock, self._state:
                old = self.resident.get(name)
                if old is not None and old.in_use:
                    raise AdapterInUseError(
                        f"adapter {name!r} is resident and used by {old.in_use} request(s); it is not replaced "
                        "under them: retry when they finish"
                    )
                if old is not None:
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
                if self.stats.on_load is not None:
                    self.stats.on_load(info.load_seconds)
        except AdapterError:
            with self._state:
                self.stats.loads["error"] += 1
            raise
        return info

    def ensure(self, name: str, path: str | Path) -> AdapterInfo:
        """Make `name` resident, loading it from `path` unless it already is (an evicted adapter's reload).

        Concurrent calls for one name load it once: the others wait and then find it resident.
        """
        with self._state:
            lock, waiters = self._reloads.get(name, (threading.Lock(), 0))
            self._reloads[name] = (lock, waiters + 1)
        try:
            with lock:
                with self._state:
                    info = self.resident.get(name)
                return info if info is not None else self.load(name, path)
        finally:
            with self._state:
                lock, waiters = self._reloads[name]
                if waiters == 1:
                    del self._reloads[name]
                else:
                    self._reloads[name] = (lock, waiters - 1)

    def _check(self, name, path, config, tensors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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
            scaled = b.float() * scaling
            peak = float(scaled.abs().max())
            if not peak <= MAX_ABS_WEIGHT:  # also NaN, from an inf or 0 * inf scaling
                raise AdapterError(
                    f"adapter {name!r} ({path}) module {module}: lora_B scaled by lora_alpha / r = {scaling:g} "
                    f"reaches |w| = {peak:.3g}, beyond the bound MAX_ABS_WEIGHT = {MAX_ABS_WEIGHT:g}"
                )
            weights[module] = (
                a.to(self.device, self.dtype).contiguous(),
                scaled.to(self.device, self.dtype).contiguous(),
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
        with self.lock, self._state:
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
        """Mark one more request using the adapter; False when it is not resident. Pair with `release`."""
        with self._state:
            info = self.resident.get(name)
            if info is None:
                return False
            info.in_use += 1
            self.resident.move_to_end(name)
            return True

    def release(self, name: str) -> None:
        with self._state:
            info = self.resident.get(name)
            if info is not None and info.in_use > 0:
                info.in_use -= 1

    @contextmanager
    def activate(self, row_adapters: list[str | None], tokens_per_row: int):
        """Hold the lock for one forward with these rows' adapters (sorted by name by the runner)."""
        del tokens_per_row  # layers see the (B, T, ...) layout and segment by row
        with self.lock:
            with self.context.activate(self.slots_for(row_adapters), self.device):
                yield

    def slots_for(self, row_adapters: list[str | None]) -> list[int]:
        """Each row's adapter slot in the layers' stacks (-1: base, or an adapter no longer resident)."""
        with self._state:
            return [self.resident[a].slot if a is not None and a in self.resident else -1 for a in row_adapters]
