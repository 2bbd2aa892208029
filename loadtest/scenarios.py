"""Named load-test scenarios: which models they hit, closed or open loop, how much load, for how long.

A scenario fixes the shape of the traffic; `python -m loadtest` flags override its size (users,
rate, duration, warm-up). Model names are the demo zoo's (`student`, `teacher`, `moe`); adapters
are never named here: they are read from `GET /v1/models` at run time (entries with a `parent`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Target = Literal["model", "adapters", "all"]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    target: Target = "model"  # model: one base model; adapters: Zipf over adapters; all: every model and adapter
    model: str = "student"  # the base model of target="model"
    loop: Literal["closed", "open"] = "closed"
    users: int = 8  # closed loop: concurrent users; open loop: arrival generators (rate is split among them)
    rate: float = 0.0  # open loop: total arrivals per second (0 for closed loop)
    arrivals: Literal["constant", "poisson"] = "constant"  # open loop: inter-arrival times
    max_in_flight: int = 512  # open loop: cap on outstanding requests per generator; arrivals past it are dropped
    duration_s: float = 60.0  # measured time, after the warm-up
    warmup_s: float = 10.0  # statistics of this first part of the run are discarded
    think_time_s: tuple[float, float] = (0.0, 0.0)  # closed loop: pause between a user's requests
    prompt_words: tuple[int, int] = (8, 32)  # prompt length range, in words
    max_tokens: int = 32
    ignore_eos_ratio: float = 1.0  # share of requests with ignore_eos: fixed output length, outcome "length"
    chat_ratio: float = 0.0  # share of requests sent to /v1/chat/completions instead of /v1/completions
    num_adapters: int = 0  # target="adapters": use the first N adapters by name (0: all)
    zipf_s: float = 1.1  # target="adapters": popularity of the k-th adapter is proportional to 1 / k**s
    expect_rejections: bool = False  # 429s are expected (counted as rejected, not failures)
    temperature: float = 0.0  # 0: greedy, where speculative decoding accepts the most drafts
    # Chat conversations (loadtest.conversation): a system prompt of this many words shared by every request
    # (0: none), and turns per conversation, each resending the history. Either makes every request a chat.
    system_prompt_words: int = 0
    turns: tuple[int, int] = (1, 1)

    @property
    def conversational(self) -> bool:
        return self.system_prompt_words > 0 or self.turns[1] > 1


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("student", "The distilled student alone, closed loop.", model="student"),
        Scenario("moe", "The Mixture-of-Experts model alone, closed loop (expert load metrics).", model="moe"),
        Scenario(
            "mixed-adapters",
            "Adapters of every base model, Zipf-distributed popularity, closed loop (multi-LoRA batching).",
            target="adapters",
        ),
        Scenario(
            "teacher-spec",
            "The teacher, greedy, batch-light: speculative decoding with a draft model when the server "
            "configures one (acceptance-rate metrics).",
            model="teacher",
            users=2,
            max_tokens=48,
        ),
        Scenario(
            "burst",
            "Open-loop arrivals well above capacity: the bounded queue answers 429 (counted as rejected).",
            model="student",
            loop="open",
            users=4,
            rate=40.0,
            duration_s=30.0,
            warmup_s=0.0,
            max_tokens=64,
            expect_rejections=True,
        ),
        Scenario(
            "soak",
            "Long steady mixed traffic with think time: leaks, drift, slow degradation.",
            target="all",
            users=4,
            duration_s=1800.0,
            warmup_s=30.0,
            think_time_s=(0.5, 2.0),
            ignore_eos_ratio=0.8,
        ),
        Scenario(
            "shared-prefix",
            "Chat with one long system prompt shared by every request and short user turns; conversations of 1-4 "
            "turns resend their history (prefix caching: usage.prompt_tokens_details.cached_tokens).",
            model="student",
            prompt_words=(6, 20),
            system_prompt_words=160,
            turns=(1, 4),
        ),
        Scenario(
            "smoke",
            "A few seconds over every model and adapter, open loop: puts data behind every dashboard query.",
            target="all",
            loop="open",
            users=2,
            rate=4.0,
            duration_s=20.0,
            warmup_s=0.0,
            max_tokens=12,
            prompt_words=(4, 12),
            ignore_eos_ratio=0.7,
        ),
    )
}


def get(name: str, **overrides: object) -> Scenario:
    """The named scenario with the non-None overrides applied; ValueError names the known scenarios."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    changes = {key: value for key, value in overrides.items() if value is not None}
    return replace(SCENARIOS[name], **changes)


def pick_targets(scenario: Scenario, models: list[str], adapters: list[str]) -> tuple[list[str], list[float]]:
    """(model names, weights) the scenario sends to, given the served base models and adapters."""
    if scenario.target == "model":
        if scenario.model not in models:
            raise ValueError(f"scenario {scenario.name} needs model {scenario.model!r}; served: {models}")
        return [scenario.model], [1.0]
    if scenario.target == "adapters":
        ordered = sorted(adapters)
        chosen = ordered[: scenario.num_adapters] if scenario.num_adapters else ordered
        if not chosen:
            raise ValueError(f"scenario {scenario.name} needs adapters; the server lists none")
        return chosen, [1.0 / (k + 1) ** scenario.zipf_s for k in range(len(chosen))]
    everything = models + sorted(adapters)
    return everything, [1.0] * len(everything)
