"""PEFT-format LoRA adapter directories: read, validate and write (shared by training and serving).

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; pickle files
(``adapter_model.bin``) are refused because unpickling can run arbitrary code. Tensor names in the
file are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (r, in) and ``... .lora_B.weight``
(out, r), where ``<module path>`` is the module's name in the Hugging Face model (and so in
`models.CausalLM`, whose names mirror it), e.g. ``model.layers.0.self_attn.q_proj``. This is what
peft 0.21 writes for a `transformers` model (checked in tests/training/test_lora.py).

`read_adapter` returns the config and the tensors keyed by ``<module path>.lora_A`` /
``<module path>.lora_B`` (prefix and ``.weight`` stripped), so a consumer only needs
``modules()`` and ``config.scaling_for(module)``. PEFT also saves a copy of the base weight
(``<module>.base_layer.weight``) when ``lm_head`` or an embedding is targeted; it duplicates the base
model's tensor and is skipped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.default)?\.weight$")


class AdapterError(ValueError):
    """An adapter directory that cannot be used, with the reason named."""


@dataclass
class AdapterConfig:
    r: int
    lora_alpha: float
    target_modules: list[str]
    base_model_name_or_path: str | None = None
    peft_type: str = "LORA"
    task_type: str | None = "CAUSAL_LM"
    lora_dropout: float = 0.0
    bias: str = "none"
    fan_in_fan_out: bool = False
    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r.
    use_rslora: bool = False
    use_dora: bool = False
    inference_mode: bool = True
    modules_to_save: list[str] | None = None
    # Per-module overrides of r / lora_alpha, keyed by a suffix of the module path (PEFT semantics).
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def scaling_for(self, module: str, rank: int | None = None) -> float:
        """The factor multiplying B @ A for one module (module path as in read_adapter's keys)."""
        r = rank if rank is not None else _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdapterConfig:
        known = set(cls.__dataclass_fields__) - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        target = kwargs.get("target_modules")
        if isinstance(target, str):  # PEFT allows a regex string; modelserve needs names
            raise AdapterError(f"target_modules as a regex ({target!r}) is not supported; list the module names")
        if "r" not in kwargs or "lora_alpha" not in kwargs or not target:
            raise AdapterError(f"{CONFIG_FILE} needs r, lora_alpha and target_modules")
        kwargs["target_modules"] = sorted(target)
        for key in ("rank_pattern", "alpha_pattern"):
            kwargs[key] = kwargs.get(key) or {}
        return cls(**kwargs, extra={k: v for k, v in raw.items() if k not in known})


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def validate(config: AdapterConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise AdapterError(message)

    need(config.peft_type == "LORA", f"peft_type {config.peft_type!r} is not supported; only LORA")
    need(config.task_type in (None, "CAUSAL_LM"), f"task_type {config.task_type!r} is not CAUSAL_LM")
    need(config.r > 0, f"LoRA rank r must be positive, got {config.r}")
    need(not config.use_dora, "DoRA adapters (use_dora) are not supported")
    need(config.bias == "none", f"LoRA bias {config.bias!r} is not supported; only 'none'")
    need(not config.modules_to_save, f"modules_to_save ({config.modules_to_save}) is not supported")
    need(not config.fan_in_fan_out, "fan_in_fan_out (GPT-2 Conv1D layout) is not supported")


def read_adapter(directory: str | Path) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """(config, {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}) from a PEFT adapter dir."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{config_path} not found: a PEFT adapter directory needs {CONFIG_FILE}")
    try:
        config = AdapterConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise AdapterError(f"{config_path} is not a valid adapter config: {exc}") from exc
    validate(config)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterError(f"{directory} holds only adapter_model.bin; modelserve loads safetensors only")
        raise AdapterError(f"{weights} not found")
    tensors: dict[str, Tensor] = {}
    with safe_open(str(weights), framework="pt") as handle:
        for name in handle.keys():
            if name.endswith(".base_layer.weight"):
                continue
            match = _KEY.match(name)
            if match is None:
                raise AdapterError(f"unexpected tensor {name!r} in {WEIGHTS_FILE} (expected {PREFIX}<module>.lora_A/B)")
            tensors[f"{match['module']}.{match['kind']}"] = handle.get_tensor(name)
    if not tensors:
        raise AdapterError(f"{weights} holds no LoRA tensors")
    for module in modules(tensors):
        a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
        if a is None or b is None:
            raise AdapterError(f"module {module} has only one of lora_A / lora_B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} ranks differ")
        if module.rsplit(".", 1)[-1] not in config.target_modules:
            raise AdapterError(f"module {module} is not in target_modules {config.target_modules}")
    return config, tensors


def modules(tensors: dict[str, Tensor]) -> list[str]:
    """Module paths that carry a LoRA pair, sorted."""
    return sorted({key.rsplit(".", 1)[0] for key in tensors})


def write_adapter(directory: str | Path, config: AdapterConfig, tensors: dict[str, Tensor]) -> Path:
    """Write a PEFT adapter dir; tensors keyed as read_adapter returns them."""
    validate(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {f"{PREFIX}{key}.weight": t.detach().to("cpu").contiguous() for key, t in sorted(tensors.items())}
    save_file(out, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return directory
