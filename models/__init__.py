"""modelserve's networks: config, decoder (dense and MoE), KV cache, checkpoint and tokenizer I/O."""

from models.attention import AttentionMetadata
from models.checkpoint import CheckpointError, load_model, save_model
from models.config import ConfigError, ModelConfig
from models.decoder import CausalLM, DecoderOutput
from models.generate import SamplingConfig, generate
from models.kv_cache import KVCache, PagedKVCache
from models.tokenizer import TextTokenizer

__all__ = [
    "AttentionMetadata",
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "DecoderOutput",
    "KVCache",
    "ModelConfig",
    "PagedKVCache",
    "SamplingConfig",
    "TextTokenizer",
    "generate",
    "load_model",
    "save_model",
]
