"""Incremental detokenization with stop strings, for streaming, in constant time per token.

Each new token decodes only a short window of recent tokens (vLLM's prefix/read offsets): the text of
tokens[prefix:read] is already known, tokens[prefix:] is decoded, and the difference is the new text.
Decoding from a few tokens back keeps what depends on context right (a leading space, a multi-byte
character split across tokens). Text is emitted only when it is final: a trailing incomplete UTF-8
character (decoded as U+FFFD) is held back until the next token completes it, and so is any tail that
could still grow into a stop string. When a stop string appears, the text is cut before it and the
request finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.tokenizer import TextTokenizer

REPLACEMENT = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    tokenizer: TextTokenizer
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # all text decoded so far (stop string excluded once found)
    emitted: int = 0  # characters of `text` already returned
    stopped: bool = False
    prefix_offset: int = 0  # tokens[prefix_offset:read_offset] decode to text already in `text`
    read_offset: int = 0

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text that is safe to emit (may be empty)."""
        self.token_ids.append(token_id)
        window = self.token_ids[self.prefix_offset :]
        known = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset])
        decoded = self.tokenizer.decode(window)
        if len(decoded) > len(known) and not decoded.endswith(REPLACEMENT):  # complete characters: take them
            self.text += decoded[len(known) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        limit = len(self.text)
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.stopped = True
                self.text = self.text[:at]
                limit = at
                break
        if not self.stopped:
            limit = min(limit, len(self.text) - self._held_for_stop())
        limit = max(limit, self.emitted)
        delta = self.text[self.emitted : limit]
        self.emitted = limit
        return delta

    def flush(self) -> str:
        """At the end of the request: whatever is still held back (a stop-string prefix that never completed,
        bytes of a character that never completed)."""
        if not self.stopped and self.read_offset < len(self.token_ids):
            known = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset])
            self.text += self.tokenizer.decode(self.token_ids[self.prefix_offset :])[len(known) :]
            self.prefix_offset = self.read_offset = len(self.token_ids)
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def _held_for_stop(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        held = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return held
