"""Benchmark: structured output (guided decoding), the grammar libraries side by side and the engine's overhead.

Part 1, the libraries (xgrammar, llguidance, outlines-core, each only if installed; their adapters are
in `bench/grammar_libs.py`), on the same JSON schema (nested object, enum, array, numbers, boolean, a
string pattern, bounded string lengths) and two vocabularies:
the tiny zoo's byte-level BPE (`artifacts/tokenizer`, or one trained here when the zoo is absent) and a
32k byte-level BPE trained here from the standard library's sources (no downloads; `--tiny`: 2k).
Measured per library and vocabulary:

- setup_ms: the one-off work per tokenizer (xgrammar's TokenizerInfo + GrammarCompiler, llguidance's
  LLTokenizer, outlines-core's Vocabulary);
- compile_ms: one schema compiled against that tokenizer as `service/engine/guided.py` would at
  admission (median over fresh compiles; xgrammar's cache off; llguidance: grammar, validation and
  the template matcher);
- mask_us: one row's next-token bitmask, per token, walking a valid document token by token (mask,
  then accept the document's token), median over the document's tokens and the repetitions;
- accept_us: advancing the state by one token;
- doc_accepted: the valid document went through token by token (EOS included);
- refuses_control_char / refuses_surrogate: inside a length-bounded string, whether the mask refuses a
  raw control character, and after the UTF-8 lead byte 0xED a continuation that would encode a
  surrogate (JSON allows neither: the output would not parse or validate).

Part 2, the engine: a random model (2 layers x 128, the zoo student's shape) with each vocabulary,
served by the engine with the chosen library; a batch of 8 sampled requests of max_tokens each,
plain (ignoring EOS) vs guided by an array of the schema's records too long to close (so both make
exactly max_tokens tokens), timed interleaved (plain, guided, plain, ...); per_token_ms = wall time /
tokens produced, prefill included. overhead_ratio = guided / plain per token (DESIGN.md: a ratio
measured side by side in one run).

The library chosen for `service/engine/guided.py` (llguidance) and why are in that module's docstring
and DESIGN.md; this benchmark is where the figures come from.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bench.common import write_report
from bench.grammar_libs import GrammarLib, available_libraries, byte_level_alphabet
from models import ModelConfig
from models.decoder import CausalLM
from models.tokenizer import TextTokenizer

NAME = "structured_output"
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 32}, "zip": {"type": "integer"}},
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "active", "role", "code", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "score": 99.5,
    "active": True,
    "role": "admin",
    "code": "AB123",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "zip": 10115},
}


# The engine's workload: records of SCHEMA in an array too long to close within max_tokens, so that a
# guided request produces as many tokens as a plain one (per-token times compare like with like).
ENGINE_SCHEMA: dict[str, Any] = {"type": "array", "items": SCHEMA, "minItems": 100}


@dataclass(frozen=True)
class StructuredConfig:
    large_vocab: int = 32_000
    corpus_chars: int = 12_000_000  # of standard-library source, to train the large BPE
    compile_reps: int = 5
    walk_reps: int = 5
    engine_batch: int = 8
    engine_max_tokens: int = 96
    engine_reps: int = 11
    hidden_size: int = 128
    layers: int = 2


TINY = StructuredConfig(
    large_vocab=2_000,
    corpus_chars=400_000,
    compile_reps=1,
    walk_reps=1,
    engine_batch=4,
    engine_max_tokens=24,
    engine_reps=1,
)


def train_bpe(vocab_size: int, corpus_chars: int) -> TextTokenizer:
    """A byte-level BPE trained on the standard library's own sources (every Python has them)."""
    texts, total = [], 0
    for path in sorted(Path(sys.modules["json"].__file__).parents[1].glob("*.py")):
        text = path.read_text(errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= corpus_chars:
            break
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return TextTokenizer(tokenizer, {"bos_token": "<s>", "eos_token": "</s>"})


def small_tokenizer() -> TextTokenizer:
    path = ROOT / "artifacts" / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return TextTokenizer.load(path)
    return train_bpe(512, 200_000)


def measure_library(lib: GrammarLib, tokenizer: TextTokenizer, config: StructuredConfig) -> dict[str, Any]:
    start = time.perf_counter()
    lib.setup(tokenizer)
    setup_ms = (time.perf_counter() - start) * 1e3
    compile_times = []
    compiled = None
    for _ in range(config.compile_reps):
        start = time.perf_counter()
        compiled = lib.compile(SCHEMA)
        compile_times.append(time.perf_counter() - start)
    ids = tokenizer.encode(json.dumps(DOCUMENT), add_bos=False) + [tokenizer.eos_token_id]
    masks, accepts, valid = [], [], True
    for _ in range(config.walk_reps):
        matcher = lib.matcher(compiled)
        for token in ids:
            start = time.perf_counter()
            lib.mask(matcher)
            middle = time.perf_counter()
            valid = lib.accept(matcher, token) and valid
            accepts.append(time.perf_counter() - middle)
            masks.append(middle - start)
    return {
        "library": lib.name,
        "vocab": tokenizer.vocab_size,
        "setup_ms": setup_ms,
        "compile_ms": statistics.median(compile_times) * 1e3,
        "mask_us": statistics.median(masks) * 1e6,
        "accept_us": statistics.median(accepts) * 1e6,
        "doc_tokens": len(ids),
        "doc_accepted": valid,
        **refusals(lib, tokenizer, compiled),
    }


def refusals(lib: GrammarLib, tokenizer: TextTokenizer, compiled: Any) -> dict[str, bool]:
    """Inside `name` (a string of maxLength 24): is a raw control character (byte 0x0f) refused, and after
    the UTF-8 lead byte 0xED, the continuation 0xB1 (together a surrogate, which is not UTF-8)? JSON
    allows neither; the output would not parse or validate."""
    byte_token = {
        b: i for ch, b in byte_level_alphabet().items() if (i := tokenizer.tokenizer.token_to_id(ch)) is not None
    }
    matcher = lib.matcher(compiled)
    for token in tokenizer.encode('{"name": "Ada', add_bos=False):
        lib.accept(matcher, token)

    def allowed(token: int) -> bool:
        lib.mask(matcher)
        words = lib.bitmask.flatten()
        return bool((int(words[token // 32]) >> (token % 32)) & 1)

    refuses_control = not allowed(byte_token[0x0F])
    refuses_surrogate = not (lib.accept(matcher, byte_token[0xED]) and allowed(byte_token[0xB1]))
    return {"refuses_control_char": refuses_control, "refuses_surrogate": refuses_surrogate}


# ---- part 2: the engine, plain vs guided (the chosen library) ----
def engine_overhead(tokenizer: TextTokenizer, config: StructuredConfig) -> dict[str, Any]:
    from bench.serving import bench_scheduler
    from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, ServedModel
    from service.engine.guided import GuidedSpec, prepare

    torch.manual_seed(0)
    model_config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.hidden_size * 3,
        num_hidden_layers=config.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    engine = Engine(EngineConfig(scheduler=bench_scheduler(max_batch_size=config.engine_batch)))
    eos = (tokenizer.eos_token_id,)
    engine.add_model(ServedModel("bench", CausalLM(model_config).eval(), tokenizer, 512, eos_token_ids=eos))
    engine.start()
    spec = GuidedSpec("json_schema", json.dumps(ENGINE_SCHEMA), "response_format")
    spec = prepare(spec, tokenizer, model_config.vocab_size, eos)
    prompt = tokenizer.encode("Describe a person as JSON:", add_bos=False)

    def batch(guided: bool) -> Callable[[], int]:
        def call() -> int:
            # Both run exactly max_tokens: plain ignores EOS, the guided array cannot close before it.
            params = SamplingParams(
                max_tokens=config.engine_max_tokens,
                temperature=1.0,
                seed=0,
                ignore_eos=not guided,
                guided=spec if guided else None,
            )
            requests = [
                GenerationRequest(uuid.uuid4().hex, "bench", prompt, params) for _ in range(config.engine_batch)
            ]
            return run_requests(engine, requests)

        return call

    calls = {"plain": batch(False), "guided": batch(True)}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for call in calls.values():  # warm-up
            call()
        for _ in range(config.engine_reps):
            for name, call in calls.items():
                start = time.perf_counter()
                tokens = call()
                samples[name].append((time.perf_counter() - start) / max(tokens, 1))
    finally:
        engine.stop()
    per_token = {name: statistics.median(times) * 1e3 for name, times in samples.items()}
    return {"plain_per_token_ms": per_token["plain"], "guided_per_token_ms": per_token["guided"]}


def run_requests(engine: Any, requests: list[Any]) -> int:
    """Submit every request at once; the number of tokens they produced once all finished."""
    done, lock, counts = threading.Event(), threading.Lock(), {"left": len(requests), "tokens": 0}

    def on_event(event: Any) -> None:
        with lock:
            counts["tokens"] += len(event.token_ids)
            if event.finish_reason is not None:
                counts["left"] -= 1
                if counts["left"] == 0:
                    done.set()

    for request in requests:
        engine.submit(request, on_event)
    if not done.wait(600):
        raise RuntimeError("benchmark requests did not finish")
    return counts["tokens"]


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    left, right = fig.subplots(1, 2)
    lib_rows = [r for r in rows if r["kind"] == "library"]
    labels = [f"{r['library']}\n{r['vocab']}" for r in lib_rows]
    left.bar(labels, [r["mask_us"] for r in lib_rows], color="#4c72b0")
    left.set_ylabel("next-token mask, one row (µs, median)")
    left.set_yscale("log")
    left.set_title("mask time per token, by library and vocabulary")
    right.bar(labels, [r["compile_ms"] for r in lib_rows], color="#dd8452")
    right.set_ylabel("schema compile (ms, median)")
    right.set_yscale("log")
    right.set_title("compile time of the benchmark schema")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="y", alpha=0.3)


def run(tiny: bool, out_dir: str | Path) -> dict[str, Path]:
    config = TINY if tiny else StructuredConfig()
    torch.set_num_threads(1)
    vocabularies = [small_tokenizer(), train_bpe(config.large_vocab, config.corpus_chars)]
    rows: list[dict[str, Any]] = []
    for tokenizer in vocabularies:
        for lib in available_libraries():
            rows.append({"kind": "library", **measure_library(lib, tokenizer, config)})
    overhead = {}
    for tokenizer in vocabularies:
        figures = engine_overhead(tokenizer, config)
        ratio = figures["guided_per_token_ms"] / figures["plain_per_token_ms"]
        overhead[tokenizer.vocab_size] = ratio
        row = {"kind": "engine", "library": "llguidance", "vocab": tokenizer.vocab_size, **figures}
        rows.append({**row, "overhead_ratio": ratio})
    columns = [
        *("kind", "library", "vocab", "setup_ms", "compile_ms", "mask_us", "accept_us", "doc_tokens"),
        *("doc_accepted", "refuses_control_char", "refuses_surrogate"),
        *("plain_per_token_ms", "guided_per_token_ms", "overhead_ratio"),
    ]
    rows = [{c: row.get(c) for c in columns} for row in rows]
    meta = {
        "config": asdict(config),
        "schema": SCHEMA,
        "chosen": "llguidance",
        "engine_overhead_ratio_by_vocab": overhead,
        "columns": "library rows: setup once per tokenizer, compile per schema, mask/accept per token of a valid "
        "document; engine rows: batch of 8 sampled requests, plain vs guided, interleaved, one torch thread",
    }
    return write_report(NAME, rows, out_dir, plot, meta)
