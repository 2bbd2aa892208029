"""Request and response bodies of the HTTP API (OpenAI- and vLLM-compatible), as separate pydantic classes.

Completion and chat requests accept unknown fields, as vLLM learned to (clients add fields of newer
API versions): they are ignored, logged, and named in the `x-modelserve-ignored-fields` response
header. Known OpenAI fields this server cannot honour are refused by name rather than ignored
(`n` over 16, `best_of` > 1, `suffix`, `tool_choice` `required` or a named function); they are
accepted at their no-op value so clients sending the defaults work. Logprob shapes (`logprobs` of
choices and chunks) are in `service/api/logprobs.py`. The admin requests (modelserve's and vLLM's own)
still refuse unknown fields.
Limits that depend on Settings (stop strings, prompt size) are checked in the routes.

Numbers and booleans are not converted from strings or booleans, as in OpenAI's API: `"max_tokens": "5"`,
`"temperature": true` or `"stream": "yes"` are 400s. A float field takes an integer (`1` is 1.0) and an
integer field a JSON number with no fraction (`5.0`: JSON Schema's `integer`, which the OpenAPI document
promises; `5.5` is a 400). Token ids are strict ints.
A prompt list is validated as the one member its first element points to, and stops at its first bad
element (`FailFast`): pydantic would otherwise try every member of the union and build one error per
element, seconds of event-loop time for a body of a million `true`s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from service.api.logprobs import ChatLogprobs, CompletionLogprobs
from service.api.structured import GuidedChoice, GuidedJson, GuidedRegex, ResponseFormat


def _number_only(value: Any) -> Any:
    if isinstance(value, (str, bool)):
        raise PydanticCustomError(
            "int_type", "Input should be a valid integer, not a {kind}", {"kind": type(value).__name__}
        )
    return value


def json_int(**bounds: int) -> Any:
    """An integer field: a JSON number without a fraction, never a string or a boolean (bounds before the
    validator, so that the JSON schema keeps them as `minimum` / `maximum`)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_number_only)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _unknown_fields(cls, data: Any) -> Any:
        """One error for the first unknown field (`extra="forbid"` would build one per field: a body of a
        million unknown keys would hold the event loop for seconds)."""
        if isinstance(data, dict) and data.keys() - cls.model_fields.keys():
            name = next(key for key in data if key not in cls.model_fields)
            raise PydanticCustomError(
                "unknown_field", "unknown field '{field}': this server does not support it", {"field": str(name)}
            )
        return data


class _OpenAIRequest(BaseModel):
    """A request body of the OpenAI API: unknown fields are kept aside (`model_extra`) and reported."""

    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return list(self.model_extra or ())


class _Lenient(BaseModel):
    """A nested OpenAI object (a message, stream options): unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        if value and isinstance(value[0], str):
            return "texts"
        return "list[list[int]]" if value and isinstance(value[0], list) else "ids"
    return None


TOKEN_ID = WithJsonSchema({"type": "integer", "minimum": 0})
MAX_PROMPTS = 64  # prompts in one completions request (each x n choices is one engine request)
TokenIds = Annotated[list[Annotated[StrictInt, TOKEN_ID]], Field(fail_fast=True)]
# One member validated, chosen by the value's shape (a plain union would try each member in turn). The
# tag of the list of token-id lists is spelled like a type so the error's location names only `prompt`.
Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True), Tag("texts")]
    # ids >= 0 is documented but checked in the route with the vocabulary bound (a per-item bound here
    # would double the validation time of a long list).
    | Annotated[TokenIds, Tag("ids")]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True), Tag("list[list[int]]")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="prompt must be a string, a list of strings, a list of integer token ids, or a "
        "list of such lists",
    ),
]


class StreamOptions(_Lenient):
    include_usage: bool = Field(False, strict=True)
    continuous_usage_stats: bool = Field(False, strict=True, description="vLLM: usage on every chunk.")


MAX_N = 16  # choices per prompt
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_LOGIT_BIAS = 1024  # entries of logit_bias


class SamplingFields(_OpenAIRequest):
    model: str = Field(min_length=1, description="A base model name or an adapter name (see GET /v1/models).")
    max_tokens: json_int(ge=1) | None = Field(None, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    top_k: json_int(ge=-1) = Field(0, description="0 or -1: off.")
    seed: json_int(ge=0, le=2**63 - 1) | None = Field(None, description="A seeded request samples reproducibly.")
    stop: str | Annotated[list[str], Field(fail_fast=True)] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(
        False, strict=True, description="vLLM extension: keep generating past the end-of-sequence token."
    )
    user: str | None = None
    n: json_int(ge=1, le=MAX_N) = Field(1, description=f"Choices per prompt (at most {MAX_N}).")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True, description="OpenAI, over generated tokens.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True, description="OpenAI, over generated tokens.")
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, strict=True, description="vLLM: > 1 discourages tokens of the prompt and output."
    )
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, strict=True, description="Drop tokens below min_p x the best's probability."
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=64, fail_fast=True)] | None = Field(
        None, description="vLLM: token ids that end generation (finish_reason stop)."
    )
    min_tokens: json_int(ge=0) = Field(0, description="vLLM: EOS and stop_token_ids are masked until this many tokens.")
    truncate_prompt_tokens: json_int(ge=1) | None = Field(None, description="vLLM: keep only the last K prompt tokens.")
    # Structured output (service/api/structured.py): at most one of these four.
    response_format: ResponseFormat | None = Field(None, description="OpenAI: text, json_object or json_schema.")
    guided_json: GuidedJson | None = Field(None, description="vLLM: the output follows this JSON Schema.")
    guided_regex: GuidedRegex | None = Field(None, description="vLLM: the output matches this regex.")
    guided_choice: GuidedChoice | None = Field(None, description="vLLM: the output is one of these strings.")

    @field_validator("logit_bias", mode="before")  # before: a huge map is refused without validating it
    @classmethod
    def _bias(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, bias in value.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be integer token ids, got {key[:32]!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} must be a number in [-100, 100]")
        return value

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(key): float(bias) for key, bias in (self.logit_bias or {}).items()}

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(
        description=f"A string, a list of strings, a list of token ids, or a list of token-id lists "
        f"(at most {MAX_PROMPTS} prompts); choice index = prompt index x n + choice."
    )
    max_tokens: json_int(ge=0) | None = Field(None, description="Tokens to generate at most; 0 only with echo.")
    echo: bool = Field(False, strict=True, description="Return the prompt before the completion.")
    logprobs: json_int(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(
        None, description="Top logprobs per token (0: the chosen token's only); with echo, the prompt's too."
    )
    best_of: Literal[1] | None = None
    suffix: None = None


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[dict], Field(fail_fast=True)] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(fail_fast=True)] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, strict=True)
    max_completion_tokens: json_int(ge=1) | None = Field(None, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = Field(None, strict=True, description="Return the chosen tokens' logprobs.")
    top_logprobs: json_int(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(None, description="Needs logprobs: true.")
    parallel_tool_calls: bool | None = None
    tools: Annotated[list[dict], Field(fail_fast=True)] | None = Field(
        None, description="Accepted with tool_choice none or auto: the model answers in text (no tool calls)."
    )
    tool_choice: Literal["none", "auto"] | None = Field(
        None, description="`required` or a named function would oblige a tool call this server cannot make: 400."
    )

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value is not None and value not in ("none", "auto"):
            raise ValueError("only 'none' or 'auto' are supported: this server does not call tools")
        return value


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens whose KV came from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    root: str | None = Field(
        None,
        description="The base model's or the adapter's directory on the server: shown only to a request "
        "carrying an admin API key (null otherwise, and always when no keys are configured).",
    )
    parent: str | None = Field(None, description="For an adapter: the base model it is bound to.")
    max_model_len: int | None = None
    parameters: int | None = Field(None, description="Base model: parameter count.")
    size_bytes: int = Field(description="Bytes of weights in memory (model) or of resident LoRA weights (adapter).")
    dtype: str | None = Field(
        None, description="Base model: dtype of its float parts (activations, norms); adapter: of its LoRA weights."
    )
    quantization: str | None = Field(
        None, description="Base model: weight quantization (`int8`) or null for float weights; adapters are float."
    )
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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error (4xx, 5xx) in the OpenAI shape."""

    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None


class TokenizeRequest(_OpenAIRequest):
    model: str = Field(min_length=1)
    prompt: str | None = Field(None, description="Text to tokenize (or give `messages`).")
    messages: Annotated[list[ChatMessage], Field(fail_fast=True, min_length=1)] | None = None
    add_generation_prompt: bool = Field(True, strict=True)
    add_special_tokens: bool = Field(True, strict=True, description="Add BOS as the tokenizer's config says.")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_OpenAIRequest):
    model: str = Field(min_length=1)
    tokens: Annotated[list[Annotated[StrictInt, TOKEN_ID]], Field(fail_fast=True)]


class DetokenizeResponse(BaseModel):
    prompt: str
