"""models/ against the reference implementation: tiny random transformers models of each family."""

from __future__ import annotations

import pytest
import torch

from models import AttentionMetadata, KVCache, SamplingConfig, generate, load_model, save_model
from tests.models.hf_fixtures import VOCAB, save_hf_model

FAMILIES = ["llama", "mistral", "qwen2", "mixtral"]
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, directory)
    return request.param, hf, load_model(directory), directory


def random_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_transformers(pair):
    _, hf, ours, _ = pair
    ids = random_ids(3, 21)
    assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=TOL, rtol=0)


@torch.no_grad()
def test_packed_padding_free_batch_equals_each_sequence_alone(pair):
    _, hf, ours, _ = pair
    lengths = [5, 11, 3, 9]
    seqs = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    packed = torch.cat(seqs)[None]  # (1, sum)
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    logits = ours(packed, meta=AttentionMetadata(segment_ids=segments)).logits[0]  # (sum, V)
    start = 0
    for seq in seqs:
        expected = hf(seq[None]).logits[0]
        assert torch.allclose(logits[start : start + len(seq)], expected, atol=TOL, rtol=0)
        start += len(seq)


@torch.no_grad()
def test_prefill_then_cached_decode_equals_full_forward_at_every_step(pair):
    _, _, ours, _ = pair
    ids = random_ids(1, 24)
    full = ours(ids).logits[0]  # (T, V)
    cache = KVCache(ours.config, num_slots=2, max_seq_len=32)
    slot = torch.tensor([cache.allocate()])
    prefill = 10
    meta = AttentionMetadata.for_cache(cache, slot, torch.tensor([0]), torch.tensor([prefill]))
    out = ours(ids[:, :prefill], meta=meta).logits[0]
    assert torch.allclose(out, full[:prefill], atol=TOL, rtol=0)
    for pos in range(prefill, ids.shape[1]):
        meta = AttentionMetadata.for_cache(cache, slot, torch.tensor([pos]), torch.tensor([1]))
        step = ours(ids[:, pos : pos + 1], meta=meta).logits[0, 0]
        assert torch.allclose(step, full[pos], atol=TOL, rtol=0), f"decode step at position {pos}"


@torch.no_grad()
def test_batched_decode_at_different_positions_equals_each_alone(pair):
    _, _, ours, _ = pair
    lengths = [4, 13, 7]
    seqs = [random_ids(1, n + 3, seed=10 + i) for i, n in enumerate(lengths)]
    cache = KVCache(ours.config, num_slots=4, max_seq_len=32)
    slots = torch.tensor([cache.allocate() for _ in seqs])
    # Chunked prefill of different lengths in one padded batch.
    longest = max(lengths)
    batch = torch.zeros(len(seqs), longest, dtype=torch.long)
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        batch[i, :n] = seq[0, :n]
    meta = AttentionMetadata.for_cache(cache, slots, torch.zeros(3, dtype=torch.long), torch.tensor(lengths))
    ours(batch, meta=meta)
    context = torch.tensor(lengths)
    for step in range(3):
        tokens = torch.stack([seq[0, n + step] for seq, n in zip(seqs, lengths)])[:, None]  # (B, 1)
        meta = AttentionMetadata.for_cache(cache, slots, context, torch.ones(3, dtype=torch.long))
        batched = ours(tokens, meta=meta).logits[:, 0]  # (B, V)
        for i, (seq, n) in enumerate(zip(seqs, lengths)):
            alone = ours(seq[:, : n + step + 1]).logits[0, -1]
            assert torch.allclose(batched[i], alone, atol=TOL, rtol=0), f"row {i} step {step}"
        context += 1


@torch.no_grad()
def test_greedy_generation_equals_transformers_generate(pair):
    _, hf, ours, _ = pair
    prompt = random_ids(1, 7, seed=3)
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, prompt.shape[1] :].tolist()
    ours_tokens = generate(ours, [prompt[0].tolist()], SamplingConfig(max_new_tokens=32))[0]
    assert ours_tokens == expected


@torch.no_grad()
def test_batched_generate_equals_each_prompt_alone(pair):
    _, _, ours, _ = pair
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 6)]
    together = generate(ours, prompts, SamplingConfig(max_new_tokens=8))
    for prompt, tokens in zip(prompts, together):
        assert generate(ours, [prompt], SamplingConfig(max_new_tokens=8))[0] == tokens


@torch.no_grad()
def test_checkpoint_saved_by_models_loads_in_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, ours, _ = pair
    save_model(ours, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids(2, 15)
    assert torch.allclose(reloaded(ids).logits, ours(ids).logits, atol=TOL, rtol=0)


@torch.no_grad()
def test_sharded_bfloat16_checkpoint_round_trip(pair, tmp_path):
    _, _, ours, _ = pair
    save_model(ours, tmp_path / "sharded", dtype="bfloat16", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    reloaded = load_model(tmp_path / "sharded")
    assert reloaded.dtype == torch.bfloat16
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name


@torch.no_grad()
def test_math_and_flash_attention_paths_agree(pair):
    _, _, ours, directory = pair
    eager = load_model(directory, attn_implementation="eager")
    ids = random_ids(2, 33)
    assert torch.allclose(eager(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
