"""Tokenizer I/O: a Hugging Face `tokenizer.json` (via the `tokenizers` library) plus `tokenizer_config.json`.

Holds what serving needs from a tokenizer: encode with or without the BOS token, decode, the special
tokens, and the chat template string when the model ships one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used."""


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or {}
        self.bos_token = self._token_text("bos_token")
        self.eos_token = self._token_text("eos_token")
        self.bos_token_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.chat_template: str | None = self.config.get("chat_template")

    def _token_text(self, key: str) -> str | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # AddedToken serialisation
            value = value.get("content")
        return value

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path} not found: modelserve needs a fast tokenizer (tokenizer.json)")
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(Tokenizer.from_file(str(path)), config)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
