"""The compiled decode step (models.decode_graph under torch.compile) against the eager path.

Every equality test of the compiled path lives here, so CI pays its compile time once per model:
- `DecodeGraph` (run eagerly: the same math the compiler gets) gives the eager forward's logits for
  every family (GQA, biases and tied head, MoE on both its gathered and its all-experts path,
  sliding window), rows at different context lengths, padding rows writing only the scratch block;
- its fused q/k/v and gate/up weights are views: the model's projections share their storage;
- an engine with `compile_decode` gives `peft`'s / `transformers`' greedy tokens for base and adapter
  rows mixed (adapter rows go eager), compiles before it starts, and runs its decode steps compiled;
- speculative decoding with compiled decode (verification chunks and the draft's steps in the graphs,
  one decode row per token) gives the target's own greedy tokens, with a perfect, a random and an
  n-gram draft;
- int8 models are not compiled (they serve eager);
- autotuned graphs (weights frozen and packed for Inductor's C++ GEMM template) give the eager logits and
  are never shared between models of one architecture, nor with plain graphs.
"""

from __future__ import annotations

import pytest
import torch

from models import load_model
from models.attention import AttentionMetadata
from models.decode_graph import MOE_GATHER_MAX_PAIRS, DecodeGraph
from models.kv_cache import PagedKVCache
from service.engine import SchedulerConfig
from service.engine.compiled_decode import CompiledDecode, batch_buckets
from tests.adapters.test_multi_lora import setup  # noqa: F401  (fixture)
from tests.models.hf_fixtures import VOCAB, save_hf_model
from tests.service.test_paged_kv import expected, make_engine, run, tokens


def prefill(model, cache: PagedKVCache, lengths: list[int], seed: int) -> tuple[list[list[int]], torch.Tensor]:
    """Prompts of `lengths` cached in consecutive blocks (eager forward). Returns (tables, next tokens)."""
    gen = torch.Generator().manual_seed(seed)
    tables, start = [], 0
    for length in lengths:
        count = -(-(length + 1) // cache.block_size)
        tables.append(list(range(start, start + count)))
        start += count
        prompt = torch.randint(3, VOCAB, (1, length), generator=gen)
        meta = AttentionMetadata.for_blocks(
            cache, torch.tensor([tables[-1]]), torch.tensor([0]), torch.tensor([length])
        )
        model(prompt, meta=meta)
    return tables, torch.randint(3, VOCAB, (len(lengths),), generator=gen)


def eager_decode(model, cache, tables, lengths, next_tokens) -> torch.Tensor:
    width = max(len(t) for t in tables)
    meta = AttentionMetadata.for_blocks(
        cache,
        torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        torch.tensor(lengths),
        torch.ones(len(lengths), dtype=torch.long),
    )
    out = model(next_tokens[:, None], meta=meta, logits_positions=torch.zeros(len(lengths), dtype=torch.long))
    return out.logits  # (B, V)


@pytest.mark.parametrize(
    "family,window,lengths",
    [
        ("llama", None, [5, 17, 40]),
        ("qwen2", None, [1, 30]),  # q/k/v biases, tied LM head
        ("mistral", 8, [3, 20, 33]),  # sliding window shorter than the contexts
        ("mixtral", None, [4, 18]),  # MoE, gathered experts (few tokens)
        ("mixtral", None, [2 + i for i in range(MOE_GATHER_MAX_PAIRS)]),  # MoE, every expert masked by routing
    ],
)
@torch.inference_mode()
def test_decode_graph_equals_the_eager_forward(tmp_path, family, window, lengths):
    save_hf_model(family, tmp_path / family)
    model = load_model(tmp_path / family)
    if window is not None:
        model.config = model.config.replace(sliding_window=window)
    cache = PagedKVCache(model.config, num_blocks=64, block_size=16)
    tables, next_tokens = prefill(model, cache, lengths, seed=len(lengths))
    want = eager_decode(model, cache, tables, lengths, next_tokens)
    # Building the graph fuses the weights in place: the eager model must still agree after it.
    graph = DecodeGraph(model, rotary_positions=64 * 16)
    # Rerun the eager decode on a fresh copy of the cache state (it rewrites the same slots).
    again = eager_decode(model, cache, tables, lengths, next_tokens)
    torch.testing.assert_close(again, want)
    width = max(len(t) for t in tables) + 1
    padded = [t + [cache.scratch_block] * (width - len(t)) for t in tables] + [[cache.scratch_block] * width]
    slots = [padded[r][n // 16] * 16 + n % 16 for r, n in enumerate(lengths)] + [cache.scratch_block * 16]
    before = [k.clone() for k in cache.k]
    logits, counts = graph(
        torch.cat([next_tokens, torch.tensor([0])]),  # one padding row
        torch.tensor(lengths + [0]),
        torch.tensor(padded),
        torch.tensor(slots),
        torch.tensor([1.0] * len(lengths) + [0.0]),
        cache.k,
        cache.v,
    )
    torch.testing.assert_close(logits[: len(lengths)], want, rtol=1e-4, atol=1e-4)
    for layer, k in enumerate(cache.k):  # the padding row wrote the scratch block, nothing else changed
        torch.testing.assert_close(k[: cache.num_blocks], before[layer][: cache.num_blocks])
    if family == "mixtral":
        assert counts.shape == (2, 8) and counts.sum().item() == 2 * 2 * len(lengths)  # layers x top-k x rows
    else:
        assert counts is None


def test_fused_projections_share_storage_with_the_model(tmp_path):
    save_hf_model("llama", tmp_path / "m")
    model = load_model(tmp_path / "m")
    graph = DecodeGraph(model, rotary_positions=16)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    fused_qkv, fused_gate_up = graph.qkv[0][0], graph.gate_up[0]
    assert attn.q_proj.weight.data_ptr() == fused_qkv.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == fused_qkv.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == fused_gate_up.untyped_storage().data_ptr()


def test_int8_models_are_not_compiled(tmp_path):
    save_hf_model("llama", tmp_path / "m")
    assert CompiledDecode.supports(load_model(tmp_path / "m"))
    assert not CompiledDecode.supports(load_model(tmp_path / "m", quantization="int8"))


@torch.inference_mode()
def test_autotuned_graphs_equal_the_eager_forward_and_are_never_shared(tmp_path):
    """Autotuned graphs hold their model's weights as constants (frozen, packed for Inductor's C++ GEMM
    template), so Dynamo must never hand one model's graph to another of the same shapes, nor mix plain and
    tuned graphs. Four models of one architecture, different weights, plain / tuned / tuned / plain: each
    gives its own eager logits, and the tuned ones really used the template."""
    from torch._dynamo.utils import counters

    for seed, autotune in enumerate((False, True, True, False)):
        save_hf_model("llama", tmp_path / str(seed), seed=seed)
        model = load_model(tmp_path / str(seed))
        cache = PagedKVCache(model.config, num_blocks=16, block_size=16)
        tables, next_tokens = prefill(model, cache, [9, 20], seed=3)
        want = eager_decode(model, cache, tables, [9, 20], next_tokens)
        templates = counters["inductor"]["cpp_templated_kernel_counter"]
        compiled = CompiledDecode(model, cache, max_batch_size=2, autotune=autotune)
        got, _ = compiled.run(next_tokens.tolist(), tables, [9, 20])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (counters["inductor"]["cpp_templated_kernel_counter"] > templates) == autotune


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]


def test_engine_with_compiled_decode_equals_peft_for_base_and_adapter_rows(setup):  # noqa: F811
    root, peft_models = setup
    engine, _ = make_engine(root, compile_decode=True, max_batch_size=4)
    try:
        worker = engine.workers["base"]
        compiled = worker.runner.compiled_decode
        assert compiled is not None and compiled.warm and worker.compile_seconds > 0  # compiled before start
        calls = []
        run_compiled = compiled.run
        compiled.run = lambda *args: calls.append(len(args[0])) or run_compiled(*args)
        gen = torch.Generator().manual_seed(11)
        plan = [
            (adapter, torch.randint(3, VOCAB, (n,), generator=gen).tolist())
            for adapter, n in [(None, 5), (None, 17), ("a1", 9), (None, 30), ("a2", 3), (None, 12)]
        ]
        events = run(engine, plan)
        for i, (adapter, prompt) in enumerate(plan):
            assert tokens(events[f"r{i}"]) == expected(peft_models, adapter, prompt), f"request {i} on {adapter}"
        assert calls and max(calls) >= 2, "no decode step ran compiled"
        assert any(present for _, present in compiled.compiled_structures), "adapter rows did not run compiled"
        worker.blocks.check()
    finally:
        engine.stop()


def test_adapters_loaded_after_warm_up_run_compiled_and_exact(setup):  # noqa: F811
    """More slots and a larger rank (dynamic sizes: no new graph), then an adapter on the LM head (a
    projection no resident adapter had: its graph compiles while serving)."""
    root, peft_models = setup
    engine, registry = make_engine(root, adapters=("a1",), compile_decode=True, max_batch_size=4)
    try:
        compiled = engine.workers["base"].runner.compiled_decode
        before = set(compiled.compiled_structures)
        for name in ("a2", "a3", "a4"):  # ranks 8, 2, 16: the stacks grow
            registry.load(name, root / name)
        gen = torch.Generator().manual_seed(13)
        plan = [
            (a, torch.randint(3, VOCAB, (n,), generator=gen).tolist()) for a, n in [("a4", 6), ("a3", 11), (None, 4)]
        ]
        events = run(engine, plan, prefix="grown")
        for i, (adapter, prompt) in enumerate(plan):
            assert tokens(events[f"grown{i}"]) == expected(peft_models, adapter, prompt), f"request {i} on {adapter}"
        assert compiled.compiled_structures == before, "growing the stacks compiled a new graph"
        registry.load("head", root / "head")  # targets lm_head: a new structure
        plan = [("head", plan[0][1]), ("a1", plan[1][1])]
        events = run(engine, plan, prefix="head")
        for i, (adapter, prompt) in enumerate(plan):
            assert tokens(events[f"head{i}"]) == expected(peft_models, adapter, prompt), f"request {i} on {adapter}"
        assert len(compiled.compiled_structures) > len(before)
        # Each compiled structure is a graph of its own (none fell back to eager at Dynamo's entry limit).
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(DecodeGraph.forward.__code__)
        assert len(entries) >= len(compiled.compiled_structures)
    finally:
        engine.stop()


def test_moe_engine_with_compiled_decode_equals_transformers(tmp_path):
    from service.engine import Engine, EngineConfig, ServedModel
    from tests.adapters.test_multi_lora import peft_greedy
    from tests.service.engine_fixtures import tiny_tokenizer

    hf = save_hf_model("mixtral", tmp_path / "moe")
    engine = Engine(EngineConfig(scheduler=SchedulerConfig(compile_decode=True, max_batch_size=2)))
    engine.add_model(ServedModel("base", load_model(tmp_path / "moe"), tiny_tokenizer(), max_model_len=64))
    engine.start()
    try:
        gen = torch.Generator().manual_seed(12)
        plan = [(None, torch.randint(3, VOCAB, (n,), generator=gen).tolist()) for n in (7, 21, 4)]
        events = run(engine, plan)
        for i, (_, prompt) in enumerate(plan):
            assert tokens(events[f"r{i}"]) == peft_greedy(hf, prompt, 8), f"request {i}"
    finally:
        engine.stop()


@pytest.mark.parametrize("draft_kind", ["perfect", "random", "ngram"])
def test_speculative_engine_with_compiled_decode_equals_the_target_alone(draft_kind):
    """A perfect draft (the target itself) is always accepted, so the draft catches up on two tokens per round;
    a random one is mostly rejected; n-gram drafts come from the prompt. Every verification chunk (k + 1 tokens)
    runs in the target's graph as k + 1 decode rows; a draft model's last k - 1 greedy steps run as one chained
    graph call."""
    from models import SamplingConfig, generate
    from service.engine import GenerationRequest, SamplingParams
    from tests.service.engine_fixtures import tiny_model, tiny_tokenizer
    from tests.service.test_speculative import run as run_requests
    from tests.service.test_speculative import spec_engine

    tokenizer = tiny_tokenizer()
    target = tiny_model(tokenizer.vocab_size, seed=1)
    draft = {"perfect": target, "random": tiny_model(tokenizer.vocab_size, seed=2), "ngram": None}[draft_kind]
    method = "ngram" if draft_kind == "ngram" else "draft"
    engine = spec_engine(target, draft, tokenizer, k=3, method=method, compile_decode=True)
    try:
        compiled = engine.workers["t"].runner.compiled_decode
        chunks = []
        run_chunks = compiled.run_chunks
        compiled.run_chunks = lambda tokens, *rest: chunks.append(max(map(len, tokens))) or run_chunks(tokens, *rest)
        chained = []  # rows of each chained call of the draft's k - 1 greedy steps
        if draft is not None:
            draft_graphs = engine.workers["t"].speculative.draft.compiled_decode
            run_chain = draft_graphs.run_greedy_chain
            draft_graphs.run_greedy_chain = lambda tokens, *rest: (
                chained.append(len(tokens)) or run_chain(tokens, *rest)
            )
        # Two at once: 2 x (k + 1) = 8 verification tokens, within the graph's chunk limit.
        prompts = [tokenizer.encode(t) for t in ["hello world hello world", "the lazy dog"]]
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        requests = [GenerationRequest(f"r{i}", "t", p, params) for i, p in enumerate(prompts)]
        out, stats = run_requests(engine, requests)
    finally:
        engine.stop()
    for r in requests:
        assert out[r.request_id] == generate(target, [r.prompt_ids], SamplingConfig(max_new_tokens=16))[0]
    assert sum(s.spec_draft_tokens for s in stats) > 0
    assert max(chunks) >= 2, "no verification chunk ran compiled"
    assert (draft is None) or max(chained) == 2, "the draft's greedy steps did not run chained for both rows"
    if draft_kind == "perfect":
        assert sum(s.spec_accepted_tokens for s in stats) == sum(s.spec_draft_tokens for s in stats)
        assert engine.workers["t"].speculative.draft.compiled_decode.warm
