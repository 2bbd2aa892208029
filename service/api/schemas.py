"""Request and response bodies of the HTTP API (OpenAI- and vLLM-compatible), as separate pydantic classes.

Requests forbid unknown fields: a field this server would silently ignore (`logit_bias`, `n=3`,
`echo`) could mislead, so it is a 400. OpenAI fields that are accepted only at their no-op value
(`n=1`, penalties 0, `logprobs` null, ...) are listed so that clients sending the defaults work.
Limits that depend on Settings (stop strings, prompt size) are checked in the routes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    model: str = Field(min_length=1, description="A base model name or an adapter name (see GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: off.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="A seeded request samples reproducibly.")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-sequence token.")
    user: str | None = None
    # OpenAI fields accepted only at their no-op value.
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logit_bias: dict[str, float] | None = None
    logprobs: None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(
        description="One prompt: a string, a list of one string, or a list of token ids."
    )
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    parallel_tool_calls: None = None
    tools: None = None
    tool_choice: None = None
    response_format: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modelserve"
    root: str = Field(description="The base model's directory, or the adapter's directory.")
    parent: str | None = Field(None, description="For an adapter: the base model it is bound to.")
    max_model_len: int | None = None
    parameters: int | None = Field(None, description="Base model: parameter count.")
    size_bytes: int = Field(description="Bytes of weights in memory (model) or of resident LoRA weights (adapter).")
    lora_rank: int | None = None
    resident: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    lora_path: str = Field(min_length=1)
    base_model_name: str | None = Field(None, description="Extension: the base model; default: resolved.")
    pinned: bool = Field(False, description="Extension: never evicted by LRU.")


class UnloadLoraRequest(_Request):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM sends it; ignored


class LoraResponse(BaseModel):
    object: Literal["lora_adapter"] = "lora_adapter"
    lora_name: str
    parent: str
    status: Literal["loaded", "unloaded"]
    lora_rank: int | None = None
    size_bytes: int | None = None


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None
