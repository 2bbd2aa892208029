"""Schemathesis against the live tiny zoo: no 5xx, and every answer is one the OpenAPI document describes.

The schema comes from the running server's `/openapi.json`, narrowed only where the server could not
be fuzzed usefully otherwise: `model` is one of the served names (a random string is only ever a 404),
token ids are below the zoo's vocabulary size (else nearly every id prompt is a 400), and `max_tokens`
/ `max_completion_tokens` are capped (and `max_tokens` required, as chat's default is 256 tokens) so
each generation stays a few milliseconds; the structured-output fields are left out (a random schema
or regex is a 400, and as optional fields they would crowd out the 200s that carry sampling fields;
`tests/service/test_guided.py` fuzzes them against the grammar compiler). Everything else (temperature,
top_p, top_k, seed, stop, prompts, messages, stream) is generated from the document as it is; the test
asserts that requests answered 200 carried each sampling field. `POST /v1/unload_lora_adapter` is left
out: it could unload the shared server's adapters under other tests.

Each operation gets a fixed number of examples, derandomized (the same cases every run, so CI is
stable). Positive (schema-valid) cases must get a documented status, content type, headers and body;
negative (schema-invalid) cases a documented status and never a 5xx (a few are 200: they only break
the narrowing above, such as a missing `max_tokens`).
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

SERVED = ["tiny", "moe", "a1", "a2"]
MAX_TOKENS = 6
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "stream")
SKIPPED = {("POST", "/v1/unload_lora_adapter")}
CONSTRAINTS = ("response_format", "guided_json", "guided_regex", "guided_choice")  # structured output
EXAMPLES = {"POST": 120, "GET": 10}  # per operation and mode; GETs take no input
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def narrowed(document: dict, vocab: int) -> dict:
    """The live document with `model` limited to the served names, token ids to the zoo's vocabulary and
    generation lengths capped."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    for member in schemas["CompletionRequest"]["properties"]["prompt"]["oneOf"]:  # token ids, flat or batched
        items = member.get("items", {})
        ids = items if items.get("type") == "integer" else items.get("items", {})
        if ids.get("type") == "integer":  # non-empty lists of ids within the vocabulary
            ids.update(minimum=0, maximum=vocab - 1)
            member["minItems"] = 1
            items.setdefault("minItems", 1)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        request = schemas[name]
        request["properties"]["model"] = {"type": "string", "enum": SERVED}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in request["properties"]:
                request["properties"][field] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
        request["required"] = sorted({*request.get("required", []), "max_tokens"})
        for field in CONSTRAINTS:  # random schemas and regexes are 400s: fuzzed in tests/service/test_guided.py
            request["properties"].pop(field, None)
        # Random token-id keys are 400s (tested in tests/api/test_sampling_api.py); ids within the vocabulary;
        # n and min_tokens small enough that requests fit the capacity and max_tokens.
        request["properties"].pop("logit_bias", None)
        if "stop_token_ids" in request["properties"]:
            request["properties"]["stop_token_ids"] = {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1},
                "maxItems": 4,
            }
        for field, most in (("n", 2), ("min_tokens", 1)):
            if field in request["properties"]:
                request["properties"][field] = {
                    "type": "integer",
                    "minimum": 0 if field == "min_tokens" else 1,
                    "maximum": most,
                }
    return document


@pytest.fixture(scope="module")
def api(server, zoo):
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    vocab = min(json.loads((zoo[name] / "config.json").read_text())["vocab_size"] for name in ("tiny", "moe"))
    return schemathesis.openapi.from_dict(narrowed(document, vocab))


def fuzz(api, server, method: str, path: str, mode: GenerationMode, seen: Counter) -> int:
    """Run one operation's examples; the number run. `seen` counts statuses and the sampling fields sent."""
    operation = api[path][method]
    ran = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES[method],
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        nonlocal ran
        ran += 1
        response = case.call(base_url=server.url, timeout=30)
        seen[f"{mode.value} {response.status_code}"] += 1
        if isinstance(case.body, dict) and response.status_code == 200:
            seen.update(f"200 with {field}" for field in SAMPLING if field in case.body)
        if mode is GenerationMode.POSITIVE:
            case.validate_response(response, checks=CHECKS)
        else:
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])

    run()
    return ran


def operations(api) -> list[tuple[str, str]]:
    found = []
    for result in api.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) not in SKIPPED:
            found.append((operation.method.upper(), operation.path))
    return found


@pytest.mark.slow
def test_fuzz_the_live_api(api, server):
    started = time.monotonic()
    counts = {}
    seen: Counter = Counter()
    for method, path in operations(api):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if method == "GET" and mode is GenerationMode.NEGATIVE:
                continue  # no parameters to break
            counts[f"{mode.value} {method} {path}"] = fuzz(api, server, method, path, mode, seen)
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"} <= {
        key.split(" ", 1)[1] for key in counts
    }
    print(f"\nfuzz: {sum(counts.values())} examples in {time.monotonic() - started:.1f}s: {counts}\n{dict(seen)}")
    for field in SAMPLING:  # the examples reached every sampling field in requests that generated
        assert seen[f"200 with {field}"] > 0, (field, seen)
    # The server is still whole: ready, and nothing left running.
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
