"""SAM's two-pass update and the parameter-group multipliers (μP, layer-wise LR), by hand."""

import pytest
import torch
from torch import nn

from models.config import ModelConfig
from models.decoder import CausalLM
from training.optim import SAM, OptimConfig, param_groups


def test_sam_two_step_update_sgd_hand_computed():
    # f(w) = |w|^2 / 2, w = (3, 4): g = (3, 4), |g| = 5. rho = 0.5: e = 0.5 * g / 5 = (0.3, 0.4).
    # Gradient at w + e = (3.3, 4.4). SGD lr 0.1: w <- (3, 4) - 0.1 * (3.3, 4.4) = (2.67, 3.56).
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5)
    (w.pow(2).sum() / 2).backward()
    sam.perturb()
    assert w.detach().tolist() == pytest.approx([3.3, 4.4])
    sam.zero_grad()
    (w.pow(2).sum() / 2).backward()
    assert w.grad.tolist() == pytest.approx([3.3, 4.4])
    sam.step()
    assert w.detach().tolist() == pytest.approx([2.67, 3.56])


def test_sam_with_adamw_first_step_hand_computed():
    # f(w) = sum(c * w^2) / 2 with c = (1, -1)... use f = (w1^2 - w2) : g = (2 w1, -1).
    # w = (1, 2): g = (2, -1), |g| = sqrt 5, rho = 0.1: e = 0.1 * (2, -1) / sqrt 5.
    # Gradient at w + e: (2 (1 + 0.2/sqrt 5), -1). AdamW's first step (bias-corrected) moves each
    # coordinate by lr * g / |g| = lr * sign(g) (eps negligible); weight decay lr * wd * w on the original w.
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    lr, wd = 0.01, 0.1
    sam = SAM(torch.optim.AdamW([w], lr=lr, weight_decay=wd, eps=1e-12), rho=0.1)

    def f():
        return w[0] ** 2 - w[1]

    f().backward()
    sam.perturb()
    sam.zero_grad()
    f().backward()
    assert w.grad[0].item() == pytest.approx(2 * (1 + 0.2 / 5**0.5))
    sam.step()
    expected = [1.0 * (1 - lr * wd) - lr, 2.0 * (1 - lr * wd) + lr]
    assert w.detach().tolist() == pytest.approx(expected, rel=1e-6)


def _model():
    config = ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2
    )
    return CausalLM(config)


def _mult_of(groups, param):
    return next(g["lr_mult"] for g in groups if any(p is param for p in g["params"]))


def test_layerwise_lr_multipliers():
    model = _model()
    groups = param_groups(model, OptimConfig(layer_lr_decay=0.5), num_layers=3)
    assert _mult_of(groups, model.lm_head.weight) == pytest.approx(1.0)  # depth L+1: full rate
    assert _mult_of(groups, model.model.layers[2].mlp.up_proj.weight) == pytest.approx(0.5)
    assert _mult_of(groups, model.model.layers[0].self_attn.q_proj.weight) == pytest.approx(0.125)
    assert _mult_of(groups, model.model.embed_tokens.weight) == pytest.approx(0.0625)  # depth 0: 0.5^4


def test_mup_lr_multipliers_and_no_decay_on_vectors():
    model = _model()
    groups = param_groups(model, OptimConfig(mup_width_mult=4.0), num_layers=3)
    assert _mult_of(groups, model.model.layers[1].self_attn.o_proj.weight) == pytest.approx(0.25)
    assert _mult_of(groups, model.lm_head.weight) == pytest.approx(1.0)
    assert _mult_of(groups, model.model.embed_tokens.weight) == pytest.approx(1.0)
    norm_group = next(g for g in groups if any(p is model.model.norm.weight for p in g["params"]))
    assert norm_group["weight_decay"] == 0.0
