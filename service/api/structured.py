"""Structured output fields of completion and chat requests, and their translation to the engine's `GuidedSpec`.

OpenAI's `response_format` (`text`, `json_object`, `json_schema` with `{name, schema, strict}`) and
vLLM's `guided_json` (a schema, or one as a JSON string), `guided_regex` and `guided_choice`. At most one
of them constrains a request (more is a 400 naming the fields); the grammar is compiled by the engine
client at admission (`service/engine/guided.py`), so a schema or regex it cannot compile is a 400 naming
the field before any generation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine.guided import GuidedSpec, spec_from_request

MAX_CHOICES = 256  # guided_choice entries
MAX_PATTERN_CHARS = 4096  # guided_regex characters


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's named schema (`strict` is accepted; output always follows it)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema the output follows.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"] = Field(
        description="`text`: no constraint; `json_object`: any JSON object; `json_schema`: follows its schema."
    )
    json_schema: JsonSchemaFormat | None = None


GuidedJson = dict[str, Any] | str
GuidedRegex = Annotated[str, Field(max_length=MAX_PATTERN_CHARS)]
GuidedChoice = Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES, fail_fast=True)]


def guided_spec(body: Any) -> GuidedSpec | None:
    """The constraint of a completion or chat request body (None: unconstrained). Raises
    `InvalidRequestError` (400) naming the field when it is contradictory or malformed."""
    response_format = body.response_format
    if response_format is not None:
        response_format = response_format.model_dump(by_alias=True, exclude_none=True)
    return spec_from_request(response_format, body.guided_json, body.guided_regex, body.guided_choice)
