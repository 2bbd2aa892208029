"""The peers the engine benchmarks are measured against: Hugging Face `transformers` generate (with `peft`
for adapters), one request after another as a user would write them, and the check that the engine's
greedy ids match theirs.

`hf_sequential` returns a `bench.serving.RunResult` (seconds, generated ids, when each token arrived),
so a peer's run sits in the same rows as the engine's. Models are loaded float32 with EOS disabled, so
`generate` runs to exactly `max_tokens`, as the engine's `ignore_eos` requests do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.serving import RunResult


class _TokenTimes:
    """A `generate` streamer that only notes when each put arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_hf(directory: Path) -> Any:
    """The directory loaded by `transformers`, float32, EOS disabled so generate runs to max_new_tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def load_peft(directory: Path, adapters: dict[str, Path]) -> Any:
    """The base loaded by `transformers` with every adapter loaded into one PeftModel (set_adapter picks)."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(load_hf(directory), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


@torch.inference_mode()
def hf_generate(model: Any, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy `generate` of exactly max_tokens; returns the new ids and when each was produced."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])  # (1, T)
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    streamer = _TokenTimes()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer)
    return out[0, len(prompt) :].tolist(), streamer.times[1:]


def hf_sequential(model: Any, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> RunResult:
    """Requests one after another; with a PeftModel, `set_adapter` per request (base: adapters disabled)."""
    outputs, times = [], []
    start = time.perf_counter()
    for prompt, adapter in zip(prompts, adapters, strict=True):
        if adapter is None and hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                ids, when = hf_generate(model, prompt, max_tokens)
        else:
            if adapter is not None:
                model.set_adapter(adapter)
            ids, when = hf_generate(model, prompt, max_tokens)
        outputs.append(ids)
        times.append(when)
    return RunResult(time.perf_counter() - start, outputs, times)


def compare_outputs(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    """How many requests got identical greedy ids, and where the others first diverge."""
    diverge = [
        {"request": i, "first_diff_at": next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))}
        for i, (x, y) in enumerate(zip(ours, theirs, strict=True))
        if x != y
    ]
    return {"requests": len(ours), "identical": len(ours) - len(diverge), "mismatches": diverge[:8]}
