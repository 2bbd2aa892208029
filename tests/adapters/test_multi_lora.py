"""Many adapters in one batch give, per request, exactly what peft gives for that adapter alone."""

from __future__ import annotations

import threading

import pytest
import torch

from adapters.peft_format import AdapterError
from adapters.registry import AdapterCapacityError, AdapterInUseError, AdapterRegistry, RegistryConfig
from models import load_model
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, ServedModel
from tests.models.hf_fixtures import VOCAB, save_hf_model
from tests.service.engine_fixtures import tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = {"a1": 4, "a2": 8, "a3": 2, "a4": 16}


def make_peft_adapter(base_dir, out_dir, rank: int, seed: int, targets=TARGETS):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.15)
    peft_model.save_pretrained(out_dir)
    return peft_model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_lora")
    save_hf_model("mistral", root / "base")
    peft_models = {
        name: make_peft_adapter(root / "base", root / name, rank, seed=i)
        for i, (name, rank) in enumerate(RANKS.items())
    }
    # A task adapter as training/ makes them: on the LM head too.
    peft_models["head"] = make_peft_adapter(root / "base", root / "head", 4, seed=9, targets=["q_proj", "lm_head"])
    return root, peft_models


def peft_greedy(peft_model, prompt, n):
    ids = torch.tensor([prompt])
    out = peft_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kernel", ["segment", "gather"])
def test_mixed_adapter_batch_equals_peft_per_adapter(setup, kernel):
    root, peft_models = setup
    model = load_model(root / "base")
    registry = AdapterRegistry("base", model)
    registry.context.kernel = kernel
    for name in [*RANKS, "head"]:
        registry.load(name, root / name)
    engine = Engine(EngineConfig())
    engine.add_model(ServedModel("base", model, tiny_tokenizer(), max_model_len=64, registry=registry))
    engine.start()
    gen = torch.Generator().manual_seed(5)
    plan = ["a1", "a2", None, "a3", "a4", "a1", None, "head", "a2"]  # 9 requests over 5 adapters + base
    prompts = [
        torch.randint(3, VOCAB, (int(n),), generator=gen).tolist()
        for n in torch.randint(3, 12, (len(plan),), generator=gen)
    ]
    results: dict[str, list[int]] = {}
    finished: set[str] = set()
    done = threading.Event()

    def on_event(event):
        results.setdefault(event.request_id, []).extend(event.token_ids)
        if event.finish_reason:
            finished.add(event.request_id)
            if len(finished) == len(plan):
                done.set()

    try:
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        for i, (adapter, prompt) in enumerate(zip(plan, prompts)):
            engine.submit(GenerationRequest(f"r{i}", "base", prompt, params, adapter=adapter), on_event)
        assert done.wait(60)
    finally:
        engine.stop()
    base_hf = next(iter(peft_models.values()))
    for i, (adapter, prompt) in enumerate(zip(plan, prompts)):
        if adapter is None:
            with base_hf.disable_adapter():
                expected = peft_greedy(base_hf, prompt, 10)
        else:
            expected = peft_greedy(peft_models[adapter], prompt, 10)
        assert results[f"r{i}"] == expected, f"request {i} on {adapter}"
    assert all(info.in_use == 0 for info in registry.resident.values())


def test_registry_lru_eviction_pinning_and_in_use(setup):
    root, _ = setup
    model = load_model(root / "base")
    registry = AdapterRegistry("base", model, RegistryConfig(max_adapters=2))
    registry.load("a1", root / "a1", pinned=True)
    registry.load("a2", root / "a2")
    registry.load("a3", root / "a3")  # evicts a2 (a1 pinned)
    assert list(registry.resident) == ["a1", "a3"] and registry.stats.evictions == 1
    assert registry.acquire("a3")
    with pytest.raises(AdapterCapacityError, match="all are pinned or in use"):
        registry.load("a4", root / "a4")
    with pytest.raises(AdapterInUseError, match="used by 1 request"):
        registry.unload("a3")
    registry.release("a3")
    registry.unload("a3")
    assert list(registry.resident) == ["a1"]
    assert all(
        not layer.ranks or set(layer.ranks) == {registry.resident["a1"].slot} for layer in registry.layers.values()
    )


def test_registry_refuses_what_does_not_fit(setup, tmp_path):
    root, _ = setup
    registry = AdapterRegistry("base", load_model(root / "base"), RegistryConfig(max_lora_rank=8))
    with pytest.raises(AdapterError, match="LoRA rank 16 exceeds max_lora_rank 8"):
        registry.load("a4", root / "a4")
    save_hf_model("llama", tmp_path / "other")  # llama fixture: 4 kv heads, so k/v shapes differ from mistral's 2
    make_peft_adapter(tmp_path / "other", tmp_path / "other_adapter", 4, seed=0)
    with pytest.raises(AdapterError, match="do not fit 'base'"):
        registry.load("x", tmp_path / "other_adapter")
    assert registry.stats.loads["error"] == 2 and not registry.resident
