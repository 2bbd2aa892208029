"""Training losses: knowledge distillation and the MoE auxiliary terms (reused from `models.moe`).

Distillation (Hinton et al. 2015):

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

averaged over the target tokens (labels != -100). The T^2 factor keeps the soft-target gradients on
the same scale as the hard-target ones when T changes. The build uses alpha = 0.5, T = 2.0
(`training.presets.DistillSpec`).

MoE: CE + aux_coef * mean over layers of the Switch load-balancing loss + z_coef * mean router z-loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.decoder import DecoderOutput
from models.moe import load_balancing_loss, router_z_loss

IGNORE = -100


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float
) -> tuple[Tensor, dict[str, float]]:
    """student_logits, teacher_logits (B, T, V); labels (B, T) with -100 ignored."""
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float()  # (N, V)
    t = teacher_logits.reshape(-1, v).float()
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE  # (N,)
    s, t = s[keep], t[keep]
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()  # mean over tokens
    ce = F.cross_entropy(s, flat_labels[keep])
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return loss, {"kl": float(kl.detach()), "ce": float(ce.detach())}


def moe_aux_losses(out: DecoderOutput, num_experts: int) -> tuple[Tensor, Tensor]:
    """(load-balancing loss, z-loss), each averaged over the MoE layers of one forward pass."""
    balance = torch.stack([load_balancing_loss(r.router_logits, r.expert_index, num_experts) for r in out.routings])
    z = torch.stack([router_z_loss(r.router_logits) for r in out.routings])
    return balance.mean(), z.mean()


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy. logits (B, T, V); labels (B, T), already shifted, -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)
