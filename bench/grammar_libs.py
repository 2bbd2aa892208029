"""The grammar libraries `bench/structured_output.py` compares, behind one small interface.

Each of xgrammar, llguidance and outlines-core: `setup(tokenizer)` (the one-off work per tokenizer),
`compile(schema)` (one JSON schema, as the library is used at admission), `matcher(compiled)` (a fresh
state), `mask(matcher)` (one row's next-token bitmask into `self.bitmask`, int32 words, bit i of word w
is token 32 w + i) and `accept(matcher, token)`. A library that is not installed is left out; install
all three with `pip install xgrammar==0.2.9 llguidance outlines-core` (xgrammar keeps torch 2.13.0
but pulls triton, so it is not in requirements-dev.txt).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from models.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class GrammarLib:
    name = ""

    def setup(self, tokenizer: TextTokenizer) -> None: ...
    def compile(self, schema: dict) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def mask(self, matcher: Any) -> None: ...
    def accept(self, matcher: Any, token: int) -> bool: ...


class _Xgrammar(GrammarLib):
    name = "xgrammar"

    def setup(self, tokenizer: TextTokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        backend = tokenizer.tokenizer
        special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        encoded = [""] * tokenizer.vocab_size  # special tokens empty: never allowed
        for text, i in backend.get_vocab(with_added_tokens=True).items():
            encoded[i] = "" if i in special else text
        info = xgr.TokenizerInfo(
            encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=tokenizer.vocab_size, stop_token_ids=[tokenizer.eos_token_id]
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, tokenizer.vocab_size)

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, matcher: Any) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, 0)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)


class _Llguidance(GrammarLib):
    name = "llguidance"

    def setup(self, tokenizer: TextTokenizer) -> None:
        import llguidance

        from service.engine.guided import JSON_OPTIONS

        self.ll, self.options = llguidance, JSON_OPTIONS
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.tokenizer.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_token_id
        )
        self.bitmask = torch.full((1, (tokenizer.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def compile(self, schema: dict) -> Any:
        # As service/engine/guided.py does at admission: grammar, validation, the template matcher.
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults=self.options)
        assert not self.ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        return self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def mask(self, matcher: Any) -> None:  # llguidance.torch's fill_next_token_bitmask, as guided.py calls it
        matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


class _Outlines(GrammarLib):
    name = "outlines-core"

    def setup(self, tokenizer: TextTokenizer) -> None:
        import outlines_core

        self.oc = outlines_core
        special = {i for i, t in tokenizer.tokenizer.get_added_tokens_decoder().items() if t.special}
        to_byte = byte_level_alphabet()
        by_bytes: dict[bytes, list[int]] = {}  # each token's raw bytes (decoding one token may drop its space)
        for text, i in tokenizer.tokenizer.get_vocab().items():
            if i not in special:
                by_bytes.setdefault(bytes(to_byte[ch] for ch in text), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, by_bytes)
        self.eos = tokenizer.eos_token_id
        self.bitmask = torch.zeros((tokenizer.vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def mask(self, matcher: Any) -> None:
        matcher.write_mask_into(self.bitmask.data_ptr(), self.bitmask.numel(), self.bitmask.element_size())

    def accept(self, matcher: Any, token: int) -> bool:
        if token == self.eos:  # outlines-core ends in a final state rather than consuming EOS
            return matcher.is_finished()
        try:
            matcher.advance(token)
        except ValueError:  # the document left the regex (a feature the regex does not follow)
            return False
        return True


def available_libraries() -> list[GrammarLib]:
    libs: list[GrammarLib] = []
    for module, cls in (("xgrammar", _Xgrammar), ("llguidance", _Llguidance), ("outlines_core", _Outlines)):
        try:
            __import__(module)
        except ImportError:
            log.warning("structured_output: %s is not installed; left out", module)
            continue
        libs.append(cls())
    return libs
