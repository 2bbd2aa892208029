"""Checkpoint directories and config.json: round trips, the formats accepted, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointError, ConfigError, ModelConfig, load_model, save_model
from models.decoder import CausalLM
from tests.models.hf_fixtures import VOCAB, build_hf_model, save_hf_model


def tiny_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base.update(changes)
    return ModelConfig(**base)


def test_config_round_trip_keeps_hf_fields_and_drops_training_only(tmp_path):
    config = tiny_config(model_type="mixtral", num_local_experts=4, logits_scale=0.5, attention_scale=0.1)
    config.save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["MixtralForCausalLM"]
    assert raw["rope_parameters"]["rope_theta"] == config.rope_theta
    assert "logits_scale" not in raw and "attention_scale" not in raw
    loaded = ModelConfig.load(tmp_path)
    assert loaded.num_local_experts == 4 and loaded.head_dim == 8 and loaded.logits_scale == 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "must be a multiple of num_key_value_heads"),
        (dict(model_type="mixtral"), "mixtral needs experts"),
        (dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok (5)"),
        (dict(hidden_size=0), "hidden_size must be positive"),
        (dict(hidden_act="gelu"), "hidden_act must be 'silu'"),
    ],
)
def test_config_validation_names_the_broken_invariant(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**changes)


def test_rope_scaling_is_refused(tmp_path):
    raw = tiny_config().to_dict() | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="rope scaling 'yarn' is not supported"):
        ModelConfig.load(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path):
    tiny_config().save(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle weights"):
        load_model(tmp_path)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    model = CausalLM(tiny_config())
    save_model(model, tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensor.*model.norm.weight"):
        load_model(tmp_path)
    state = dict(model.state_dict())
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(7,\), config.json implies \(32,\)"):
        load_model(tmp_path)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    tiny_config().save(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


@torch.no_grad()
def test_fused_mixtral_expert_tensors_load(tmp_path):
    """transformers v5 keeps experts as fused 3-D tensors in memory; such a state dict loads too."""
    hf = build_hf_model("mixtral")
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    ours = load_model(tmp_path)
    ids = torch.randint(3, VOCAB, (2, 9))
    assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sliding_window_matches_transformers(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,
    )
    hf = tf.MistralForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.sliding_window == 6
    ids = torch.randint(3, VOCAB, (1, 20))
    assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_parameter_count_matches_the_module(tmp_path):
    save_hf_model("mixtral", tmp_path)
    model = load_model(tmp_path)
    counted = model.config.num_parameters()
    actual = sum(p.numel() for p in model.parameters())
    assert counted["total"] == actual
    assert counted["active"] < counted["total"]
