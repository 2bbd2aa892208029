"""Build the served models from Settings: model dirs -> `ServedModel`s with adapter registries, adapters loaded.

With no configured models the demo zoo under `artifacts_dir` is served: every direct child holding
`config.json` is a model, every `artifacts_dir/adapters/<name>/` an adapter. An adapter's base is
its `adapter_config.json` `base_model_name_or_path` when that names a served model (by name, by
directory, or by the directory's last component); otherwise the one served model whose layer shapes
fit the adapter's tensors. `device="auto"` picks CUDA (bfloat16 weights) when torch sees a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.peft_format import AdapterError, modules, read_adapter
from adapters.registry import AdapterRegistry, RegistryConfig
from models.checkpoint import CheckpointError, GenerationDefaults, load_model
from models.config import ConfigError, ModelConfig
from models.quantization import describe, weight_bytes, weight_count
from models.tokenizer import TextTokenizer
from service.engine import Engine, EngineConfig, SchedulerConfig, ServedModel
from service.engine.catalog import AdapterCatalog
from service.engine.client import ClientConfig, EngineClient, ModelInfo, RequestObserver
from service.engine.speculative import SpeculativeConfig
from service.settings import Settings

log = logging.getLogger(__name__)


NGRAM = "ngram"  # `--draft TARGET=ngram`: prompt-lookup speculation, no draft model (vLLM's method name)


class LoadingError(ValueError):
    """The configured models or adapters cannot be served, with the reason named."""


@dataclass
class LoadedModel:
    served: ServedModel
    directory: Path
    config: ModelConfig
    dtype: str | None = None  # of the float parts (norms, scales, activations)
    quantization: str | None = None  # "int8" or None (models/quantization.py)
    weight_bytes: int = 0  # weights in memory: int8 tables and scales of a quantized model, tied ones once
    weight_count: int = 0  # parameters, quantized or not


def resolve_device(settings: Settings) -> tuple[str, str]:
    """(device, dtype name) for the model weights."""
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoadingError("device=cuda but torch sees no CUDA GPU")
    dtype = settings.dtype or ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def discover(settings: Settings) -> tuple[dict[str, Path], dict[str, Path]]:
    """(models, adapters) to serve: the configured ones, or the zoo under artifacts_dir."""
    if settings.models:
        return dict(settings.models), dict(settings.adapters)
    root = settings.artifacts_dir
    models = {d.name: d for d in sorted(root.iterdir()) if (d / "config.json").is_file()} if root.is_dir() else {}
    if not models:
        raise LoadingError(
            f"no models to serve: {root}/ has no model directories (run `modelserve build` or `make run`), "
            "and no --model NAME=DIR was given"
        )
    adapter_root = root / "adapters"
    adapters = (
        {d.name: d for d in sorted(adapter_root.iterdir()) if (d / "adapter_config.json").is_file()}
        if adapter_root.is_dir()
        else {}
    )
    return models, {**adapters, **settings.adapters}


def quantization_for(name: str, settings: Settings) -> str | None:
    """The weight quantization asked for model `name` ("int8" or None): its own entry, else the "*" entry."""
    method = settings.quantization.get(name, settings.quantization.get("*"))
    return None if method in (None, "none") else method


def load_served_model(name: str, directory: Path, settings: Settings, device: str, dtype: str) -> LoadedModel:
    try:
        model = load_model(directory, dtype=dtype, device=device, quantization=quantization_for(name, settings))
    except (CheckpointError, ConfigError) as exc:
        raise LoadingError(f"model {name!r} ({directory}): {exc}") from exc
    tokenizer = TextTokenizer.load(directory)
    config = model.config
    eos = list(GenerationDefaults.load(directory, config).eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    registry = AdapterRegistry(
        name,
        model,
        RegistryConfig(settings.max_adapters, settings.max_adapter_bytes, settings.max_lora_rank),
    )
    max_len = min(config.max_position_embeddings, settings.max_model_len)
    served = ServedModel(name, model, tokenizer, max_model_len=max_len, eos_token_ids=tuple(eos), registry=registry)
    info = describe(model)
    log.info(
        "loaded model %s from %s (%s, %s, quantization %s, max_model_len=%d)",
        name,
        directory,
        device,
        dtype,
        info["quantization"] or "none",
        max_len,
    )
    return LoadedModel(
        served, directory, config, weight_bytes=weight_bytes(model), weight_count=weight_count(model), **info
    )


def _fits(registry: AdapterRegistry, tensors: dict) -> bool:
    for module in modules(tensors):
        layer = registry.layers.get(module)
        a, b = tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]
        if layer is None or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            return False
    return True


def resolve_base(adapter_dir: Path, models: dict[str, LoadedModel]) -> str:
    """The served model an adapter belongs to (see module docstring). Raises AdapterError."""
    config, tensors = read_adapter(adapter_dir)
    base = config.base_model_name_or_path
    if base:
        if base in models:
            return base
        for name, loaded in models.items():
            candidate = Path(base) if Path(base).is_absolute() else adapter_dir / base
            same_dir = candidate.exists() and candidate.resolve() == loaded.directory.resolve()
            if same_dir or Path(base).name == loaded.directory.name:
                return name
    fitting = [name for name, loaded in models.items() if _fits(loaded.served.registry, tensors)]
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        raise AdapterError(
            f"adapter {adapter_dir.name!r} (base_model_name_or_path={base!r}) fits none of the served models "
            f"({', '.join(models)})"
        )
    raise AdapterError(
        f"adapter {adapter_dir.name!r} (base_model_name_or_path={base!r}) fits several served models "
        f"({', '.join(fitting)}); set base_model_name_or_path to one of them"
    )


def resolve_drafts(settings: Settings, models: dict[str, LoadedModel]) -> dict[str, str]:
    """Target -> draft pairs: the configured ones, or for the demo zoo the DistillSpec draft (the student when
    the zoo predates it) drafting for the teacher."""
    if settings.drafts:
        return dict(settings.drafts)
    if settings.models:  # models named explicitly: no demo default
        return {}
    draft = next((name for name in ("draft", "student") if {"teacher", name} <= set(models)), None)
    return {"teacher": draft} if draft else {}


def attach_drafts(models: dict[str, LoadedModel], drafts: dict[str, str], num_draft_tokens: int) -> None:
    for target, draft in drafts.items():
        if draft == NGRAM and target in models:  # prompt lookup: drafts from the sequence's history
            models[target].served.speculative = SpeculativeConfig(num_draft_tokens=num_draft_tokens, method="ngram")
            log.info("speculative decoding: n-gram prompt lookup for %s", target)
            continue
        if target not in models or draft not in models:
            raise LoadingError(f"draft pair {target}={draft}: both must be served models ({', '.join(models)})")
        target_config, draft_config = models[target].config, models[draft].config
        if target_config.vocab_size != draft_config.vocab_size:
            raise LoadingError(
                f"draft {draft!r} has vocab_size {draft_config.vocab_size}, target {target!r} "
                f"{target_config.vocab_size}: a draft must share the target's tokenizer"
            )
        models[target].served.draft_model = models[draft].served.model
        models[target].served.speculative = SpeculativeConfig(num_draft_tokens=num_draft_tokens)
        log.info("speculative decoding: %s drafts for %s", draft, target)


def load_all(settings: Settings) -> tuple[dict[str, LoadedModel], dict[str, tuple[str, Path]]]:
    """Load every model and start-up adapter: (models by name, adapter name -> (base, dir))."""
    model_dirs, adapter_dirs = discover(settings)
    device, dtype = resolve_device(settings)
    models = {name: load_served_model(name, Path(d), settings, device, dtype) for name, d in model_dirs.items()}
    attach_drafts(models, resolve_drafts(settings, models), settings.num_draft_tokens)
    adapters: dict[str, tuple[str, Path]] = {}
    for name, directory in adapter_dirs.items():
        if name in models:
            raise LoadingError(f"adapter name {name!r} is also a model name")
        base = resolve_base(Path(directory), models)
        info = models[base].served.registry.load(name, directory, pinned=True)
        adapters[name] = (base, Path(directory))
        log.info("loaded adapter %s (rank %d) on %s from %s", name, info.rank, base, directory)
    return models, adapters


def model_info(name: str, loaded: LoadedModel, chat_template: str | None = None) -> ModelInfo:
    """What the client and routes know of a served model; chat_template overrides the tokenizer's."""
    tokenizer = loaded.served.tokenizer
    return ModelInfo(
        name=name,
        directory=loaded.directory,
        max_model_len=loaded.served.max_model_len,
        vocab_size=loaded.config.vocab_size,
        parameters=loaded.weight_count,
        size_bytes=loaded.weight_bytes,
        dtype=loaded.dtype,
        quantization=loaded.quantization,
        device=str(loaded.served.model.device),
        chat_template=chat_template or tokenizer.chat_template,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
    )


def build_client(settings: Settings, observer: RequestObserver, on_step=None) -> EngineClient:
    """Load every model and start-up adapter, start the engine, and return the client in front of it."""
    models, adapters = load_all(settings)
    # The client's admission bounds each model's requests (running + waiting); the engine's own bound also
    # counts submissions not yet moved into its scheduler, so it gets the whole capacity as a backstop.
    capacity = settings.max_batch_size + settings.max_waiting
    settings.export_torch_environment()
    scheduler = SchedulerConfig(
        settings.max_batch_size,
        settings.max_tokens_per_step,
        capacity,
        compile_decode=settings.compile_decode,
        compile_autotune=settings.compile_autotune,
        block_size=settings.kv_block_size,
        kv_cache_tokens=settings.kv_cache_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
    )
    engine = Engine(
        EngineConfig(scheduler, max_consecutive_step_failures=settings.max_consecutive_step_failures), on_step=on_step
    )
    for loaded in models.values():
        engine.add_model(loaded.served)  # may cap max_model_len at the KV pool: model_info reads it after
    catalog = AdapterCatalog(
        {name: loaded.served.registry for name, loaded in models.items()},
        settings.effective_adapter_roots,
        lambda directory: resolve_base(directory, models),
    )
    for name, (base, directory) in adapters.items():
        catalog.add_startup(name, base, directory)
    config = ClientConfig(
        capacity=capacity,
        max_prompt_chars=settings.max_prompt_chars,
        max_stop_sequences=settings.max_stop_sequences,
        max_stop_chars=settings.max_stop_chars,
        request_timeout_s=settings.request_timeout_s,
    )
    template = settings.chat_template_text()
    infos = {name: (loaded.served, model_info(name, loaded, template)) for name, loaded in models.items()}
    engine.start()
    return EngineClient(engine, infos, catalog, config, observer)
