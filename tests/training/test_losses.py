"""Losses against values computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from models.moe import load_balancing_loss, router_z_loss
from training.losses import kd_loss


def test_kd_loss_hand_computed():
    # T = 2. Teacher logits (2 ln 3, 0) / T = (ln 3, 0) -> p_t = (3/4, 1/4); student (0, 0) -> p_s = (1/2, 1/2).
    # KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2); CE(student, label 0) = ln 2.
    # loss = alpha * T^2 * KL + (1 - alpha) * CE, alpha = 0.5.
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = 0.5 * 4 * kl + 0.5 * math.log(2)
    student = torch.zeros(1, 2, 2)
    teacher = torch.tensor([[[2 * math.log(3), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, -100]])  # the second position is ignored
    loss, parts = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert parts["kl"] == pytest.approx(kl, rel=1e-6)
    assert parts["ce"] == pytest.approx(math.log(2), rel=1e-6)


def test_kd_loss_is_pure_ce_at_alpha_zero_and_zero_kl_when_equal():
    logits = torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    loss, parts = kd_loss(logits, logits, labels, temperature=3.0, alpha=0.0)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1))
    assert float(loss) == pytest.approx(float(ce))


def test_load_balancing_loss_hand_computed():
    # Token 1 logits (ln 3, 0) -> probs (3/4, 1/4); token 2 (0, 0) -> (1/2, 1/2). Mean probs P = (5/8, 3/8).
    # Both tokens routed (top-1) to expert 0: f = (1, 0). Loss = E * sum f_e P_e = 2 * 5/8 = 1.25.
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    index = torch.tensor([[0], [0]])
    assert float(load_balancing_loss(logits, index, 2)) == pytest.approx(1.25, rel=1e-6)
    # Uniform routing and probabilities give exactly 1.
    uniform = torch.zeros(4, 4)
    assert float(load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), 4)) == pytest.approx(1.0)


def test_router_z_loss_hand_computed():
    # logsumexp(ln 3, 0) = ln 4; logsumexp(0, 0) = ln 2; z = mean of squares.
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    expected = (math.log(4) ** 2 + math.log(2) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(expected, rel=1e-6)
