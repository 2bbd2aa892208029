"""The one adapter catalog: which LoRA adapters the service knows, on which base, and where their files are.

Known adapters are the start-up ones (pinned, exempt from the adapter roots: they were named on the
command line) and the ones an admin loaded (under the adapter roots, checked again on every reload).
Residency is the registries' business (LRU eviction, pinning, in-use counts); the catalog reloads an
evicted adapter when a request needs it. Every failure is an `EngineError` with its HTTP meaning:
400 bad files or path, 404 unknown, 409 name taken / in use / no room, 503 an adapter's files went bad
after it was loaded (the server's store is at fault; an admin fixes or unloads it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.peft_format import AdapterError
from adapters.registry import AdapterCapacityError, AdapterInUseError, AdapterRegistry, resolve_under_roots
from service.engine.types import ConflictError, InvalidRequestError, StoreUnavailableError, UnknownModelError


@dataclass(frozen=True)
class AdapterCard:
    """What the outside sees of one adapter (plain data)."""

    name: str
    base: str
    directory: Path
    resident: bool
    rank: int | None = None
    size_bytes: int = 0
    pinned: bool = False


@dataclass(frozen=True)
class KnownAdapter:
    base: str
    directory: Path
    startup: bool  # named at start-up: pinned, and the adapter roots do not apply


class AdapterCatalog:
    def __init__(
        self,
        registries: dict[str, AdapterRegistry],
        roots: list[Path],
        resolve_base: Callable[[Path], str],
    ) -> None:
        self.registries = registries  # base model name -> its registry
        self.roots = roots
        self.resolve_base = resolve_base  # adapter dir -> the served base it fits (raises AdapterError)
        self.known: dict[str, KnownAdapter] = {}
        self._loading: set[str] = set()
        self._lock = threading.Lock()

    # ---- start-up ----
    def add_startup(self, name: str, base: str, directory: Path) -> None:
        self.known[name] = KnownAdapter(base, Path(directory), startup=True)

    def load_trusted(self, name: str, directory: Path) -> AdapterCard:
        """Load an adapter the deployment itself names (a Ray replica loading what its gateway routes to it):
        not pinned, and like start-up adapters exempt from the roots (the gateway checked them). Blocking."""
        directory = Path(directory)
        try:
            base = self.resolve_base(directory)
            info = self.registries[base].load(name, directory, False)
        except AdapterCapacityError as exc:
            raise ConflictError(str(exc)) from exc
        except AdapterError as exc:
            raise InvalidRequestError(str(exc)) from exc
        self.known[name] = KnownAdapter(base, directory, startup=True)
        return AdapterCard(name, base, directory, True, info.rank, info.bytes)

    # ---- queries ----
    def base_of(self, name: str) -> str | None:
        entry = self.known.get(name)
        return entry.base if entry is not None else None

    def cards(self) -> list[AdapterCard]:
        out = []
        for name, entry in list(self.known.items()):
            info = self.registries[entry.base].resident.get(name)
            out.append(
                AdapterCard(
                    name=name,
                    base=entry.base,
                    directory=entry.directory,
                    resident=info is not None,
                    rank=info.rank if info else None,
                    size_bytes=info.bytes if info else 0,
                    pinned=bool(info and info.pinned),
                )
            )
        return out

    # ---- admin ----
    async def load(self, name: str, raw_path: str, base: str | None, pinned: bool, models: set[str]) -> AdapterCard:
        """Load an adapter directory under the roots as `name` (file reading in a worker thread)."""
        if name in models:
            raise InvalidRequestError(f"{name!r} is a base model name", param="lora_name")
        with self._lock:  # the name is reserved before any await: two loads of one name -> one 409
            if name in self.known or name in self._loading:
                what = "is already loaded; unload it first" if name in self.known else "is being loaded"
                raise ConflictError(f"adapter {name!r} {what}", param="lora_name")
            self._loading.add(name)
        try:
            try:
                directory = resolve_under_roots(raw_path, self.roots)
            except AdapterError as exc:
                raise InvalidRequestError(f"lora_path: {exc}", param="lora_path") from exc
            if base is not None and base not in self.registries:
                raise UnknownModelError(f"base model {base!r} is not served", param="base_model_name")
            base = base or await asyncio.to_thread(self.resolve_base, directory)
            info = await asyncio.to_thread(self.registries[base].load, name, directory, pinned)
            self.known[name] = KnownAdapter(base, directory, startup=False)
        except (AdapterCapacityError, AdapterInUseError) as exc:
            raise ConflictError(str(exc), param="lora_name") from exc
        except AdapterError as exc:
            raise InvalidRequestError(str(exc), param="lora_path") from exc
        except (OSError, ValueError) as exc:  # a path in the config (base_model_name_or_path) the OS refuses
            raise InvalidRequestError(f"adapter {raw_path[:200]!r} cannot be loaded: {exc}", param="lora_path") from exc
        finally:
            with self._lock:
                self._loading.discard(name)
        return AdapterCard(name, base, directory, True, info.rank, info.bytes, pinned)

    def unload(self, name: str) -> AdapterCard:
        """Forget an adapter; refused (409) while requests use it."""
        entry = self.known.get(name)
        if entry is None:
            raise UnknownModelError(f"adapter {name!r} is not loaded", param="lora_name", code="model_not_found")
        try:
            self.registries[entry.base].unload(name)
        except AdapterInUseError as exc:
            raise ConflictError(str(exc), param="lora_name") from exc
        except AdapterError:  # not resident (LRU evicted it): forgetting it is enough
            pass
        self.known.pop(name, None)
        return AdapterCard(name, entry.base, entry.directory, False)

    # ---- requests ----
    async def ensure_resident(self, name: str) -> None:
        """Make a request's adapter resident, reloading it (in a worker thread) if LRU evicted it.

        It is held (one in-use count) until the event loop's next turn, across the synchronous engine
        submission that follows (which takes the request's own count), so no concurrent load evicts it
        in between. A reload of an admin-loaded adapter re-checks the adapter roots."""
        entry = self.known.get(name)
        if entry is None:
            raise UnknownModelError(f"adapter {name!r} was unloaded", param="model", code="model_not_found")
        registry = self.registries[entry.base]
        for _ in range(3):  # an adapter evicted again before this coroutine resumed is reloaded again
            if registry.acquire(name):
                asyncio.get_running_loop().call_soon(registry.release, name)
                return
            try:
                await asyncio.to_thread(self._reload, registry, name, entry)
            except AdapterCapacityError as exc:
                raise ConflictError(f"adapter {name!r} could not be reloaded: {exc}") from exc
            except (AdapterError, OSError, ValueError) as exc:  # files went bad, or a path now outside the roots
                raise StoreUnavailableError(f"adapter {name!r} could not be reloaded: {exc}") from exc
            if self.known.get(name) != entry:  # unloaded (or replaced) by an admin meanwhile
                raise UnknownModelError(f"adapter {name!r} was unloaded", param="model", code="model_not_found")
        raise ConflictError(f"adapter {name!r} was evicted again before use: more adapters in use than max_adapters")

    def _reload(self, registry: AdapterRegistry, name: str, entry: KnownAdapter) -> None:
        directory = entry.directory
        if not entry.startup:  # admin-loaded: the roots apply again
            directory = resolve_under_roots(str(directory), self.roots)
        registry.ensure(name, directory)
