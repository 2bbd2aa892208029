"""Guided decoding in the engine: request fields to a spec, compilation errors, masks, termination, mixed batches."""

from __future__ import annotations

import json
import uuid

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine import (
    Engine,
    EngineConfig,
    GenerationRequest,
    SamplingParams,
    SchedulerConfig,
    ServedModel,
    guided,
    logits_processing,
)
from service.engine.guided import GuidedSpec, prepare, spec_from_request
from service.engine.types import InvalidRequestError
from tests.service.engine_fixtures import tiny_model, tiny_tokenizer
from tests.service.test_engine import run_all, tokens_of

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "n", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    engine = Engine(EngineConfig(scheduler=SchedulerConfig(max_batch_size=16)))
    model = tiny_model(tokenizer.vocab_size, seed=1)
    engine.add_model(ServedModel("tiny", model, tokenizer, max_model_len=256, eos_token_ids=(tokenizer.eos_token_id,)))
    engine.start()
    yield engine
    engine.stop()


def compiled(spec: GuidedSpec, tokenizer) -> GuidedSpec:
    return prepare(spec, tokenizer, tokenizer.vocab_size, (tokenizer.eos_token_id,))


class _Row:
    """What guided.apply reads of a sequence: its request's params (and a request id for logs)."""

    def __init__(self, spec: GuidedSpec) -> None:
        self.request = GenerationRequest("r", "tiny", [1], SamplingParams(guided=spec))
        self.request_id = "r"


def test_request_fields_become_one_spec():
    assert spec_from_request(None) is None and spec_from_request({"type": "text"}) is None
    assert spec_from_request({"type": "json_object"}).kind == "json_object"
    wrapped = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert spec_from_request(wrapped) == GuidedSpec(
        "json_schema", '{"type": "object"}', "response_format.json_schema.schema"
    )
    assert spec_from_request(None, guided_json='{"type": "integer"}').value == '{"type": "integer"}'
    assert spec_from_request(None, guided_choice=["a", "b"]).value == '["a", "b"]'
    with pytest.raises(InvalidRequestError) as both:
        spec_from_request({"type": "json_object"}, guided_regex="a+")
    assert both.value.param == "guided_regex" and "response_format" in str(both.value)
    for kwargs, param in [
        ({"guided_json": "{oops"}, "guided_json"),
        ({"guided_json": "[1]"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": ""}, "guided_regex"),
    ]:
        with pytest.raises(InvalidRequestError) as error:
            spec_from_request(None, **kwargs)
        assert error.value.param == param


def test_bad_constraints_fail_at_compilation_naming_the_field(tokenizer):
    for spec in (
        GuidedSpec("json_schema", '{"type": "no-such-type"}', "guided_json"),
        GuidedSpec("regex", "(unclosed", "guided_regex"),
    ):
        with pytest.raises(InvalidRequestError) as error:
            compiled(spec, tokenizer)
        assert error.value.param == spec.param and spec.param in str(error.value)
    with pytest.raises(InvalidRequestError, match="end-of-sequence"):
        prepare(GuidedSpec("json_object", "", "response_format"), tokenizer, tokenizer.vocab_size, ())
    spec = compiled(GuidedSpec("json_object", "", "response_format"), tokenizer)
    assert compiled(GuidedSpec("json_object", "", "response_format"), tokenizer).compiled is spec.compiled  # cached


def test_eos_only_when_the_grammar_is_complete(tokenizer):
    row = _Row(compiled(GuidedSpec("choice", '["yes", "no"]', "guided_choice"), tokenizer))
    eos = tokenizer.eos_token_id
    first = guided.allowed_tokens(row, tokenizer.vocab_size)
    assert eos not in first and first
    for token in tokenizer.encode("yes", add_bos=False):
        assert token in guided.allowed_tokens(row, tokenizer.vocab_size)
        guided.accept(row, token)
    assert guided.allowed_tokens(row, tokenizer.vocab_size) == [eos]


def test_mask_keeps_unguided_rows_and_the_raw_logits(tokenizer):
    row = _Row(compiled(GuidedSpec("regex", "[0-9]+", "guided_regex"), tokenizer))
    plain = _Row(None)
    logits = torch.randn(2, tokenizer.vocab_size)
    raw = logits.clone()
    masked = guided.apply([plain, row], logits)
    assert torch.equal(logits, raw) and torch.equal(masked[0], raw[0])  # input untouched, plain row as is
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).isdigit() for t in allowed)
    assert guided.apply([plain], logits) is logits


def test_json_strings_refuse_control_characters_and_surrogates(tokenizer):
    """The cases that made xgrammar 0.2.9's outputs fail to parse or validate (see guided.py)."""
    vocab = tokenizer.tokenizer.get_vocab()
    bounded = {"type": "object", "properties": {"t": {"type": "string", "maxLength": 8}}, "required": ["t"]}
    row = _Row(compiled(GuidedSpec("json_schema", json.dumps(bounded), "guided_json"), tokenizer))
    for token in tokenizer.encode('{"t": "p', add_bos=False):
        guided.accept(row, token)
    allowed = set(guided.allowed_tokens(row, tokenizer.vocab_size))
    assert vocab["ď"] not in allowed  # byte 0x0f: a raw control character
    guided.accept(row, vocab["í"])  # byte 0xED: a UTF-8 lead byte of U+D000..U+DFFF
    allowed = set(guided.allowed_tokens(row, tokenizer.vocab_size))
    assert vocab["±"] not in allowed  # 0xB1 after 0xED would encode a surrogate
    assert vocab["ŀ"] in allowed  # 0x9E after 0xED: U+D780 range (Hangul), fine


def test_guided_rows_do_not_speculate():
    spec = GuidedSpec("json_object", "", "response_format")
    row = _Row(spec)
    assert logits_processing.needs_processing(row)
    assert not logits_processing.needs_processing(_Row(None))


def test_mixed_batch_guided_outputs_validate_and_plain_equals_alone(engine, tokenizer):
    prompt = tokenizer.encode("hello world", add_bos=False)
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = tokens_of(run_all(engine, [GenerationRequest("alone", "tiny", prompt, plain)])["alone"])
    spec = compiled(GuidedSpec("json_schema", json.dumps(SCHEMA), "guided_json"), tokenizer)
    choice = compiled(GuidedSpec("choice", '["red", "green"]', "guided_choice"), tokenizer)
    requests = []
    for i in range(6):
        requests.append(GenerationRequest(f"p{i}", "tiny", prompt, plain))
        params = SamplingParams(max_tokens=120, temperature=1.0, seed=i, guided=spec)
        requests.append(GenerationRequest(f"g{i}", "tiny", prompt, params))
    # min_tokens masks EOS, but a complete grammar allows only EOS: the grammar wins, the row ends.
    late = SamplingParams(max_tokens=50, temperature=0.0, min_tokens=40, guided=choice)
    requests.append(GenerationRequest("choice", "tiny", prompt, late))
    events = run_all(engine, requests)
    stopped = 0
    for request in requests:
        text = "".join(e.text for e in events[request.request_id])
        reason = events[request.request_id][-1].finish_reason
        if request.request_id.startswith("p"):
            assert tokens_of(events[request.request_id]) == alone
        elif request.request_id == "choice":
            assert reason == "stop" and text in ("red", "green")
        elif reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(text), SCHEMA)
    assert stopped >= 3


def test_unknown_kind_is_refused(tokenizer):
    with pytest.raises(InvalidRequestError):
        compiled(GuidedSpec("yaml", "", "response_format"), tokenizer)


@pytest.mark.parametrize("seed", range(3))
def test_a_seeded_guided_request_is_reproducible(engine, tokenizer, seed):
    spec = compiled(GuidedSpec("regex", "[a-z]{2,6}(-[0-9]{1,3})?", "guided_regex"), tokenizer)
    prompt = tokenizer.encode("the quick", add_bos=False)
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=seed, guided=spec)
    runs = [run_all(engine, [GenerationRequest(uuid.uuid4().hex, "tiny", prompt, params)]) for _ in range(2)]
    texts = ["".join(e.text for e in next(iter(run.values()))) for run in runs]
    assert texts[0] == texts[1]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=12,
)
KEYWORDS = st.sampled_from(["type", "properties", "items", "enum", "required", "pattern", "anyOf", "$ref", "minimum"])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    schema=st.dictionaries(KEYWORDS | st.text(max_size=6), JSON_VALUES, max_size=4),
    regex=st.text(max_size=12),
    choices=st.lists(st.text(max_size=6), max_size=3),
)
def test_random_constraints_compile_or_are_400s(tokenizer, schema, regex, choices):
    """What the HTTP fuzz leaves out: any schema, regex or choice list compiles or is an InvalidRequestError."""
    for kwargs in ({"guided_json": schema}, {"guided_regex": regex}, {"guided_choice": choices}):
        try:
            spec = spec_from_request(None, **kwargs)
            compiled(spec, tokenizer)
        except InvalidRequestError as error:
            assert error.param == next(iter(kwargs))
