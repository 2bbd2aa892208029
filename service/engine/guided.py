"""Guided decoding (structured output): a grammar decides which tokens a row may sample next.

Scope: the request's constraint as plain data (`GuidedSpec`, built from `response_format` or vLLM's
`guided_json` / `guided_regex` / `guided_choice` by `spec_from_request`), its compilation against a
model's tokenizer at admission (`prepare`: a bad schema or regex is an `InvalidRequestError` naming the
field, a 400 before the request reaches the engine), and the per-sequence state the engine drives
through `service/engine/logits_processing.py`: `apply` masks the guided rows of a batch's logits (one
bitmask row per guided row, applied to the (S, V) tensor in one call), `accept` advances a row's
grammar after its token is sampled. End: a grammar allows the end-of-sequence token only where it is
complete, and only that token once nothing else may follow, so a guided row ends with the model's
EOS and `finish_reason` "stop"; its text then parses (it may still end at `max_tokens`, truncated).

Library: llguidance, chosen by measurement (`bench/structured_output.py`, `reports/structured_output.md`:
the same schema, the zoo's 4k vocabulary and a 32k BPE, one CPU thread). Per token, a row's mask costs
llguidance 8-11 us, xgrammar about 1 us, outlines-core 0.4-0.8 us; all are small next to a decode step
(milliseconds here). What decided: xgrammar (0.2.9) lets a length-bounded JSON string take a raw
control character, and UTF-8-encoded surrogates (bytes ED A0..BF), so outputs that end with "stop"
fail to parse or to validate (both cases are in the report's `refuses_*` columns and in
`tests/service/test_guided.py`); outlines-core compiles a schema into a regex automaton over the whole
vocabulary, 1.2 s per new schema on the 32k vocabulary against llguidance's 1 ms, paid at admission.
llguidance refuses both bad cases, validates a grammar before use (a bad schema is a 400 at admission),
and needs no torch (xgrammar requires torch and triton; the pinned 2.13.0 stays either way).

JSON grammars have no free whitespace (separators ", " and ": "); a schema is followed as written
(`additionalProperties` allowed unless the schema says otherwise, as JSON Schema means). Compiled
grammars (an llguidance matcher at the grammar's start, deep-copied per sequence) are cached per
(tokenizer, constraint) in a bounded LRU.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from service.engine.types import InvalidRequestError

log = logging.getLogger(__name__)
KINDS = ("json_schema", "json_object", "regex", "choice")
MAX_COMPILED = 256  # compiled grammars kept (LRU), all models together
MAX_TOKENIZERS = 8  # llguidance tokenizers kept (one per served model in practice)
# JSON without free whitespace (small models otherwise wander in it), OpenAI's separators.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GuidedSpec:
    """One request's constraint. `value`: the schema as JSON text (json_schema), the regex, or the
    choices as a JSON list; `param` is the request field it came from (named in errors).
    `compiled` is set by `prepare` (not compared: two equal specs are the same constraint)."""

    kind: str
    value: str
    param: str
    compiled: Any = field(default=None, compare=False, hash=False, repr=False)


# ---- from the request's fields ----
def spec_from_request(
    response_format: dict | None,
    guided_json: dict | str | None = None,
    guided_regex: str | None = None,
    guided_choice: list[str] | None = None,
) -> GuidedSpec | None:
    """The one constraint a request asks for (None: plain text); more than one is a 400 naming them."""
    given = {
        "response_format": response_format is not None and response_format.get("type", "text") != "text",
        "guided_json": guided_json is not None,
        "guided_regex": guided_regex is not None,
        "guided_choice": guided_choice is not None,
    }
    named = [name for name, present in given.items() if present]
    if len(named) > 1:
        raise InvalidRequestError(
            f"give at most one of {', '.join(named)}: each one constrains the whole output", param=named[1]
        )
    if not named:
        return None
    if named[0] == "response_format":
        return _from_response_format(response_format or {})
    if named[0] == "guided_json":
        return GuidedSpec("json_schema", _schema_text(guided_json, "guided_json"), "guided_json")
    if named[0] == "guided_regex":
        if not guided_regex:
            raise InvalidRequestError("guided_regex must be a non-empty regular expression", param="guided_regex")
        return GuidedSpec("regex", guided_regex, "guided_regex")
    choices = guided_choice or []
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError("guided_choice must be a non-empty list of non-empty strings", param="guided_choice")
    return GuidedSpec("choice", json.dumps(choices, ensure_ascii=False), "guided_choice")


def _from_response_format(response_format: dict) -> GuidedSpec:
    kind = response_format.get("type")
    if kind == "json_object":
        return GuidedSpec("json_object", "", "response_format")
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format type {kind!r} is not supported: use 'text', 'json_object' or 'json_schema'",
            param="response_format.type",
        )
    wrapper = response_format.get("json_schema")
    if not isinstance(wrapper, dict):
        raise InvalidRequestError(
            "response_format type 'json_schema' needs a json_schema object {name, schema, strict}",
            param="response_format.json_schema",
        )
    schema = wrapper.get("schema", wrapper.get("json_schema"))
    if schema is None:
        schema = {"type": "object"}  # OpenAI: a named format without a schema constrains to any object
    param = "response_format.json_schema.schema"
    return GuidedSpec("json_schema", _schema_text(schema, param), param)


def _schema_text(schema: dict | str | bool | None, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON Schema object", param=param)
    return json.dumps(schema, ensure_ascii=False)  # key order kept: properties are generated in schema order


# ---- compilation (at admission) ----
@dataclass(frozen=True)
class _Compiled:
    grammar: str  # llguidance's serialised grammar
    template: Any  # an LLMatcher at the start of the grammar: each sequence starts from a deep copy
    eos: tuple[int, ...]  # the model's end tokens (the only ones a finished grammar allows)
    backend: Any  # the LLTokenizer it was compiled for (a cache hit must be for that very tokenizer)


_lock = threading.Lock()
_tokenizers: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()  # key -> (TextTokenizer, LLTokenizer)
_compiled: OrderedDict[tuple, _Compiled] = OrderedDict()


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> Any:
    """llguidance's view of a `TextTokenizer` (its `tokenizer.json`), padded to the model's vocab_size and
    ending on the model's EOS ids; cached per tokenizer (bounded)."""
    import llguidance

    key = (id(tokenizer), vocab_size, eos_token_ids)
    entry = _tokenizers.get(key)
    if entry is None or entry[0] is not tokenizer:  # an id reused by a new object is a new tokenizer
        backend = llguidance.LLTokenizer(
            tokenizer.tokenizer.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )
        entry = _tokenizers[key] = (tokenizer, backend)
        while len(_tokenizers) > MAX_TOKENIZERS:
            _tokenizers.popitem(last=False)
    _tokenizers.move_to_end(key)
    return entry[1]


def grammar_of(spec: GuidedSpec) -> str:
    """The llguidance grammar of a constraint (not yet checked: `prepare` does)."""
    from llguidance import LLMatcher

    if spec.kind in ("json_schema", "json_object"):
        schema = spec.value if spec.kind == "json_schema" else '{"type": "object"}'
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(spec.value))
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    raise ValueError(f"unknown guided kind {spec.kind!r}; known: {KINDS}")


def prepare(spec: GuidedSpec, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> GuidedSpec:
    """The spec with its grammar compiled for this tokenizer (cached); a constraint llguidance refuses is a
    400 naming its field. A model without an end-of-sequence token cannot end a guided row: refused too."""
    from llguidance import LLMatcher

    if not eos_token_ids:
        raise InvalidRequestError("structured output needs a model with an end-of-sequence token", param=spec.param)
    with _lock:
        backend = ll_tokenizer(tokenizer, vocab_size, tuple(eos_token_ids))
        key = (id(backend), spec.kind, spec.value)
        compiled = _compiled.get(key)
        if compiled is None or compiled.backend is not backend:
            try:
                grammar = grammar_of(spec)
                error = LLMatcher.validate_grammar(grammar, backend)
                template = None if error else LLMatcher(backend, grammar, log_level=0)
                if template is not None and template.is_error():
                    error = template.get_error()
            except Exception as exc:  # a schema llguidance cannot read (ValueError, TypeError, ...)
                error = str(exc) or type(exc).__name__
            except BaseException as exc:  # a Rust panic surfaces as pyo3's PanicException (a BaseException)
                if type(exc).__name__ != "PanicException":
                    raise
                error = f"the grammar library failed on it ({str(exc)[:200]})"
            if error:
                reason = error.strip().splitlines()[0] if error.strip() else "invalid"
                raise InvalidRequestError(f"{spec.param} cannot be compiled: {reason[:300]}", param=spec.param)
            compiled = _compiled[key] = _Compiled(grammar, template, tuple(eos_token_ids), backend)
            while len(_compiled) > MAX_COMPILED:
                _compiled.popitem(last=False)
        _compiled.move_to_end(key)
    return replace(spec, compiled=compiled)


# ---- per-sequence state (engine thread) ----
@dataclass
class _State:
    matcher: Any  # llguidance LLMatcher of this sequence
    eos: tuple[int, ...]
    broken: bool = False  # a token the grammar refused was chosen: only EOS may follow


_states: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()  # Sequence -> state
_executor: Any = None  # llguidance's thread pool for the masks of several rows


def spec_of(seq: Any) -> GuidedSpec | None:
    return getattr(seq.request.params, "guided", None)


def _state(seq: Any) -> _State:
    state = _states.get(seq)
    if state is None:
        compiled = spec_of(seq).compiled
        state = _states[seq] = _State(compiled.template.deep_copy(), compiled.eos)
    return state


def _fill(states: list[_State], rows: list[int], bitmask: Tensor) -> None:
    """Each guided row's allowed tokens into its row of bitmask (S, W) int32, contiguous on the CPU; several
    rows in llguidance's thread pool. (What `llguidance.torch`'s helpers do, without importing that
    module: it compiles a kernel with torch.compile at import, seconds of start-up.)"""
    global _executor
    import llguidance

    live = [(state.matcher, row) for state, row in zip(states, rows) if not state.broken]
    row_bytes = bitmask.shape[1] * bitmask.element_size()
    if len(live) > 1:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        _executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), row_bytes, bitmask.shape[0])
    elif live:
        matcher, row = live[0]
        matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), row_bytes)


def apply(seqs: list[Any], logits: Tensor) -> Tensor:
    """logits (S, V) -> logits with the guided rows' disallowed tokens at -inf (a copy; the input stays raw
    for logprobs). Unguided rows pass through unchanged; with none guided, the same tensor comes back."""
    rows = [i for i, seq in enumerate(seqs) if spec_of(seq) is not None]
    if not rows:
        return logits
    states = [_state(seqs[i]) for i in rows]
    vocab = logits.shape[-1]
    bitmask = torch.full((len(seqs), (vocab + 31) // 32), -1, dtype=torch.int32)  # (S, W) all allowed
    _fill(states, rows, bitmask)
    for state, row in zip(states, rows):
        if state.broken:  # only the end may follow
            bitmask[row] = 0
            for token in state.eos:
                bitmask[row, token // 32] |= _bit(token)
    bits = (bitmask[rows].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # (G, W, 32)
    allowed = bits.reshape(len(rows), -1)[:, :vocab].to(device=logits.device, dtype=torch.bool)  # (G, V)
    masked = logits.clone()
    index = torch.tensor(rows, device=logits.device)
    rows_out = masked[index].masked_fill(~allowed, float("-inf"))  # (G, V)
    for j in torch.nonzero(~torch.isfinite(rows_out.amax(dim=-1))).flatten().tolist():
        rows_out[j, list(states[j].eos)] = 0.0  # e.g. EOS masked by min_tokens where only EOS fits: the grammar wins
    masked[index] = rows_out
    return masked


def _bit(token: int) -> int:
    """Token's bit in its int32 word, as a signed int32 value."""
    bit = 1 << (token % 32)
    return bit - (1 << 32) if bit >= 1 << 31 else bit


def accept(seq: Any, token: int) -> None:
    """Advance a guided row's grammar by its sampled token."""
    if spec_of(seq) is None:
        return
    state = _state(seq)
    if state.broken or state.matcher.is_stopped():
        return
    if not state.matcher.consume_token(token):
        log.warning("request %s: token %d is outside its grammar (%s); ending it", seq.request_id, token,
                    state.matcher.get_error()[:200])  # fmt: skip
        state.broken = True


def allowed_tokens(seq: Any, vocab_size: int) -> list[int]:
    """The tokens a guided row may take next (for tests and debugging)."""
    scores = apply([seq], torch.zeros(1, vocab_size))
    return torch.nonzero(torch.isfinite(scores[0])).flatten().tolist()
