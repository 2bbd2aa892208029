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

Everything read from disk is untrusted: `read_adapter` turns every way a directory can be broken (a
truncated, empty or random weights file, a config that is not a UTF-8 JSON object, fields of the
wrong type, empty or zero-rank tensors, non-float dtypes, NaN/inf or values beyond `MAX_ABS_WEIGHT`)
into an `AdapterError` whose message names the file and the reason; no parser exception escapes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.default)?\.weight$")
# A trained LoRA factor is O(1): PEFT starts A at Kaiming-uniform (about 1/sqrt(in)) and B at zero, and
# fine-tuning keeps both far below 10. 1e4 is far above any real adapter yet far below float16's largest
# value (65504), so an accepted adapter (and B scaled by lora_alpha / r, checked by the registry) stays
# finite in the float16/bfloat16 serving dtypes; a value beyond it means a corrupt or hostile file.
MAX_ABS_WEIGHT = 1e4
# A PEFT config is a few KB; anything this large is not one, and is refused before it is parsed.
MAX_CONFIG_BYTES = 1024**2
# Wider than any layer of a servable model (the registry then applies max_lora_rank); the bound also
# keeps lora_alpha / r an ordinary float.
MAX_RANK = 2**16
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
            raise AdapterError(f"target_modules as a regex ({_short(target)}) is not supported; list the module names")
        if "r" not in kwargs or "lora_alpha" not in kwargs or not target:
            raise AdapterError("the config needs r, lora_alpha and target_modules")
        _check_types(kwargs)
        kwargs["target_modules"] = sorted(target)
        for key in ("rank_pattern", "alpha_pattern"):
            kwargs[key] = kwargs.get(key) or {}
        return cls(**kwargs, extra={k: v for k, v in raw.items() if k not in known})


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    try:
        return _is_number(value) and math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _optional(check):
    return lambda value: value is None or check(value)


# Known config fields: (check, what the value must be). JSON allows any type anywhere; these don't.
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "r": (_is_int, "an integer"),
    "lora_alpha": (_is_number, "a number"),
    "target_modules": (lambda v: isinstance(v, list) and all(isinstance(m, str) and m for m in v), "a list of names"),
    "base_model_name_or_path": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "task_type": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "lora_dropout": (_is_number, "a number"),
    "bias": (lambda v: isinstance(v, str), "a string"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "modules_to_save": (_optional(lambda v: isinstance(v, list)), "a list or null"),
    "rank_pattern": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
    "alpha_pattern": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
}


def _check_types(fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        check, what = _FIELD_TYPES.get(key, (None, ""))
        if check is not None and not check(value):
            raise AdapterError(f"{key} must be {what}, got {type(value).__name__} {_short(value)}")


def validate(config: AdapterConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise AdapterError(message)

    _check_types({key: getattr(config, key) for key in _FIELD_TYPES})
    need(config.peft_type == "LORA", f"peft_type {_short(config.peft_type)} is not supported; only LORA")
    need(config.task_type in (None, "CAUSAL_LM"), f"task_type {_short(config.task_type)} is not CAUSAL_LM")
    need(0 < config.r <= MAX_RANK, f"LoRA rank r must be 1 to {MAX_RANK}, got {_short(config.r)}")
    need(_is_finite(config.lora_alpha), f"lora_alpha must be a finite number, got {_short(config.lora_alpha)}")
    for key, value in config.rank_pattern.items():
        ok = isinstance(key, str) and _is_int(value) and 0 < value <= MAX_RANK
        need(ok, f"rank_pattern[{_short(key)}] must be a rank from 1 to {MAX_RANK}, got {_short(value)}")
    for key, value in config.alpha_pattern.items():
        need(_is_finite(value), f"alpha_pattern[{_short(key)}] must be a finite number, got {_short(value)}")
    need(not config.use_dora, "DoRA adapters (use_dora) are not supported")
    need(config.bias == "none", f"LoRA bias {config.bias!r} is not supported; only 'none'")
    need(not config.modules_to_save, f"modules_to_save ({config.modules_to_save}) is not supported")
    need(not config.fan_in_fan_out, "fan_in_fan_out (GPT-2 Conv1D layout) is not supported")


def read_adapter(directory: str | Path) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """(config, {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}) from a PEFT adapter dir.

    Raises AdapterError, naming the file and the reason, for anything unusable (see module docstring).
    """
    directory = Path(directory)
    config = _read_config(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterError(f"{directory} holds only adapter_model.bin; modelserve loads safetensors only")
        raise AdapterError(f"{weights} not found")
    tensors = _read_tensors(weights)
    for module in modules(tensors):
        a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
        if a is None or b is None:
            raise AdapterError(f"{weights}: module {module} has only one of lora_A / lora_B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{weights}: module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} ranks differ"
            )
        if module.rsplit(".", 1)[-1] not in config.target_modules:
            raise AdapterError(f"{weights}: module {module} is not in target_modules {config.target_modules}")
    return config, tensors


def _read_config(path: Path) -> AdapterConfig:
    if not path.is_file():
        raise AdapterError(f"{path} not found: a PEFT adapter directory needs {CONFIG_FILE}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterError(f"{path} has {size} bytes, over MAX_CONFIG_BYTES = {MAX_CONFIG_BYTES} for a config")
        raw = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise AdapterError(f"{path} is not valid JSON: nested too deeply") from exc
    except OSError as exc:
        raise AdapterError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    try:
        config = AdapterConfig.from_dict(raw)
        validate(config)
    except AdapterError as exc:
        raise AdapterError(f"{path}: {exc}") from exc
    return config


def _read_tensors(weights: Path) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():
                if name.endswith(".base_layer.weight"):
                    continue
                match = _KEY.match(name)
                if match is None:
                    raise AdapterError(
                        f"{weights}: unexpected tensor {_short(name, 160)} (expected {PREFIX}<module>.lora_A/B.weight)"
                    )
                key = f"{match['module']}.{match['kind']}"
                if key in tensors:
                    raise AdapterError(f"{weights}: {key} appears twice (with and without .default)")
                tensors[key] = _checked_tensor(weights, name, handle.get_tensor(name))
    except AdapterError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, OverflowError, RuntimeError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise AdapterError(f"{weights} is not a readable safetensors file ({_short(reason, 200)})") from exc
    if not tensors:
        raise AdapterError(f"{weights} holds no LoRA tensors")
    return tensors


def _checked_tensor(weights: Path, name: str, tensor: Tensor) -> Tensor:
    """The tensor, if it is a non-empty float matrix with finite values within +-MAX_ABS_WEIGHT."""
    where = f"{weights}: tensor {_short(name, 160)}"
    if tensor.dtype not in FLOAT_DTYPES:
        raise AdapterError(f"{where} has dtype {tensor.dtype}; LoRA weights are float16, bfloat16, float32 or float64")
    if tensor.ndim != 2:
        raise AdapterError(f"{where} has shape {tuple(tensor.shape)}; LoRA weights are matrices")
    if tensor.numel() == 0:
        raise AdapterError(f"{where} is empty (shape {tuple(tensor.shape)}): a LoRA needs rank >= 1")
    values = tensor.float()
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        nan = int(torch.isnan(values).sum())
        raise AdapterError(f"{where} holds non-finite values ({nan} NaN, {int((~finite).sum()) - nan} inf)")
    peak = float(values.abs().max())
    if peak > MAX_ABS_WEIGHT:
        raise AdapterError(f"{where} holds |w| = {peak:.3g}, beyond the bound MAX_ABS_WEIGHT = {MAX_ABS_WEIGHT:g}")
    return tensor


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
