"""μP: the coordinate check (flat under μP, drifting under SP) and export folding (equal logits)."""

import torch

from models.checkpoint import load_model, save_model
from models.config import ModelConfig
from models.decoder import CausalLM
from training.mup import coordinate_check, fold_for_export, mup_config, mup_init

WIDTHS = [64, 128, 256]
# Stated band: under μP, at every one of the first steps, the largest activation scale over the three
# widths is within 2x of the smallest. Under SP, the widest model's scale is > 3x the narrowest's.
MUP_BAND = 2.0
SP_DRIFT = 3.0


def _spread(result, key, step):
    values = [result[w][key][step] for w in WIDTHS]
    return max(values) / min(values)


def test_coordinate_check_flat_under_mup_drifts_under_sp():
    mup = coordinate_check(WIDTHS, base_width=64, use_mup=True, steps=4)
    sp = coordinate_check(WIDTHS, base_width=64, use_mup=False, steps=4)
    for key in ("logits", "hidden"):
        for step in range(4):
            assert _spread(mup, key, step) < MUP_BAND, (key, step, mup)
        assert sp[256][key][-1] / sp[64][key][-1] > SP_DRIFT, (key, sp)


def test_fold_for_export_keeps_logits_and_saves_plain_hf(tmp_path):
    torch.manual_seed(0)
    base = ModelConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_bias=True,
    )
    config = mup_config(base, base_width=16)
    assert config.logits_scale == 0.25 and not config.tie_word_embeddings
    model = CausalLM(config)
    mup_init(model, 16)
    assert float(model.lm_head.weight.abs().sum()) == 0.0  # zero readout
    with torch.no_grad():  # trained-looking weights: nothing zero, biases included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 64, (2, 12))
    before = model(ids).logits
    fold_for_export(model)
    assert model.config.logits_scale == 1.0 and model.config.attention_scale is None
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    save_model(model, tmp_path)
    torch.testing.assert_close(load_model(tmp_path)(ids).logits, before, rtol=1e-5, atol=1e-5)

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, before, rtol=1e-4, atol=1e-4)
