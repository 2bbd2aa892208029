"""Locust users that stream completions and report TTFT, inter-token latency, TPOT and tokens as custom metrics.

Every request fires exactly one Locust event of type POST (name: the endpoint) timed end to end,
with the output token count (from `usage`) as its response length. The per-token measurements are
fired as separate event types, which the report keeps out of the request totals:

| type | name | value (Locust's "response time" column) |
| --- | --- | --- |
| `TTFT` | all | time to first token, ms |
| `ITL` | all | one per gap between text events, ms |
| `TPOT` | all | time per output token after the first, ms |
| `TOKENS` | all | output tokens of the request (a count, not ms) |
| `PROMPT` | all | prompt tokens of the request (a count), when the server reports cached tokens |
| `CACHED` | all | of those, tokens served from the prefix cache (`usage.prompt_tokens_details.cached_tokens`) |
| `GOODPUT` | met / missed | end-to-end ms of a request; `met` when it succeeded within both SLOs |
| `REJECTED` | the endpoint | a 429 of a scenario that expects them (not a failure) |
| `DROPPED` | open-loop | an arrival not sent: the generator had `max_in_flight` requests outstanding |

`ClosedLoopUser`: each user sends its next request when the previous one ends (plus think time).
`OpenLoopUser`: each user is an arrival generator at `rate / users` requests per second, sending
regardless of how many answers are outstanding, so queueing shows up as latency and 429s. At the
end of the run it stops sending and lets outstanding requests finish within Locust's stop timeout.
In conversational scenarios (`shared-prefix`) each closed-loop user holds one chat at a time
(`loadtest.conversation`): every request resends its history, and a new chat starts after the last
turn or a failure.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import gevent
import requests
from gevent.pool import Pool
from locust import User, between, constant, task
from locust.exception import StopUser
from locust.user.users import LOCUST_STATE_STOPPING

from loadtest import scenarios
from loadtest.conversation import Conversation
from loadtest.sse import stream

log = logging.getLogger(__name__)
WORDS = (
    "the quick brown fox jumps over a lazy dog while engines batch tokens across adapters and experts route "
    "each token to two of many small networks that learn cheaply from a larger teacher model"
).split()


@dataclass(frozen=True)
class RunOptions:
    """What a user needs from the command line (Locust passes custom arguments to every worker)."""

    scenario: scenarios.Scenario
    slo_ttft_ms: float
    slo_tpot_ms: float
    request_timeout_s: float
    api_key: str = ""  # sent as `Authorization: Bearer` when set

    @classmethod
    def from_parsed(cls, options) -> RunOptions:
        scenario = scenarios.get(
            options.scenario,
            rate=options.rate or None,
            max_tokens=options.max_tokens or None,
            num_adapters=options.num_adapters or None,
            model=options.model or None,
        )
        api_key = getattr(options, "api_key", "") or ""
        return cls(scenario, options.slo_ttft_ms, options.slo_tpot_ms, options.request_timeout_s, api_key)


class Targets:
    """The model names a scenario sends to, with their weights, read from `GET /v1/models` once per process."""

    _cache: dict[tuple[str, str, int], tuple[list[str], list[float]]] = {}

    @classmethod
    def resolve(cls, session: requests.Session, base_url: str, scenario: scenarios.Scenario) -> Targets:
        key = (base_url, scenario.name, scenario.num_adapters)
        if key not in cls._cache:
            response = session.get(base_url + "/v1/models", timeout=30)
            response.raise_for_status()
            cards = response.json()["data"]
            models = [c["id"] for c in cards if not c.get("parent")]
            adapters = sorted(c["id"] for c in cards if c.get("parent"))
            cls._cache[key] = scenarios.pick_targets(scenario, models, adapters)
            log.info("scenario %s targets %s", scenario.name, dict(zip(*cls._cache[key])))
        return cls(*cls._cache[key])

    def __init__(self, names: list[str], weights: list[float]) -> None:
        self.names, self.weights = names, weights
        self.turn = random.randrange(len(names))

    def next(self) -> str:
        if len(set(self.weights)) == 1:  # uniform: round robin, so every target surely gets traffic
            self.turn = (self.turn + 1) % len(self.names)
            return self.names[self.turn]
        return random.choices(self.names, self.weights)[0]


def make_body(
    scenario: scenarios.Scenario, model: str, conversation: Conversation | None = None
) -> tuple[str, str, dict]:
    """(endpoint path, user text, request body) of one random request of the scenario (the next turn of
    `conversation` when given)."""
    words = " ".join(random.choices(WORDS, k=random.randint(*scenario.prompt_words)))
    body = {
        "model": model,
        "max_tokens": scenario.max_tokens,
        "temperature": scenario.temperature,
        "ignore_eos": random.random() < scenario.ignore_eos_ratio,
    }
    if conversation is not None:
        return "/v1/chat/completions", words, {**body, "messages": conversation.ask(words)}
    if random.random() < scenario.chat_ratio:
        return "/v1/chat/completions", words, {**body, "messages": [{"role": "user", "content": words}]}
    return "/v1/completions", words, {**body, "prompt": words}


class StreamingUser(User):
    """Shared by both loops: one streamed request and its events."""

    abstract = True
    options: RunOptions
    targets: Targets
    conversation: Conversation | None = None

    def on_start(self) -> None:
        self.options = RunOptions.from_parsed(self.environment.parsed_options)
        self.session = requests.Session()
        if self.options.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.options.api_key}"
        try:
            self.targets = Targets.resolve(self.session, self.host.rstrip("/"), self.options.scenario)
        except (requests.RequestException, ValueError, KeyError) as exc:
            log.error("cannot pick targets: %s", exc)
            self.environment.events.request.fire(
                request_type="GET", name="/v1/models", response_time=0, response_length=0, exception=exc
            )
            raise StopUser() from exc

    def fire(self, kind: str, name: str, value: float, length: int = 0, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=value, response_length=length, exception=exception
        )

    def one_request(self) -> None:
        scenario = self.options.scenario
        chat = None
        if scenario.conversational:  # one chat at a time per user (closed loop)
            if self.conversation is None or self.conversation.done:
                self.conversation = Conversation(scenario)
            chat = self.conversation
        path, words, body = make_body(scenario, self.targets.next(), chat)
        result = stream(self.session, self.host.rstrip("/"), path, body, self.options.request_timeout_s)
        if chat is not None:
            if result.ok:
                chat.answered(words, result.text)
            else:
                self.conversation = None
        e2e_ms = result.e2e_s * 1000
        if result.status == 429 and scenario.expect_rejections:
            self.fire("REJECTED", path, e2e_ms)
            self.fire("GOODPUT", "missed", e2e_ms)
            return
        self.fire("POST", path, e2e_ms, result.completion_tokens, None if result.ok else Exception(result.error))
        if not result.ok:
            self.fire("GOODPUT", "missed", e2e_ms)
            return
        ttft, tpot = result.ttft_s, result.tpot_s
        if ttft is not None:
            self.fire("TTFT", "all", ttft * 1000)
        for gap in result.itl_s:
            self.fire("ITL", "all", gap * 1000)
        if tpot is not None:
            self.fire("TPOT", "all", tpot * 1000)
        self.fire("TOKENS", "all", result.completion_tokens)
        if result.cached_tokens is not None:
            self.fire("PROMPT", "all", result.prompt_tokens)
            self.fire("CACHED", "all", result.cached_tokens)
        met = (
            ttft is not None
            and ttft * 1000 <= self.options.slo_ttft_ms
            and (tpot is None or tpot * 1000 <= self.options.slo_tpot_ms)
        )
        self.fire("GOODPUT", "met" if met else "missed", e2e_ms)


class ClosedLoopUser(StreamingUser):
    """Sends a request, waits for its end, thinks, repeats."""

    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        low, high = self.options.scenario.think_time_s
        if high > 0:
            self.wait_time = between(low, high)

    @task
    def completion(self) -> None:
        self.one_request()


class OpenLoopUser(StreamingUser):
    """An arrival generator: requests start on a fixed (or Poisson) schedule, not when answers come back."""

    wait_time = constant(0)

    @task
    def arrivals(self) -> None:
        scenario = self.options.scenario
        rate = scenario.rate / max(1, self.environment.parsed_options.num_users or scenario.users)
        if rate <= 0:
            raise StopUser()
        pool = Pool(scenario.max_in_flight)
        next_at = time.monotonic() + random.uniform(0, 1 / rate)  # de-phase the generators
        try:
            while self._state != LOCUST_STATE_STOPPING:  # Locust's graceful stop (--stop-timeout)
                gevent.sleep(max(0.0, next_at - time.monotonic()))
                if pool.full():
                    self.fire("DROPPED", "open-loop", 0)
                else:
                    pool.spawn(self.one_request)
                gap = random.expovariate(rate) if scenario.arrivals == "poisson" else 1 / rate
                next_at += gap
            pool.join()  # the requests already sent finish within the stop timeout
        finally:
            pool.kill(block=False)
