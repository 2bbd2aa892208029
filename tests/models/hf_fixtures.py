"""Builders of tiny random `transformers` models, one per supported family."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96


def build_hf_model(family: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        config = tf.LlamaConfig(num_key_value_heads=4, rope_theta=10000.0, **common)
        model = tf.LlamaForCausalLM(config)
    elif family == "mistral":
        config = tf.MistralConfig(num_key_value_heads=2, rope_theta=10000.0, sliding_window=None, **common)
        model = tf.MistralForCausalLM(config)
    elif family == "qwen2":
        config = tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
        model = tf.Qwen2ForCausalLM(config)
    elif family == "mixtral":
        config = tf.MixtralConfig(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, **common)
        model = tf.MixtralForCausalLM(config)
    else:
        raise ValueError(family)
    # Larger random weights than the default init, so logits differ visibly between tokens and positions.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model.eval()


def save_hf_model(family: str, directory: Path, seed: int = 0):
    model = build_hf_model(family, seed)
    model.save_pretrained(directory)
    return model
