"""Single-adapter LoRA for training: swap target nn.Linear modules, train only A and B, export as PEFT.

Verbs: `apply_lora(model, spec)` replaces each targeted ``nn.Linear`` (matched by the last component
of its module path, e.g. ``q_proj``) with a `LoraLinear` and freezes everything else;
`lora_tensors(model)` collects the A/B weights keyed by module path; `save_adapter` writes them in
PEFT format (`adapters.peft_format`); `load_adapter_weights` puts a saved adapter back into a wrapped
model. Initialisation follows PEFT: A Kaiming-uniform, B zero, so training starts at the base model.

``lm_head`` is a valid target too (PEFT supports it; the task adapters use it).
For Mixtral, `transformers` v5 keeps the experts as fused 3-D tensors that PEFT cannot target as
Linear modules, so MoE adapters target the attention projections only (`ATTENTION_TARGETS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adapters.peft_format import AdapterConfig, read_adapter, write_adapter

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_TARGETS = (*ATTENTION_TARGETS, "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSpec:
    r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ATTENTION_TARGETS
    dropout: float = 0.0


class LoraLinear(nn.Module):
    """base(x) + scaling * B(A(dropout(x))); base frozen. x (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> Tensor:  # code that reads .weight (dtype, device) still works
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Wrap every targeted Linear in place and freeze the rest; returns the wrapped module paths."""
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in spec.target_modules
    ]
    if not targets:
        raise ValueError(f"no nn.Linear named any of {spec.target_modules} in the model")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, spec.r, spec.lora_alpha, spec.dropout))
    return [name for name, _ in targets]


def lora_tensors(model: nn.Module) -> dict[str, Tensor]:
    """{"<module path>.lora_A": (r, in), "<module path>.lora_B": (out, r)} for every LoraLinear."""
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            out[f"{name}.lora_A"] = module.lora_A.weight.detach().cpu()
            out[f"{name}.lora_B"] = module.lora_B.weight.detach().cpu()
    return out


def save_adapter(model: nn.Module, spec: LoraSpec, directory: str, base_model: str) -> None:
    config = AdapterConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        target_modules=sorted(spec.target_modules),
        base_model_name_or_path=base_model,
        lora_dropout=spec.dropout,
    )
    write_adapter(directory, config, lora_tensors(model))


@torch.no_grad()
def load_adapter_weights(model: nn.Module, directory: str) -> AdapterConfig:
    """Load a PEFT adapter into a model already wrapped by apply_lora with the same targets and rank."""
    config, tensors = read_adapter(directory)
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    for key, tensor in tensors.items():
        module, kind = key.rsplit(".", 1)
        if module not in wrapped:
            raise ValueError(f"adapter module {module} is not wrapped in this model")
        getattr(wrapped[module], kind).weight.copy_(tensor)
        wrapped[module].scaling = config.scaling_for(module, rank=tensor.shape[0] if kind == "lora_A" else None)
    return config


def unwrap_lora(model: nn.Module) -> None:
    """Put the original Linear modules back (drops the adapter)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)
