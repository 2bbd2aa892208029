"""A tiny random model and a byte-level BPE tokenizer for engine tests (no artifacts needed)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models import ModelConfig
from models.decoder import CausalLM
from models.tokenizer import TextTokenizer

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello engine", "def f(x): return x + 1"] * 20


def tiny_tokenizer() -> TextTokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        show_progress=False,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    return TextTokenizer(tokenizer, {"bos_token": "<s>", "eos_token": "</s>"})


def tiny_model(vocab_size: int, seed: int = 0, moe: bool = False) -> CausalLM:
    torch.manual_seed(seed)
    extra = dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2) if moe else {}
    config = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        **extra,
    )
    return CausalLM(config).eval()
