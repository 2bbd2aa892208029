"""One streamed completion over HTTP: send it, time every SSE event, verify the stream against the contract.

Verified (any breach fails the request with the reason): status 200 and `text/event-stream`; every
event is `data: <json>` of the endpoint's chunk object with one id throughout and choice index 0; an
`{"error": ...}` event mid-stream is a failure carrying the server's message; exactly one chunk has
a `finish_reason`, and it is `stop` or `length`; the usage chunk (requested with
`stream_options.include_usage`) has no choices and consistent counts; `data: [DONE]` ends the
stream and nothing follows it. Output tokens are counted from `usage`, never from chunks;
`usage.prompt_tokens_details.cached_tokens` (prompt tokens served from the prefix cache), where the
server reports it, must be an integer from 0 to the prompt tokens.

Timing (client side, `time.perf_counter`): TTFT is from sending the request to the first event
carrying output text; inter-token latency is the gap between consecutive events carrying text (the
server may put several tokens in one event); TPOT is (last text event - first) / (output tokens - 1).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import requests

OBJECTS = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat.completion.chunk"}


class StreamError(Exception):
    """The response broke the streaming contract (or the server reported an error)."""


@dataclass
class StreamResult:
    status: int
    started: float  # perf_counter at send
    ended: float = 0.0  # perf_counter when [DONE] (or the failure) arrived
    text_times: list[float] = field(default_factory=list)  # perf_counter of each event that carried text
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server reports it
    text: str = ""  # the output text, concatenated from the chunks
    error: str | None = None  # set on failure
    retry_after: str | None = None  # 429/503 Retry-After header

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e_s(self) -> float:
        return self.ended - self.started

    @property
    def ttft_s(self) -> float | None:
        return self.text_times[0] - self.started if self.text_times else None

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.text_times, self.text_times[1:])]

    @property
    def tpot_s(self) -> float | None:
        if len(self.text_times) < 1 or self.completion_tokens < 2:
            return None
        return (self.text_times[-1] - self.text_times[0]) / (self.completion_tokens - 1)


def _text(chunk: dict, path: str) -> str:
    choice = chunk["choices"][0]
    if path == "/v1/completions":
        text = choice.get("text")
    else:
        text = (choice.get("delta") or {}).get("content") or ""
    if not isinstance(text, str):
        raise StreamError(f"choice text is {type(text).__name__}, not a string")
    return text


class StreamChecker:
    """Feeds on SSE `data:` payloads in order; raises StreamError at the first breach."""

    def __init__(self, path: str, result: StreamResult) -> None:
        self.path, self.result = path, result
        self.id: str | None = None
        self.done = False
        self.usage_seen = False

    def feed(self, payload: str, now: float) -> None:
        if self.done:
            raise StreamError(f"data after [DONE]: {payload[:80]!r}")
        if payload == "[DONE]":
            if self.result.finish_reason is None:
                raise StreamError("[DONE] before any chunk had a finish_reason")
            if not self.usage_seen:
                raise StreamError("no usage chunk although stream_options.include_usage was set")
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise StreamError(f"event is not JSON: {payload[:80]!r}") from exc
        if "error" in chunk:
            error = chunk["error"] or {}
            raise StreamError(f"server error mid-stream: {error.get('type')}: {error.get('message')}")
        if chunk.get("object") != OBJECTS[self.path]:
            raise StreamError(f"object {chunk.get('object')!r}, expected {OBJECTS[self.path]!r}")
        self.id = self.id or chunk.get("id")
        if not self.id or chunk.get("id") != self.id:
            raise StreamError(f"chunk id {chunk.get('id')!r} differs from the stream's {self.id!r}")
        usage = chunk.get("usage")
        if usage is not None:
            self._usage(chunk, usage)
            return
        choices = chunk.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or choices[0].get("index") != 0:
            raise StreamError(f"expected one choice with index 0, got {choices!r:.120}")
        if self.usage_seen:
            raise StreamError("a content chunk after the usage chunk")
        text = _text(chunk, self.path)
        if text:
            if self.result.finish_reason is not None:
                raise StreamError("text after the finish_reason chunk")
            self.result.text_times.append(now)
            self.result.text += text
        finish = choices[0].get("finish_reason")
        if finish is not None:
            if self.result.finish_reason is not None:
                raise StreamError("two chunks with a finish_reason")
            if finish not in ("stop", "length"):
                raise StreamError(f"finish_reason {finish!r}")
            self.result.finish_reason = finish

    def _usage(self, chunk: dict, usage: dict) -> None:
        if chunk.get("choices") != []:
            raise StreamError("the usage chunk must have empty choices")
        if self.result.finish_reason is None:
            raise StreamError("usage chunk before the finish_reason chunk")
        prompt, completion, total = (usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
        if not all(isinstance(v, int) and v >= 0 for v in (prompt, completion, total)) or prompt + completion != total:
            raise StreamError(f"inconsistent usage {usage!r}")
        if prompt == 0:
            raise StreamError("usage reports 0 prompt tokens")
        if completion < len(self.result.text_times):
            raise StreamError(f"usage reports {completion} tokens but {len(self.result.text_times)} text events came")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is not None and not (isinstance(cached, int) and 0 <= cached <= prompt):
            raise StreamError(f"usage reports {cached!r} cached tokens of {prompt} prompt tokens")
        self.usage_seen = True
        self.result.prompt_tokens, self.result.completion_tokens = prompt, completion
        self.result.cached_tokens = cached


def stream(session: requests.Session, base_url: str, path: str, body: dict, timeout_s: float) -> StreamResult:
    """POST `body` (stream and include_usage forced on) and read the SSE answer to its end."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    result = StreamResult(status=0, started=time.perf_counter())
    try:
        with session.post(base_url + path, json=body, stream=True, timeout=timeout_s) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.retry_after = response.headers.get("Retry-After")
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            ctype = response.headers.get("content-type", "")
            if not ctype.startswith("text/event-stream"):
                raise StreamError(f"content-type {ctype!r}, expected text/event-stream")
            checker, buffer = StreamChecker(path, result), b""
            for data in response.iter_content(chunk_size=None):
                now = time.perf_counter()
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    for line in event.decode("utf-8").splitlines():
                        if line.startswith("data: "):
                            checker.feed(line[len("data: ") :], now)
                        elif line and not line.startswith(":"):
                            raise StreamError(f"unexpected SSE line {line[:80]!r}")
            if buffer.strip():
                raise StreamError(f"stream ended inside an event: {buffer[:80]!r}")
            if not checker.done:
                raise StreamError("stream ended without data: [DONE]")
    except StreamError as exc:
        result.error = str(exc)
    except (requests.RequestException, UnicodeDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.ended = time.perf_counter()
    return result
