"""int8 weight quantization: error bounds, kernels, dense and MoE models, checkpoints, refusals, LoRA, engine."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open
from torch import nn

from adapters.peft_format import AdapterConfig, write_adapter
from adapters.registry import AdapterRegistry
from models import CausalLM, CheckpointError, ModelConfig, SamplingConfig, generate, load_model, save_model
from models.int8_kernels import choose, int8_matmul
from models.quantization import (
    QuantizationConfig,
    QuantizationError,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTiedHead,
    dequantize,
    describe,
    quantize_model,
    quantize_weight,
    weight_bytes,
)
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, ServedModel
from tests.service.engine_fixtures import tiny_model, tiny_tokenizer

VOCAB = 300


def dense(intermediate: int = 96, tied: bool = False, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=tied,
    )
    return CausalLM(config).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


IDS = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))


def test_per_channel_error_is_at_most_half_a_step():
    w = torch.randn(37, 50) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different ranges
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (37,) and int(q.abs().max()) == 127
    assert torch.all((dequantize(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.all(q[5] == 0)


@pytest.mark.parametrize("kernel", ["weight_only", "dynamic", "dequant", "auto"])
@pytest.mark.parametrize("rows,k", [(1, 64), (4, 64), (33, 64), (1, 88), (4, 88), (40, 88)])
def test_kernels_match_the_dequantized_reference(kernel, rows, k):
    # k = 88 is not a multiple of 16: the CPU weight-only kernel would crash there with > 1 row, so it is
    # routed to the dynamic kernel (this test would die with a segmentation fault otherwise).
    gen = torch.Generator().manual_seed(rows * k)
    w = torch.randn(72, k, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    q, scale = quantize_weight(w)
    expected = x @ dequantize(q, scale).T
    got = int8_matmul(x, q, scale, scale.bfloat16(), kernel)
    tolerance = 1e-5 if choose(kernel, rows, k, 72, x.device, 8) == "dequant" else 2e-2  # bf16 / int8 activations
    assert got.shape == (rows, 72) and rel_err(got, expected) < tolerance
    assert rel_err(got, x @ w.T) < 3e-2


def test_auto_kernel_choice_on_cpu():
    cpu = torch.device("cpu")
    assert choose("auto", 1, 128, 4096, cpu, 8) == "weight_only"
    assert choose("auto", 32, 128, 4096, cpu, 8) == "dynamic"  # a large weight at many rows
    assert choose("auto", 32, 128, 344, cpu, 8) == "dequant"  # a small one
    assert choose("auto", 1, 344, 128, cpu, 8) == "dequant"  # K % 16 != 0
    assert choose("auto", 1, 344, 4096, cpu, 8) == "dynamic"
    assert choose("weight_only", 2, 344, 64, cpu, 8) == "dynamic"


@pytest.mark.parametrize("intermediate", [96, 88])
def test_dense_model_quantized_close_to_float(intermediate):
    model = dense(intermediate)
    reference, float_bytes = logits(model, IDS), weight_bytes(model)
    quantize_model(model, QuantizationConfig())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, QuantizedLinear) for m in linears)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.dtype == torch.float32 and describe(model) == {"dtype": "float32", "quantization": "int8"}
    assert rel_err(logits(model, IDS), reference) < 0.05
    assert float_bytes / weight_bytes(model) > 3.5
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(model)


def test_moe_experts_quantized_router_float_by_default():
    model = tiny_model(VOCAB, seed=2, moe=True)
    reference = logits(model, IDS)
    quantize_model(model, "int8")
    block = model.model.layers[0].block_sparse_moe
    assert all(isinstance(e.w1, QuantizedLinear) and isinstance(e.w2, QuantizedLinear) for e in block.experts)
    assert type(block.gate) is nn.Linear
    # A token whose top-2 experts change (a near tie in the router) moves a lot; most must not.
    got = logits(model, IDS)
    per_token = (got - reference).norm(dim=-1) / reference.norm(dim=-1)  # (B, T)
    assert per_token.median() < 0.08  # random weights (std 0.2) amplify: pure weight rounding alone gives ~0.04
    routed = tiny_model(VOCAB, seed=2, moe=True)
    quantize_model(routed, QuantizationConfig(quantize_router=True))
    assert isinstance(routed.model.layers[0].block_sparse_moe.gate, QuantizedLinear)


def test_lm_head_and_embeddings_can_stay_float():
    model = dense()
    quantize_model(model, QuantizationConfig(quantize_lm_head=False, quantize_embeddings=False))
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)
    with pytest.raises(QuantizationError, match="share one weight"):
        quantize_model(dense(tied=True), QuantizationConfig(quantize_lm_head=False))


@pytest.mark.parametrize("moe,tied", [(False, False), (False, True), (True, False)])
def test_save_load_round_trip(tmp_path, moe, tied):
    model = tiny_model(VOCAB, seed=3, moe=True) if moe else dense(tied=tied)
    save_model(model, tmp_path / "float")
    quantize_model(model)
    expected = logits(model, IDS)
    save_model(model, tmp_path / "int8")
    raw = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "modelserve-int8"
    with safe_open(str(tmp_path / "int8" / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float32
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.int8
    assert ("lm_head.weight" in names) != tied and ("lm_head.weight_scale" in names) != tied
    loaded = load_model(tmp_path / "int8")
    assert torch.equal(logits(loaded, IDS), expected)
    if tied:
        assert isinstance(loaded.lm_head, QuantizedTiedHead)
    # Quantizing at load gives the same model as quantizing after load.
    assert torch.equal(logits(load_model(tmp_path / "float", quantization="int8"), IDS), expected)
    float_size = (tmp_path / "float" / "model.safetensors").stat().st_size
    assert float_size / (tmp_path / "int8" / "model.safetensors").stat().st_size > 3.0  # tiny: scales weigh more


def test_quantized_checkpoint_in_bfloat16(tmp_path):
    model = dense()
    quantize_model(model)
    save_model(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    assert rel_err(logits(loaded, IDS).float(), logits(model, IDS)) < 0.05


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fp8", "something-new"])
def test_foreign_quantized_checkpoints_refused_by_name(tmp_path, method):
    save_model(dense(), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=f"quant_method '{method}' is not supported"):
        load_model(tmp_path)


def test_bad_int8_checkpoints_refused(tmp_path):
    model = dense()
    quantize_model(model)
    save_model(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**raw, "quantization_config": {**raw["quantization_config"], "bits": 4}})
    )
    with pytest.raises(CheckpointError, match="bits=4"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="quantization 'fp8' is not supported"):
        load_model(tmp_path, quantization="fp8")


def test_float_weights_into_an_int8_checkpoint_are_refused(tmp_path):
    save_model(dense(), tmp_path)  # float tensors ...
    model = dense()
    quantize_model(model)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization_config"] = model.quantization.to_dict()  # ... under a config that says int8
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="does not use|missing"):
        load_model(tmp_path)


# ---- LoRA on a quantized base ----
def make_adapter(directory, seed: int, targets=("q_proj", "v_proj", "up_proj", "down_proj", "lm_head")):
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "q_proj": (64, 64),
        "v_proj": (64, 32),
        "up_proj": (64, 96),
        "down_proj": (96, 64),
        "lm_head": (64, VOCAB),
    }
    tensors = {}
    for layer in range(2):
        for target in targets:
            fan_in, fan_out = shapes[target]
            prefix = "lm_head" if target == "lm_head" else model_path(layer, target)
            tensors[f"{prefix}.lora_A"] = torch.randn(4, fan_in, generator=gen) * 0.3
            tensors[f"{prefix}.lora_B"] = torch.randn(fan_out, 4, generator=gen) * 0.3
    write_adapter(directory, AdapterConfig(r=4, lora_alpha=8, target_modules=list(targets)), tensors)
    return directory


def model_path(layer: int, target: str) -> str:
    part = "self_attn" if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return f"model.layers.{layer}.{part}.{target}"


def with_adapters(model: CausalLM, tmp_path) -> AdapterRegistry:
    registry = AdapterRegistry("base", model)
    for i, name in enumerate(("x", "y")):
        path = tmp_path / name
        if not path.exists():
            make_adapter(path, seed=10 + i)
        registry.load(name, path)
    return registry


def adapter_logits(registry: AdapterRegistry, model: CausalLM, ids: torch.Tensor, rows: list[str | None]):
    with registry.activate(rows, ids.shape[1]):
        return logits(model, ids)


def test_lora_on_a_quantized_base_matches_float_base_plus_adapter(tmp_path):
    float_model = dense()
    quantized = quantize_model(dense(), QuantizationConfig(kernel="dynamic"))
    float_registry, int8_registry = with_adapters(float_model, tmp_path), with_adapters(quantized, tmp_path)
    assert isinstance(int8_registry.layers["lm_head"].base, QuantizedLinear)
    assert int8_registry.dtype == torch.float32  # the adapters stay full precision
    # int8 tolerance: what quantizing costs the base alone (full-precision adapters add no error of their own).
    base_error = rel_err(logits(quantized, IDS), logits(float_model, IDS))
    assert base_error < 0.05
    for name in ("x", "y"):
        expected = adapter_logits(float_registry, float_model, IDS, [name] * 3)
        got = adapter_logits(int8_registry, quantized, IDS, [name] * 3)
        base_only = adapter_logits(int8_registry, quantized, IDS, [None] * 3)
        assert rel_err(got, expected) < 2 * base_error
        assert rel_err(got, base_only) > 0.2  # the adapter did apply
    # A mixed batch (sorted by adapter, as the runner sends it) equals each adapter run on its own rows:
    # the dynamic kernel quantizes each row by itself, so rows do not influence each other.
    mixed = adapter_logits(int8_registry, quantized, IDS, ["x", "x", "y"])
    alone_x = adapter_logits(int8_registry, quantized, IDS[:2], ["x", "x"])
    alone_y = adapter_logits(int8_registry, quantized, IDS[2:], ["y"])
    torch.testing.assert_close(mixed, torch.cat([alone_x, alone_y]), rtol=1e-5, atol=1e-5)


# ---- the engine serves a quantized model as its own eager forward decides ----
def run_engine(served: ServedModel, prompts: list[list[int]], max_tokens: int, adapter=None) -> list[list[int]]:
    engine = Engine(EngineConfig())
    engine.add_model(served)
    engine.start()
    results: dict[str, list[int]] = {}
    finished = threading.Event()
    done: set[str] = set()

    def on_event(event):
        results.setdefault(event.request_id, []).extend(event.token_ids)
        if event.finish_reason:
            done.add(event.request_id)
            if len(done) == len(prompts):
                finished.set()

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.submit(GenerationRequest(f"r{i}", served.name, prompt, params, adapter=adapter), on_event)
        assert finished.wait(60)
    finally:
        engine.stop()
    return [results[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("moe", [False, True])
def test_engine_serving_a_quantized_model_equals_its_eager_forward(tmp_path, moe):
    model = tiny_model(VOCAB, seed=4, moe=moe)
    quantize_model(model)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    prompt = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = generate(loaded, [prompt], SamplingConfig(max_new_tokens=12))[0]
    served = ServedModel("q", loaded, tiny_tokenizer(), max_model_len=64)
    assert run_engine(served, [prompt], 12) == [expected]
