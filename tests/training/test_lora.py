"""LoRA export: the same tensor names peft 0.21 writes, and peft loads our adapters with equal outputs."""

import json

import pytest
import torch

from adapters.peft_format import AdapterError, read_adapter, write_adapter
from models.checkpoint import save_model
from models.config import ModelConfig
from models.decoder import CausalLM
from training.lora import ATTENTION_TARGETS, DENSE_TARGETS, LoraSpec, apply_lora, load_adapter_weights, save_adapter


def _base(model_type: str) -> CausalLM:
    torch.manual_seed(0)
    extra = {"num_local_experts": 4, "num_experts_per_tok": 2} if model_type == "mixtral" else {}
    config = ModelConfig(
        model_type=model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        **extra,
    )
    return CausalLM(config)


def _randomise_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


@pytest.mark.parametrize(
    ("model_type", "targets"), [("llama", (*DENSE_TARGETS, "lm_head")), ("mixtral", ATTENTION_TARGETS)]
)
def test_peft_loads_our_adapter_with_equal_logits_and_same_names(tmp_path, model_type, targets):
    import peft
    import transformers
    from safetensors import safe_open

    base_dir, adapter_dir, peft_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "peft"
    model = _base(model_type)
    save_model(model, base_dir)
    spec = LoraSpec(r=4, lora_alpha=8.0, target_modules=targets)
    apply_lora(model, spec)
    _randomise_lora(model)
    save_adapter(model, spec, str(adapter_dir), base_model="base")
    ids = torch.randint(0, 64, (2, 9))
    ours = model.eval()(ids).logits

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    # The names peft itself writes for the same targets on the transformers model.
    reference = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM")
    )
    reference.save_pretrained(peft_dir)
    with safe_open(str(peft_dir / "adapter_model.safetensors"), "pt") as f:
        peft_names = set(f.keys())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        our_names = set(f.keys())
    # For lm_head targets peft also saves a copy of the base head (".base_layer.weight"); we do not.
    assert our_names == {n for n in peft_names if not n.endswith(".base_layer.weight")}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in our_names

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    loaded = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_read_adapter_round_trip_and_load_into_model(tmp_path):
    model = _base("llama")
    spec = LoraSpec(r=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"))
    apply_lora(model, spec)
    _randomise_lora(model)
    save_adapter(model, spec, str(tmp_path), base_model="base")
    config, tensors = read_adapter(tmp_path)
    assert config.r == 2 and config.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    assert tensors["model.layers.1.self_attn.v_proj.lora_A"].shape == (2, 32)
    assert tensors["model.layers.1.self_attn.v_proj.lora_B"].shape == (16, 2)  # one KV head of 16
    other = _base("llama")
    apply_lora(other, spec)
    load_adapter_weights(other, str(tmp_path))
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(other(ids).logits, model(ids).logits)


def test_apply_lora_trains_only_a_and_b_and_starts_at_base():
    model = _base("llama")
    ids = torch.randint(0, 64, (1, 6))
    before = model(ids).logits
    apply_lora(model, LoraSpec(r=2, target_modules=("q_proj",)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    torch.testing.assert_close(model(ids).logits, before)  # B = 0 at init


def test_read_adapter_refuses_bad_dirs(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "IA3", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]})
    )
    with pytest.raises(AdapterError, match="IA3"):
        read_adapter(tmp_path)
    from adapters.peft_format import AdapterConfig

    with pytest.raises(AdapterError, match="DoRA"):
        write_adapter(tmp_path, AdapterConfig(r=1, lora_alpha=1, target_modules=["q_proj"], use_dora=True), {})
