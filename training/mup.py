"""μP (maximal update parametrisation, Tensor Programs V / microsoft/mup) for the decoder, and export folding.

With width_mult = hidden_size / base_width, the rules used here (Adam variant, Table 3 of TP-V):

- hidden matrices (both dimensions grow with width: q/k/v/o, MLP and expert projections): init std
  divided by sqrt(width_mult), learning rate divided by width_mult (`training.optim`);
- vector-like parameters (embedding, router, norms, biases): init and learning rate unchanged;
- readout: zero-initialised, output multiplied by 1/width_mult (`ModelConfig.logits_scale`), untied
  from the embedding;
- attention: scores scaled by 1/d instead of 1/sqrt(d). Concretely attention_scale =
  sqrt(base_head_dim) / head_dim, which equals the standard 1/sqrt(d) at the base width;
- query projection zero-initialised (attention starts uniform, as microsoft/mup recommends).

At base width every rule reduces to standard parametrisation, so hyperparameters tuned on the base
model transfer to wider ones. `fold_for_export` multiplies the training-only multipliers into the
weights so the saved checkpoint is an ordinary Hugging Face model with the same logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.config import ModelConfig
from models.decoder import CausalLM


def width_mult(config: ModelConfig, base_width: int) -> float:
    return config.hidden_size / base_width


def mup_config(config: ModelConfig, base_width: int) -> ModelConfig:
    """The training config: μP attention and readout multipliers, untied embeddings."""
    mult = width_mult(config, base_width)
    base_head_dim = config.head_dim / mult
    return config.replace(
        attention_scale=math.sqrt(base_head_dim) / config.head_dim,
        logits_scale=1.0 / mult,
        tie_word_embeddings=False,
    )


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """A 2-D weight whose fan-in and fan-out both grow with width (not embedding, readout or router)."""
    if param.ndim != 2 or name.endswith(".gate.weight") or "embed_tokens" in name or name.startswith("lm_head"):
        return False
    return "lora_" not in name


@torch.no_grad()
def mup_init(model: CausalLM, base_width: int) -> None:
    """Re-initialise a model built from `mup_config` by the μP rules above."""
    model.reset_parameters(scaled_residual=True)
    mult = width_mult(model.config, base_width)
    for name, param in model.named_parameters():
        if is_hidden_matrix(name, param):
            param.mul_(1.0 / math.sqrt(mult))
    nn.init.zeros_(model.lm_head.weight)
    for layer in model.model.layers:
        nn.init.zeros_(layer.self_attn.q_proj.weight)


@torch.no_grad()
def fold_for_export(model: CausalLM) -> None:
    """Fold logits_scale into lm_head and the attention scale into q_proj, in place; logits unchanged."""
    config = model.config
    if config.logits_scale != 1.0:
        if config.tie_word_embeddings:
            raise ValueError("cannot fold logits_scale into a tied lm_head; μP models use untied embeddings")
        model.lm_head.weight.mul_(config.logits_scale)
        config.logits_scale = 1.0
    if config.attention_scale is not None:
        factor = config.attention_scale * math.sqrt(config.head_dim)  # new scale is 1/sqrt(head_dim)
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(factor)
            if attn.q_proj.bias is not None:
                attn.q_proj.bias.mul_(factor)
            attn.scale = config.head_dim**-0.5
        config.attention_scale = None


def coordinate_check(
    widths: list[int], base_width: int, use_mup: bool, steps: int = 4, lr: float = 1e-2, seed: int = 0
) -> dict[int, dict[str, list[float]]]:
    """μP coordinate check (TP-V, Fig. 5): activation scales after each of `steps` Adam steps, per width.

    Returns {width: {"logits": [mean |logit|], "hidden": [mean |residual stream| after the last layer]}}.

    The same small llama at each width (2 layers, 4 heads, head_dim and MLP growing with width), the
    same random batch, AdamW at one learning rate with the μP groups (`use_mup`) or plain SP. Under
    μP the curves stay flat across widths; under SP they grow with width.
    """
    from training.optim import OptimConfig, build_optimizer  # optim imports this module

    out: dict[int, dict[str, list[float]]] = {}
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (8, 33), generator=gen)  # (B, T+1)
    for width in widths:
        torch.manual_seed(seed)
        config = ModelConfig(
            vocab_size=128,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
        if use_mup:
            config = mup_config(config, base_width)
        model = CausalLM(config)
        if use_mup:
            mup_init(model, base_width)
        mult = width_mult(config, base_width) if use_mup else None
        opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0, mup_width_mult=mult), 2)
        scales: dict[str, list[float]] = {"logits": [], "hidden": []}
        hidden: list[torch.Tensor] = []
        model.model.layers[-1].register_forward_hook(lambda _m, _i, output, sink=hidden: sink.append(output[0]))
        for _ in range(steps):
            loss, _ = model.loss(ids[:, :-1], ids[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            hidden.clear()
            with torch.no_grad():
                scales["logits"].append(float(model(ids[:, :-1]).logits.abs().mean()))  # (B, T, V) -> scalar
            scales["hidden"].append(float(hidden[-1].abs().mean()))  # (B, T, H) -> scalar
        out[width] = scales
    return out
