"""Optimiser construction: AdamW parameter groups (μP and layer-wise learning rates) and a SAM wrapper.

Every group carries ``lr_mult``; the training loop sets ``lr = base_lr * lr_mult * schedule(step)``.

- μP (``mup_width_mult``): hidden matrices (`training.mup.is_hidden_matrix`) get lr_mult /= width_mult.
- Layer-wise learning rates (``layer_lr_decay`` = γ): a parameter at depth d, of a model with L
  layers, gets lr_mult *= γ ** (L + 1 - d), with depth 0 for the embedding, i + 1 for layer i, and
  L + 1 for the final norm and the head. So with γ < 1 the head trains at the full rate and each
  step towards the input multiplies it by γ (layer-wise LR decay, ELECTRA / BEiT fine-tuning);
  γ = 1 turns it off.
- Weight decay (decoupled, torch AdamW) on matrices only; norms and biases are not decayed.

SAM (Foret et al. 2021, "Sharpness-Aware Minimization"): `SAM.perturb` moves the weights to
w + ρ g / ||g|| (global L2 norm over all parameters); after a second forward/backward there, `SAM.step`
restores w and lets the base optimiser (AdamW) step with the perturbed-point gradient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from training.mup import is_hidden_matrix

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # μP: hidden_size / base_width of the model being trained; None for standard parametrisation.
    mup_width_mult: float | None = None
    # γ in lr_mult = γ ** (L + 1 - depth); 1.0 disables layer-wise learning rates.
    layer_lr_decay: float = 1.0
    # SAM neighbourhood radius ρ; 0 disables SAM (one forward/backward per step).
    sam_rho: float = 0.0


def depth_of(name: str, num_layers: int) -> int:
    if "embed_tokens" in name:
        return 0
    match = _LAYER.search(name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def param_groups(model: nn.Module, config: OptimConfig, num_layers: int) -> list[dict]:
    """Trainable parameters grouped by (lr_mult, weight_decay)."""
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = config.layer_lr_decay ** (num_layers + 1 - depth_of(name, num_layers))
        if config.mup_width_mult is not None and is_hidden_matrix(name, param):
            mult /= config.mup_width_mult
        decay = config.weight_decay if param.ndim >= 2 else 0.0
        group = groups.setdefault(
            (mult, decay), {"params": [], "lr_mult": mult, "weight_decay": decay, "lr": config.lr * mult}
        )
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, config: OptimConfig, num_layers: int) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, config, num_layers), lr=config.lr, betas=config.betas, eps=config.eps)


class SAM:
    """Sharpness-aware minimisation around any torch optimiser (two forward/backward passes per step)."""

    def __init__(self, base: torch.optim.Optimizer, rho: float, eps: float = 1e-12) -> None:
        if rho <= 0:
            raise ValueError(f"SAM rho must be positive, got {rho}")
        self.base, self.rho, self.eps = base, rho, eps
        self._offsets: list[tuple[Tensor, Tensor]] = []

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    @torch.no_grad()
    def perturb(self) -> None:
        """w <- w + ρ g / ||g||, using the gradients of the first pass (left in .grad)."""
        params = [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = self.rho / (norm + self.eps)
        self._offsets = []
        for p in params:
            offset = p.grad * scale
            p.add_(offset)
            self._offsets.append((p, offset))

    @torch.no_grad()
    def step(self) -> None:
        """Undo the perturbation, then step the base optimiser with the gradient taken at w + e."""
        for p, offset in self._offsets:
            p.sub_(offset)
        self._offsets = []
        self.base.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)
