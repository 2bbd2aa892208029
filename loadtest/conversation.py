"""Chats of the `shared-prefix` scenario: one long system prompt shared by every request, multi-turn history.

The system prompt is the same text in every Locust process (seeded), so every request of every user
starts with the same tokens: the server's prefix cache can serve them. A conversation lasts a random
number of turns (`Scenario.turns`); each turn resends the whole history (system prompt, earlier user
turns and the assistant's replies as streamed) plus a new short user turn, as chat clients do, so
each turn's prompt extends the previous one. Nothing here imports Locust (the unit tests use it).
"""

from __future__ import annotations

import random

from loadtest.scenarios import Scenario

SYSTEM_WORDS = (
    "you are a careful assistant for a team that serves language models answer briefly and precisely cite the "
    "relevant setting when asked about batching caching adapters experts latency throughput memory or errors"
).split()
SYSTEM_SEED = 13  # the same system prompt in every process and run


def system_prompt(words: int) -> str:
    """The shared system prompt: `words` words, identical for a given count."""
    return " ".join(random.Random(SYSTEM_SEED).choices(SYSTEM_WORDS, k=words))


class Conversation:
    """One chat: the messages so far and how many turns are left."""

    def __init__(self, scenario: Scenario, rng: random.Random | None = None) -> None:
        rng = rng or random.Random()
        words = scenario.system_prompt_words
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt(words)}] if words else []
        self.turns_left = rng.randint(*scenario.turns)

    @property
    def done(self) -> bool:
        return self.turns_left <= 0

    def ask(self, text: str) -> list[dict[str, str]]:
        """The messages of the next request: the whole history plus the new user turn."""
        return [*self.messages, {"role": "user", "content": text}]

    def answered(self, question: str, reply: str) -> None:
        """Keep a finished turn (the user's text and the reply as streamed) for the next one."""
        self.messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        self.turns_left -= 1
