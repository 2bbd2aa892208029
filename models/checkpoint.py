"""Hugging Face-format checkpoint directories: load and save.

A model directory holds `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`), and optionally `tokenizer.json`, `tokenizer_config.json` and
`generation_config.json`. Tensor names are Hugging Face's. Pickle checkpoints (`*.bin`, `*.pt`) are
refused: loading them can run arbitrary code. Mixtral experts are accepted both as per-expert
tensors (`experts.N.w1`, the on-disk format) and as the fused 3-D tensors that `transformers` v5
keeps in memory (`mlp.experts.gate_up_proj`). A model quantized by `models.quantization` saves and
loads as int8 weights plus scales with a `quantization_config` in config.json (layout: that module's
docstring); other quantized checkpoints (GPTQ, AWQ, bitsandbytes, ...) are refused, naming the method.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from models.config import ModelConfig
from models.decoder import CausalLM
from models.quantization import (
    QuantizationConfig,
    QuantizationError,
    quantization_of,
    quantize_model,
    refresh,
    resolve,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some older checkpoints carry that this implementation recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded, with the reason named."""


@dataclass
class GenerationDefaults:
    """What `generation_config.json` says, where it exists."""

    eos_token_ids: list[int]
    bos_token_id: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def load(cls, directory: Path, config: ModelConfig) -> GenerationDefaults:
        path = directory / "generation_config.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        eos = raw.get("eos_token_id", config.eos_token_id)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            eos_ids,
            raw.get("bos_token_id", config.bos_token_id),
            raw.get("temperature"),
            raw.get("top_p"),
            raw.get("top_k"),
        )


def parse_dtype(name: str | torch.dtype | None, default: str = "float32") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    name = name or default
    if name not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX_FILE).is_file():
        index = json.loads((directory / INDEX_FILE).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{directory / INDEX_FILE} has an empty weight_map")
        return [directory / name for name in names]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    shards = sorted(directory.glob("model-*.safetensors"))
    if shards:
        return shards
    pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES] if directory.is_dir() else []
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); modelserve loads safetensors only "
            "because unpickling can run arbitrary code. Convert with transformers: "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")


def read_tensors(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory, by Hugging Face name."""
    directory = Path(directory)
    tensors: dict[str, Tensor] = {}
    for path in _weight_files(directory):
        if not path.is_file():
            raise CheckpointError(f"shard {path.name} listed in {INDEX_FILE} is missing")
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


_FUSED = re.compile(r"^(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


def _unfuse_experts(tensors: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rewrite transformers-v5 fused Mixtral expert tensors as per-expert tensors."""
    out: dict[str, Tensor] = {}
    inter = config.intermediate_size
    for name, tensor in tensors.items():
        match = _FUSED.match(name)
        if match is None or not config.is_moe:
            out[name] = tensor
            continue
        prefix, kind = match.group(1), match.group(2)
        moe = f"{prefix}.block_sparse_moe"
        if kind == "gate.weight":
            out[f"{moe}.gate.weight"] = tensor
        elif kind == "experts.gate_up_proj":  # (E, 2I, H): gate rows then up rows
            for e in range(tensor.shape[0]):
                out[f"{moe}.experts.{e}.w1.weight"] = tensor[e, :inter]
                out[f"{moe}.experts.{e}.w3.weight"] = tensor[e, inter:]
        else:  # down_proj (E, H, I)
            for e in range(tensor.shape[0]):
                out[f"{moe}.experts.{e}.w2.weight"] = tensor[e]
    return out


def load_state(model: CausalLM, tensors: dict[str, Tensor]) -> None:
    """Copy checkpoint tensors into the model, naming every missing, unexpected or mis-shaped tensor."""
    config = model.config
    tensors = _unfuse_experts(tensors, config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        for name in ("lm_head.weight", "lm_head.weight_scale"):
            expected.pop(name, None)
            tensors.pop(name, None)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), first: {', '.join(missing[:5])}")
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensor(s) this {config.model_type} config does not use, "
            f"first: {', '.join(unexpected[:5])}"
        )
    for name, target in expected.items():
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensors[name].shape)}, config.json implies {tuple(target.shape)}"
            )
        if (target.dtype == torch.int8) != (tensors[name].dtype == torch.int8):
            raise CheckpointError(
                f"tensor {name} is {tensors[name].dtype}, the model expects {target.dtype} "
                "(quantization_config and the stored tensors disagree)"
            )
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def load_model(
    directory: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    quantization: str | QuantizationConfig | None = None,
) -> CausalLM:
    """Load a Hugging Face-format model directory. dtype None: the checkpoint's own dtype.

    quantization "int8" (or a QuantizationConfig) quantizes a float checkpoint as it loads (from its
    float32 weights, before the cast to dtype); a checkpoint saved quantized loads quantized whatever
    is asked (models.quantization has the layout). Other quant_methods are refused by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    config = ModelConfig.load(directory)
    config.attn_implementation = attn_implementation
    stored_quant = config.extra.pop("quantization_config", None)
    try:
        stored = (
            None if stored_quant is None else QuantizationConfig.from_dict(stored_quant, f"{directory}/config.json")
        )
        wanted = resolve(quantization)
    except QuantizationError as exc:
        raise CheckpointError(str(exc)) from exc
    if stored is not None and wanted is not None:  # runtime choices from the request, layout from the file
        stored.kernel, stored.weight_only_max_rows = wanted.kernel, wanted.weight_only_max_rows
    tensors = read_tensors(directory)
    torch_dtype = parse_dtype(dtype, config.torch_dtype)
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device="cpu")
    model.rotary = type(model.rotary)(config.head_dim, config.rope_theta)  # buffers lost on meta
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if stored is not None:
        quantize_model(model, stored, values=False)
    load_state(model, tensors)
    if stored is not None:
        refresh(model)
    elif wanted is not None:
        quantize_model(model, wanted)
    return model.to(device=device, dtype=torch_dtype).eval()


def _stored(name: str, tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A state tensor as written: int8 weights as they are, their scales float32, the rest in dtype."""
    tensor = tensor.detach().to("cpu")
    if not tensor.is_floating_point():
        return tensor.contiguous()
    return tensor.to(torch.float32 if name.endswith("weight_scale") else dtype).contiguous()


def save_model(
    model: CausalLM,
    directory: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    generation_config: dict | None = None,
) -> Path:
    """Write config.json and safetensors weights (sharded above max_shard_bytes) in Hugging Face names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = parse_dtype(dtype, model.config.torch_dtype) if dtype else model.dtype
    dtype_name = next(k for k, v in DTYPES.items() if v == torch_dtype)
    state = {k: _stored(k, v, torch_dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state.pop("lm_head.weight_scale", None)
    model.config.replace(torch_dtype=dtype_name).save(directory)
    quant = quantization_of(model)
    if quant is not None:  # the layout is in models/quantization.py
        path = directory / "config.json"
        raw = json.loads(path.read_text())
        raw["quantization_config"] = quant.to_dict()
        path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    for stale in [*directory.glob("model-*.safetensors"), directory / SINGLE_FILE, directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / filename), metadata=metadata)
            weight_map.update({name: filename for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return directory
