"""Logprobs in OpenAI's response shapes, from the engine's `TokenLogprob`s (the model's raw log-softmax).

- Completions (legacy shape): `{tokens, token_logprobs, top_logprobs, text_offset}`, one entry per
  token; with `echo`, the prompt's tokens come first and the first prompt token's logprob and top
  logprobs are null. `top_logprobs[i]` maps token text -> logprob for the N most likely tokens plus the
  chosen one (OpenAI: "up to logprobs + 1 elements"). `text_offset` counts characters of the choice's
  text from its start (the echoed prompt included).
- Chat: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.

A token's text is the token decoded alone (special tokens kept); `bytes` its UTF-8 bytes. A logprob of
-inf (a logit of -inf) is sent as -9999.0, as vLLM does, since JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import BaseModel

from service.engine import TokenLogprob

TokenTexts = Callable[[list[int]], list[str]]  # token ids -> the text of each
FLOOR = -9999.0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def _texts(ids: list[int], entries: list[TokenLogprob | None], texts: TokenTexts) -> dict[int, str]:
    """One decode per distinct token id of the tokens and their alternatives."""
    wanted = set(ids)
    for entry in entries:
        if entry is not None:
            wanted.update(token for token, _ in entry.top)
    order = sorted(wanted)
    return dict(zip(order, texts(order)))


def completion_logprobs(ids: list[int], entries: list[TokenLogprob | None], texts: TokenTexts, offset: int = 0) -> dict:
    """The legacy shape for tokens `ids` (entries aligned; None: no logprob), text offsets from `offset`."""
    text_of = _texts(ids, entries, texts)
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, entry in zip(ids, entries):
        text = text_of[token]
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(entry.logprob))
        top = {text_of[t]: _finite(lp) for t, lp in entry.top}
        top.setdefault(text, _finite(entry.logprob))
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict:
    """The chat shape for generated tokens."""
    text_of = _texts([e.token_id for e in entries], entries, texts)

    def one(token: int, logprob: float) -> dict:
        text = text_of[token]
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", "replace"))}

    return {
        "content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
    }
