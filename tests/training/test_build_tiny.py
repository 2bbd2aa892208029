"""End to end: `build_zoo("tiny")`, then every artifact loads with models/ and with transformers/peft, equal logits."""

import json
import time

import pytest
import torch

from models.checkpoint import load_model
from models.tokenizer import TextTokenizer
from training.build import build_zoo
from training.lora import LoraSpec, apply_lora, load_adapter_weights

MODELS = ["teacher", "student", "moe", "controls/student-scratch", "controls/moe-dense", "draft"]
MODEL_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "README.md",
    "card.json",
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    start = time.perf_counter()
    build_zoo("tiny", str(out), force=False)
    return out, time.perf_counter() - start


@pytest.mark.slow
def test_tiny_build_is_fast_and_complete(zoo):
    out, seconds = zoo
    assert seconds < 60
    summary = json.loads((out / "zoo.json").read_text())
    assert set(summary["models"]) == {"teacher", "student", "moe"}
    assert len(summary["adapters"]) >= 4
    assert summary["distillation_vs_control"]["same_tokens"] and summary["moe_vs_dense"]["same_tokens"]
    for name in MODELS:
        for f in MODEL_FILES:
            assert (out / name / f).is_file(), (name, f)
        card = json.loads((out / name / "card.json").read_text())
        for key in (
            "parameters",
            "bytes_on_disk",
            "training_tokens",
            "training_seconds",
            "val_bits_per_byte",
            "command",
        ):
            assert key in card, (name, key)
    for name in summary["adapters"]:
        assert (out / "adapters" / name / "adapter_config.json").is_file()
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file()
    assert "expert_load_val" in json.loads((out / "moe" / "card.json").read_text())["router"]
    draft = json.loads((out / "draft" / "card.json").read_text())
    assert draft["layers"] == 1 and 0 <= draft["greedy_agreement_with_teacher"]["draft"] <= 1
    # A second build skips everything.
    start = time.perf_counter()
    build_zoo("tiny", str(out), force=False)
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_every_artifact_loads_in_transformers_and_peft_with_equal_logits(zoo):
    import peft
    import transformers

    out, _ = zoo
    ids = torch.randint(3, 200, (2, 16))
    for name in MODELS:
        ours = load_model(out / name)(ids).logits
        hf = transformers.AutoModelForCausalLM.from_pretrained(out / name).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "student")
    tok = TextTokenizer.load(out / "student")
    assert hf_tok("upper: c a t =")["input_ids"] == tok.encode("upper: c a t =")
    assert hf_tok.eos_token == "<|eos|>" and hf_tok.chat_template
    summary = json.loads((out / "zoo.json").read_text())
    for entry in summary["adapters"].values():
        adapter_dir = out / entry["path"]
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        model = load_model(out / entry["base"])
        apply_lora(
            model,
            LoraSpec(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=tuple(config["target_modules"])),
        )
        load_adapter_weights(model, str(adapter_dir))
        ours = model.eval()(ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(out / entry["base"]).eval()
        loaded = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ours, rtol=1e-4, atol=1e-4)
